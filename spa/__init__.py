"""SPA - Structurally Prune Anything.

    import spa
    result = spa.prune("model.onnx", ratio=0.3, output="small.onnx")

or step by step::

    model = spa.load("model.onnx")
    dg = spa.dependency_graph(model)          # dg.groups, dg.blocked_groups, dg.barriers
    scores = spa.score(dg, "l2")
    plan = spa.make_plan(dg, scores, ratio=0.3, round_to=8)
    small = spa.apply_plan(model, plan)       # verified copy; `model` is untouched
    spa.save(small, "small.onnx")
"""

from __future__ import annotations

from spa.api import (
    apply_plan,
    collect_stats,
    dependency_graph,
    export_plan,
    from_pretrained,
    load,
    load_module,
    make_plan,
    save,
    save_module,
    score,
)
from spa.depgraph import Barrier, DependencyGraph
from spa.dims import Dim, IndexMap
from spa.errors import (
    ArgumentError,
    EquivalenceError,
    FrontendError,
    PlanError,
    SpaError,
    UnsupportedModelError,
    ValidationError,
)
from spa.groups import BlockedGroup, Group, Member
from spa.pipeline import PruneResult, prune
from spa.plan import GroupPlan, Plan
from spa.sensitivity_report import SensitivityResult, sensitivity

__version__ = "0.1.0"

__all__ = [
    "ArgumentError", "Barrier", "BlockedGroup", "DependencyGraph", "Dim", "EquivalenceError", "FrontendError",
    "Group", "GroupPlan", "IndexMap", "Member", "Plan", "PlanError", "PruneResult", "SensitivityResult", "SpaError",
    "UnsupportedModelError", "ValidationError", "apply_plan", "collect_stats", "dependency_graph", "export_plan",
    "from_pretrained", "load", "load_module", "make_plan", "prune", "save", "save_module", "score", "sensitivity",
]

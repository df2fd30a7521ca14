"""Public API: load -> dependency graph -> scores -> plan -> apply -> save, and ``prune``.

Passes and frontends are imported inside the functions: ``import spa`` stays light and the
core never imports them at module import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import onnx
import onnx_ir as ir

from spa.depgraph import DependencyGraph
from spa.errors import ArgumentError, SpaError, ValidationError
from spa.plan import GroupPlan, Plan
from spa.progress import SILENT, Progress


def load(source) -> ir.Model:
    """Load an ONNX model (path, bytes, ModelProto or onnx_ir.Model) and canonicalize it.

    The source is never modified: an onnx_ir.Model is cloned first.
    """
    from spa.frontends.onnx import load as load_onnx
    from spa.passes.canonicalize import CanonicalizePass

    model = load_onnx(source)
    if isinstance(source, ir.Model):
        model = model.clone()
    CanonicalizePass()(model)
    return model


def dependency_graph(model: ir.Model) -> DependencyGraph:
    """Dims, couplings, groups and barriers of a loaded model."""
    return DependencyGraph(model)


def score(dg: DependencyGraph, criterion: str = "l1", reduction: str = "mean",
          normalization: str = "mean", seed: int = 0):
    """Channel scores of every group (see ``spa.importance``)."""
    from spa.passes.score import score_groups

    return score_groups(dg, criterion, reduction, normalization, seed)


def make_plan(dg: DependencyGraph, scores, ratio: float, global_pruning: bool = False,
              round_to: int = 1, protect: Iterable[str] = (), kinds: Iterable[str] | None = None,
              gqa: str = "kv") -> Plan:
    """Channels to keep per group (only groups of ``kinds`` when given: heads/channels/hidden;
    ``gqa``: kv / q / both, how GQA heads groups are pruned, see ``spa.passes.allocate``)."""
    from spa.passes.allocate import allocate

    return allocate(dg, scores, ratio, global_pruning, round_to, tuple(protect),
                    kinds=None if kinds is None else tuple(kinds), gqa=gqa)


def _apply(model: ir.Model, plan: Plan) -> ir.Model:
    from spa.passes.apply_plan import ApplyPlanPass
    from spa.passes.cleanup import CleanupPass

    out = model.clone()
    ApplyPlanPass(plan)(out)
    CleanupPass()(out)
    return out


def apply_plan(model: ir.Model, plan: Plan, verify: bool = True, input_shapes: dict | None = None,
               progress: Progress = SILENT) -> ir.Model:
    """A pruned copy of ``model``; verified unless ``verify=False`` (raises ValidationError)."""
    with progress.step(f"applying plan ({len(plan.pruned_groups)} groups pruned)"):
        out = _apply(model, plan)
    if verify:
        with progress.step("verifying (checker, shape inference, onnxruntime run)"):
            _verify_or_blame(out, model, plan, input_shapes)
    return out


def _verify_or_blame(out: ir.Model, reference: ir.Model, plan: Plan, input_shapes, run: bool = True):
    from spa.passes.verify import verify

    try:
        return verify(out, reference, input_shapes, run=run)
    except ValidationError as exc:
        for gp in plan.pruned_groups:
            single = Plan(tuple(g if g.key == gp.key else GroupPlan(g.key, g.size, tuple(range(g.size)))
                                for g in plan.groups))
            try:
                verify(_apply(reference, single), reference, input_shapes, run=run)
            except (ValidationError, SpaError) as one:
                raise ValidationError(
                    f"pruning group '{gp.key}' makes the model invalid ({one}); nothing was written. "
                    f"Keep it whole with --protect '{gp.key.rsplit(':', 1)[0]}' and report the model"
                ) from exc
        raise


def save(model: ir.Model, path: str | os.PathLike) -> Path:
    """Write a model atomically."""
    from spa.io import save as save_model

    return save_model(model, path)


@dataclass
class PruneResult:
    """The pruned model, the plan that made it and the analysis of the input."""

    model: ir.Model
    plan: Plan
    graph: DependencyGraph
    verify_report: object = None
    saved_to: Path | None = None
    notes: list = field(default_factory=list)

    @property
    def proto(self) -> onnx.ModelProto:
        return ir.serde.serialize_model(self.model)

    def save(self, path: str | os.PathLike) -> Path:
        self.saved_to = save(self.model, path)
        return self.saved_to


def prune(
    model,
    ratio: float = 0.5,
    *,
    criterion: str = "l1",
    reduction: str = "mean",
    normalization: str = "mean",
    global_pruning: bool = False,
    round_to: int = 1,
    protect: Iterable[str] = (),
    kinds: Iterable[str] | None = None,
    gqa: str = "kv",
    seed: int = 0,
    output: str | os.PathLike | None = None,
    plan_out: str | os.PathLike | None = None,
    verify: bool = True,
    run: bool = True,
    input_shapes: dict | None = None,
    progress: Progress = SILENT,
) -> PruneResult:
    """Prune ``model`` (a path, bytes, onnx.ModelProto or onnx_ir.Model).

    ``ratio`` is the fraction of channels removed from every group (or from all groups
    together with ``global_pruning``). Returns a :class:`PruneResult`; with ``output`` the
    pruned model is also written (atomically, only once it verified). ``run=False`` keeps the
    checker and strict shape inference but skips the onnxruntime run. ``kinds`` prunes only
    groups of those kinds: ``heads`` (attention, whole KV groups), ``channels`` (FFN, conv) and
    ``hidden`` (the residual stream; valid but not exact, as norms over it change). ``gqa``
    (``kv``, ``q``, ``both``) says whether GQA heads groups lose whole K/V groups, query heads
    within every K/V group, or both.
    """
    if (output is not None and isinstance(model, (str, os.PathLike))
            and Path(output).resolve() == Path(model).resolve()):
        raise ArgumentError("the output path is the input model; SPA never overwrites its input")
    with progress.step("loading and canonicalizing"):
        loaded = load(model)
    with progress.step("discovering groups"):
        dg = dependency_graph(loaded)
        groups = dg.groups
    progress.note(f"{len(groups)} prunable groups, {len(dg.blocked_groups)} blocked")
    with progress.step(f"scoring ({criterion})"):
        scores = score(dg, criterion, reduction, normalization, seed)
    plan = make_plan(dg, scores, ratio, global_pruning, round_to, protect, kinds, gqa)
    plan = Plan(plan.groups, {**plan.meta, "reduction": reduction, "normalization": normalization, "seed": seed})
    pruned = apply_plan(loaded, plan, verify=False, progress=progress)
    result = PruneResult(pruned, plan, dg)
    if verify:
        what = "checker, shape inference" + (", onnxruntime run" if run else "")
        with progress.step(f"verifying ({what})"):
            result.verify_report = _verify_or_blame(pruned, loaded, plan, input_shapes, run)
            result.notes.extend(result.verify_report.notes)
    if plan_out is not None:
        plan.to_json(plan_out)
    if output is not None:
        with progress.step(f"writing {output}"):
            result.save(output)
    return result

"""Pass: bring a model from any exporter to the form the rules expect.

Initializers out of the graph inputs, Constant nodes lifted to initializers, local functions
inlined, constants folded (shape arithmetic, Identity/Dropout) by onnxscript's optimizer,
unused nodes removed, shapes inferred (and completed where inference stops). All steps are onnx-ir / onnxscript passes.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import fold_constants

from spa.depgraph import CANONICAL_MARK
from spa.errors import run_pass
from spa.ops import registry
from spa.passes.infer_shapes import InferShapesPass
from spa.passes.complete_shapes import CompleteShapesPass
from spa.passes.fold_shape_reads import FoldShapeReadsPass
from spa.passes.symbolic_shapes import SymbolicShapesPass

log = logging.getLogger("spa")


#: Ops that only convert or lay out a weight (their spec's ``weight_view``). Their output keeps
#: the weight's values, and the dependency graph sees through them to the parameter name.
WEIGHT_VIEW_OPS = registry.weight_view_ops()


def _keep_weight_casts(node: ir.Node) -> bool | None:
    """Never fold a cast or layout op of an initializer (Cast, Transpose, Unsqueeze, Reshape,
    ...): folding would store a converted copy of the weight (fp16 -> fp32 doubles it) under a
    new name, losing the parameter's name that group keys and the torch frontend rely on. Rules
    see through them instead; onnxruntime folds them when it loads the model."""
    x = node.inputs[0] if node.op_type in WEIGHT_VIEW_OPS and node.inputs else None
    if x is not None and x.is_initializer() and x.dtype is not None and x.dtype.is_floating_point():
        return False  # integer constants (shape arithmetic) still fold
    return None


class FoldConstantsPass(ir.passes.InPlacePass):
    """onnxscript's constant folding (shape arithmetic, Identity, Dropout in inference).

    ``params``: names of the model's own (floating-point) initializers, its parameters. A node
    that reads one is never folded: folding would bake the parameter into a new, unnamed
    constant (BERT's token-type embedding gathered at constant indices, a class token expanded
    to a static batch), and the parameter could not be traced or mapped back by name.
    """

    def __init__(self, params: frozenset[str] = frozenset()):
        super().__init__()
        self.params = params

    def _should_fold(self, node: ir.Node) -> bool | None:
        if any(v is not None and v.name in self.params for v in node.inputs):
            return False
        return _keep_weight_casts(node)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # A node the reference evaluator cannot fold (e.g. a mask built for another length) is
        # left as it is; its warning is noise to a user, so it shows only with spa -v.
        folding_log = logging.getLogger("onnxscript.optimizer._constant_folding")
        level = folding_log.level
        if not log.isEnabledFor(logging.DEBUG):
            folding_log.setLevel(logging.ERROR)
        try:
            result = fold_constants(model, onnx_shape_inference=False, should_fold=self._should_fold)
        finally:
            folding_log.setLevel(level)
        return ir.passes.PassResult(model, bool(result.modified))


class UntieUniformInitializersPass(ir.passes.InPlacePass):
    """Give each use of a shared, uniform-valued weight its own copy.

    Exporters deduplicate equal initializers (TorchScript shares every all-zero bias of a
    freshly initialized transformer). Sharing is a real tie for a learned tensor (tied
    embeddings), but a tensor whose elements are all equal carries no per-channel values, and
    sharing it would couple unrelated axes (a head's bias with the hidden size's).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        graph = model.graph
        for v in list(graph.initializers.values()):
            uses = v.uses()
            if len(uses) < 2 or v.const_value is None or v.shape is None or len(v.shape) == 0:
                continue
            if not v.dtype.is_floating_point() or v.const_value.size < 2:
                continue
            arr = v.const_value.numpy()
            if not (arr == arr.flat[0]).all():
                continue
            for k, (node, index) in enumerate(uses[1:], start=1):
                name = f"{v.name}_spa_untied_{k}"
                copy = ir.Value(name=name, shape=ir.Shape(arr.shape), type=v.type,
                                const_value=ir.tensor(arr.copy(), name=name))
                graph.register_initializer(copy)
                node.replace_input_with(index, copy)
            modified = True
        return ir.passes.PassResult(model, modified)


def _fresh(name: str, used: set[str]) -> str:
    k, new = 1, name
    while new in used:
        new, k = f"{name}_{k}", k + 1
    used.add(new)
    return new


class UniqueNamesPass(ir.passes.InPlacePass):
    """Value and node names unique across the whole model, subgraphs included.

    onnx-ir's NameFixPass makes names unique within a graph and its parents only: the two
    branches of an If may both hold a ``W`` or a node ``conv``. Dims, fix-ups and masks are
    keyed by name, so a later duplicate (in graph order, the main graph first) is renamed.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        value_names: set[str] = set()
        node_names: set[str] = set()
        seen: set[int] = set()
        modified = False
        for graph in model.graphs():
            values = list(graph.inputs) + list(graph.initializers.values())
            values += [v for node in graph for v in node.outputs]
            for v in values:
                if id(v) in seen or not v.name:
                    continue
                seen.add(id(v))
                if v.name in value_names:
                    v.name = _fresh(v.name, value_names)
                    modified = True
                else:
                    value_names.add(v.name)
            for node in graph:
                if node.name in node_names:
                    node.name = _fresh(node.name, node_names)
                    modified = True
                elif node.name:
                    node_names.add(node.name)
        return ir.passes.PassResult(model, modified)


class IdentityEliminationPass(common.IdentityEliminationPass):
    """onnx-ir's Identity elimination, except where a subgraph outputs an outer value.

    Upstream replaces ``y = Identity(x)`` by ``x`` even when ``y`` is a subgraph's output and
    ``x`` lives in an enclosing graph; ``x`` then becomes that subgraph's output, and a second
    branch doing the same raises "Value ... is already an output of a different graph"
    (TorchScript exports of nested ``If`` whose branches pass an input through). Such an
    Identity is kept; every other one is eliminated as upstream does.
    """

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        x = node.inputs[0] if len(node.inputs) == 1 else None
        y = node.outputs[0] if len(node.outputs) == 1 else None
        if x is not None and y is not None and node.graph is not None and y in node.graph.outputs:
            if x.graph is not node.graph:
                return False
        return super()._try_eliminate_identity_node(node)


class CanonicalizePass(ir.passes.InPlacePass):
    """Runs the canonicalization sequence in place and marks the model as canonical (analyses
    refuse a model without the mark)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        params = frozenset(name for g in model.graphs() for name, v in g.initializers.items()  # bodies too
                           if v.dtype is not None and v.dtype.is_floating_point())
        params |= frozenset(v.name for v in model.graph.inputs if v.name in model.graph.initializers)
        steps = (
            common.NameFixPass(),
            UniqueNamesPass(),
            common.RemoveInitializersFromInputsPass(),
            common.InlinePass(),
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            FoldConstantsPass(params),
            IdentityEliminationPass(),
            common.RemoveUnusedNodesPass(),
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            UntieUniformInitializersPass(),
            UniqueNamesPass(),  # values folding created in sibling bodies
            common.TopologicalSortPass(),
            InferShapesPass(),
            CompleteShapesPass(),
        )
        modified = False
        for step in steps:  # one at a time, so an upstream failure names its pass
            modified |= run_pass(step, model, "canonicalization").modified
        if run_pass(SymbolicShapesPass(), model, "canonicalization").modified:
            modified = True  # new sizes may solve more reshapes: complete again (else nothing would change)
            run_pass(CompleteShapesPass(), model, "canonicalization")
        if run_pass(FoldShapeReadsPass(), model, "canonicalization").modified:  # needs the shapes
            modified = True
            for step in (FoldConstantsPass(params), common.RemoveUnusedNodesPass(),
                         common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)):
                run_pass(step, model, "canonicalization")
        model.meta[CANONICAL_MARK] = True
        return ir.passes.PassResult(model, modified)

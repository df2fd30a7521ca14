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

from spa.passes.complete_shapes import CompleteShapesPass

log = logging.getLogger("spa")


def _keep_weight_casts(node: ir.Node) -> bool | None:
    """Never fold Cast/Identity of an initializer: folding would store a converted copy of the
    weight (fp16 -> fp32 doubles it) under a new name. Rules see through them instead."""
    if node.op_type in ("Cast", "Identity") and node.inputs and node.inputs[0] is not None \
            and node.inputs[0].is_initializer():
        return False
    return None


class FoldConstantsPass(ir.passes.InPlacePass):
    """onnxscript's constant folding (shape arithmetic, Identity, Dropout in inference)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = fold_constants(model, onnx_shape_inference=False, should_fold=_keep_weight_casts)
        return ir.passes.PassResult(model, bool(result.modified))


class CanonicalizePass(ir.passes.InPlacePass):
    """Runs the canonicalization sequence in place."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        seq = ir.passes.Sequential(
            common.NameFixPass(),
            common.RemoveInitializersFromInputsPass(),
            common.InlinePass(),
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            FoldConstantsPass(),
            common.IdentityEliminationPass(),
            common.RemoveUnusedNodesPass(),
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common.TopologicalSortPass(),
            common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True),
            CompleteShapesPass(),
        )
        result = seq(model)
        return ir.passes.PassResult(model, result.modified)

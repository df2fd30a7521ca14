"""Pass: remove what a rewrite left unused (nodes, initializers, opsets)."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common


class CleanupPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        seq = ir.passes.Sequential(
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.TopologicalSortPass(),
        )
        return ir.passes.PassResult(model, seq(model).modified)

"""Pass: remove what a rewrite left unused (nodes, initializers, opsets)."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common


class RemoveUnusedBodyInitializersPass(ir.passes.InPlacePass):
    """Initializers of If / Loop / Scan bodies that nothing reads any more (a shape constant a
    fix-up replaced); onnx-ir's RemoveUnusedNodesPass clears those of the main graph only."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in model.graphs():
            if graph is model.graph:
                continue
            outputs = set(map(id, graph.outputs))
            for name, v in list(graph.initializers.items()):
                if not v.uses() and id(v) not in outputs:
                    graph.initializers.pop(name)
                    modified = True
        return ir.passes.PassResult(model, modified)


class CleanupPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        seq = ir.passes.Sequential(
            common.RemoveUnusedNodesPass(),
            RemoveUnusedBodyInitializersPass(),
            common.RemoveUnusedFunctionsPass(),
            common.TopologicalSortPass(),
        )
        return ir.passes.PassResult(model, seq(model).modified)

"""Pass: remove residual branches. Each Add ``y = x + f(x)`` closing a removed branch gives way
to its stream input ``x`` (every reader of ``y`` reads ``x``); the branch's nodes and the
initializers only they read are then dead and cleaned up. Nothing depends on the ops inside."""

from __future__ import annotations

import onnx_ir as ir


class RemoveBlocksPass(ir.passes.InPlacePass):
    """Remove ``blocks`` (``spa.depth.Block`` or ``spa.plan.BlockPlan``, matched by key)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = tuple(blocks)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from spa.depth import branches_of
        from spa.passes.cleanup import CleanupPass

        if not self.blocks:
            return ir.passes.PassResult(model, False)
        order = {id(n): i for i, n in enumerate(model.graph)}
        # last first: a later branch's stream may be an earlier one's Add output
        for add, x, _ in sorted(branches_of(model, self.blocks), key=lambda b: -order[id(b[0])]):
            y = add.outputs[0]
            if y.is_graph_output():  # the output keeps its name: an Identity of the stream
                ident = ir.Node("", "Identity", [x], num_outputs=1, name=f"{add.name}_spa_bypass")
                model.graph.insert_before(add, ident)
                name = y.name
                ir.convenience.replace_all_uses_with(y, ident.outputs[0], replace_graph_outputs=True)
                y.name = f"{name}_spa_removed"
                ident.outputs[0].name = name
                ident.outputs[0].shape, ident.outputs[0].type = y.shape, y.type
            else:
                ir.convenience.replace_all_uses_with(y, x)
            model.graph.remove(add, safe=True)
        CleanupPass()(model)
        return ir.passes.PassResult(model, True)

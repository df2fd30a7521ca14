"""Pass: give a shape to outputs that ONNX shape inference left without one.

Shape inference stops at ops it cannot see into (custom domains, some function ops such as
GroupNormalization-21). Where the op alone fixes the result, fill it in: shape-preserving ops
copy their input's shape; Conv/ConvTranspose get (batch, channels from the weight, ?, ...).
Unknown entries stay unknown, so the rules still block what they cannot size.
"""

from __future__ import annotations

import onnx_ir as ir

from spa.rules.elementwise import UNARY_OPS

SAME_SHAPE_OPS = UNARY_OPS | frozenset(
    """BatchNormalization InstanceNormalization GroupNormalization LayerNormalization Softmax LogSoftmax
    Hardmax LpNormalization LRN MeanVarianceNormalization PRelu""".split()
)


def _partial(node: ir.Node) -> ir.Shape | None:
    x = node.inputs[0] if node.inputs else None
    if node.domain not in ("", "ai.onnx") or x is None:
        return None
    if node.op_type in SAME_SHAPE_OPS:
        return x.shape
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if node.op_type in ("Conv", "ConvTranspose") and w is not None and w.shape is not None:
        rank = len(w.shape)
        channels = w.shape[0]
        if node.op_type == "ConvTranspose":
            group = node.attributes.get("group")
            g = group.value if group is not None else 1
            channels = w.shape[1] * g if isinstance(w.shape[1], int) else None
        batch = x.shape[0] if x.shape is not None else None
        return ir.Shape([batch, channels] + [None] * (rank - 2))
    return None


class CompleteShapesPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            out = node.outputs[0] if node.outputs else None
            if out is None or out.shape is not None:
                continue
            shape = _partial(node)
            if shape is not None:
                out.shape = shape
                modified = True
        return ir.passes.PassResult(model, modified)

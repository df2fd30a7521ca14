"""Pass: entries read off ``Shape`` that are static become constants.

TorchScript exports compute sizes at run time even where the axis is static (rotary
embeddings' ``x[..., : x.shape[-1] // 2]``), and onnxruntime's optimizer rewrites
``Shape(Transpose(x))`` as ``Gather(Shape(x), perm)``. Constant folding cannot see through
``Shape`` of a tensor with dynamic axes; once shapes are inferred, a ``Gather`` at constant
indices of such a shape vector whose selected axes are static is a constant, and the
arithmetic on it folds (Slice starts and ends become literals the rules can read).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spa.ops.context import static_size


def _shape_entries(node: ir.Node) -> list | None:
    x = node.inputs[0]
    if x is None or x.shape is None:
        return None
    entries = [s if isinstance(s := static_size(d), int) else None for d in x.shape]
    r = len(entries)
    start = node.attributes.get("start")
    end = node.attributes.get("end")
    lo = 0 if start is None else int(start.value)
    hi = r if end is None else int(end.value)
    lo, hi = (min(max(v + r if v < 0 else v, 0), r) for v in (lo, hi))
    return entries[lo:hi]


class FoldShapeReadsPass(ir.passes.InPlacePass):
    """Replace ``Gather`` of a shape vector at constant indices by a constant where every
    selected axis has a static size."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        known: dict[str, list] = {}
        outputs = {v.name for v in graph.outputs}
        modified = False
        for node in list(graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Shape":
                entries = _shape_entries(node)
                if entries is not None:
                    known[node.outputs[0].name] = entries
                continue
            if node.op_type != "Gather" or node.inputs[0] is None or node.inputs[0].name not in known:
                continue
            idx, out = node.inputs[1], node.outputs[0]
            axis = node.attributes.get("axis")
            if idx is None or idx.const_value is None or (axis is not None and int(axis.value) != 0):
                continue
            entries = known[node.inputs[0].name]
            flat = idx.const_value.numpy().astype(np.int64).reshape(-1)
            if any(not -len(entries) <= i < len(entries) for i in flat):
                continue
            picked = [entries[int(i)] for i in flat]
            if idx.const_value.numpy().ndim == 1:
                known[out.name] = picked
            if any(p is None for p in picked) or out.name in outputs:
                continue
            arr = np.array(picked, dtype=np.int64).reshape(idx.const_value.numpy().shape)
            name = f"{out.name}_spa_static"
            value = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.INT64),
                             const_value=ir.tensor(arr, name=name))
            graph.register_initializer(value)
            ir.convenience.replace_all_uses_with(out, value)
            modified = True
        return ir.passes.PassResult(model, modified)

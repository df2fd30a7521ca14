"""Parameter and MAC counts of an ONNX model (MACs of Conv, ConvTranspose, Gemm and MatMul)."""

from __future__ import annotations

import math

import onnx
import onnx_ir as ir

from spa.runtime import concrete_shape

_FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
_FLOAT_PROTO = {int(t) for t in _FLOAT}


def count_params(model: ir.Model) -> int:
    """Elements of floating-point initializers (weights, biases, norm parameters)."""
    return int(sum(math.prod(v.const_value.shape.numpy()) for v in model.graph.initializers.values()
                   if v.const_value is not None and v.const_value.dtype in _FLOAT))


def _static_shapes(model: ir.Model, input_shapes: dict | None) -> dict[str, tuple[int, ...]]:
    proto = ir.serde.serialize_model(model)
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        sym = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
        for d, s in zip(dims, concrete_shape(inp.name, sym, input_shapes)):
            d.Clear()
            d.dim_value = s
    for vi in list(proto.graph.value_info):
        proto.graph.value_info.remove(vi)
    for init in proto.graph.initializer:  # shapes only: no need to carry weights (keep shape constants)
        if init.data_type not in _FLOAT_PROTO:
            continue
        init.ClearField("raw_data")
        init.ClearField("float_data")
        init.data_location = onnx.TensorProto.DEFAULT
        del init.external_data[:]
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    shapes = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    for name, v in model.graph.initializers.items():
        if v.const_value is not None:
            shapes[name] = tuple(v.const_value.shape.numpy())
    return shapes


_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _run_shapes(model: ir.Model, names: list[str], input_shapes: dict | None) -> dict[str, tuple[int, ...]]:
    """Shapes of ``names`` read off one onnxruntime run (where inference cannot follow the
    Shape arithmetic of an export with dynamic axes)."""
    from spa import runtime

    sess = runtime.session_exposing(model, names)
    outs = sess.run(names, runtime.random_feeds(sess, input_shapes))
    return {n: tuple(o.shape) for n, o in zip(names, outs)}


def count_macs(model: ir.Model, input_shapes: dict | None = None) -> int:
    """Multiply-accumulates of one forward pass with concrete input shapes."""
    shapes = _static_shapes(model, input_shapes)
    missing = [v.name for node in model.graph if node.op_type in _MAC_OPS
               for v in (node.inputs[0], node.outputs[0]) if v is not None and v.name not in shapes]
    if missing:
        shapes.update(_run_shapes(model, list(dict.fromkeys(missing)), input_shapes))
    total = 0
    for node in model.graph:
        ins = [shapes.get(v.name) if v is not None else None for v in node.inputs]
        outs = [shapes.get(v.name) for v in node.outputs]
        op = node.op_type
        if op == "Conv" and outs[0] and ins[1]:
            total += math.prod(outs[0]) * math.prod(ins[1][1:])
        elif op == "ConvTranspose" and ins[0] and ins[1]:
            total += math.prod(ins[0]) * math.prod(ins[1][1:])
        elif op == "Gemm" and ins[0] and outs[0]:
            k = ins[0][0] if node.attributes.get("transA") and node.attributes["transA"].value else ins[0][1]
            total += math.prod(outs[0]) * k
        elif op == "MatMul" and ins[0] and outs[0]:
            total += math.prod(outs[0]) * ins[0][-1]
    return int(total)


__all__ = ["count_macs", "count_params"]

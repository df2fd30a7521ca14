"""Parameter and MAC counts of an ONNX model (MACs: each op spec's ``macs``, see ``spa.ops``)."""

from __future__ import annotations

import math

import onnx
import onnx_ir as ir

from spa.ops import model_opsets, spec_of
from spa.ops.quantized import integer_param_sizes
from spa.runtime import concrete_shape

_FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
_FLOAT_PROTO = {int(t) for t in _FLOAT}


def param_elements(model: ir.Model) -> dict[str, int]:
    """Elements of each initializer counted as a parameter (those of If / Loop / Scan bodies
    included): floating-point ones (weights,
    biases, norm parameters, quantization scales) and the integer weights and biases that
    quantized ops read (``integer_param_sizes``)."""
    sizes = {name: int(math.prod(v.const_value.shape.numpy())) for g in model.graphs()
             for name, v in g.initializers.items() if v.const_value is not None and v.const_value.dtype in _FLOAT}
    for g in model.graphs():
        sizes.update(integer_param_sizes(g))
    return sizes


def count_params(model: ir.Model) -> int:
    """Elements of the parameters (:func:`param_elements`)."""
    return int(sum(param_elements(model).values()))


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
    for node in model.graph:  # static shapes the model already holds win: ONNX inference stops at
        for v in node.outputs:  # contrib ops (com.microsoft QLinearAdd) that loading completed
            dims = [getattr(d, "value", d) for d in v.shape] if v.shape is not None else None
            if dims is not None and all(isinstance(d, int) for d in dims):
                shapes[v.name] = tuple(dims)
    for name, v in model.graph.initializers.items():
        if v.const_value is not None:
            shapes[name] = tuple(v.const_value.shape.numpy())
    return shapes




def _run_shapes(model: ir.Model, names: list[str], input_shapes: dict | None) -> dict[str, tuple[int, ...]]:
    """Shapes of ``names`` read off one onnxruntime run (where inference cannot follow the
    Shape arithmetic of an export with dynamic axes)."""
    from spa import runtime

    try:
        sess = runtime.session_exposing(model, names)
        outs = sess.run(names, runtime.random_feeds(sess, input_shapes))
    except runtime.ort_errors():  # onnxruntime cannot run it: those ops' MACs stay uncounted
        return {}
    return {n: tuple(o.shape) for n, o in zip(names, outs)}


def count_macs(model: ir.Model, input_shapes: dict | None = None) -> int:
    """Multiply-accumulates of one forward pass with concrete input shapes."""
    shapes = _static_shapes(model, input_shapes)
    opsets = model_opsets(model)
    counted = [(node, spec.macs) for node in model.graph
               if (spec := spec_of(node, opsets)) is not None and spec.macs is not None]
    missing = [v.name for node, _ in counted for v in (node.inputs[0], node.outputs[0])
               if v is not None and v.name not in shapes]
    if missing:
        shapes.update(_run_shapes(model, list(dict.fromkeys(missing)), input_shapes))
    total = 0
    for node, macs in counted:
        ins = [shapes.get(v.name) if v is not None else None for v in node.inputs]
        outs = [shapes.get(v.name) for v in node.outputs]
        total += macs(node, ins, outs) or 0
    return int(total)


__all__ = ["count_macs", "count_params"]

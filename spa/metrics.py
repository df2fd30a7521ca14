"""Parameter and MAC counts of an ONNX model (MACs: each op spec's ``macs``, see ``spa.ops``)."""

from __future__ import annotations

import contextlib
import functools
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


@contextlib.contextmanager
def _weights_left_out(model: ir.Model):
    """Floating-point initializers stand in as external stubs while the model is serialized for
    shape inference: their shapes are what it needs, copying their values is what costs."""
    swapped = []
    for g in model.graphs():
        for v in g.initializers.values():
            t = v.const_value
            if t is not None and t.dtype in _FLOAT and not isinstance(t, ir.ExternalTensor):
                v.const_value = ir.ExternalTensor("spa-shapes-only", 0, 0, t.dtype, shape=t.shape, name=t.name or "")
                swapped.append((v, t))
    try:
        yield
    finally:
        for v, t in swapped:
            v.const_value = t


def _static_shapes(model: ir.Model, input_shapes: dict | None) -> dict[str, tuple[int, ...]]:
    with _weights_left_out(model):
        proto = ir.serde.serialize_model(model)
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        sym = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
        for d, s in zip(dims, concrete_shape(inp.name, sym, input_shapes)):
            d.Clear()
            d.dim_value = s
    del proto.graph.value_info[:]
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


def _symbol_values(model: ir.Model, input_shapes: dict | None) -> dict[str, int]:
    """The size each symbolic dim of the graph inputs takes in a run with ``input_shapes``
    (a symbol given two sizes is left out)."""
    env: dict[str, int] = {}
    clash = set()
    for v in model.graph.inputs:
        if v.shape is None or v.name in model.graph.initializers:
            continue
        dims = [getattr(d, "value", d) for d in v.shape]
        for d, size in zip(dims, concrete_shape(v.name, dims, input_shapes)):
            if isinstance(d, str):
                if env.setdefault(d, size) != size:
                    clash.add(d)
    return {k: n for k, n in env.items() if k not in clash}


def _evaluated(entry, env: dict[str, int]) -> int | None:
    """A shape entry as a number: an int, an input's symbol, or a product of those (``4*batch``)."""
    if isinstance(entry, int):
        return entry
    if not isinstance(entry, str):
        return None
    out = 1
    for factor in entry.split("*"):
        factor = factor.strip()
        if factor.isdigit():
            out *= int(factor)
        elif factor in env:
            out *= env[factor]
        else:
            return None
    return out


def _symbolic_shapes(model: ir.Model, names: list[str], input_shapes: dict | None) -> dict[str, tuple[int, ...]]:
    """Shapes of ``names`` from the symbolic shapes that loading inferred, the symbols taking
    the graph inputs' sizes (ONNX inference with concrete inputs stops at a reshape computed
    from ``Shape`` in exports with dynamic axes; the symbols followed it)."""
    env = _symbol_values(model, input_shapes)
    wanted = set(names)
    out = {}
    for node in model.graph:
        for v in node.outputs:
            if v.name in wanted and v.shape is not None:
                dims = [_evaluated(getattr(d, "value", d), env) for d in v.shape]
                if all(d is not None for d in dims):
                    out[v.name] = tuple(dims)
    return out


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


def value_shapes(model: ir.Model, names, input_shapes: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of the graph's values with ``input_shapes``: ONNX inference, then for
    ``names`` it left unknown the symbolic shapes loading inferred, then one onnxruntime run."""
    shapes = _static_shapes(model, input_shapes)
    missing = list(dict.fromkeys(n for n in names if n not in shapes))
    if missing:
        shapes.update(_symbolic_shapes(model, missing, input_shapes))
        missing = [n for n in missing if n not in shapes]
    if missing:  # still unknown: one onnxruntime run
        shapes.update(_run_shapes(model, missing, input_shapes))
    return shapes


class Counter:
    """Parameters and MACs of a model, and of the same model with some axes shrunk (what a plan
    that slices only those axes leaves), from one shape inference: a pruned copy need not be
    built to be counted. ``shrunk`` maps (value or initializer name, axis) to the new size."""

    def __init__(self, model: ir.Model, input_shapes: dict | None = None):
        opsets = model_opsets(model)
        self.counted = [(node, spec.macs) for node in model.graph
                        if (spec := spec_of(node, opsets)) is not None and spec.macs is not None]
        self.shapes = value_shapes(model, [v.name for node, _ in self.counted
                                           for v in (node.inputs[0], node.outputs[0]) if v is not None],
                                   input_shapes)
        self.model = model

    @functools.cached_property
    def elements(self) -> dict[str, int]:
        return param_elements(self.model)

    def _shape(self, name: str, shrunk: dict | None):
        shape = self.shapes.get(name)
        if shape is None or not shrunk:
            return shape
        return tuple(shrunk.get((name, axis), d) for axis, d in enumerate(shape))

    def macs(self, shrunk: dict | None = None) -> int:
        total = 0
        for node, macs in self.counted:
            ins = [self._shape(v.name, shrunk) if v is not None else None for v in node.inputs]
            outs = [self._shape(v.name, shrunk) for v in node.outputs]
            total += macs(node, ins, outs) or 0
        return int(total)

    def params(self, shrunk: dict | None = None) -> int:
        total = 0
        for name, n in self.elements.items():
            shape = self.shapes.get(name)
            if shrunk and shape is not None and any((name, a) in shrunk for a in range(len(shape))):
                n = math.prod(self._shape(name, shrunk))
            total += n
        return int(total)


def count_macs(model: ir.Model, input_shapes: dict | None = None) -> int:
    """Multiply-accumulates of one forward pass with concrete input shapes."""
    return Counter(model, input_shapes).macs()


__all__ = ["Counter", "count_macs", "count_params", "value_shapes"]

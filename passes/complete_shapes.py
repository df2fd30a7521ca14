"""Pass: give a shape to outputs that ONNX shape inference left without one.

Shape inference stops at ops it cannot see into (custom domains, some function ops such as
GroupNormalization-21). Where the op alone fixes the result, fill it in: shape-preserving ops
copy their input's shape; Conv/ConvTranspose get (batch, channels from the weight, ?, ...).
Unknown entries stay unknown, so the rules still block what they cannot size.

It also solves Reshape outputs whose shape inference left one entry as a fresh symbol: a
``-1`` in a target computed from ``Shape`` (TorchScript exports with dynamic axes give
``[unk__7, unk__8, unk__9, 16]`` for ``[batch, seq, 4, 16]``). When every other factor cancels
against the input's, the symbol is a whole number; it is replaced throughout the graph.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common  # ShapeInferencePass

from spa.ops import model_opsets, spec_of


def _completed(node: ir.Node, opsets: dict) -> list | None:
    """Output shapes from the op spec's shape completion (None entries: leave as they are)."""
    spec = spec_of(node, opsets)
    if spec is None or spec.shape is None:
        return None
    return spec.shape(node)


def _entry(d):
    if isinstance(d, int):
        return d
    v = getattr(d, "value", None)
    return v if isinstance(v, (int, str)) else None


def _solve_reshape(node: ir.Node) -> tuple[str, int | str] | None:
    """(symbol, value) when the output's only unknown entry of a Reshape is determined by the
    element count: a whole number, or a product with the input's leftover symbols written as
    ``4*batch`` (a fold of ``[batch, 4, ...]``), the form symbolic inference uses."""
    x, y = node.inputs[0], node.outputs[0]
    if x is None or x.shape is None or y.shape is None:
        return None
    xs, ys = [_entry(d) for d in x.shape], [_entry(d) for d in y.shape]
    if any(e is None for e in xs):
        return None
    x_syms = [e for e in xs if isinstance(e, str)]
    unknown = [k for k, e in enumerate(ys) if e is None or (isinstance(e, str) and e not in x_syms)]
    if len(unknown) != 1:
        return None
    rest = [e for k, e in enumerate(ys) if k != unknown[0]]
    leftover = list(x_syms)
    for e in rest:
        if isinstance(e, str):
            if e not in leftover:
                return None
            leftover.remove(e)
    if any(("*" in e or not e.replace("_", "").isalnum()) for e in leftover):
        return None  # keep to plain symbols: no expression algebra here
    num = 1
    for e in xs:
        num *= e if isinstance(e, int) else 1
    den = 1
    for e in rest:
        den *= e if isinstance(e, int) else 1
    if den == 0 or num % den:
        return None
    value = num // den
    if leftover:
        value = "*".join(([str(value)] if value != 1 else []) + sorted(leftover))
    if value == ys[unknown[0]]:
        return None  # already solved (a fixed point: nothing to substitute)
    if ys[unknown[0]] is None:  # no symbol to replace elsewhere: fill this entry only
        dims = list(y.shape)
        dims[unknown[0]] = value if isinstance(value, int) else ir.SymbolicDim(value)
        y.shape = ir.Shape(dims)
        return "", value
    return ys[unknown[0]], value


def _substitute(model: ir.Model, symbol: str, value: int | str) -> set[str]:
    values = list(model.graph.inputs) + list(model.graph.outputs)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        values.extend(node.outputs)
    changed = set()
    for v in values:
        if v.shape is not None and any(_entry(d) == symbol for d in v.shape):
            v.shape = ir.Shape([(value if isinstance(value, int) else ir.SymbolicDim(value))
                                if _entry(d) == symbol else d for d in v.shape])
            changed.add(v.name)
    return changed


def _forget_generated_symbols(model: ir.Model, keep: set[str]) -> None:
    """Drop intermediate shapes holding symbols that shape inference made up (``unk__N``), so
    a new inference run derives them again from the solved sizes (``keep``: solved values)."""
    keep = keep | {v.name for v in model.graph.outputs}
    for node in model.graph:
        for v in node.outputs:
            if v.name not in keep and v.shape is not None and any(
                    isinstance(_entry(d), str) and _entry(d).startswith("unk__") for d in v.shape):
                v.shape = None


def _carried(node: ir.Node) -> list[tuple[ir.Value, ir.Shape | None, ir.Value | None]]:
    """(body input, the shape it has on the first iteration, the body output it must equal after
    an iteration, or None for a scan input's slice) for a Loop's or Scan's body inputs."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Loop", "Scan") or "body" not in node.attributes:
        return []
    body = node.attributes["body"].value
    if node.op_type == "Loop":
        n = len(node.inputs) - 2
        return [(body.inputs[2 + k], _shape(node.inputs[2 + k]), body.outputs[1 + k]) for k in range(n)
                if 2 + k < len(body.inputs) and 1 + k < len(body.outputs)]
    attr = node.attributes.get("num_scan_inputs")
    m = attr.value if attr is not None else 0
    n = len(node.inputs) - m
    out = [(body.inputs[k], _shape(node.inputs[k]), body.outputs[k]) for k in range(n)
           if k < len(body.inputs) and k < len(body.outputs)]
    axes = node.attributes.get("scan_input_axes")
    axes = list(axes.value) if axes is not None else [0] * m
    for j in range(m):
        x = node.inputs[n + j]
        if n + j >= len(body.inputs) or j >= len(axes) or x is None or x.shape is None:
            continue
        dims = list(x.shape)
        del dims[axes[j] % len(dims)]
        out.append((body.inputs[n + j], ir.Shape(dims), None))
    return out


def _shape(v: ir.Value | None) -> ir.Shape | None:
    return None if v is None or v.shape is None else ir.Shape(list(v.shape))


def _complete_body_inputs(model: ir.Model) -> bool:
    """Exporters often leave the inputs of a Loop or Scan body without shapes, and shape
    inference then knows nothing inside the body. A body input takes the shape of what feeds it
    on the first iteration; a loop-carried one keeps it only if inference then gives the body
    output the same shape (a value that grows over the iterations stays unknown: the body's
    shapes are cleared again)."""
    done: dict[ir.Node, list[ir.Value]] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for v, shape, _ in _carried(node):
            if v.shape is None and shape is not None:
                v.shape = shape
                done.setdefault(node, []).append(v)
    if not done:
        return False
    ir.passes.common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    for node, completed in done.items():
        if all(y is None or (v.shape is not None and y.shape is not None and list(y.shape) == list(v.shape))
               for v, _, y in _carried(node)):
            continue
        for v in completed:
            v.shape = None
        for inner in ir.traversal.RecursiveGraphIterator(node.attributes["body"].value):
            for o in inner.outputs:
                o.shape = None
    return True


def _element_source(node: ir.Node) -> ir.Value:
    """The input whose element type the completed outputs keep: input 0, or the first floating
    point input when input 0 holds indices (int32/int64 token ids of a fused embedding)."""
    first = node.inputs[0]
    if first.dtype not in (ir.DataType.INT32, ir.DataType.INT64):  # 8-bit: a quantized op keeps it
        return first
    return next((v for v in node.inputs if v is not None and v.dtype is not None
                 and v.dtype.is_floating_point()), first)


class CompleteShapesPass(ir.passes.InPlacePass):
    """Reshape sizes solved and op shapes completed, each until nothing changes (at most 4
    shape-inference round trips each). ``inference_runs``: ONNX inference runs of the last call."""

    def __init__(self):
        super().__init__()
        self.inference_runs = 0

    def _infer(self, model: ir.Model) -> None:
        self.inference_runs += 1
        ir.passes.common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.inference_runs = 0
        modified = _complete_body_inputs(model)
        solved_values: set[str] = set()  # every round's: a later round must not forget them
        for _ in range(4):
            solved_now: set[str] = set()
            for node in model.graph:
                if node.op_type == "Reshape" and node.domain in ("", "ai.onnx"):
                    solved = _solve_reshape(node)
                    if solved is not None:
                        solved_now |= _substitute(model, *solved) if solved[0] else {node.outputs[0].name}
            if not solved_now:
                break
            modified = True
            solved_values |= solved_now
            _forget_generated_symbols(model, solved_values)
            self._infer(model)
        opsets = model_opsets(model)
        for _ in range(4):  # ops after a completed one are inferred again (a contrib op mid-graph)
            completed = False
            for node in ir.traversal.RecursiveGraphIterator(model.graph):
                out = node.outputs[0] if node.outputs else None
                if out is None or out.shape is not None:
                    continue
                for v, shape in zip(node.outputs, _completed(node, opsets) or []):
                    if v is not None and shape is not None and v.shape is None:
                        v.shape = shape if isinstance(shape, ir.Shape) else ir.Shape(shape)
                        if v.type is None and node.inputs and node.inputs[0] is not None:
                            v.type = _element_source(node).type  # these ops keep their input's element type
                        completed = True
            if not completed:
                break
            modified = True
            self._infer(model)
        return ir.passes.PassResult(model, modified)

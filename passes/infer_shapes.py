"""Pass: ONNX shape inference that trusts the ops over the exporter's ``value_info``.

Exporters write ``value_info`` for intermediate values, and some write it wrong (NHWC shapes for
NCHW values). onnx-ir's ShapeInferencePass gives such entries to ONNX inference, which then
either keeps them (non-strict mode) or fails, so a stale shape reaches the rules and the dense
model fails the checker. Here the entries of values that a default-domain op computes are left
out of the inference and compared with what it derives: a contradiction (another rank, another
static size) is discarded in favour of the op's result, agreeing entries are combined. Entries
of custom-domain outputs stay in: ONNX cannot infer past those ops without them.
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils  # an ONNX C API call with large weights left out

log = logging.getLogger("spa")


def _entry(d):
    return d if isinstance(d, int) else getattr(d, "value", None)


def _rank_of(entry) -> int:
    """3: a static size, 2: a named symbol, 1: ONNX's made-up ``unk__N``, 0: nothing. A size
    the ops compute statically wins over an exporter's placeholder name for it."""
    if isinstance(entry, int):
        return 3
    if entry is None:
        return 0
    return 1 if entry.startswith("unk__") else 2


def _combined(old: ir.Shape | None, new: ir.Shape | None) -> tuple[ir.Shape | None, bool]:
    """(the shape to keep, whether ``old`` contradicted ``new``)."""
    if new is None:
        return old, False
    if old is None:
        return new, False
    a, b = [_entry(d) for d in old], [_entry(d) for d in new]
    if len(a) != len(b) or any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a, b)):
        return new, True
    out = [x if _rank_of(x) >= _rank_of(y) else y for x, y in zip(a, b)]
    return ir.Shape(out), False


def _computed_by_default_ops(graph: onnx.GraphProto) -> set[str]:
    return {o for n in graph.node if n.domain in ("", "ai.onnx") for o in n.output}


class InferShapesPass(ir.passes.InPlacePass):
    """ONNX shape inference (data propagation on, non-strict) with stale entries discarded."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
            stack = [proto.graph]
            while stack:
                g = stack.pop()
                ours = _computed_by_default_ops(g)
                keep = [vi for vi in g.value_info if vi.name not in ours]
                del g.value_info[:]
                g.value_info.extend(keep)
                if g is not proto.graph:  # a body's outputs are declared like value_info
                    for o in g.output:
                        if o.name in ours and o.type.HasField("tensor_type"):
                            o.type.tensor_type.ClearField("shape")
                for n in g.node:
                    for a in n.attribute:
                        if a.HasField("g"):
                            stack.append(a.g)
                        stack.extend(a.graphs)
            return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)

        try:
            inferred = ir.serde.deserialize_model(_c_api_utils.call_onnx_api(infer, model))
        except Exception as exc:  # noqa: BLE001 - ONNX inference gives up: the shapes stay as they are
            log.warning("ONNX shape inference failed (%s); shapes are left as the file has them", exc)
            return ir.passes.PassResult(model, False)
        modified = False
        stale = []
        for graph, other in zip(model.graphs(), inferred.graphs()):
            theirs = ir.convenience.create_value_mapping(other)
            for name, v in ir.convenience.create_value_mapping(graph).items():
                w = theirs.get(name)
                if w is None or v.const_value is not None:
                    continue
                shape, contradicted = _combined(v.shape, w.shape)
                if contradicted:
                    stale.append(f"{name}: {list(v.shape)} -> {list(w.shape)}")
                if shape != v.shape:
                    v.shape = shape
                    modified = True
                if w.dtype is not None and v.dtype != w.dtype:
                    v.dtype = w.dtype
                    modified = True
        if stale:
            log.info("discarded %d value shapes the file declares against what its ops compute (%s%s)", len(stale),
                     "; ".join(stale[:3]), " ..." if len(stale) > 3 else "")
        return ir.passes.PassResult(model, modified)

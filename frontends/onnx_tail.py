"""Map-typed values (scikit-learn's ZipMap and what reads it): set aside at load, put back on write.

onnx-ir, on which SPA is built, cannot represent map types (``seq(map(int64, float))``, the
default output of skl2onnx classifiers). The nodes that make a map value, and every node that
reads one, form a *tail* at the end of the graph. SPA analyses and prunes the rest (whose
outputs then include the tensors the tail reads: graph outputs, so never pruned) and
``spa.io`` re-attaches the tail, unchanged, when the model is written.
"""

from __future__ import annotations

import onnx

from spa.errors import FrontendError
from spa.io import DETACHED_TAIL


def has_map(tp: onnx.TypeProto) -> bool:
    while True:
        kind = tp.WhichOneof("value")
        if kind == "map_type":
            return True
        if kind == "sequence_type":
            tp = tp.sequence_type.elem_type
        elif kind == "optional_type":
            tp = tp.optional_type.elem_type
        else:
            return False


def _map_values(graph: onnx.GraphProto) -> set[str]:
    return {vi.name for vi in list(graph.value_info) + list(graph.output) if has_map(vi.type)}


def needs_detaching(proto: onnx.ModelProto) -> bool:
    """Whether the main graph declares a map-typed value (``detach`` refuses map inputs)."""
    return bool(_map_values(proto.graph)) or any(has_map(vi.type) for vi in proto.graph.input)


def detach(proto: onnx.ModelProto, what: str) -> tuple[onnx.ModelProto, dict]:
    """(the model without its map-typed tail, the record ``spa.io`` needs to put it back).
    ``proto`` is not modified."""
    graph = proto.graph
    for vi in graph.input:
        if has_map(vi.type):
            raise FrontendError(
                f"{what}: graph input '{vi.name}' is map-typed (e.g. a DictVectorizer's input); onnx-ir, on which "
                "SPA is built, cannot read map types. Export the model with a tensor input instead")
    maps = _map_values(graph)
    tail_values = set(maps)
    tail = []
    for node in graph.node:  # topological order: a reader comes after what it reads
        if any(o in tail_values for o in node.output) or any(i in tail_values for i in node.input if i):
            tail.append(node)
            tail_values.update(o for o in node.output if o)
    tail_ids = {id(n) for n in tail}
    core_nodes = [n for n in graph.node if id(n) not in tail_ids]
    produced = {o for n in core_nodes for o in n.output} | {i.name for i in graph.input}
    core_reads = {i for n in core_nodes for i in n.input} | {o.name for o in graph.output if o.name not in tail_values}
    inits = {t.name: t for t in graph.initializer}
    tail_inits = [name for name in dict.fromkeys(i for n in tail for i in n.input if i in inits)
                  if name not in core_reads]
    cut = [i for i in dict.fromkeys(i for n in tail for i in n.input if i)
           if i not in tail_values and i in produced]
    typed = {vi.name: vi for vi in list(graph.value_info) + list(graph.output) + list(graph.input)}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
        typed.update({vi.name: vi for vi in inferred.graph.value_info if vi.name in cut and vi.name not in typed})
    except Exception:  # noqa: BLE001 - onnx inference may stop on a custom op: names only
        pass
    record = {
        "nodes": [n.SerializeToString() for n in tail],
        "outputs": [(o.name, o.SerializeToString() if o.name in tail_values else None) for o in graph.output],
        "value_info": [vi.SerializeToString() for vi in graph.value_info if vi.name in tail_values],
        "initializers": [inits[name].SerializeToString() for name in tail_inits],
        "cut": [c for c in cut if c not in {o.name for o in graph.output}],
        "opsets": {o.domain: o.version for o in proto.opset_import},
        "ops": sorted({f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in tail}),
    }
    core = onnx.ModelProto()
    core.CopyFrom(proto)
    g = core.graph
    del g.node[:]
    g.node.extend(core_nodes)
    keep_vi = [vi for vi in g.value_info if vi.name not in tail_values]
    del g.value_info[:]
    g.value_info.extend(keep_vi)
    keep_init = [t for t in g.initializer if t.name not in set(tail_inits)]
    del g.initializer[:]
    g.initializer.extend(keep_init)
    outputs = [o for o in g.output if o.name not in tail_values]
    for name in record["cut"]:
        vi = onnx.ValueInfoProto()
        if name in typed:
            vi.CopyFrom(typed[name])
        vi.name = name
        outputs.append(vi)
    del g.output[:]
    g.output.extend(outputs)
    return core, record

"""State pairs: graph inputs and outputs that carry a decoder's K/V cache.

A causal LM exported for incremental decoding reads the cache of every layer as a graph
input (``past_key_values.N.key``) and writes the grown cache as a graph output
(``present.N.key``). Such a pair is not interface but state the runtime passes from one step
to the next: its head axis may shrink with the K/V heads, as long as input and output shrink
together. Pairs are found from the graph, never by name alone:

- an attention op's past slot fed by a graph input, whose present slot is a graph output
  (com.microsoft GroupQueryAttention inputs 3/4 -> outputs 1/2, MultiHeadAttention inputs
  6/7 -> outputs 1/2, Attention input 4 -> output 1);
- a graph input Concat-ed along the sequence axis of a rank-4 ``[batch, heads, seq, size]``
  cache whose Concat result is a graph output (plain-op exports).

Every other axis of a pair stays pinned (batch, sequence, head size), and every other graph
input and output stays pinned whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MS = "com.microsoft"
# op type -> ((past input slot, present output slot), ...); caches are [batch, heads, seq, size]
_SLOTS = {
    "GroupQueryAttention": ((3, 1), (4, 2)),
    "MultiHeadAttention": ((6, 1), (7, 2)),
}
HEAD_AXIS = 1


@dataclass(frozen=True)
class StatePair:
    """One cache: graph input ``past`` is read by ``node`` and its successor ``present`` is a
    graph output; ``axis`` (the heads) may shrink in both together."""
    past: str
    present: str
    node: str
    op: str
    axis: int = HEAD_AXIS

    def as_dict(self) -> dict:
        return {"past": self.past, "present": self.present, "node": self.node, "op": self.op,
                "axis": self.axis}


def _name(v):
    return v.name if v is not None and v.name else None


def _rank(v):
    return len(v.shape) if v is not None and v.shape is not None else None


def find_state_pairs(graph) -> tuple[StatePair, ...]:
    """The K/V cache pairs of ``graph`` (an ``onnx_ir.Graph``), in graph-input order."""
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name for v in graph.outputs}
    found: dict[str, StatePair] = {}
    used_out: set[str] = set()

    def add(past, present, node):
        p, q = _name(past), _name(present)
        if (p in inputs and q in outputs and p not in found and q not in used_out
                and _rank(past) == 4 and _rank(present) == 4):
            found[p] = StatePair(p, q, node.name or "", node.op_type)
            used_out.add(q)

    for node in graph:
        ins, outs = list(node.inputs), list(node.outputs)
        if node.domain == MS and node.op_type in _SLOTS:
            for i, o in _SLOTS[node.op_type]:
                if i < len(ins) and o < len(outs):
                    add(ins[i], outs[o], node)
        elif node.domain == MS and node.op_type == "Attention":
            # past/present pack key and value: [2, batch, heads, seq, size]; not shrunk here
            continue
        elif node.domain in ("", "ai.onnx") and node.op_type == "Concat" and len(ins) == 2:
            attr = node.attributes.get("axis")
            axis = attr.as_int() if attr is not None else None
            if axis is not None and axis < 0:
                axis += 4
            if axis == 2 and _name(ins[0]) in inputs:
                add(ins[0], outs[0], node)
    order = {v.name: i for i, v in enumerate(graph.inputs)}
    return tuple(sorted(found.values(), key=lambda s: order[s.past]))


_PATTERNS = (re.compile(r"^(.*?)(\d+)(\D*)$"),)


def _split_number(name: str):
    m = _PATTERNS[0].match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def layer_numbering(pairs) -> dict[str, tuple[str, int, str]] | None:
    """``name -> (prefix, layer, suffix)`` when every past and present name holds exactly one
    layer number in one pattern per kind (``past_key_values.%d.key``); else None."""
    out = {}
    for s in pairs:
        for name in (s.past, s.present):
            if len(re.findall(r"\d+", name)) != 1:
                return None
            out[name] = _split_number(name)
    return out or None


def renumber(pairs, removed: set[str]) -> dict[str, str]:
    """Old -> new names of the caches left after ``removed`` (value names) go, numbered
    0..n-1 contiguously in their old order; {} when names follow no single numbering."""
    numbering = layer_numbering(pairs)
    if numbering is None:
        return {}
    kept = [n for n in numbering if n not in removed]
    layers = sorted({numbering[n][1] for n in kept})
    new_of = {old: i for i, old in enumerate(layers)}
    renames = {}
    for n in kept:
        pre, layer, suf = numbering[n]
        new = f"{pre}{new_of[layer]}{suf}"
        if new != n:
            renames[n] = new
    return renames


def single_batch(model) -> bool:
    """Whether synthetic feeds must hold one sample: GroupQueryAttention refuses a batch above 1
    when it reads a non-empty past cache with more than one new token."""
    return any(s.op == "GroupQueryAttention" for s in find_state_pairs(model.graph))


#: Past length of synthetic cache feeds (a non-empty cache, so the masked reference reads it).
PAST_LEN = 5
#: Length runtime.concrete_shape gives a symbolic sequence axis.
SEQ_LEN = 16


def _sym(d):
    return d if isinstance(d, str) else getattr(d, "value", None) if not isinstance(d, int) else None


def state_symbols(model) -> dict[str, int]:
    """Sizes for the symbolic dims of K/V cache inputs, so synthetic feeds agree with the op:
    head size from the attention op, past length PAST_LEN, total length PAST_LEN + SEQ_LEN."""
    out: dict[str, int] = {}
    graph = model.graph
    for s in find_state_pairs(graph):
        node = next((n for n in graph if (n.name or "") == s.node and n.op_type == s.op), None)
        past = next(v for v in graph.inputs if v.name == s.past)
        present = next(v for v in graph.outputs if v.name == s.present)
        size = _head_size(node)
        if size and _sym(past.shape[3]):
            out.setdefault(_sym(past.shape[3]), size)
        if _sym(past.shape[2]):
            out.setdefault(_sym(past.shape[2]), PAST_LEN)
            if _sym(present.shape[2]) and _sym(present.shape[2]) != _sym(past.shape[2]):
                out.setdefault(_sym(present.shape[2]), PAST_LEN + SEQ_LEN)
    return out


def _head_size(node) -> int | None:
    if node is None or node.op_type != "GroupQueryAttention":
        return None
    q = node.inputs[0]
    attrs = node.attributes
    n, kvn = attrs["num_heads"].as_int(), attrs["kv_num_heads"].as_int()
    if q is None or q.shape is None or not isinstance(q.shape[-1], int):
        return None
    packed = len(node.inputs) < 2 or node.inputs[1] is None or not node.inputs[1].name
    return q.shape[-1] // ((n + 2 * kvn) if packed else n)

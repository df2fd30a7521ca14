"""Depth pruning: residual blocks found in the dataflow graph, scored, chosen for removal.

A residual branch closes at an Add ``y = x + f(x)``: one operand is the stream ``x``, the other
depends on ``x``. The branch is every node between them (descendants of ``x`` that the other
operand depends on); side inputs that do not depend on ``x`` (an attention mask, rotary
tables) stay shared. A branch is removable when nothing outside it reads its values and the
Add's output keeps the stream's shape: removing it then equals forcing its output to zero.
An Add whose two operands both derive from an earlier stream value through weights (a
downsampling block with a projection shortcut) is listed as a block that is not removable.

A fused skip norm (com.microsoft ``SkipSimplifiedLayerNormalization`` / ``SkipLayerNormalization``,
as onnxruntime-genai builds decoders) closes a branch too: its residual sum (output 3) is the
stream and its normalized output the next branch's input; removed, it becomes the plain norm of
the stream. A decoder layer's K/V cache (a ``spa.state`` pair read and written by its attention
op) goes with the layer: its past input and present output leave the graph and the caches left
are renumbered 0..n-1 (the runtime finds them by name pattern and layer count).

Scores (``score_units``) run the model once in onnxruntime with the stream values exposed:

* ``bi``: block influence, 1 - cosine(stream before, stream after) averaged over tokens;
* ``angular``: angular distance between the stream before unit i and after unit i+n-1, the
  best contiguous span of n units;
* ``greedy``: the unit whose removal changes the graph outputs least (relative error), then
  re-measured with it gone, n times (one session: every branch gets a 0/1 gate input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from spa.errors import ArgumentError, PlanError
from spa.state import find_state_pairs

KINDS = ("attention", "ffn", "block", "layer")
UNITS = ("layer", "sublayer")
SCORES = ("bi", "angular", "greedy")
_MATMULS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "MatMulInteger", "QLinearMatMul", "QLinearConv",
            "FusedMatMul", "ConvInteger", "MatMulNBits"}
_ATTENTION = {"Softmax", "LogSoftmax"}
MS = "com.microsoft"
#: fused residual norms: op type -> (the plain norm it leaves when its branch goes, inputs kept after x)
SKIP_NORMS = {"SkipSimplifiedLayerNormalization": ("SimplifiedLayerNormalization", 1),
              "SkipLayerNormalization": ("LayerNormalization", 2)}
_SUM = 3  # a skip norm's output holding input + skip


def skip_norm(n: ir.Node) -> bool:
    """A fused skip norm whose only residual is input + skip (no bias input) and whose mean /
    inverse-std outputs nobody reads."""
    if n.domain != MS or n.op_type not in SKIP_NORMS:
        return False
    ins, outs = list(n.inputs), list(n.outputs)
    bias = 2 + SKIP_NORMS[n.op_type][1]
    return (len(ins) > 2 and None not in ins[:3] and all(i is None for i in ins[bias:])
            and not any(o.uses() or o.is_graph_output() for o in outs[1:_SUM]))


def _closes(n: ir.Node) -> bool:
    return (n.op_type == "Add" and n.domain in ("", "ai.onnx") and len(n.inputs) == 2 and None not in n.inputs) \
        or skip_norm(n)


def stream_after(n: ir.Node) -> ir.Value | None:
    """The stream value a closing node writes: the Add's output, a skip norm's sum (None when
    the graph does not expose it: the last layer's norm)."""
    if n.op_type == "Add":
        return n.outputs[0]
    return n.outputs[_SUM] if len(n.outputs) > _SUM and n.outputs[_SUM].name else None


@dataclass(frozen=True)
class Block:
    """One residual branch (or an attention+FFN pair, ``kind == "layer"``) along the stream."""

    key: str
    kind: str
    layer: int | None
    index: int
    add: str
    nodes: tuple[str, ...]
    params: tuple[str, ...]
    removable: bool
    reason: str | None
    caches: tuple[str, ...] = ()  # K/V cache inputs (past) that go with the block

    def describe(self) -> str:
        what = {"attention": "attention sublayer", "ffn": "FFN sublayer", "block": "residual block",
                "layer": "layer"}[self.kind]
        state = "removable" if self.removable else f"not removable: {self.reason}"
        return f"{self.key} ({what}, {len(self.nodes)} nodes, {len(self.params)} weights): {state}"


@dataclass(frozen=True)
class _Branch:
    add: ir.Node
    stream: ir.Value  # x
    out: ir.Value  # the branch output f(x), the Add's other operand
    core: tuple[ir.Node, ...]  # nodes depending on x that the branch output depends on
    shortcut: tuple[ir.Node, ...] = ()  # nodes on a projection shortcut (not removable)
    inner: tuple[tuple[ir.Node, ir.Value], ...] = ()  # parallel branches closing earlier: (Add, output)

    @property
    def gates(self) -> tuple[tuple[ir.Node, ir.Value], ...]:
        """(Add, branch output) pairs whose outputs, zeroed, give the model without the block."""
        return ((self.add, self.out),) + self.inner


# ---- discovery --------------------------------------------------------------------------
class _Graph:
    def __init__(self, model: ir.Model):
        self.model = model
        self.nodes = list(model.graph)
        self.pos = {id(n): i for i, n in enumerate(self.nodes)}
        self.outputs = {id(v) for v in model.graph.outputs}
        self.states = {s.present: s for s in find_state_pairs(model.graph)}

    def caches(self, nodes) -> list:
        """The K/V cache pairs (``spa.state.StatePair``) whose present output ``nodes`` write."""
        return [self.states[o.name] for m in nodes for o in m.outputs if o.name in self.states]

    def at(self, v: ir.Value) -> int:
        p = v.producer()
        return -1 if p is None or id(p) not in self.pos else self.pos[id(p)]

    def ancestors(self, v: ir.Value, floor: int) -> list[ir.Node]:
        """Producers v depends on, above position ``floor`` (main graph)."""
        seen, stack, out = set(), [v], []
        while stack:
            p = stack.pop().producer()
            if p is None or id(p) in seen or id(p) not in self.pos or self.pos[id(p)] <= floor:
                continue
            seen.add(id(p))
            out.append(p)
            stack.extend(i for i in p.inputs if i is not None)
        return out

    def between(self, x: ir.Value, out: ir.Value) -> list[ir.Node]:
        """Nodes depending on ``x`` that ``out`` depends on, in graph order."""
        anc = self.ancestors(out, self.at(x))
        anc.sort(key=lambda n: self.pos[id(n)])
        reached, core = {id(x)}, []
        p = x.producer()
        if p is not None and skip_norm(p) and x is stream_after(p):
            reached.update(id(o) for o in p.outputs)  # the fused norm of the stream reads only x
        for n in anc:
            if any(i is not None and id(i) in reached for i in n.inputs):
                core.append(n)
                reached.update(id(o) for o in n.outputs)
        return core

    def depends(self, out: ir.Value, x: ir.Value) -> bool:
        return bool(self.between(x, out)) if self.at(out) > self.at(x) else False


def _is_const(v: ir.Value) -> bool:
    p = v.producer()
    return v.const_value is not None or (p is not None and p.op_type == "Constant" and not p.inputs)


def _shape(v: ir.Value):
    return None if v.shape is None else tuple(d if isinstance(d, int) else str(d) for d in v.shape)


def _branches(g: _Graph) -> list[_Branch]:
    found = []
    for n in g.nodes:
        if not _closes(n):
            continue
        a, b = n.inputs[:2]
        if _is_const(a) or _is_const(b) or a is b or n.outputs[0].dtype is None \
                or not n.outputs[0].dtype.is_floating_point():
            continue
        for x, out in ((a, b), (b, a)):
            if _shape(x) is not None and _shape(x) != _shape(n.outputs[0]):
                continue  # a broadcast operand (an attention mask) is no stream
            core = g.between(x, out)
            if core:
                found.append(_Branch(n, x, out, tuple(core)))
                break
        else:
            if n.op_type == "Add":
                found.extend(_parallel(g, n, found) or _projection(g, n))
    inner = {id(m) for br in found for m in br.core}
    return [br for br in found if id(br.add) not in inner]


def _parallel(g: _Graph, add: ir.Node, found: list[_Branch]) -> list[_Branch]:
    """``(x + a(x)) + m(x)``: a second branch reading the stream before the first one's Add
    (parallel attention and FFN); one block closing at the outer Add."""
    closing = {id(br.add): br for br in found if not br.shortcut}
    for s1, m in (add.inputs, add.inputs[::-1]):
        first = closing.get(id(s1.producer())) if s1.producer() is not None else None
        if first is None or _shape(s1) != _shape(add.outputs[0]):
            continue
        core = g.between(first.stream, m)
        if core:
            nodes = {id(n): n for n in (*first.core, first.add, *core)}
            ordered = tuple(sorted(nodes.values(), key=lambda n: g.pos[id(n)]))
            return [_Branch(add, first.stream, m, ordered, inner=((first.add, first.out),))]
    return []


def _sums_parallel(g: _Graph, br: _Branch) -> bool:
    """``x + (a(x) + m(x))``: the branch output sums an attention and an FFN that both read x."""
    p = br.out.producer()
    if p is None or p.op_type != "Add" or len(p.inputs) != 2 or None in p.inputs:
        return False
    cores = [g.between(br.stream, v) for v in p.inputs]
    return all(c and _has_weight(c) for c in cores) and sorted(_kind(c) == "attention" for c in cores) == [False, True]


def _has_weight(nodes) -> bool:
    return any(m.op_type in _MATMULS and any(i is not None and i.const_value is not None for i in m.inputs[1:])
               for m in nodes)


def _projection(g: _Graph, add: ir.Node) -> list[_Branch]:
    """``y = proj(x) + f(x)``: both operands derive from a common stream value through weights."""
    a, b = add.inputs
    common = {id(m) for m in g.ancestors(a, -1)} & {id(m) for m in g.ancestors(b, -1)}
    if not common:
        return []
    top = max((m for m in g.nodes if id(m) in common), key=lambda m: g.pos[id(m)])
    x = next((o for o in top.outputs if o.uses()), None)
    if x is None or x.dtype is None or not x.dtype.is_floating_point():
        return []
    pa, pb = g.between(x, a), g.between(x, b)
    short, out, core = (pa, b, pb) if len(pa) <= len(pb) else (pb, a, pa)
    if not _has_weight(short) or not _has_weight(core):
        return []
    return [_Branch(add, x, out, tuple(core), tuple(short))]


def _kind(core) -> str:
    ops = {m.op_type for m in core}
    if ops & _ATTENTION or any(m.op_type.endswith("Attention") for m in core):
        return "attention"
    if ops & {"Conv", "ConvTranspose", "QLinearConv", "ConvInteger"}:
        return "block"
    weighted = [m for m in core if m.op_type in _MATMULS]
    return "ffn" if len(weighted) >= 2 else "block"


def _exclusive(g: _Graph, core, stream: ir.Value) -> tuple[list[ir.Node], list[str]]:
    """``core`` plus the side nodes only it reads (constants, weight transposes), and the
    floating-point initializers (weights; shape constants aside) only those nodes read."""
    members = {id(m) for m in core}
    nodes = list(core)
    changed = True
    while changed:
        changed = False
        for m in list(nodes):
            for i in m.inputs:
                p = None if i is None else i.producer()
                if p is None or id(p) in members or id(p) not in g.pos or p is stream.producer():
                    continue
                if all(o.uses() and id(o) not in g.outputs and all(id(u.node) in members for u in o.uses())
                       for o in p.outputs):
                    members.add(id(p))
                    nodes.append(p)
                    changed = True
    params = []
    for name, v in g.model.graph.initializers.items():
        uses = v.uses()
        if uses and id(v) not in g.outputs and all(id(u.node) in members for u in uses) \
                and v.dtype is not None and v.dtype.is_floating_point():
            params.append(name)
    nodes.sort(key=lambda m: g.pos[id(m)])
    return nodes, params


def _why_not(g: _Graph, br: _Branch) -> str | None:
    if br.shortcut:
        ops = sorted({m.op_type for m in br.shortcut if m.op_type in _MATMULS})
        sx, sy = _shape(br.stream), _shape(br.add.outputs[0])
        change = f"; the block changes the stream's shape {sx} -> {sy}" if sx != sy else ""
        return f"projection shortcut ({'/'.join(ops)} on the shortcut{change})"
    members = {id(m) for m in br.core}
    closing = {id(br.out)} | {id(a.outputs[0]) for a, _ in br.inner}
    pasts = {v.name: v for v in g.model.graph.inputs}
    for pair in g.caches(br.core):
        readers = [u.node for u in pasts[pair.past].uses()]
        if any(id(r) not in members for r in readers):
            return f"cache input '{pair.past}' of the branch is also read outside it"
    caches = {pair.present for pair in g.caches(br.core)}
    for m in br.core:
        for o in m.outputs:
            if id(o) in g.outputs and o.name not in caches:
                return f"value '{o.name}' of the branch is a graph output"
            for u in o.uses():
                if id(u.node) not in members and not (id(o) in closing and u.node is br.add):
                    return f"value '{o.name}' of the branch is also read by '{u.node.name}' outside it"
    sx, sy = _shape(br.stream), _shape(br.add.outputs[0])
    if sx is None or sy is None or sx != sy:
        return f"the branch changes the stream's shape ({sx} -> {sy})"
    return None


def find_blocks(model_or_dg) -> list[Block]:
    """Residual branches along the stream of a loaded model (or a DependencyGraph's model), in
    order, then the attention+FFN pairs as ``layer`` blocks (a parallel attention+FFN block is
    one ``layer`` block)."""
    from spa.api import loaded

    model = getattr(model_or_dg, "model", model_or_dg)
    model = model if isinstance(model, ir.Model) else loaded(model)
    return _discover(model)[0]


def _discover(model: ir.Model) -> tuple[list[Block], dict[str, tuple[_Branch, ...]]]:
    g = _Graph(model)
    branches = _branches(g)
    kinds = ["layer" if br.inner or _sums_parallel(g, br) else _kind(br.core) for br in branches]
    layer_of: list[int | None] = [None] * len(branches)
    pairs = []
    layer = 0
    for i, kind in enumerate(kinds):
        if kind == "layer":
            layer_of[i] = layer
            layer += 1
        elif kind == "attention" and i + 1 < len(kinds) and kinds[i + 1] == "ffn" and layer_of[i] is None:
            layer_of[i] = layer_of[i + 1] = layer
            pairs.append((layer, i, i + 1))
            layer += 1
    blocks, of = [], {}
    for i, (br, kind) in enumerate(zip(branches, kinds)):
        nodes, params = _exclusive(g, br.core, br.stream)
        why = _why_not(g, br)
        key = (f"layer{layer_of[i]}" + ("" if kind == "layer" else f".{kind}")) if layer_of[i] is not None \
            else f"block{i}"
        blocks.append(Block(key, kind, layer_of[i], i, br.add.name, tuple(m.name for m in nodes), tuple(params),
                            why is None, why, tuple(pair.past for pair in g.caches(br.core))))
        of[key] = (br,)
    for layer, i, j in pairs:
        a, f = blocks[i], blocks[j]
        why = a.reason or f.reason
        blocks.append(Block(f"layer{layer}", "layer", layer, i, f.add, a.nodes + f.nodes, a.params + f.params,
                            why is None, why, a.caches + f.caches))
        of[f"layer{layer}"] = (branches[i], branches[j])
    return blocks, of


def branches_of(model: ir.Model, blocks, found=None) -> list[tuple[ir.Node, ir.Value, tuple]]:
    """(closing Add, stream x, (Add, branch output) pairs to zero) of each sublayer of
    ``blocks`` (Block or BlockPlan) in ``model`` (``found``: its ``_discover`` result, when
    known); a block this model does not have is refused."""
    found, of = _discover(model) if found is None else found
    by_key = {b.key: b for b in found}
    out = []
    for want in blocks:
        b = by_key.get(want.key)
        if b is None or b.kind != want.kind:
            raise PlanError(f"block '{want.key}' ({want.kind}) is not in this model (it has "
                            f"{', '.join(x.key for x in found[:6]) or 'no residual block'}"
                            f"{' ...' if len(found) > 6 else ''}); was the plan made for another model?")
        if not b.removable:
            raise PlanError(f"block '{b.key}' cannot be removed: {b.reason}")
        out.extend((br.add, br.stream, br.gates) for br in of[b.key])
    return out


def cache_changes(model: ir.Model, blocks, found=None) -> tuple[set[str], dict[str, str]]:
    """What removing ``blocks`` does to the K/V cache interface: the past and present names that
    go with their layers, and old -> new names of the caches left (numbered 0..n-1)."""
    from spa.state import renumber

    found = _discover(model) if found is None else found
    g = _Graph(model)
    by_key = {b.key: b for b in found[0]}
    gone: set[str] = set()
    for want in blocks:
        if want.key in by_key:
            for br in found[1][want.key]:
                gone.update(n for pair in g.caches(br.core) for n in (pair.past, pair.present))
    return gone, (renumber(find_state_pairs(model.graph), gone) if gone else {})


def gated(model: ir.Model, blocks, gates: bool = False) -> ir.Model:
    """A copy whose branch outputs of ``blocks`` are multiplied by 0 (the depth reference); with
    ``gates``, by a scalar graph input ``spa_gate_<i>`` each instead (to switch them at run time)."""
    from spa.api import clone

    out = clone(model)
    pairs = [pair for _, _, gates in branches_of(out, blocks) for pair in gates]
    for k, (add, r) in enumerate(pairs):
        dtype = r.dtype or ir.DataType.FLOAT
        if gates:
            g = ir.Value(name=f"spa_gate_{k}", shape=ir.Shape([]), type=ir.TensorType(dtype))
            out.graph.inputs.append(g)
        else:
            g = ir.Value(name=f"spa_zero_{k}", shape=ir.Shape([]), type=ir.TensorType(dtype),
                         const_value=ir.tensor(np.zeros((), dtype.numpy()), name=f"spa_zero_{k}"))
            out.graph.register_initializer(g)
        mul = ir.Node("", "Mul", [r, g], num_outputs=1, name=f"spa_gate_mul_{k}")
        mul.outputs[0].name = f"{r.name}_spa_gated"
        mul.outputs[0].shape, mul.outputs[0].type = r.shape, r.type
        out.graph.insert_before(add, mul)
        add.replace_input_with(list(add.inputs).index(r), mul.outputs[0])
    return out


# ---- units and scores -------------------------------------------------------------------
def units(blocks: list[Block], unit: str = "layer") -> list[Block]:
    """What depth pruning counts and removes: whole layers (attention+FFN pairs, or the
    residual blocks of a model without layers), or every sublayer."""
    if unit not in UNITS:
        raise ArgumentError(f"depth unit '{unit}' is not one of {', '.join(UNITS)}")
    layers = [b for b in blocks if b.kind == "layer"]
    if unit == "layer" and layers:
        paired = {b.layer for b in layers}
        rest = [b for b in blocks if b.kind != "layer" and b.layer not in paired]
        return sorted(layers + rest, key=lambda b: b.index)
    split = {b.layer for b in blocks if b.kind != "layer" and b.layer is not None}
    return [b for b in blocks if b.kind != "layer" or b.layer not in split]  # a parallel layer stays whole


def count(depth: float, n_units: int) -> int:
    """Units to remove: ``depth`` in (0, 1) is a share of the removable units (at least one),
    an integer >= 1 a count."""
    if depth is None or depth <= 0:
        return 0
    if depth >= 1:
        if float(depth) != int(depth):
            raise ArgumentError(f"depth {depth}: a share is below 1, a count an integer")
        n = int(depth)
    else:
        n = max(1, int(math.floor(depth * n_units + 0.5)))
    if n >= n_units:
        raise ArgumentError(f"depth {depth} would remove {n} of {n_units} removable units; SPA keeps at least one")
    return n


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim == 4:  # NCHW: a token is a pixel, its features the channels
        a = np.moveaxis(a, 1, -1)
    return a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = _rows(a), _rows(b)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return np.clip((a * b).sum(1) / np.maximum(na * nb, 1e-30), -1.0, 1.0)


def score_units(model: ir.Model, candidates: list[Block], n: int, method: str, feeds: list[dict]) -> list[Block]:
    """The ``n`` units of ``candidates`` (removable, in stream order) to remove by ``method``."""
    if method not in SCORES:
        raise ArgumentError(f"depth score '{method}' is not one of {', '.join(SCORES)}")
    if method == "greedy":
        return _greedy(model, candidates, n, feeds)
    score = _scores(model, candidates, n, method, feeds)
    if method == "bi":
        chosen = sorted(score, key=lambda i: (score[i], i))[:n]
        return [candidates[i] for i in sorted(chosen)]
    best = min(score, key=lambda i: (score[i], i))
    return candidates[best:best + n]


def rank_units(model: ir.Model, feeds: list[dict], unit: str = "layer", blocks: list[Block] | None = None) -> list[Block]:
    """The removable ``unit``s, lowest block influence (``bi``) first: removing the first k is
    what ``select(depth=k)`` removes. [] when the model has none."""
    blocks = find_blocks(model) if blocks is None else blocks
    candidates = [u for u in units(blocks, unit) if u.removable]
    if not candidates:
        return []
    score = _scores(model, candidates, 1, "bi", feeds)
    return [candidates[i] for i in sorted(score, key=lambda i: (score[i], i))]


def _scores(model: ir.Model, candidates: list[Block], n: int, method: str, feeds: list[dict]) -> dict[int, float]:
    """Block influence of each candidate (``bi``), or angular distance of each run of ``n``."""
    from spa import runtime

    found = _discover(model)
    subs = [branches_of(model, [u], found) for u in candidates]
    ends = [((s[0][1].name,), _after(*s[-1])) for s in subs]
    names = sorted({v for pair in ends for part in pair for v in part})
    sess = runtime.session_exposing(model, names)
    wanted = [o.name for o in sess.get_outputs()]
    sums: dict = {}
    for batch in feeds:
        exposed = dict(zip(wanted, sess.run(None, batch)))
        values = {part: sum(exposed[v] for v in part) for pair in ends for part in pair}
        if method == "bi":
            for i, (x, y) in enumerate(ends):
                sums.setdefault(i, []).append(float(np.mean(1.0 - _cosine(values[x], values[y]))))
        else:
            for i in _contiguous(candidates, n):
                x, y = ends[i][0], ends[i + n - 1][1]
                sums.setdefault(i, []).append(float(np.mean(np.arccos(_cosine(values[x], values[y])) / np.pi)))
    return {i: float(np.mean(v)) for i, v in sums.items()}


def _after(add: ir.Node, x: ir.Value, gates) -> tuple[str, ...]:
    """Values whose sum is the stream after a sublayer: the closing node's stream output, or
    the stream and the branch output where the graph does not expose their sum."""
    y = stream_after(add)
    return (y.name,) if y is not None else (x.name, gates[0][1].name)


def _contiguous(candidates: list[Block], n: int) -> list[int]:
    """Starts of runs of ``n`` candidates with no unremovable block between them."""
    order = [c.index for c in candidates]
    starts = []
    for i in range(len(candidates) - n + 1):
        if all(order[i + k + 1] - order[i + k] <= _stride(candidates[i + k]) for k in range(n - 1)):
            starts.append(i)
    return starts or list(range(len(candidates) - n + 1))


def _stride(unit: Block) -> int:
    return 2 if unit.kind == "layer" else 1


def _greedy(model: ir.Model, candidates: list[Block], n: int, feeds: list[dict]) -> list[Block]:
    from spa import runtime
    from spa.equivalence import fidelity
    from spa.io import to_proto

    found = _discover(model)
    subs = [branches_of(model, [u], found) for u in candidates]
    sess = runtime.session(to_proto(gated(model, candidates, gates=True)))
    inputs = {i.name for i in model.graph.inputs}
    owner = [(i, (r.dtype or ir.DataType.FLOAT).numpy()) for i, s in enumerate(subs) for _, _, gates in s
             for _, r in gates]

    def outputs(removed: set[int]) -> list:
        gates = {f"spa_gate_{k}": np.asarray(0.0 if i in removed else 1.0, dt) for k, (i, dt) in enumerate(owner)}
        return [a for b in feeds for a in sess.run(None, {**{k: v for k, v in b.items() if k in inputs}, **gates})]

    base = outputs(set())
    removed: set[int] = set()
    for _ in range(n):
        errs = {i: fidelity(outputs(removed | {i}), base).rel_error for i in range(len(candidates)) if i not in removed}
        removed.add(min(errs, key=lambda i: (errs[i], i)))
    return [candidates[i] for i in sorted(removed)]


# ---- selection, removal and its check -----------------------------------------------------
def select(model: ir.Model, depth: float, unit: str = "layer", method: str = "bi", feeds: list[dict] | None = None,
           blocks: list[Block] | None = None) -> list[Block]:
    """The units to remove: ``depth`` (a share, or a count >= 1) of the removable ``unit``s,
    chosen by ``method`` on ``feeds`` (batches of graph inputs)."""
    from spa.errors import UnsupportedModelError

    blocks = find_blocks(model) if blocks is None else blocks
    candidates = [u for u in units(blocks, unit) if u.removable]
    if not candidates:
        why = "; ".join(f"{b.key}: {b.reason}" for b in blocks[:3] if not b.removable)
        raise UnsupportedModelError(
            "depth pruning found no removable residual block (a branch y = x + f(x) whose nodes nothing else "
            f"reads){': ' + why if why else ''}. `spa inspect MODEL` lists the blocks")
    n = count(depth, len(candidates))
    if n == 0:
        return []
    return score_units(model, candidates, n, method, feeds or [])


def to_plans(blocks) -> tuple:
    from spa.plan import BlockPlan

    return tuple(BlockPlan(b.key, b.kind, b.layer, b.params) for b in blocks)


def remove(model: ir.Model, blocks) -> ir.Model:
    """Remove ``blocks`` (Block or BlockPlan) from a loaded model in place."""
    from spa.errors import run_pass
    from spa.passes.remove_blocks import RemoveBlocksPass

    run_pass(RemoveBlocksPass(blocks), model, "removing residual blocks")
    return model


def check_removal(dense: ir.Model, shallow: ir.Model, blocks, feeds: dict) -> tuple[float, float]:
    """Run ``shallow`` and ``dense`` with the branches of ``blocks`` zeroed on ``feeds``; they
    must agree (on the outputs both have: the removed layers' caches aside, the others by their
    new names). Returns (max |diff|, tolerance); raises EquivalenceError otherwise."""
    from spa import runtime
    from spa.equivalence import _compare_shapes, _tolerance
    from spa.errors import EquivalenceError
    from spa.io import to_proto

    gone, renames = cache_changes(dense, blocks)
    dense_names, dense_out = runtime.run_flat(runtime.session(to_proto(gated(dense, blocks))), feeds)
    by_name = {renames.get(n, n): a for n, a in zip(dense_names, dense_out) if n not in gone}
    sess = runtime.session(to_proto(shallow))
    wanted = {i.name for i in sess.get_inputs()}
    old_of = {new: old for old, new in renames.items()}
    names, got = runtime.run_flat(sess, {n: feeds[old_of.get(n, n)] for n in wanted})
    want = [by_name[n] for n in names if n in by_name]
    _compare_shapes(names, got, want)
    atol, rtol = _tolerance(want)
    diff = max((float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if a.size else 0.0
                for a, b in zip(got, want)), default=0.0)
    scale = max((float(np.max(np.abs(w))) for w in want if w.size and np.issubdtype(w.dtype, np.number)), default=0.0)
    tol = atol + rtol * scale
    if not diff <= tol:
        raise EquivalenceError(
            f"the model without blocks {', '.join(b.key for b in blocks)} differs from the dense model with those "
            f"branches zeroed by {diff:.3g} (tolerance {tol:.2g}); nothing was written. Report the model")
    return diff, tol

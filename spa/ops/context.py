"""What a coupling rule sees and declares: :class:`RuleContext` over one node.

A rule reads one node through a :class:`RuleContext` and declares
  * couplings between dims (with an index map),
  * dims it blocks (with a reason) or leaves free (touched, but unconstrained),
  * roles of parameter dims (``out``/``in``/``bias``/``scale``/``stat``/``param``),
  * fix-ups: closures that rewrite attributes or shape constants once the plan is known.
Any axis of the node's inputs and outputs that the rule does not mention is blocked, so an
op is never silently treated as elementwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from spa.dims import IDENTITY, Dim, IndexMap
from spa.ops.fixups import ApplyOps, Fixup

if TYPE_CHECKING:  # pragma: no cover
    import onnx_ir as ir

class RuleRefusal(Exception):
    """Raised by a rule that cannot handle this node's configuration."""


@dataclass(slots=True)
class Edge:
    src: Dim
    dst: Dim
    map: IndexMap
    node: str
    op: str
    repeat: bool = False  # a K/V repeat (GQA): query heads -> the K/V head they read


@dataclass(slots=True)
class RuleOutput:
    edges: list[Edge] = field(default_factory=list)
    blocked: dict[Dim, str] = field(default_factory=dict)
    mentioned: set[Dim] = field(default_factory=set)
    roles: dict[Dim, tuple[str, str]] = field(default_factory=dict)
    fixups: list[Fixup] = field(default_factory=list)
    sizes: dict[Dim, Any] = field(default_factory=dict)
    inexact: set[Dim] = field(default_factory=set)
    periods: dict[Dim, int] = field(default_factory=dict)
    tags: dict[Dim, str] = field(default_factory=dict)


def static_size(dim: Any) -> int | str | None:
    """Normalise an onnx-ir shape entry to int, symbol name or None."""
    if isinstance(dim, int):
        return dim
    value = getattr(dim, "value", None)
    if isinstance(value, int):
        return value
    return value if isinstance(value, str) else None


def current_operand(node, index: int, base: np.ndarray) -> np.ndarray:
    """The operand as it stands now (an earlier fix-up may have rewritten other entries)."""
    v = node.inputs[index] if index < len(node.inputs) else None
    cur = v.const_value.numpy() if v is not None and v.const_value is not None else None
    if cur is None or cur.shape != base.shape:
        return base.copy()
    return np.array(cur, dtype=np.int64)


def shape_pieces(operand) -> list[tuple[Any, int, np.ndarray | None, int, int]] | None:
    """Where the entries of a 1-D shape operand come from: ``(node, input index, constant
    values or None, first entry, length)`` per piece. A constant operand is one piece (owner
    None); a ``Concat`` of one-dimensional pieces (exports with dynamic axes) has one per input.
    None when the entries cannot be placed."""
    if operand is None:
        return None
    if operand.const_value is not None:
        arr = operand.const_value.numpy().reshape(-1)
        return [(None, -1, arr, 0, int(arr.size))]
    prod = operand.producer()
    if prod is None or prod.op_type != "Concat" or prod.domain not in ("", "ai.onnx"):
        return None
    pieces, off = [], 0
    for k, piece in enumerate(prod.inputs):
        n = static_size(piece.shape[0]) if piece is not None and piece.shape is not None \
            and len(piece.shape) == 1 else None
        if not isinstance(n, int):
            return None
        values = piece.const_value.numpy().reshape(-1) if piece.const_value is not None else None
        pieces.append((prod, k, values, off, n))
        off += n
    return pieces


def set_shape_entry(apply: ApplyOps, node, index: int, position: int, value: int) -> bool:
    """Rewrite entry ``position`` of the shape operand ``index`` of ``node`` (a constant, or a
    constant piece of the Concat that computes it). False when that entry is not a literal."""
    for owner, k, values, start, n in shape_pieces(node.inputs[index]) or []:
        if values is None or not start <= position < start + n:
            continue
        target, slot = (node, index) if owner is None else (apply.private_producer(node, index), k)
        new = current_operand(target, slot, np.array(values, dtype=np.int64))
        new[position - start] = value
        apply.set_input_const(target, slot, new)
        return True
    return False


class RuleContext:
    """What a rule sees of one node, and where it writes its declarations."""

    def __init__(self, node: ir.Node, opset: int, out: RuleOutput):
        self.node = node
        self.op = node.op_type
        self.name = node.name or f"<{node.op_type}>"
        self.opset = opset
        self._out = out
        self._unknown: set[str] = set()

    # ---- reading -----------------------------------------------------------------------
    def inp(self, i: int) -> ir.Value | None:
        inputs = self.node.inputs
        return inputs[i] if i < len(inputs) else None

    def out(self, i: int = 0) -> ir.Value | None:
        outputs = self.node.outputs
        return outputs[i] if i < len(outputs) else None

    def shape(self, v: ir.Value) -> tuple:
        """Static shape of ``v`` (entries int, symbol name or None); refuses when unknown."""
        if v.shape is None:
            raise RuleRefusal(f"the shape of '{v.name}' is unknown")
        return tuple(static_size(d) for d in v.shape)

    def rank(self, v: ir.Value) -> int:
        return len(self.shape(v))

    def size(self, v: ir.Value, axis: int) -> int | str | None:
        shape = self.shape(v)
        return shape[axis]

    def int_size(self, v: ir.Value, axis: int) -> int:
        s = self.size(v, axis)
        if not isinstance(s, int):
            raise RuleRefusal(f"axis {axis} of '{v.name}' has no static size")
        return s

    def dim(self, v: ir.Value, axis: int) -> Dim:
        if v.shape is None and axis >= 0:
            # Unknown shape: the dim exists but cannot be sized; couple() blocks what it meets.
            self._unknown.add(v.name)
            return Dim(v.name, axis)
        r = self.rank(v)
        if not -r <= axis < r:
            raise RuleRefusal(f"axis {axis} out of range for '{v.name}' of rank {r}")
        axis %= r
        d = Dim(v.name, axis)
        self._out.sizes.setdefault(d, self.shape(v)[axis])
        return d

    def dims(self, v: ir.Value) -> list[Dim]:
        return [self.dim(v, a) for a in range(self.rank(v))]

    def const(self, v: ir.Value | None) -> np.ndarray | None:
        """The constant value of ``v`` (initializer or folded Constant), else None."""
        if v is None or v.const_value is None:
            return None
        return v.const_value.numpy()

    def require_const(self, v: ir.Value | None, what: str) -> np.ndarray:
        arr = self.const(v)
        if arr is None:
            raise RuleRefusal(f"{what} is not a constant")
        return arr

    def attr(self, name: str, default: Any = None) -> Any:
        a = self.node.attributes.get(name)
        return default if a is None else a.value

    # ---- declaring ---------------------------------------------------------------------
    def couple(self, a: Dim, b: Dim, imap: IndexMap = IDENTITY, repeat: bool = False) -> None:
        """Tie dim ``a`` to dim ``b``: index i of ``a`` is index ``imap(i)`` of ``b``."""
        unknown = next((d for d in (a, b) if d.value in self._unknown), None)
        if unknown is not None:
            for d in (a, b):
                if d.value not in self._unknown:
                    self.block(d, f"tied by {self.op} '{self.name}' to '{unknown.value}', whose shape is unknown")
            return
        self._out.edges.append(Edge(a, b, imap, self.name, self.op, repeat))
        self._out.mentioned.update((a, b))

    def block(self, d: Dim, reason: str) -> None:
        self._out.blocked.setdefault(d, reason)
        self._out.mentioned.add(d)

    def free(self, d: Dim) -> None:
        """``d`` is touched by this node but not constrained by it."""
        self._out.mentioned.add(d)

    def role(self, d: Dim, role: str) -> None:
        if d.value in self._unknown:
            return
        self._out.roles.setdefault(d, (role, self.name))

    def inexact(self, d: Dim) -> None:
        """Pruning ``d`` changes the outputs beyond masking (e.g. a norm over it)."""
        self._out.inexact.add(d)

    def tag(self, d: Dim, tag: str) -> None:
        """Describe what ``d`` is (``"heads"``: a batch axis of a product of two activations,
        as in Q·Kᵀ); reports use it, couplings do not."""
        self._out.tags.setdefault(d, tag)

    def periodic(self, d: Dim, period: int) -> None:
        """``d`` has size ``n * period`` whose index ``i`` is channel ``i % period``: a static
        axis folded under the batch axis (``[batch, heads, ...] -> [heads*batch, ...]``). It is
        sized ``period`` in its group; identity ties carry the period on."""
        self._out.periods[d] = int(period)

    def virtual(self, tag: str, size: int) -> Dim:
        d = Dim(f"{self.name}#{tag}", 0, virtual=True)
        self._out.sizes[d] = size
        return d

    def fixup(self, what: str, fn: Callable[[ApplyOps], None]) -> None:
        self._out.fixups.append(Fixup(self.name, what, fn))

    def follow_sizes(self, index: int, values, entries, what: str, keep=lambda old: True) -> None:
        """Fix-up: entry k of the constant operand ``index`` becomes the new size of dim ``d``
        for every ``(k, d)`` in ``entries`` whose dim was pruned and whose old value passes
        ``keep`` (e.g. not 0/-1 in a Reshape target)."""
        node = self.node
        base = np.array(values, dtype=np.int64)

        def fix(apply: ApplyOps) -> None:
            new = current_operand(node, index, base)
            changed = False
            for k, d in entries:
                if apply.is_pruned(d) and keep(int(base[k])):
                    new[k] = apply.new_size(d)
                    changed = True
            if changed:
                apply.set_input_const(node, index, new)

        self.fixup(what, fix)

    def follow_shape(self, index: int, entries, what: str, keep=lambda old: True) -> None:
        """Like :meth:`follow_sizes` for a shape operand that may be computed at run time.

        A constant operand is rewritten directly. Exporters with dynamic axes build the shape
        as ``Concat`` of one-element pieces: ``Shape``-derived pieces follow the tensors by
        themselves, and each constant piece (a literal head count, hidden size, KV repeat) is
        rewritten in place, so pruned models keep dynamic batch and sequence length.
        """
        operand = self.inp(index)
        target = self.const(operand)
        if target is not None:
            self.follow_sizes(index, target, entries, what, keep)
            return
        wanted = dict(entries)
        plan = []
        for _, k, values, start, n in shape_pieces(operand) or []:
            sub = [(i - start, wanted[i]) for i in range(start, start + n) if i in wanted]
            if values is not None and sub:  # Shape-derived pieces follow the tensors by themselves
                plan.append((k, np.array(values, dtype=np.int64), sub))
        if not plan:
            return
        node = self.node

        def fix(apply: ApplyOps) -> None:
            concat = None
            for k, values, sub in plan:
                changed = [(pos, d) for pos, d in sub if apply.is_pruned(d) and keep(int(values[pos]))]
                if not changed:
                    continue
                concat = concat or apply.private_producer(node, index)
                new = current_operand(concat, k, values)
                for pos, d in changed:
                    new[pos] = apply.new_size(d)
                apply.set_input_const(concat, k, new)

        self.fixup(f"{what} (computed)", fix)

    def repeat(self, merged: Dim, kv: Dim, rep: int, expand, axis: int) -> None:
        """``merged`` (query heads) is ``kv`` (K/V heads) repeated ``rep`` times by ``expand``
        along ``axis`` (GQA). The couplings are declared by the caller; this records the fix-up
        that rewrites the repeat count when query heads are pruned within each K/V group."""
        rep_value = expand.outputs[0]

        def fix(apply: ApplyOps) -> None:
            if not apply.is_pruned(merged):
                return
            new_rep = apply.new_size(merged) // apply.new_size(kv)
            if new_rep == rep:
                return
            n_target = static_size(expand.inputs[1].shape[0])
            lead = len(rep_value.shape) - n_target
            if not set_shape_entry(apply, expand, 1, axis - lead, new_rep):
                raise ValueError(f"the repeat count of Expand '{expand.name}' is not a literal")
            dims = list(rep_value.shape)
            dims[axis] = new_rep
            rep_value.shape = type(rep_value.shape)(dims)

        self.fixup("K/V repeat", fix)

    def refuse(self, reason: str) -> None:
        raise RuleRefusal(reason)

"""Layout ops: Reshape, Flatten, Squeeze, Unsqueeze (one stride rule) and Transpose."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from spa.dims import IDENTITY, block, mod
from spa.ops.context import RuleContext, shape_pieces
from spa.ops.registry import op


@dataclass(frozen=True)
class _Prod:
    """A product of static sizes and named symbolic sizes."""

    num: int
    syms: tuple[str, ...] = ()

    def __mul__(self, size) -> _Prod:
        if isinstance(size, _Prod):
            return _Prod(self.num * size.num, tuple(sorted(self.syms + size.syms)))
        if isinstance(size, int):
            return _Prod(self.num * size, self.syms)
        return _Prod(self.num, tuple(sorted(self.syms + (size,))))

    def ratio(self, other: _Prod) -> int | None:
        """self / other when it is a whole static number, else None."""
        if Counter(self.syms) != Counter(other.syms) or other.num == 0 or self.num % other.num:
            return None
        return self.num // other.num


    @property
    def symbolic(self) -> bool:
        return bool(self.syms)


_PRODUCT = re.compile(r"^\s*(\d+|[A-Za-z_]\w*)(\s*\*\s*(\d+|[A-Za-z_]\w*))*\s*$")


def _factor(size) -> _Prod:
    """A shape entry as a product: ``4*batch`` (written by symbolic shape inference for a
    folded axis) is 4 times ``batch``; any other expression is one opaque symbol."""
    if isinstance(size, int):
        return _Prod(size)
    if _PRODUCT.match(size):
        p = _Prod(1)
        for tok in size.split("*"):
            tok = tok.strip()
            p = p * (int(tok) if tok.isdigit() else tok)
        return p
    return _Prod(1, (size,))


def _strides(shape) -> list[tuple[_Prod, _Prod]]:
    """(stride, stride*size) of every axis of a row-major tensor."""
    out = []
    acc = _Prod(1)
    for s in reversed(shape):
        stride = acc
        acc = acc * _factor(s)
        out.append((stride, acc))
    return out[::-1]


def _pure_symbol(size) -> bool:
    f = _factor(size)
    return f.symbolic and f.num == 1


def _count_factor(v, factor: int, depth: int = 4):
    """(path of (node, input) from the shape piece ``v`` down to a ``Mul`` by the literal
    ``factor``, the Mul's literal input) when ``v`` is ``batch * factor`` computed at run time."""
    path = []
    for _ in range(depth):
        prod = v.producer() if v is not None else None
        if prod is None or prod.domain not in ("", "ai.onnx"):
            return None
        if prod.op_type == "Mul":
            for k in (0, 1):
                c = prod.inputs[k].const_value if prod.inputs[k] is not None else None
                if c is not None and c.numpy().size == 1 and int(c.numpy().reshape(-1)[0]) == factor:
                    return path, k
            return None
        if prod.op_type not in ("Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity"):
            return None
        path.append(0)
        v = prod.inputs[0]
    return None


def _follow_folded_count(ctx: RuleContext, j: int, period: int) -> None:
    """The shape entry ``j`` of a Reshape computed as ``batch * period`` (a Concat piece)
    follows the kept head count."""
    for _, k, values, start, n in shape_pieces(ctx.inp(1)) or []:
        if values is not None or not start <= j < start + n or n != 1:
            continue
        found = _count_factor(ctx.node.inputs[1].producer().inputs[k], period)
        if found is None:
            return
        path, slot = found
        node, d = ctx.node, ctx.dim(ctx.out(0), j)

        def fix(apply) -> None:
            kept = apply.kept(d)
            if kept is None or kept.size == period:
                return
            target = apply.private_producer(apply.private_producer(node, 1), k)
            for index in path:
                target = apply.private_producer(target, index)
            old = target.inputs[slot].const_value.numpy()
            apply.set_input_const(target, slot, np.full(old.shape, kept.size, dtype=old.dtype))

        ctx.fixup("folded head count", fix)
        return


def _fold_under_symbol(ctx: RuleContext, fine_v, j: int, coarse_v, i: int, ratio: int) -> bool:
    """``fine_v[j]`` (size ``n*ratio``) folds a batch axis ``coarse_v[i]`` over the static axes
    after it (SDPA's ``[batch, heads, s, d] -> [heads*batch, s, d]``). Tie it periodically to
    the first static axis, never to the batch axis: batch is not a channel. The batch axis is
    dynamic, or (static exports) the leading axis of both tensors, which is then blocked."""
    coarse_shape, fine_shape = ctx.shape(coarse_v), ctx.shape(fine_v)
    if i + 1 >= len(coarse_shape):
        return False
    dynamic = _pure_symbol(coarse_shape[i]) and not isinstance(fine_shape[j], int)
    static = (i == 0 and j == 0 and isinstance(coarse_shape[0], int) and coarse_shape[0] > 1
              and isinstance(fine_shape[0], int) and len(coarse_shape) >= 3)
    # [seq, batch, heads*d] -> [seq, batch*heads, d] (sequence first, dynamic; batch static)
    behind_seq = (i == j >= 1 and tuple(coarse_shape[:i]) == tuple(fine_shape[:j])
                  and all(_pure_symbol(s) for s in coarse_shape[:i]) and isinstance(coarse_shape[i], int)
                  and coarse_shape[i] > 1 and isinstance(fine_shape[j], int))
    if not (dynamic or static or behind_seq):
        return False
    inner = coarse_shape[i + 1]
    if not isinstance(inner, int) or inner <= 1:
        return False
    if ratio % inner == 0 and not behind_seq:
        ctx.periodic(ctx.dim(fine_v, j), ratio)
        ctx.couple(ctx.dim(fine_v, j), ctx.dim(coarse_v, i + 1), block(ratio // inner))
    elif ((dynamic or behind_seq) and inner % ratio == 0 and j + 1 < len(fine_shape)
          and fine_shape[j + 1] == inner // ratio):
        # [batch, heads*d] -> [batch*heads, d] (nn.MultiheadAttention): channel e is head e // d
        ctx.periodic(ctx.dim(fine_v, j), ratio)
        ctx.couple(ctx.dim(coarse_v, i + 1), ctx.dim(fine_v, j), block(inner // ratio))
    else:
        return False
    if ctx.node.op_type == "Reshape":
        _follow_folded_count(ctx, j, ratio)
    if dynamic:
        ctx.free(ctx.dim(coarse_v, i))
    else:
        ctx.block(ctx.dim(coarse_v, i), f"batch axis folded with heads by Reshape '{ctx.name}'")
    return True


def _repeat_source(ctx: RuleContext, x, i: int, r: int):
    """The Expand that made axis ``i + 1`` of ``x`` (size ``r``) by broadcasting a size-1 axis:
    merging ``x[i]`` with it repeats each index of ``x[i]`` ``r`` times (GQA's K/V repeat)."""
    shape = ctx.shape(x)
    if r < 2 or i + 1 >= len(shape) or shape[i + 1] != r:
        return None
    prod = x.producer()
    if prod is None or prod.op_type != "Expand" or prod.inputs[0] is None or prod.inputs[0].shape is None:
        return None
    src = ctx.shape(prod.inputs[0])
    lead = len(shape) - len(src)
    if i + 1 - lead < 0 or src[i + 1 - lead] != 1:
        return None
    return prod


#: ``value.meta`` key: axes of the value that index something other than channels (the
#: directions of a recurrent layer's output); a fold of such an axis over the next one keeps
#: the inner axis as the channel (``[D, H] -> [D*H]``: index ``d*H + h`` is channel ``h``).
INDEX_AXES = "spa.index_axes"


def mark_index_axes(v, axes) -> None:
    """Record that ``axes`` of ``v`` are index axes (never channels) for the views after it."""
    v.meta[INDEX_AXES] = frozenset(int(a) for a in axes)


def _index_axes(v) -> frozenset:
    return v.meta.get(INDEX_AXES, frozenset())


def _fold_over_index(ctx: RuleContext, x, i: int, y, j: int, xb, yst) -> bool:
    """``y[j]`` folds the index axis ``x[i]`` over exactly ``x[i+1]``: tie ``y[j]`` to
    ``x[i+1]`` (index ``k`` of ``y[j]`` is ``k % size``); the index axis stays untied."""
    xs = ctx.shape(x)
    if i not in _index_axes(x) or i + 1 >= len(xs) or not isinstance(xs[i + 1], int) or xb[i + 1][0] != yst:
        return False
    ctx.couple(ctx.dim(y, j), ctx.dim(x, i + 1), mod(xs[i + 1]))
    return True


def _const_of(v):
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _moved_axis(node, axis: int, rank: int) -> int | None:
    """Where ``axis`` of input 0 lands in the output of a pure layout op, else None."""
    t = node.op_type
    if t == "Identity":
        return axis
    if t == "Transpose":
        perm = node.attributes.get("perm")
        perm = list(range(rank))[::-1] if perm is None else [int(p) % rank for p in perm.value]
        return perm.index(axis)
    if t in ("Squeeze", "Unsqueeze"):
        a = node.attributes.get("axes")
        axes = a.value if a is not None else _const_of(node.inputs[1] if len(node.inputs) > 1 else None)
        if axes is None:
            return None
        if t == "Squeeze":
            axes = {int(k) % rank for k in axes}
            return None if axis in axes else axis - sum(k < axis for k in axes)
        out_rank = rank + len(axes)
        axes = {int(k) % out_rank for k in axes}
        kept = [k for k in range(out_rank) if k not in axes]
        return kept[axis]
    return None


def _picked_by_constants(v, axis: int, depth: int = 8) -> bool:
    """Every use of ``v`` reaches a Gather that picks one constant index of ``axis`` (through
    layout ops only): the axis indexes parts (q, k, v of a packed projection), not channels."""
    if depth == 0 or v.is_graph_output() or v.shape is None or not v.uses():
        return False
    rank = len(v.shape)
    for node, slot in v.uses():
        if slot != 0 or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
            return False
        if node.op_type == "Gather":
            a = node.attributes.get("axis")
            idx = _const_of(node.inputs[1])
            if (0 if a is None else int(a.value)) % rank != axis or idx is None or idx.ndim != 0:
                return False
            continue
        moved = _moved_axis(node, axis, rank)
        if moved is None or not _picked_by_constants(node.outputs[0], moved, depth - 1):
            return False
    return True


def couple_view(ctx: RuleContext, x, y) -> None:
    """Ties axes of a row-major view that share the flat range they span.

    Axes i (input) and j (output) with the same ``stride*size`` are tied: identity when the
    strides match, else the finer axis maps onto the coarser one by ``i // (ratio)``. Axes
    that span no common range (inner parts of a fold) stay untied, hence blocked.
    """
    xs, ys = ctx.shape(x), ctx.shape(y)
    if any(s is None for s in xs + ys):
        ctx.refuse(f"'{x.name}' -> '{y.name}' has a dimension of unknown size")
    xb, yb = _strides(xs), _strides(ys)
    by_upper = {}
    for j, (_, up) in enumerate(yb):
        if ys[j] != 1:
            by_upper[up] = j
    tied = set()
    for i, (xst, xup) in enumerate(xb):
        if xs[i] == 1:
            ctx.free(ctx.dim(x, i))
            continue
        j = by_upper.get(xup)
        if j is None:
            continue
        tied.add(j)
        yst = yb[j][0]
        if xst == yst:
            ctx.couple(ctx.dim(x, i), ctx.dim(y, j), IDENTITY)
        elif (r := xst.ratio(yst)) is not None:  # output axis is finer
            if _fold_over_index(ctx, x, i, y, j, xb, yst):
                continue
            if not _fold_under_symbol(ctx, y, j, x, i, r):
                expand = _repeat_source(ctx, x, i, r)
                ctx.couple(ctx.dim(y, j), ctx.dim(x, i), block(r), repeat=expand is not None)
                if expand is not None:
                    ctx.repeat(ctx.dim(y, j), ctx.dim(x, i), r, expand, i + 1)
        elif (r := yst.ratio(xst)) is not None:  # input axis is finer
            if j + 1 < len(ys) and ys[j + 1] == r and _picked_by_constants(y, j):
                ctx.couple(ctx.dim(x, i), ctx.dim(y, j + 1), mod(r))  # [P*C] -> [P, C], parts picked
                ctx.free(ctx.dim(y, j))
            elif not _fold_under_symbol(ctx, x, i, y, j, r):
                ctx.couple(ctx.dim(x, i), ctx.dim(y, j), block(r))
    for j, s in enumerate(ys):
        if s == 1:
            ctx.free(ctx.dim(y, j))
        elif j not in tied:
            _merge_periodic(ctx, x, y, j, xb, yb)


def _merge_periodic(ctx: RuleContext, x, y, j: int, xb, yb) -> None:
    """``y[j]`` (static) spans the low factor ``p`` of an axis ``x[i]`` sized ``p*batch`` and
    the axes after it (``[s, batch*heads, d] -> [s*batch, heads*d]``): index ``k`` of ``x[i]``
    is channel ``k % p`` of ``y[j]``'s blocks."""
    yst, yup = yb[j]
    for i, (xst, _) in enumerate(xb):
        f = _factor(ctx.shape(x)[i])
        if not f.symbolic or f.num <= 1 or not isinstance(ctx.shape(y)[j], int):
            continue
        if (xst * f.num).ratio(yup) == 1 == yup.ratio(xst * f.num) and (r := xst.ratio(yst)) is not None:
            ctx.periodic(ctx.dim(x, i), f.num)
            ctx.couple(ctx.dim(y, j), ctx.dim(x, i), block(r))
            return


@op("Reshape", weight_view="reshape")
def reshape(ctx: RuleContext) -> None:
    """View rule; literal entries of the target shape follow the new sizes (0 and -1 stay)."""
    x, shape_in, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    couple_view(ctx, x, y)
    for d in ctx.dims(shape_in):
        ctx.free(d)
    ctx.follow_shape(1, list(enumerate(ctx.dims(y))), "shape", keep=lambda old: old not in (0, -1))


@op("Flatten", "Squeeze", "Unsqueeze", weight_view="reshape")
def flatten_like(ctx: RuleContext) -> None:
    """View rule (Flatten folds C*H*W: column c*H*W+k ~ channel c)."""
    couple_view(ctx, ctx.inp(0), ctx.out(0))
    axes = ctx.inp(1)
    if axes is not None and axes.name and axes.shape is not None:
        for d in ctx.dims(axes):
            ctx.free(d)


@op("Transpose", weight_view="transpose")
def transpose(ctx: RuleContext) -> None:
    """y[i] ~ x[perm[i]]."""
    x, y = ctx.inp(0), ctx.out(0)
    r = ctx.rank(x)
    perm = ctx.attr("perm") or list(range(r))[::-1]
    for i, p in enumerate(perm):
        ctx.couple(ctx.dim(x, int(p)), ctx.dim(y, i))
    if _index_axes(x):
        mark_index_axes(y, [i for i, p in enumerate(perm) if int(p) in _index_axes(x)])

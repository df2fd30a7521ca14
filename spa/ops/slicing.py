"""Ops that place one tensor's axis at an offset of another: Concat, Split, Slice, Pad,
Gather, and ops whose shape operands must follow a pruned axis: Expand, Tile, Resize,
ConstantOfShape."""

from __future__ import annotations

import numpy as np

from spa.dims import offset
from spa.ops.elementwise import couple_broadcast
from spa.ops.context import RuleContext, shape_pieces
from spa.ops.registry import op


def _free_inputs(ctx: RuleContext, start: int) -> None:
    for v in ctx.node.inputs[start:]:
        if v is not None and v.name and v.shape is not None:
            for d in ctx.dims(v):
                ctx.free(d)


def _other_axes_identity(ctx: RuleContext, x, y, axis: int) -> None:
    for a in range(ctx.rank(x)):
        if a != axis:
            ctx.couple(ctx.dim(x, a), ctx.dim(y, a))


@op("Concat")
def concat(ctx: RuleContext) -> None:
    """y[axis] index off_k + i ~ x_k[axis] index i; other axes identity."""
    y = ctx.out(0)
    axis = int(ctx.attr("axis")) % ctx.rank(y)
    sizes = [ctx.size(x, axis) for x in ctx.node.inputs]
    off = 0
    for x, n in zip(ctx.node.inputs, sizes):
        _other_axes_identity(ctx, x, y, axis)
        if all(isinstance(s, int) for s in sizes):  # else the concat axis stays untied (blocked)
            ctx.couple(ctx.dim(x, axis), ctx.dim(y, axis), offset(off))
            off += n


@op("Split")
def split(ctx: RuleContext) -> None:
    """y_k[axis] index i ~ x[axis] index off_k + i; split sizes follow the new sizes."""
    x = ctx.inp(0)
    axis = int(ctx.attr("axis", 0)) % ctx.rank(x)
    outs = list(ctx.node.outputs)
    off = 0
    for y in outs:
        _other_axes_identity(ctx, x, y, axis)
        ctx.couple(ctx.dim(y, axis), ctx.dim(x, axis), offset(off))
        off += ctx.int_size(y, axis)
    _free_inputs(ctx, 1)
    node, out_dims, opset = ctx.node, [ctx.dim(y, axis) for y in outs], ctx.opset

    def fix(apply) -> None:
        if not any(apply.is_pruned(d) for d in out_dims):
            return
        sizes = np.array([apply.new_size(d) for d in out_dims], dtype=np.int64)
        if opset < 13:
            apply.set_attr(node, "split", [int(s) for s in sizes])
        else:
            apply.remove_attr(node, "num_outputs")
            apply.set_input_const(node, 1, sizes)

    ctx.fixup("split", fix)


def _slice_params(ctx: RuleContext, x):
    r = ctx.rank(x)
    if ctx.opset < 10:  # Slice-1: starts, ends and axes are attributes
        starts = np.array(ctx.attr("starts"), dtype=np.int64)
        ends = np.array(ctx.attr("ends"), dtype=np.int64)
        axes = ctx.attr("axes")
        axes = np.arange(len(starts)) if axes is None else np.array(axes, dtype=np.int64) % r
        return starts, ends, axes, np.ones(len(starts), np.int64)
    starts = ctx.require_const(ctx.inp(1), "Slice starts").astype(np.int64)
    ends = ctx.require_const(ctx.inp(2), "Slice ends").astype(np.int64)
    axes = ctx.const(ctx.inp(3))
    axes = np.arange(len(starts)) if axes is None else axes.astype(np.int64) % r
    steps = ctx.const(ctx.inp(4))
    steps = np.ones(len(starts), np.int64) if steps is None else steps.astype(np.int64)
    return starts, ends, axes, steps


@op("Slice")
def slice_(ctx: RuleContext) -> None:
    """y[a] index i ~ x[a] index start_a + i (step 1); untouched axes identity."""
    x, y = ctx.inp(0), ctx.out(0)
    starts, ends, axes, steps = _slice_params(ctx, x)
    sliced = {}
    for s, e, a, st in zip(starts, ends, axes, steps):
        sliced[int(a)] = (int(s), int(e), int(st))
    for a in range(ctx.rank(x)):
        if a not in sliced:
            ctx.couple(ctx.dim(x, a), ctx.dim(y, a))
            continue
        s, e, st = sliced[a]
        n = ctx.size(x, a)
        if st != 1 or not isinstance(n, int):
            continue  # strided or dynamic slice along this axis: left untied, so blocked
        start = min(max(s + n if s < 0 else s, 0), n)
        ctx.couple(ctx.dim(y, a), ctx.dim(x, a), offset(start))
    _free_inputs(ctx, 1)
    node, x_dims, y_dims, opset = ctx.node, ctx.dims(x), ctx.dims(y), ctx.opset
    ax_list = [int(a) for a in axes]

    def fix(apply) -> None:
        new_starts, new_ends = starts.copy(), ends.copy()
        changed = False
        for k, a in enumerate(ax_list):
            dx, dy = x_dims[a], y_dims[a]
            if not (apply.is_pruned(dx) or apply.is_pruned(dy)):
                continue
            n = apply.old_size(dx)
            start = min(max(starts[k] + n if starts[k] < 0 else starts[k], 0), n)
            kept_x = apply.kept(dx)
            new_start = int(np.count_nonzero(kept_x < start)) if kept_x is not None else start
            new_starts[k] = new_start
            new_ends[k] = new_start + apply.new_size(dy)
            changed = True
        if changed and opset < 10:
            apply.set_attr(node, "starts", [int(v) for v in new_starts])
            apply.set_attr(node, "ends", [int(v) for v in new_ends])
            apply.set_attr(node, "axes", ax_list)
        elif changed:
            apply.set_input_const(node, 1, new_starts)
            apply.set_input_const(node, 2, new_ends)
            if len(node.inputs) < 4 or node.inputs[3] is None:
                apply.set_input_const(node, 3, np.array(ax_list, dtype=np.int64))

    ctx.fixup("starts/ends", fix)


@op("Pad")
def pad(ctx: RuleContext) -> None:
    """y[a] ~ x[a] on every axis with zero padding; padded axes stay untied."""
    x, y = ctx.inp(0), ctx.out(0)
    r = ctx.rank(x)
    pads = ctx.const(ctx.inp(1)) if ctx.opset >= 11 else np.array(ctx.attr("pads"))
    if pads is None:
        ctx.refuse("Pad amounts are not constant")
    axes = ctx.const(ctx.inp(3)) if len(ctx.node.inputs) > 3 else None
    axes = list(range(r)) if axes is None else [int(a) % r for a in axes]
    padded = {a for k, a in enumerate(axes) if pads[k] != 0 or pads[k + len(axes)] != 0}
    for a in range(r):
        if a not in padded:
            ctx.couple(ctx.dim(x, a), ctx.dim(y, a))
    _free_inputs(ctx, 1)


@op("Gather")
def gather(ctx: RuleContext) -> None:
    """y = x[..., idx, ...]: x axes other than `axis` ~ y; indices axes ~ y[axis:axis+q]."""
    x, idx, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    r = ctx.rank(x)
    axis = int(ctx.attr("axis", 0)) % r
    q = ctx.rank(idx)
    for a in range(r):
        if a < axis:
            ctx.couple(ctx.dim(x, a), ctx.dim(y, a))
        elif a > axis:
            ctx.couple(ctx.dim(x, a), ctx.dim(y, a + q - 1))
        if a != axis:  # a table (embeddings) produces the channels it carries
            ctx.role(ctx.dim(x, a), "out")
    for a in range(q):
        ctx.couple(ctx.dim(idx, a), ctx.dim(y, axis + a))


def _literal_entries(operand) -> set[int]:
    """Positions of a shape operand (constant, or Concat of pieces) that hold literal values."""
    return {i for _, _, values, start, n in shape_pieces(operand) or [] if values is not None
            for i in range(start, start + n)}


@op("Expand")
def expand(ctx: RuleContext) -> None:
    """Broadcast x to y; an axis made by broadcasting to a literal size is free (its values are
    equal along it) and literal entries of the shape operand follow a pruned axis."""
    x, shape_in, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    couple_broadcast(ctx, [x], y)
    _free_inputs(ctx, 1)
    n_target = ctx.size(shape_in, 0) if shape_in.shape is not None else None
    if isinstance(n_target, int):
        y_dims = ctx.dims(y)
        lead = len(y_dims) - n_target
        entries = [(k, y_dims[k + lead]) for k in range(n_target)]
        ctx.follow_shape(1, entries, "shape", keep=lambda old: old > 1)
        x_shape, literal = ctx.shape(x), _literal_entries(shape_in)
        x_lead = len(y_dims) - len(x_shape)
        for k, d in entries:
            a = k + lead
            if k in literal and (a < x_lead or x_shape[a - x_lead] == 1):
                ctx.free(d)


@op("Tile")
def tile(ctx: RuleContext) -> None:
    """y[a] ~ x[a] on axes repeated once; tiled axes stay untied."""
    x, y = ctx.inp(0), ctx.out(0)
    repeats = ctx.require_const(ctx.inp(1), "Tile repeats")
    for a, rep in enumerate(repeats):
        if int(rep) == 1:
            ctx.couple(ctx.dim(x, a), ctx.dim(y, a))
    _free_inputs(ctx, 1)


def _resize_factors(ctx: RuleContext, x):
    """Per-axis (scale, size) operands of Resize/Upsample, None where absent."""
    r = ctx.rank(x)
    if ctx.op == "Upsample" or ctx.opset < 11:  # Upsample, and Resize-10: (X, scales)
        scales = ctx.const(ctx.inp(1)) if ctx.opset >= 9 else np.array(ctx.attr("scales"))
        if scales is None:
            ctx.refuse(f"{ctx.op} scales are not constant")
        return scales, None, list(range(r))
    scales = ctx.const(ctx.inp(2)) if len(ctx.node.inputs) > 2 and ctx.inp(2) is not None else None
    sizes = ctx.const(ctx.inp(3)) if len(ctx.node.inputs) > 3 and ctx.inp(3) is not None else None
    if scales is not None and scales.size == 0:
        scales = None
    if scales is None and sizes is None:
        own = _own_shape_axes(ctx, x, ctx.inp(3) if len(ctx.node.inputs) > 3 else None)
        if not own:
            ctx.refuse("Resize scales/sizes are not constant")
        return None, own, None
    axes = ctx.attr("axes")
    axes = list(range(r)) if axes is None else [int(a) % r for a in axes]
    return scales, sizes, axes


def _shape_of(v, x) -> tuple[int, int] | None:
    """(first axis, end) when ``v`` is ``Shape(x)`` or a unit-step ``Slice`` of it along axis 0
    with constant bounds: entries of ``v`` are sizes of ``x``'s axes first..end-1."""
    prod = v.producer() if v is not None else None
    if prod is None or prod.domain not in ("", "ai.onnx"):
        return None
    rank = len(x.shape) if x.shape is not None else None
    if prod.op_type == "Shape" and prod.inputs[0] is x and rank is not None:
        start = prod.attributes.get("start")
        end = prod.attributes.get("end")
        lo = start.value if start is not None else 0
        hi = end.value if end is not None else rank
        return lo % rank if lo < 0 else lo, min(hi % rank if hi < 0 else hi, rank)
    if prod.op_type == "Slice" and len(prod.inputs) >= 3:
        inner = _shape_of(prod.inputs[0], x)
        bounds = [i.const_value.numpy().reshape(-1) if i is not None and i.const_value is not None else None
                  for i in list(prod.inputs[1:5]) + [None] * (5 - len(prod.inputs))]
        if inner is None or bounds[0] is None or bounds[1] is None or bounds[0].size != 1:
            return None
        if (bounds[2] is not None and int(bounds[2][0]) != 0) or (bounds[3] is not None and int(bounds[3][0]) != 1):
            return None
        n = inner[1] - inner[0]
        lo, hi = int(bounds[0][0]), int(bounds[1][0])
        lo, hi = max(lo + n if lo < 0 else lo, 0), min(hi + n if hi < 0 else hi, n)
        return inner[0] + lo, inner[0] + max(hi, lo)
    return None


def _own_shape_axes(ctx: RuleContext, x, sizes) -> dict[int, int]:
    """Axes whose Resize size is read off the input's own shape at run time (``Concat(Shape(x)
    [:2], hw)``, how exporters write ``interpolate(x, size=other.shape[-2:])``): they keep their
    size whatever it becomes. {axis: its index in ``sizes``}."""
    out = {}
    for owner, k, _values, start, n in shape_pieces(sizes) or []:
        piece = sizes if owner is None else owner.inputs[k]
        span = _shape_of(piece, x)
        if span is not None and span[1] - span[0] == n:
            out.update({span[0] + j: start + j for j in range(n)})
    return out


@op("Resize", "Upsample")
def resize(ctx: RuleContext) -> None:
    """y[a] ~ x[a] on axes with scale 1 (or size equal to the input's, or read off x's own
    shape at run time); constant sizes follow."""
    x, y = ctx.inp(0), ctx.out(0)
    scales, sizes, axes = _resize_factors(ctx, x)
    if axes is None:  # sizes computed from x's shape: those axes keep x's size
        for a in sizes:
            ctx.couple(ctx.dim(x, a), ctx.dim(y, a))
        _free_inputs(ctx, 1)
        return
    for k, a in enumerate(axes):
        same = (scales is not None and float(scales[k]) == 1.0) or (
            sizes is not None and int(sizes[k]) == ctx.size(x, a)
        )
        if same:
            ctx.couple(ctx.dim(x, a), ctx.dim(y, a))
    _free_inputs(ctx, 1)
    if sizes is not None:
        y_dims = ctx.dims(y)
        ctx.follow_sizes(3, sizes, [(k, y_dims[a]) for k, a in enumerate(axes)], "sizes")


@op("ConstantOfShape")
def constant_of_shape(ctx: RuleContext) -> None:
    """y[a] has size shape[a]: the shape operand follows a pruned axis of y."""
    shape_in, y = ctx.inp(0), ctx.out(0)
    target = ctx.const(shape_in)
    if target is not None:
        for d in ctx.dims(y):
            ctx.free(d)
        _free_inputs(ctx, 0)
        ctx.follow_sizes(0, target, list(enumerate(ctx.dims(y))), "shape")
        return
    literal = _literal_entries(shape_in)  # computed (dynamic axes): the literal entries follow
    if not literal:
        ctx.refuse("ConstantOfShape shape is not a constant")
    entries = [(k, d) for k, d in enumerate(ctx.dims(y)) if k in literal]
    for _, d in entries:
        ctx.free(d)
    _free_inputs(ctx, 0)
    ctx.follow_shape(0, entries, "shape")

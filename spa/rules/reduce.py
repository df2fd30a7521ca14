"""Ops that reduce or normalize over axes (Reduce*, ArgMax, Softmax, pooling) and ops that
only read a shape (Shape, Size)."""

from __future__ import annotations

from spa.rules.registry import RuleContext, register, register_family

REDUCE_OPS = frozenset(
    """ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceSumSquare ArgMax ArgMin""".split()
)
POOL_OPS = frozenset("MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split())
SOFTMAX_OPS = frozenset("Softmax LogSoftmax Hardmax".split())


def _reduce_axes(ctx: RuleContext, r: int) -> set[int]:
    if ctx.op in ("ArgMax", "ArgMin"):
        return {int(ctx.attr("axis", 0)) % r}
    axes = ctx.attr("axes")
    if axes is None and len(ctx.node.inputs) > 1 and ctx.inp(1) is not None and ctx.inp(1).name:
        arr = ctx.require_const(ctx.inp(1), f"{ctx.op} axes")
        axes = list(arr.reshape(-1))
        for d in ctx.dims(ctx.inp(1)):
            ctx.free(d)
    if not axes:
        return set() if ctx.attr("noop_with_empty_axes", 0) else set(range(r))
    return {int(a) % r for a in axes}


def reduce(ctx: RuleContext) -> None:
    """Axes not reduced over are carried (shifted when keepdims=0). A reduced axis may shrink
    (RMSNorm's mean over the hidden size): it is free but not exact, since the removed
    channels' values no longer enter the result. ArgMax/ArgMin return positions along it, so
    their axis is left untied."""
    x, y = ctx.inp(0), ctx.out(0)
    r = ctx.rank(x)
    reduced = _reduce_axes(ctx, r)
    keep = int(ctx.attr("keepdims", 1))
    j = 0
    for a in range(r):
        if a not in reduced:
            ctx.couple(ctx.dim(x, a), ctx.dim(y, j))
        elif ctx.op not in ("ArgMax", "ArgMin"):
            ctx.free(ctx.dim(x, a))
            ctx.inexact(ctx.dim(x, a))
            if keep:
                ctx.free(ctx.dim(y, j))
        if keep or a not in reduced:
            j += 1


def pool(ctx: RuleContext) -> None:
    """y[0] ~ x[0], y[1] ~ x[1] (per-channel pooling); spatial axes are not carried."""
    x = ctx.inp(0)
    for y in ctx.node.outputs:
        if y is not None and y.name:
            ctx.couple(ctx.dim(x, 0), ctx.dim(y, 0))
            ctx.couple(ctx.dim(x, 1), ctx.dim(y, 1))


def softmax(ctx: RuleContext) -> None:
    """Every axis but the normalized one is carried (opset < 13: only axes before `axis`)."""
    x, y = ctx.inp(0), ctx.out(0)
    r = ctx.rank(x)
    axis = int(ctx.attr("axis", -1 if ctx.opset >= 13 else 1)) % r
    for a in range(r):
        if a != axis and (ctx.opset >= 13 or a < axis):
            ctx.couple(ctx.dim(x, a), ctx.dim(y, a))


@register("Shape", "Size")
def shape_of(ctx: RuleContext) -> None:
    """Reads only the shape: its input's axes are unconstrained."""
    for d in ctx.dims(ctx.inp(0)):
        ctx.free(d)


register_family(REDUCE_OPS, reduce)
register_family(POOL_OPS, pool)
register_family(SOFTMAX_OPS, softmax)

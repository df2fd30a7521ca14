"""Ops that reduce or normalize over axes (Reduce*, ArgMax, Softmax, pooling) and ops that
only read a shape (Shape, Size)."""

from __future__ import annotations

from spa.ops.context import RuleContext
from spa.ops.registry import op, register_family
from spa.ops.shapes import same_shape

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


def _normalizes_stream(ctx: RuleContext, reduced: set[int], r: int) -> bool:
    """A mean over the last axis that is a norm's statistic: of a square (RMSNorm, as
    exported: ``ReduceMean(Pow(x, 2))``) or subtracted from its input (LayerNorm, decomposed)."""
    if ctx.op != "ReduceMean" or reduced != {r - 1} or r < 2:
        return False
    x = ctx.inp(0)
    prod = x.producer()
    if prod is not None and (prod.op_type == "Pow" or (prod.op_type == "Mul" and prod.inputs[0] is prod.inputs[1])):
        return True
    return any(use.op_type == "Sub" for use, _ in ctx.out(0).uses())


def reduce(ctx: RuleContext) -> None:
    """Axes not reduced over are carried (shifted when keepdims=0). A reduced axis may shrink
    (RMSNorm's mean over the hidden size): it is free but not exact, since the removed
    channels' values no longer enter the result. ArgMax/ArgMin return positions along it, so
    their axis is left untied."""
    x, y = ctx.inp(0), ctx.out(0)
    r = ctx.rank(x)
    reduced = _reduce_axes(ctx, r)
    stream = _normalizes_stream(ctx, reduced, r)
    keep = int(ctx.attr("keepdims", 1))
    j = 0
    for a in range(r):
        if a not in reduced:
            ctx.couple(ctx.dim(x, a), ctx.dim(y, j))
        elif ctx.op not in ("ArgMax", "ArgMin"):
            ctx.free(ctx.dim(x, a))
            ctx.inexact(ctx.dim(x, a))
            if stream:
                ctx.tag(ctx.dim(x, a), "hidden")
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
    """Opset 13+: every axis but the normalized one (default -1) is carried."""
    x, y = ctx.inp(0), ctx.out(0)
    r = ctx.rank(x)
    axis = int(ctx.attr("axis", -1)) % r
    for a in range(r):
        if a != axis:
            ctx.couple(ctx.dim(x, a), ctx.dim(y, a))


def softmax_legacy(ctx: RuleContext) -> None:
    """Opsets 1-12: the input is flattened to 2-D at `axis` (default 1) and normalized over
    all axes from `axis` on, so only the axes before it are carried."""
    x, y = ctx.inp(0), ctx.out(0)
    r = ctx.rank(x)
    axis = int(ctx.attr("axis", 1)) % r
    for a in range(axis):
        ctx.couple(ctx.dim(x, a), ctx.dim(y, a))


@op("Shape", "Size")
def shape_of(ctx: RuleContext) -> None:
    """Reads only the shape: its input's axes are unconstrained."""
    for d in ctx.dims(ctx.inp(0)):
        ctx.free(d)


register_family(REDUCE_OPS, reduce)
register_family(POOL_OPS, pool)
register_family(SOFTMAX_OPS, softmax, shape=same_shape, since=13)
register_family(SOFTMAX_OPS, softmax_legacy, shape=same_shape, since=1, until=12)
#: Normalizations over windows or spatial axes, no rule yet (barriers): shapes only.
register_family(("LpNormalization", "LRN", "MeanVarianceNormalization"), None, shape=same_shape)

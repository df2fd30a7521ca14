"""Normalizations with per-channel parameters: BatchNorm, InstanceNorm, GroupNorm, and the
normalizations over trailing axes of transformers: LayerNorm, RMSNorm (and onnxruntime's
fused Skip/Simplified variants)."""

from __future__ import annotations

from spa.dims import block
from spa.ops.elementwise import couple_broadcast
from spa.ops.context import RuleContext
from spa.ops.registry import op
from spa.ops.shapes import same_shape, same_shape_and_sum


@op("BatchNormalization", shape=same_shape)
def batch_norm(ctx: RuleContext) -> None:
    """y[a] ~ x[a] for all a; x[1] ~ scale[0] ~ B[0] ~ mean[0] ~ var[0]."""
    x, y = ctx.inp(0), ctx.out(0)
    if len([o for o in ctx.node.outputs if o is not None and o.name and o.uses()]) > 1:
        ctx.refuse("BatchNormalization in training mode (running statistics are outputs)")
    if ctx.opset < 9 and int(ctx.attr("spatial", 1)) == 0:
        ctx.refuse("BatchNormalization with spatial=0 (statistics per element, not per channel)")
    for dx, dy in zip(ctx.dims(x), ctx.dims(y)):
        ctx.couple(dx, dy)
    c = ctx.dim(x, 1)
    for i, role in ((1, "scale"), (2, "bias"), (3, "stat"), (4, "stat")):
        p = ctx.inp(i)
        ctx.couple(ctx.dim(p, 0), c)
        ctx.role(ctx.dim(p, 0), role)


@op("InstanceNormalization", shape=same_shape)
def instance_norm(ctx: RuleContext) -> None:
    """y[0] ~ x[0]; y[1] ~ x[1] ~ scale[0] ~ B[0]; spatial axes are normalized over."""
    x, y = ctx.inp(0), ctx.out(0)
    ctx.couple(ctx.dim(x, 0), ctx.dim(y, 0))
    ctx.couple(ctx.dim(x, 1), ctx.dim(y, 1))
    for i, role in ((1, "scale"), (2, "bias")):
        ctx.couple(ctx.dim(ctx.inp(i), 0), ctx.dim(x, 1))
        ctx.role(ctx.dim(ctx.inp(i), 0), role)


@op("GroupNormalization", shape=same_shape)
def group_norm(ctx: RuleContext) -> None:
    """x[1] // (C/G) ~ groups; scale/bias per channel (opset 21) or per group (opset 18)."""
    x, y = ctx.inp(0), ctx.out(0)
    n_groups = int(ctx.attr("num_groups"))
    channels = ctx.int_size(x, 1)
    if channels % n_groups:
        ctx.refuse(f"num_groups={n_groups} does not divide {channels} channels")
    ctx.couple(ctx.dim(x, 0), ctx.dim(y, 0))
    ctx.couple(ctx.dim(x, 1), ctx.dim(y, 1))
    g = ctx.virtual("groups", n_groups)
    ctx.couple(ctx.dim(x, 1), g, block(channels // n_groups))
    for i, role in ((1, "scale"), (2, "bias")):
        p = ctx.dim(ctx.inp(i), 0)
        ctx.couple(p, ctx.dim(x, 1) if ctx.size(ctx.inp(i), 0) == channels else g)
        ctx.role(p, role)
    node = ctx.node

    def fix(apply) -> None:
        if apply.is_pruned(g):
            apply.set_attr(node, "num_groups", apply.new_size(g))

    ctx.fixup("num_groups", fix)


def _couple_trailing_params(ctx: RuleContext, x, axis: int, params) -> None:
    """Per-element parameters over the normalized axes x[axis:] (numpy-broadcast from the right)."""
    r = ctx.rank(x)
    for p, role in params:
        if p is None or not p.name:
            continue
        rp = ctx.rank(p)
        for k in range(rp):
            a = r - rp + k
            d = ctx.dim(p, k)
            if ctx.size(p, k) == 1:
                ctx.free(d)
                continue
            if a < axis:
                ctx.block(d, f"{ctx.op} parameter spans a batch axis")
                continue
            ctx.couple(d, ctx.dim(x, a))
            ctx.role(d, role)


def _normalize_over(ctx: RuleContext, x, axis: int, outputs) -> None:
    """y ~ x on every axis; the normalized axes are prunable but not exact (the statistics
    change); statistics outputs (size 1 over the normalized axes) carry the leading axes."""
    r = ctx.rank(x)
    for a in range(axis, r):
        ctx.inexact(ctx.dim(x, a))
        ctx.tag(ctx.dim(x, a), "hidden")
    for k, y in enumerate(outputs):
        if y is None or not y.name or y.shape is None:
            continue
        if k == 0 or ctx.shape(y) == ctx.shape(x):
            for a in range(r):
                ctx.couple(ctx.dim(x, a), ctx.dim(y, a))
            continue
        for a in range(ctx.rank(y)):
            if a < axis:
                ctx.couple(ctx.dim(x, a), ctx.dim(y, a))
            else:
                ctx.free(ctx.dim(y, a))


@op("LayerNormalization", "RMSNormalization", shape=same_shape)
@op("LayerNormalization", "SimplifiedLayerNormalization", domain="com.microsoft", shape=same_shape)
def layer_norm(ctx: RuleContext) -> None:
    """Normalizes over x[axis:], with per-element scale (and bias) over those axes."""
    x = ctx.inp(0)
    r = ctx.rank(x)
    axis = int(ctx.attr("axis", -1)) % r
    _normalize_over(ctx, x, axis, ctx.node.outputs)
    _couple_trailing_params(ctx, x, axis, [(ctx.inp(1), "scale"), (ctx.inp(2), "bias")])


@op("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain="com.microsoft",
    shape=same_shape_and_sum)
def skip_layer_norm(ctx: RuleContext) -> None:
    """LayerNorm(input + skip (+ bias)) over the last axis; output 3 is the sum itself."""
    x, skip = ctx.inp(0), ctx.inp(1)
    r = ctx.rank(x)
    couple_broadcast(ctx, [skip], x)
    if ctx.op.startswith("SkipSimplified"):  # (input, skip, gamma, bias)
        params = [(ctx.inp(2), "scale"), (ctx.inp(3), "bias")]
    else:  # (input, skip, gamma, beta, bias)
        params = [(ctx.inp(2), "scale"), (ctx.inp(3), "bias"), (ctx.inp(4), "bias")]
    _normalize_over(ctx, x, r - 1, ctx.node.outputs)
    _couple_trailing_params(ctx, x, r - 1, params)

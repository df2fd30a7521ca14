"""Normalizations with per-channel parameters: BatchNorm, InstanceNorm, GroupNorm."""

from __future__ import annotations

from spa.dims import block
from spa.rules.registry import RuleContext, register


@register("BatchNormalization")
def batch_norm(ctx: RuleContext) -> None:
    """y[a] ~ x[a] for all a; x[1] ~ scale[0] ~ B[0] ~ mean[0] ~ var[0]."""
    x, y = ctx.inp(0), ctx.out(0)
    if len([o for o in ctx.node.outputs if o is not None and o.name and o.uses()]) > 1:
        ctx.refuse("BatchNormalization in training mode (running statistics are outputs)")
    for dx, dy in zip(ctx.dims(x), ctx.dims(y)):
        ctx.couple(dx, dy)
    c = ctx.dim(x, 1)
    for i, role in ((1, "scale"), (2, "bias"), (3, "stat"), (4, "stat")):
        p = ctx.inp(i)
        ctx.couple(ctx.dim(p, 0), c)
        ctx.role(ctx.dim(p, 0), role)


@register("InstanceNormalization")
def instance_norm(ctx: RuleContext) -> None:
    """y[0] ~ x[0]; y[1] ~ x[1] ~ scale[0] ~ B[0]; spatial axes are normalized over."""
    x, y = ctx.inp(0), ctx.out(0)
    ctx.couple(ctx.dim(x, 0), ctx.dim(y, 0))
    ctx.couple(ctx.dim(x, 1), ctx.dim(y, 1))
    for i, role in ((1, "scale"), (2, "bias")):
        ctx.couple(ctx.dim(ctx.inp(i), 0), ctx.dim(x, 1))
        ctx.role(ctx.dim(ctx.inp(i), 0), role)


@register("GroupNormalization")
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

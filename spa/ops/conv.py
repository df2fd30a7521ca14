"""Convolutions: Conv and ConvTranspose, plain, depthwise and grouped."""

from __future__ import annotations

from spa.dims import block
from spa.ops.context import RuleContext
from spa.ops.layers import conv_layer
from spa.ops.registry import op
from spa.ops.shapes import prod


def _conv_shape(node):
    """(batch, channels from the weight, ?, ...) where inference stops (custom domains)."""
    x, w = node.inputs[0], node.inputs[1]
    if x is None or w is None or w.shape is None:
        return None
    channels = w.shape[0]
    if node.op_type == "ConvTranspose":
        group = node.attributes.get("group")
        channels = w.shape[1] * (group.value if group is not None else 1) if isinstance(w.shape[1], int) else None
    batch = x.shape[0] if x.shape is not None else None
    return [[batch, channels] + [None] * (len(w.shape) - 2)]


def _conv_macs(node, ins, outs):
    """out elements × (Cin/g · k) per output element."""
    return prod(outs[0]) * prod(ins[1][1:]) if outs[0] and ins[1] else None


def _conv_transpose_macs(node, ins, outs):
    """in elements × (Cout/g · k) per input element."""
    return prod(ins[0]) * prod(ins[1][1:]) if ins[0] and ins[1] else None


def _group_fixup(ctx: RuleContext, groups_dim):
    node = ctx.node

    def fix(apply) -> None:
        if apply.is_pruned(groups_dim):
            apply.set_attr(node, "group", apply.new_size(groups_dim))

    ctx.fixup("group", fix)


def _batch(ctx: RuleContext, x, y) -> None:
    ctx.couple(ctx.dim(x, 0), ctx.dim(y, 0))


def _whole_groups(ctx: RuleContext, x, y, group: int) -> None:
    """x[1] // (Cin/g) ~ groups ~ y[1] // (Cout/g): only whole convolution groups go."""
    cin, cout = ctx.int_size(x, 1), ctx.int_size(y, 1)
    if cin % group or cout % group:
        ctx.refuse(f"group={group} does not divide {cin} input / {cout} output channels")
    g = ctx.virtual("groups", group)
    ctx.couple(ctx.dim(x, 1), g, block(cin // group))
    ctx.couple(ctx.dim(y, 1), g, block(cout // group))
    _group_fixup(ctx, g)


@op("Conv", shape=_conv_shape, layer=conv_layer, macs=_conv_macs)
def conv(ctx: RuleContext) -> None:
    """y[1] ~ W[0] ~ B[0]; x[1] ~ W[1] (group=1) or x[1]//(Cin/g) ~ y[1]//(Cout/g) (grouped)."""
    couple_conv(ctx, ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.out(0))


def couple_conv(ctx: RuleContext, x, w, b, y) -> None:
    """The Conv couplings of operands ``x``, ``w``, optional ``b`` and output ``y`` (ops that
    read them at other input positions share them: QLinearConv, ConvInteger)."""
    group = int(ctx.attr("group", 1))
    _batch(ctx, x, y)
    ctx.couple(ctx.dim(y, 1), ctx.dim(w, 0))
    ctx.role(ctx.dim(w, 0), "out")
    if b is not None and b.name:
        ctx.couple(ctx.dim(b, 0), ctx.dim(w, 0))
        ctx.role(ctx.dim(b, 0), "bias")
    if group == 1:
        ctx.couple(ctx.dim(x, 1), ctx.dim(w, 1))
        ctx.role(ctx.dim(w, 1), "in")
        return
    _whole_groups(ctx, x, y, group)


@op("ConvTranspose", shape=_conv_shape, macs=_conv_transpose_macs)
def conv_transpose(ctx: RuleContext) -> None:
    """x[1] ~ W[0]; y[1] ~ W[1] ~ B[0] (group=1); grouped: whole groups, as for Conv."""
    x, w, b, y = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.out(0)
    group = int(ctx.attr("group", 1))
    _batch(ctx, x, y)
    ctx.couple(ctx.dim(x, 1), ctx.dim(w, 0))
    if b is not None and b.name:
        ctx.couple(ctx.dim(b, 0), ctx.dim(y, 1))
        ctx.role(ctx.dim(b, 0), "bias")
    if group == 1:
        ctx.role(ctx.dim(w, 0), "in")
        ctx.couple(ctx.dim(y, 1), ctx.dim(w, 1))
        ctx.role(ctx.dim(w, 1), "out")
        return
    ctx.role(ctx.dim(w, 0), "out")
    _whole_groups(ctx, x, y, group)

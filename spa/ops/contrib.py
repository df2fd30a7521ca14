"""onnxruntime's com.microsoft contrib ops that SPA can see through."""

from __future__ import annotations

from spa.ops.context import RuleContext
from spa.ops.conv import _conv_macs, _conv_shape, conv
from spa.ops.elementwise import couple_broadcast
from spa.ops.layers import conv_layer
from spa.ops.registry import op


@op("FusedConv", domain="com.microsoft", shape=_conv_shape, layer=conv_layer, macs=_conv_macs)
def fused_conv(ctx: RuleContext) -> None:
    """act(Conv(X, W, B) + Z): the Conv rule; the optional sum Z broadcasts to the output."""
    conv(ctx)
    if ctx.inp(3) is not None and ctx.inp(3).name:
        couple_broadcast(ctx, [ctx.inp(3)], ctx.out(0))

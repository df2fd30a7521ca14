"""Elementwise families: unary ops (identity on every axis) and broadcasting n-ary ops."""

from __future__ import annotations

from spa.ops.context import RuleContext
from spa.ops.registry import op, register_family
from spa.ops.shapes import same_shape

UNARY_OPS = frozenset(
    """Relu LeakyRelu Sigmoid Tanh HardSigmoid HardSwish Elu Selu Celu Gelu Mish Softplus
    Softsign ThresholdedRelu Shrink Erf Exp Log Neg Abs Sqrt Reciprocal Floor Ceil Round Sign
    Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh Not IsNaN IsInf BitwiseNot
    Identity Cast CastLike Clip Dropout Swish""".split()
)

BROADCAST_OPS = frozenset(
    """Add Sub Mul Div Pow Max Min Sum Mean Where Equal Greater Less GreaterOrEqual LessOrEqual
    And Or Xor Mod BitShift BitwiseAnd BitwiseOr BitwiseXor PRelu""".split()
)

# Side inputs of unary ops (Clip min/max, Dropout ratio/training_mode, CastLike target): free.
_SIDE_INPUTS_FROM = 1


def unary(ctx: RuleContext) -> None:
    """y[a] = f(x[a]) on every axis a; extra outputs (Dropout's mask) likewise."""
    x = ctx.inp(0)
    for y in ctx.node.outputs:
        if y is None or not y.name:
            continue
        for dx, dy in zip(ctx.dims(x), ctx.dims(y)):
            ctx.couple(dx, dy)
    if ctx.op == "Dropout" and ctx.attr("training_mode") is None:
        training = ctx.const(ctx.inp(2))
        if training is not None and bool(training):
            ctx.refuse("Dropout runs in training mode")
    for side in ctx.node.inputs[_SIDE_INPUTS_FROM:]:
        if side is not None and side.shape is not None:
            for d in ctx.dims(side):
                ctx.free(d)


def _same(a, b) -> bool:
    return a is not None and b is not None and a == b


def couple_broadcast(ctx: RuleContext, inputs, out, param_role: str | None = None) -> None:
    """Numpy broadcasting: an input axis of size 1 ties to nothing; an equal one ties to out."""
    out_shape = ctx.shape(out)
    r_out = len(out_shape)
    out_dims = ctx.dims(out)
    for v in inputs:
        if v is None or not v.name:
            continue
        shape = ctx.shape(v)
        lead = r_out - len(shape)
        if lead < 0:
            ctx.refuse(f"input '{v.name}' has a higher rank than the output")
        is_param = param_role is not None and v.const_value is not None
        for a, s in enumerate(shape):
            d = ctx.dim(v, a)
            so = out_shape[a + lead]
            if s == 1 or so == 1:
                ctx.free(d)
            elif _same(s, so):
                ctx.couple(d, out_dims[a + lead])
                if is_param:
                    ctx.role(d, param_role)
            else:
                # Unknown: the input's axis may be the output's (then both must shrink together)
                # or broadcast from 1. Neither side may be pruned alone.
                why = f"cannot tell whether axis {a} of '{v.name}' broadcasts in {ctx.op} '{ctx.name}'"
                ctx.block(d, why)
                ctx.block(out_dims[a + lead], why)
    for d, so in zip(out_dims, out_shape):
        if so == 1:
            ctx.free(d)


def broadcast(ctx: RuleContext) -> None:
    """out[a] = f(in_k[a - lead_k]) for every input axis that is not broadcast from size 1."""
    role = "param" if ctx.op in ("Mul", "Div", "Add", "Sub", "PRelu") else None
    couple_broadcast(ctx, ctx.node.inputs, ctx.out(0), role)


#: Unary ops that leave a weight's values as they are (Cast converts them): analyses see
#: through them to the parameter.
CONVERT_OPS = frozenset({"Identity", "Cast", "Dropout"})

register_family(UNARY_OPS - CONVERT_OPS, unary, shape=same_shape)
register_family(CONVERT_OPS, unary, shape=same_shape, weight_view="convert")
register_family(BROADCAST_OPS - {"PRelu"}, broadcast)
op("PRelu", shape=same_shape)(broadcast)
register_family(("Gelu", "QuickGelu"), unary, domain="com.microsoft", shape=same_shape)
op("FastGelu", "BiasGelu", domain="com.microsoft")(broadcast)

"""Contractions: Gemm and MatMul (constant weight or two activations)."""

from __future__ import annotations

from spa.rules.elementwise import couple_broadcast
from spa.rules.registry import RuleContext, register


@register("Gemm")
def gemm(ctx: RuleContext) -> None:
    """A[K] ~ B[K] (contracted, B role in); Y[1] ~ B[N] (role out) ~ C; Y[0] ~ A[M]."""
    a, b, c, y = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.out(0)
    ta, tb = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    a_k, a_m = (0, 1) if ta else (1, 0)
    b_k, b_n = (1, 0) if tb else (0, 1)
    ctx.couple(ctx.dim(a, a_k), ctx.dim(b, b_k))
    ctx.role(ctx.dim(b, b_k), "in")
    ctx.couple(ctx.dim(a, a_m), ctx.dim(y, 0))
    ctx.couple(ctx.dim(b, b_n), ctx.dim(y, 1))
    ctx.role(ctx.dim(b, b_n), "out")
    if c is not None and c.name:
        couple_broadcast(ctx, [c], y, "bias")


@register("MatMul")
def matmul(ctx: RuleContext) -> None:
    """A[-1] ~ B[-2] (contracted); Y[-1] ~ B[-1]; Y[-2] ~ A[-2]; batch axes broadcast."""
    a, b, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    # Roles are harmless on activations: only dims traced back to an initializer are parameters.
    ctx.couple(ctx.dim(a, -1), ctx.dim(b, 0 if rb == 1 else -2))
    ctx.role(ctx.dim(b, 0 if rb == 1 else -2), "in")
    if rb > 1:
        ctx.couple(ctx.dim(b, -1), ctx.dim(y, -1))
        ctx.role(ctx.dim(b, -1), "out")
    if ra > 1:
        ctx.couple(ctx.dim(a, -2), ctx.dim(y, -2 if rb > 1 else -1))
    # Batch axes: everything left of the matrix axes, broadcast numpy-style.
    y_shape = ctx.shape(y)
    # A product of two activations with batch axes (Q·Kᵀ, attention·V): those axes are heads.
    heads = ctx.const(a) is None and ctx.const(b) is None
    n_batch_y = ry - (ra > 1) - (rb > 1)
    for v, r in ((a, ra), (b, rb)):
        n_batch = max(r - 2, 0)
        shape = ctx.shape(v)
        for i in range(n_batch):
            ay = n_batch_y - n_batch + i
            d = ctx.dim(v, i)
            if shape[i] == 1 or y_shape[ay] == 1:
                ctx.free(d)
            elif shape[i] is not None and shape[i] == y_shape[ay]:
                ctx.couple(d, ctx.dim(y, ay))
                if heads:
                    ctx.tag(d, "heads")
            else:
                ctx.block(d, f"cannot tell how batch axis {i} of '{v.name}' broadcasts")

"""Contractions: Gemm and MatMul (constant weight or two activations)."""

from __future__ import annotations

from spa.ops.elementwise import couple_broadcast
from spa.ops.context import RuleContext
from spa.ops.layers import attr, einsum_layer, matmul_layer
from spa.ops.registry import op
from spa.ops.shapes import prod


def _gemm_macs(node, ins, outs):
    if not (ins[0] and outs[0]):
        return None
    return prod(outs[0]) * (ins[0][0] if attr(node, "transA", 0) else ins[0][1])


def _matmul_macs(node, ins, outs):
    return prod(outs[0]) * ins[0][-1] if ins[0] and outs[0] else None


@op("Gemm", layer=matmul_layer, macs=_gemm_macs)
def gemm(ctx: RuleContext) -> None:
    """A[K] ~ B[K] (contracted, B role in); Y[1] ~ B[N] (role out) ~ C; Y[0] ~ A[M]."""
    couple_gemm(ctx, ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.out(0))


def couple_gemm(ctx: RuleContext, a, b, c, y) -> None:
    """The Gemm couplings of operands ``a``, ``b``, optional ``c`` and output ``y`` (QGemm reads
    them at other input positions)."""
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


@op("MatMul", layer=matmul_layer, macs=_matmul_macs)
def matmul(ctx: RuleContext) -> None:
    """A[-1] ~ B[-2] (contracted); Y[-1] ~ B[-1]; Y[-2] ~ A[-2]; batch axes broadcast."""
    couple_matmul(ctx, ctx.inp(0), ctx.inp(1), ctx.out(0))


def couple_matmul(ctx: RuleContext, a, b, y, trans_a: bool = False, trans_b: bool = False) -> None:
    """The MatMul couplings of operands ``a``, ``b`` and output ``y`` (QLinearMatMul and
    MatMulInteger read them at other input positions), the matrix axes of A (of B) swapped
    when ``trans_a`` (``trans_b``: FusedMatMul)."""
    ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    if (trans_a and ra < 2) or (trans_b and rb < 2):
        ctx.refuse("a transposed operand of rank 1")
    a_k, a_m = (-2, -1) if trans_a else (-1, -2)
    b_k, b_n = (0, 0) if rb == 1 else (-1, -2) if trans_b else (-2, -1)
    # Roles are harmless on activations: only dims traced back to an initializer are parameters.
    ctx.couple(ctx.dim(a, a_k), ctx.dim(b, b_k))
    ctx.role(ctx.dim(b, b_k), "in")
    if rb > 1:
        ctx.couple(ctx.dim(b, b_n), ctx.dim(y, -1))
        ctx.role(ctx.dim(b, b_n), "out")
    if ra > 1:
        ctx.couple(ctx.dim(a, a_m), ctx.dim(y, -2 if rb > 1 else -1))
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


def _einsum_terms(ctx: RuleContext, inputs) -> tuple[list[str], str]:
    """Operand and output subscripts with ``...`` expanded to upper-case letters."""
    eq = str(ctx.attr("equation")).replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(inputs):
        ctx.refuse(f"equation '{eq}' names {len(terms)} operands, the node has {len(inputs)}")
    n_ell = 0
    for t, v in zip(terms, inputs):
        if "..." in t:
            n_ell = max(n_ell, ctx.rank(v) - (len(t) - 3))
    ell = "".join(chr(ord("A") + k) for k in range(n_ell))
    out = []
    for t, v in zip(terms, inputs):
        if "..." in t:
            k = ctx.rank(v) - (len(t) - 3)
            t = t.replace("...", ell[n_ell - k:])
        if len(set(t)) != len(t):
            ctx.refuse(f"repeated subscript in '{t}' (diagonal) is not supported")
        if len(t) != ctx.rank(v):
            ctx.refuse(f"subscripts '{t}' do not match the rank of '{v.name}'")
        out.append(t)
    if "->" in eq:
        rhs = rhs.replace("...", ell)
    else:
        letters = "".join(out)
        rhs = ell + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in ell))
    return out, rhs


@op("Einsum", layer=einsum_layer)
def einsum(ctx: RuleContext) -> None:
    """Axes with the same subscript are one axis (size-1 axes broadcast). On a constant operand,
    subscripts kept in the output are its out axes and contracted ones its in axes; subscripts
    shared by two activations and the output are batch axes (heads)."""
    inputs = [v for v in ctx.node.inputs if v is not None]
    y = ctx.out(0)
    terms, rhs = _einsum_terms(ctx, inputs)
    occurrences: dict[str, list] = {}
    for t, v in zip(terms, inputs):
        for a, c in enumerate(t):
            occurrences.setdefault(c, []).append((v, a))
    for a, c in enumerate(rhs):
        occurrences.setdefault(c, []).append((y, a))
    activations = [v for v in inputs if ctx.const(v) is None]
    for c, occ in occurrences.items():
        sized = [(v, a) for v, a in occ if ctx.size(v, a) != 1]
        for v, a in occ:
            if ctx.size(v, a) == 1 and sized:
                ctx.free(ctx.dim(v, a))
        if not sized:
            for v, a in occ:
                ctx.free(ctx.dim(v, a))
            continue
        in_acts = {id(v) for v, _ in sized if v is not y and ctx.const(v) is None}
        if len(in_acts) >= 2 and c not in rhs:
            for v, a in sized:  # Q·Kᵀ over head_dim: heads are pruned whole, head_dim never
                ctx.block(ctx.dim(v, a), f"'{c}' is contracted between two activations in Einsum '{ctx.name}'")
            continue
        first = ctx.dim(*sized[0])
        for v, a in sized[1:]:
            ctx.couple(ctx.dim(v, a), first)
        for v, a in sized:
            if v is not y and ctx.const(v) is not None:
                ctx.role(ctx.dim(v, a), "out" if c in rhs else "in")
        if len(activations) >= 2 and len(in_acts) >= 2 and c in rhs:
            for v, a in sized:
                ctx.tag(ctx.dim(v, a), "heads")

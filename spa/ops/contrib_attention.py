"""onnxruntime's fused transformer ops (com.microsoft), as ``onnxruntime.transformers.optimizer``
emits them: Attention, MultiHeadAttention, GroupQueryAttention, RotaryEmbedding,
EmbedLayerNormalization, BiasAdd, FusedMatMul (and the default-domain
SimplifiedLayerNormalization that onnxruntime registers).

A fused attention keeps its heads prunable: a virtual heads dim (tagged ``"heads"``) stands
for ``num_heads``; each projection part (Q, K, V of a packed weight or bias) is tied to it by
``block(head_size)``, so heads are removed whole and head_size never changes. The head counts
are attributes, rewritten by fix-ups. K/V caches (``past*`` inputs, ``present*`` outputs) are
tied to the K/V heads: where they are graph inputs or outputs, their heads cannot change.
"""

from __future__ import annotations

from spa.dims import Dim, block, offset
from spa.ops.context import RuleContext
from spa.ops.elementwise import couple_broadcast
from spa.ops.layers import matmul_layer
from spa.ops.linear import couple_matmul
from spa.ops.norm import layer_norm
from spa.ops.registry import op
from spa.ops.shapes import prod, same_shape

MS = "com.microsoft"


# ---- shared pieces ---------------------------------------------------------------------------
def _present(ctx: RuleContext, i: int, output: bool = False):
    v = ctx.out(i) if output else ctx.inp(i)
    return v if v is not None and v.name else None


def _heads_dim(ctx: RuleContext, tag: str, n: int) -> Dim:
    d = ctx.virtual(tag, n)
    ctx.tag(d, "heads")
    return d


def _split_into_heads(ctx: RuleContext, whole: Dim, parts) -> list[Dim]:
    """``whole`` is the concatenation of ``(tag, size, heads, n_heads)`` parts: part index i is
    index ``off + i`` of ``whole`` and belongs to head ``i // (size / n_heads)``."""
    out, off = [], 0
    for tag, size, heads, n in parts:
        if size % n:
            ctx.refuse(f"{tag} size {size} is not a multiple of {n} heads")
        part = ctx.virtual(tag, size)
        ctx.couple(part, whole, offset(off))
        ctx.couple(part, heads, block(size // n))
        out.append(part)
        off += size
    return out


def _free_all(ctx: RuleContext, v) -> None:
    if v is not None and v.name and v.shape is not None:
        for d in ctx.dims(v):
            ctx.free(d)


def _per_head(ctx: RuleContext, v, axis: int, heads: Dim, n: int) -> None:
    """``v[axis]`` is one entry per head (caches, attention bias, qk); other axes are free."""
    if v is None or not v.name:
        return
    if v.shape is None and not v.uses() and not v.is_graph_output():
        return  # an output nobody reads (a cache of a prompt-only graph) constrains nothing
    if ctx.rank(v) <= axis:
        ctx.refuse(f"'{v.name}' has no heads axis {axis}")
    for a, d in enumerate(ctx.dims(v)):
        if a == axis and ctx.size(v, a) != 1:
            if ctx.size(v, a) != n:
                ctx.refuse(f"axis {a} of '{v.name}' has {ctx.size(v, a)} entries, not {n} heads")
            ctx.couple(d, heads)
        else:
            ctx.free(d)


def _rows(ctx: RuleContext, x, y) -> None:
    """Batch and sequence axes of a ``[batch, seq, hidden]`` input follow the output."""
    ctx.couple(ctx.dim(x, 0), ctx.dim(y, 0))
    ctx.couple(ctx.dim(x, 1), ctx.dim(y, 1))


def _follow_attrs(ctx: RuleContext, attrs) -> None:
    """Fix-up: each ``(attribute, dim)`` becomes the new size of the dim once it is pruned."""
    node = ctx.node

    def fix(apply) -> None:
        for name, d in attrs:
            if apply.is_pruned(d):
                apply.set_attr(node, name, apply.new_size(d))

    ctx.fixup("/".join(name for name, _ in attrs), fix)


def _follow_list_attr(ctx: RuleContext, name: str, dims) -> None:
    node = ctx.node

    def fix(apply) -> None:
        if any(apply.is_pruned(d) for d in dims):
            apply.set_attr(node, name, [apply.new_size(d) for d in dims])

    ctx.fixup(name, fix)


def _hidden_shape(node, hidden_of, caches=None) -> list | None:
    """Output 0 is ``[batch, seq, hidden_of(node)]`` of input 0; ``caches(batch)`` the shapes of
    the K/V cache outputs (their total length left unknown)."""
    x = node.inputs[0] if node.inputs else None
    hidden = hidden_of(node)
    if x is None or x.shape is None or len(x.shape) not in (3, 5) or hidden is None:
        return None
    return [[x.shape[0], x.shape[1], hidden], *(caches(node, x.shape[0]) if caches else [])]


def _bnsh_caches(heads_attr: str, first: int = 0):
    """Shapes of present key / value ``[batch, heads, total, head_size]`` from past key / value
    (inputs ``first``, ``first + 1``), when they are given."""

    def shapes(node, batch):
        past = node.inputs[first] if len(node.inputs) > first else None
        if past is None or not past.name or past.shape is None or len(past.shape) != 4:
            return []
        return [[batch, _int_attr(node, heads_attr), None, past.shape[3]]] * 2

    return shapes


def _int_attr(node, name: str, default: int = 0) -> int:
    a = node.attributes.get(name)
    return default if a is None else int(a.value)


# ---- Attention: input x packed weights [hidden, q + k + v] ----------------------------------
def _qkv_sizes(node) -> tuple[int, int, int] | None:
    w = node.inputs[1]
    sizes = node.attributes.get("qkv_hidden_sizes")
    if sizes is not None:
        return tuple(int(s) for s in sizes.value)
    if w is None or w.shape is None or not isinstance(w.shape[1], int) or w.shape[1] % 3:
        return None
    return (w.shape[1] // 3,) * 3


def _attention_macs(node, ins, outs):
    sizes = _qkv_sizes(node)
    if not (ins[0] and sizes) or len(ins[0]) != 3:
        return None
    b, s, hidden = ins[0]
    past = ins[4][3] if len(ins) > 4 and ins[4] else 0
    return b * s * hidden * sum(sizes) + b * s * (s + past) * (sizes[0] + sizes[2])


@op("Attention", domain=MS, layer=matmul_layer, macs=_attention_macs,
    shape=lambda node: _hidden_shape(node, lambda n: (_qkv_sizes(n) or (None,) * 3)[2]))
def attention(ctx: RuleContext) -> None:
    """x[2] ~ W[0] (in); W[1] = Q|K|V at offsets 0, q, q+k, part index i ~ heads[i // head_size];
    bias ~ W[1]; y[2] ~ V part; past/present[2] ~ heads; num_heads and qkv_hidden_sizes follow."""
    x, w, bias, y = ctx.inp(0), ctx.inp(1), _present(ctx, 2), ctx.out(0)
    if ctx.rank(x) != 3 or ctx.rank(w) != 2:
        ctx.refuse("Attention expects a [batch, seq, hidden] input and a 2-D packed weight")
    n = int(ctx.attr("num_heads"))
    sizes = _qkv_sizes(ctx.node)
    if sizes is None or sum(sizes) != ctx.size(w, 1):
        ctx.refuse("the packed weight does not split into Q, K and V")
    if sizes[0] != sizes[1]:
        ctx.refuse("Q and K hidden sizes differ")
    heads = _heads_dim(ctx, "heads", n)
    _rows(ctx, x, y)
    ctx.couple(ctx.dim(x, 2), ctx.dim(w, 0))
    ctx.role(ctx.dim(w, 0), "in")
    ctx.role(ctx.dim(w, 1), "out")
    parts = _split_into_heads(ctx, ctx.dim(w, 1), [(t, s, heads, n) for t, s in zip("qkv", sizes)])
    if bias is not None:
        ctx.couple(ctx.dim(bias, 0), ctx.dim(w, 1))
        ctx.role(ctx.dim(bias, 0), "bias")
    ctx.couple(ctx.dim(y, 2), parts[2])
    _free_all(ctx, _present(ctx, 3))  # mask_index
    _per_head(ctx, _present(ctx, 4), 2, heads, n)  # past [2, batch, heads, past_seq, head_size]
    _per_head(ctx, _present(ctx, 1, output=True), 2, heads, n)  # present
    _per_head(ctx, _present(ctx, 5), 1, heads, n)  # attention_bias [batch|1, heads, seq, total]
    _free_all(ctx, _present(ctx, 6))  # past_sequence_length
    _follow_attrs(ctx, [("num_heads", heads)])
    if ctx.node.attributes.get("qkv_hidden_sizes") is not None:
        _follow_list_attr(ctx, "qkv_hidden_sizes", parts)


# ---- MultiHeadAttention: Q, K, V (separate, packed or BNSH caches) --------------------------
def _mha_value_size(node) -> int | None:
    q, k, v = (node.inputs[i] if i < len(node.inputs) else None for i in range(3))
    n = _int_attr(node, "num_heads")
    if q is None or q.shape is None:
        return None
    if len(q.shape) == 5:  # packed [batch, seq, heads, 3, head_size]
        return n * q.shape[4] if isinstance(q.shape[4], int) else None
    if v is not None and v.name and v.shape is not None:
        last = v.shape[-1] if len(v.shape) == 3 else v.shape[-1] * n if isinstance(v.shape[-1], int) else None
        return last if isinstance(last, int) else None
    if k is not None and k.name and k.shape is not None and len(k.shape) == 5:  # packed KV
        return n * k.shape[4] if isinstance(k.shape[4], int) else None
    return None


def _mha_macs(node, ins, outs):
    if not (ins[0] and outs[0]) or len(ins[0]) != 3:
        return None
    b, s, dq = ins[0]
    key = ins[1] if len(ins) > 1 and ins[1] else None
    t = s if key is None else key[1] if len(key) in (3, 5) else key[2]
    return b * s * t * (dq + outs[0][2])


@op("MultiHeadAttention", domain=MS, macs=_mha_macs,
    shape=lambda node: _hidden_shape(node, _mha_value_size, _bnsh_caches("num_heads", 6)))
def multi_head_attention(ctx: RuleContext) -> None:
    """q[2] ~ heads[i // head_size] (k[2], v[2] likewise, or their heads axis when packed / BNSH);
    bias = Q|K|V at offsets 0, q, q+k; y[2] ~ v[2]; caches, attention_bias, qk[1] ~ heads."""
    q, k, v, bias, y = ctx.inp(0), _present(ctx, 1), _present(ctx, 2), _present(ctx, 3), ctx.out(0)
    n = int(ctx.attr("num_heads"))
    heads = _heads_dim(ctx, "heads", n)
    rq = ctx.rank(q)
    if rq == 5:  # packed QKV [batch, seq, heads, 3, head_size]
        if k is not None or v is not None or bias is not None:
            ctx.refuse("packed QKV with a separate key, value or bias")
        _rows(ctx, q, y)
        _per_head(ctx, q, 2, heads, n)
        ctx.couple(ctx.dim(y, 2), heads, block(ctx.int_size(q, 4)))
    elif rq == 3:
        _rows(ctx, q, y)
        ctx.couple(ctx.dim(q, 2), heads, block(_head_size(ctx, q, 2, n)))
        if k is None:
            ctx.refuse("MultiHeadAttention without a key")
        rk = ctx.rank(k)
        if rk == 3 and v is not None and ctx.rank(v) == 3:
            for t in (k, v):
                ctx.couple(ctx.dim(t, 2), heads, block(_head_size(ctx, t, 2, n)))
                ctx.couple(ctx.dim(t, 0), ctx.dim(q, 0))
                ctx.free(ctx.dim(t, 1))
            ctx.couple(ctx.dim(y, 2), ctx.dim(v, 2))
        elif rk == 5 and v is None:  # packed KV [batch, kv_seq, heads, 2, head_size]
            _per_head(ctx, k, 2, heads, n)
            ctx.couple(ctx.dim(y, 2), heads, block(ctx.int_size(k, 4)))
        elif rk == 4 and v is not None and ctx.rank(v) == 4:  # BNSH key / value (cross attention)
            _per_head(ctx, k, 1, heads, n)
            _per_head(ctx, v, 1, heads, n)
            ctx.couple(ctx.dim(y, 2), heads, block(ctx.int_size(v, 3)))
        else:
            ctx.refuse(f"key of rank {rk} with {'a' if v is not None else 'no'} value is not a known layout")
        if bias is not None:
            if rk != 3:
                ctx.refuse("a bias with packed or BNSH key / value")
            whole = ctx.dim(bias, 0)
            off = 0
            for t in (q, k, v):
                ctx.couple(ctx.dim(t, 2), whole, offset(off))
                off += ctx.int_size(t, 2)
            ctx.role(whole, "bias")
    else:
        ctx.refuse(f"query of rank {rq}")
    _free_all(ctx, _present(ctx, 4))  # key_padding_mask
    _per_head(ctx, _present(ctx, 5), 1, heads, n)  # attention_bias
    for i in (6, 7):  # past_key / past_value [batch, heads, past_seq, head_size]
        _per_head(ctx, _present(ctx, i), 1, heads, n)
    for i in (8, 9):  # past_sequence_length, cache_indirection
        _free_all(ctx, _present(ctx, i))
    for i in (1, 2, 3):  # present_key / present_value, qk [batch, heads, seq, total]
        _per_head(ctx, _present(ctx, i, output=True), 1, heads, n)
    _follow_attrs(ctx, [("num_heads", heads)])


def _head_size(ctx: RuleContext, v, axis: int, n: int) -> int:
    size = ctx.int_size(v, axis)
    if size % n:
        ctx.refuse(f"axis {axis} of '{v.name}' ({size}) is not a multiple of {n} heads")
    return size // n


# ---- GroupQueryAttention: n query heads over kv_n K/V heads ----------------------------------
def _gqa_macs(node, ins, outs):
    if not (ins[0] and outs[0]) or len(ins[0]) != 3:
        return None
    b, s, _ = ins[0]
    past = ins[3][2] if len(ins) > 3 and ins[3] else 0
    return b * s * (s + past) * 2 * outs[0][2]


def _gqa_hidden(node) -> int | None:
    q, k = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    n, kvn = _int_attr(node, "num_heads"), _int_attr(node, "kv_num_heads")
    if q is None or q.shape is None or not isinstance(q.shape[-1], int):
        return None
    if k is not None and k.name:
        return q.shape[-1]
    return q.shape[-1] // (n + 2 * kvn) * n if n + 2 * kvn else None


def _gqa_caches(node, batch) -> list:
    """present key / value ``[batch, kv_heads, total, head_size]`` (total unknown)."""
    past = _bnsh_caches("kv_num_heads", 3)(node, batch)
    if past or len(node.outputs) < 3:
        return past
    hidden, n = _gqa_hidden(node), _int_attr(node, "num_heads")
    return [[batch, _int_attr(node, "kv_num_heads"), None, hidden // n]] * 2 if hidden and n else []


@op("GroupQueryAttention", domain=MS, macs=_gqa_macs,
    shape=lambda node: _hidden_shape(node, _gqa_hidden, _gqa_caches))
def group_query_attention(ctx: RuleContext) -> None:
    """q[2] ~ q_heads[i // head_size]; k[2], v[2] ~ kv_heads[i // head_size] (or Q|K|V packed in q);
    q_heads[j] ~ kv_heads[j // (n / kv_n)] (repeat); y[2] ~ q_heads; caches[1] ~ kv_heads."""
    q, k, v, y = ctx.inp(0), _present(ctx, 1), _present(ctx, 2), ctx.out(0)
    n, kvn = int(ctx.attr("num_heads")), int(ctx.attr("kv_num_heads"))
    if ctx.rank(q) != 3 or not kvn or n % kvn:
        ctx.refuse(f"{n} query heads over {kvn} K/V heads in a rank-{ctx.rank(q)} query")
    for i in (12, 13):  # quantized K/V caches: scales per head are not sliced here
        if _present(ctx, i) is not None:
            ctx.refuse("quantized K/V cache (k_scale / v_scale)")
    q_heads, kv_heads = _heads_dim(ctx, "q_heads", n), _heads_dim(ctx, "kv_heads", kvn)
    rep = n // kvn
    ctx.couple(q_heads, kv_heads, block(rep), repeat=rep > 1)
    _rows(ctx, q, y)
    if k is None:  # packed [batch, seq, (n + 2 kv_n) * head_size]
        if v is not None:
            ctx.refuse("a value without a key")
        h = ctx.int_size(q, 2) // (n + 2 * kvn)
        _split_into_heads(ctx, ctx.dim(q, 2), [("q", n * h, q_heads, n), ("k", kvn * h, kv_heads, kvn),
                                               ("v", kvn * h, kv_heads, kvn)])
    else:
        if v is None or ctx.rank(k) != 3 or ctx.rank(v) != 3:
            ctx.refuse("key and value must both be [batch, seq, kv_hidden]")
        h = _head_size(ctx, q, 2, n)
        ctx.couple(ctx.dim(q, 2), q_heads, block(h))
        for t in (k, v):
            ctx.couple(ctx.dim(t, 2), kv_heads, block(_head_size(ctx, t, 2, kvn)))
            ctx.couple(ctx.dim(t, 0), ctx.dim(q, 0))
            ctx.couple(ctx.dim(t, 1), ctx.dim(q, 1))
    ctx.couple(ctx.dim(y, 2), q_heads, block(h))
    for i in (3, 4):  # past_key / past_value [batch, kv_heads, past_seq, head_size]
        _per_head(ctx, _present(ctx, i), 1, kv_heads, kvn)
    for i in (1, 2):  # present_key / present_value
        _per_head(ctx, _present(ctx, i, output=True), 1, kv_heads, kvn)
    _per_head(ctx, _present(ctx, 3, output=True), 1, q_heads, n)  # output_qk
    _per_head(ctx, _present(ctx, 10), 1, q_heads, n)  # attention_bias
    sink = _present(ctx, 11)  # head_sink [num_heads]
    if sink is not None:
        ctx.couple(ctx.dim(sink, 0), q_heads)
        ctx.role(ctx.dim(sink, 0), "param")
    for i in (5, 6, 7, 8, 9, 14, 15, 16):  # lengths, rotary caches, positions, q/k norm over head_size
        _free_all(ctx, _present(ctx, i))
    _follow_attrs(ctx, [("num_heads", q_heads), ("kv_num_heads", kv_heads)])


# ---- RotaryEmbedding: rotates pairs within each head -----------------------------------------
@op("RotaryEmbedding", domain=MS, shape=same_shape)
def rotary_embedding(ctx: RuleContext) -> None:
    """y ~ x on every axis but head_size; [batch, seq, hidden]: x[2] ~ heads[i // head_size]
    (heads pruned whole, never inside one); [batch, heads, seq, head_size]: x[1] is the heads."""
    x, y = ctx.inp(0), ctx.out(0)
    r = ctx.rank(x)
    if r == 4:
        for a in range(3):
            ctx.couple(ctx.dim(x, a), ctx.dim(y, a))
        ctx.tag(ctx.dim(x, 1), "heads")
        for d in (ctx.dim(x, 3), ctx.dim(y, 3)):
            ctx.block(d, f"RotaryEmbedding '{ctx.name}' rotates pairs within head_size")
        if int(ctx.attr("num_heads", 0)):
            _follow_attrs(ctx, [("num_heads", ctx.dim(x, 1))])
    elif r == 3:
        hidden = ctx.int_size(x, 2)
        n_attr = int(ctx.attr("num_heads", 0))
        if n_attr:
            h = _head_size(ctx, x, 2, n_attr)
        else:
            if int(ctx.attr("rotary_embedding_dim", 0)):
                ctx.refuse("a partial rotary_embedding_dim without num_heads")
            h = 2 * ctx.int_size(ctx.inp(2), ctx.rank(ctx.inp(2)) - 1)
        if hidden % h:
            ctx.refuse(f"hidden size {hidden} is not a multiple of head_size {h}")
        heads = _heads_dim(ctx, "heads", hidden // h)
        for a in range(3):
            ctx.couple(ctx.dim(x, a), ctx.dim(y, a))
        ctx.couple(ctx.dim(x, 2), heads, block(h))
        if n_attr:
            _follow_attrs(ctx, [("num_heads", heads)])
    else:
        ctx.refuse(f"input of rank {r}")
    if int(ctx.attr("is_packed_batching", 0)):
        ctx.refuse("packed batching")
    for i in (1, 2, 3):  # position_ids, cos_cache, sin_cache: per position and rotary pair
        _free_all(ctx, _present(ctx, i))


# ---- EmbedLayerNormalization: word + position (+ segment) embeddings, then LayerNorm --------
@op("EmbedLayerNormalization", domain=MS,
    shape=lambda node: None if node.inputs[0].shape is None or node.inputs[2].shape is None
    else [[*node.inputs[0].shape, node.inputs[2].shape[1]], None, [*node.inputs[0].shape, node.inputs[2].shape[1]]])
def embed_layer_norm(ctx: RuleContext) -> None:
    """y[2] ~ word[1] ~ position[1] ~ segment[1] (tables, role out) ~ gamma[0] ~ beta[0] ~ sum[2];
    normalized over y[2] (not exact); y[0], y[1] ~ input_ids."""
    ids, y = ctx.inp(0), ctx.out(0)
    hidden = ctx.dim(y, 2)
    ctx.inexact(hidden)
    ctx.tag(hidden, "hidden")
    _rows(ctx, ids, y)
    for i in (2, 3, 4):  # word, position, segment tables [rows, hidden]
        table = _present(ctx, i)
        if table is None:
            continue
        ctx.couple(ctx.dim(table, 1), hidden)
        ctx.role(ctx.dim(table, 1), "out")
        ctx.block(ctx.dim(table, 0), f"rows of an embedding table of EmbedLayerNormalization '{ctx.name}'")
    for i, role in ((5, "scale"), (6, "bias")):
        ctx.couple(ctx.dim(ctx.inp(i), 0), hidden)
        ctx.role(ctx.dim(ctx.inp(i), 0), role)
    for i in (1, 7, 8):  # segment_ids, mask, position_ids
        _free_all(ctx, _present(ctx, i))
    _free_all(ctx, _present(ctx, 1, output=True))  # mask_index
    total = _present(ctx, 2, output=True)  # embedding_sum, before the normalization
    if total is not None:
        _rows(ctx, ids, total)
        ctx.couple(ctx.dim(total, 2), hidden)


# ---- elementwise with bias, contractions -----------------------------------------------------
@op("BiasAdd", domain=MS, shape=same_shape)
def bias_add(ctx: RuleContext) -> None:
    """y = x + bias + skip: broadcast, the constant bias in role bias."""
    couple_broadcast(ctx, ctx.node.inputs, ctx.out(0), "bias")


def _fused_matmul_layer(node, member):
    return None if _int_attr(node, "transA") else matmul_layer(node, member)


def _fused_matmul_macs(node, ins, outs):
    if not (ins[0] and outs[0]) or len(ins[0]) < 2:
        return None
    return prod(outs[0]) * (ins[0][-2] if _int_attr(node, "transA") else ins[0][-1])


def _fused_matmul_shape(node) -> list | None:
    """[..., M, N] of (A or Aᵀ)·(B or Bᵀ), when the batch axes of the two agree or one has none."""
    a, b = node.inputs[0], node.inputs[1]
    if a is None or b is None or a.shape is None or b.shape is None or min(len(a.shape), len(b.shape)) < 2:
        return None
    sa, sb = list(a.shape), list(b.shape)
    if _int_attr(node, "transA"):
        sa[-2], sa[-1] = sa[-1], sa[-2]
    if _int_attr(node, "transB"):
        sb[-2], sb[-1] = sb[-1], sb[-2]
    lead_a, lead_b = sa[:-2], sb[:-2]
    if lead_a and lead_b and lead_a != lead_b:
        return None
    return [[*(lead_a or lead_b), sa[-2], sb[-1]]]


@op("FusedMatMul", domain=MS, layer=_fused_matmul_layer, macs=_fused_matmul_macs, shape=_fused_matmul_shape)
def fused_matmul(ctx: RuleContext) -> None:
    """alpha * MatMul(A or Aᵀ, B or Bᵀ): the MatMul rule on the (transposed) matrix axes."""
    if int(ctx.attr("transBatchA", 0)) or int(ctx.attr("transBatchB", 0)):
        ctx.refuse("transBatchA / transBatchB move batch axes into the matrix")
    couple_matmul(ctx, ctx.inp(0), ctx.inp(1), ctx.out(0), bool(int(ctx.attr("transA", 0))),
                  bool(int(ctx.attr("transB", 0))))


# onnxruntime registers SimplifiedLayerNormalization (RMSNorm) in the default domain too.
op("SimplifiedLayerNormalization", shape=same_shape)(layer_norm)

"""onnxruntime's fused transformer ops (com.microsoft): models from ``transformers`` configs run
through ``onnxruntime.transformers.optimizer``, and hand-written graphs for the fused ops the
optimizer does not emit for them (MultiHeadAttention, GroupQueryAttention, RotaryEmbedding,
FusedMatMul, BiasAdd). Heads stay prunable through the fused attention ops."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from helpers import build, check_masked_equivalence, dims_of, feeds_for, groups_of, masked_model, run, \
    single_group_plan

import spa
from spa.metrics import count_params
from spa.passes.verify import check_structure

MS = '<ir_version: 9, opset_import: ["" : 18, "com.microsoft" : 1]>\n'
HEAD = '<ir_version: 9, opset_import: ["" : 18]>\n'
SHAPES = {"B": 2, "S": 5}


def node_of(model, op_type):
    return next(n for n in model.graph if n.op_type == op_type)


def attrs(node):
    return {k: a.value for k, a in node.attributes.items()}


def prune_one(source, key, keep, slots=None, input_shapes=None):
    loaded = spa.load(source)
    dg = spa.dependency_graph(loaded)
    g = dg.group(key)
    pruned = spa.apply_plan(loaded, single_group_plan(dg, g, keep, slots), input_shapes=input_shapes)
    return loaded, g, pruned


def assert_masked_equal(loaded, g, pruned, keep, slots=None, input_shapes=None):
    feeds = feeds_for(loaded, input_shapes)
    for w, o in zip(run(masked_model(loaded, g, keep, slots), feeds), run(pruned, feeds)):
        np.testing.assert_allclose(o, w, atol=1e-4, rtol=1e-4)


# ---- hand-written fused attention graphs ----------------------------------------------------
ATTENTION = MS + """g (float[B,S,16] x, float[16,48] w, float[48] b, float[16,16] wo) => (float[B,S,16] y)
{ a = com.microsoft.Attention <num_heads=4> (x, w, b)  y = MatMul(a, wo) }"""


def test_attention_packed_weight_is_sliced_per_head_and_num_heads_follows():
    dg, groups = groups_of(build(ATTENTION))
    g = groups["w:1"]
    assert g.kind == "heads" and g.size == 4 and g.heads.head_dim == 4
    assert {"w[1]", "b[0]", "a[2]", "wo[0]"} <= dims_of(g)
    w = next(m for m in g.params if m.param == "w")
    np.testing.assert_array_equal(w.channel, np.tile(np.repeat(np.arange(4), 4), 3))  # Q|K|V, 4 heads each
    check_masked_equivalence(build(ATTENTION), input_shapes=SHAPES)
    loaded, g, pruned = prune_one(build(ATTENTION), "w:1", [0, 3], input_shapes=SHAPES)
    assert attrs(node_of(pruned, "Attention"))["num_heads"] == 2
    assert pruned.graph.initializers["w"].shape == (16, 24) and pruned.graph.initializers["wo"].shape == (8, 16)
    assert run(pruned, feeds_for(loaded, {"B": 3, "S": 7}))[0].shape == (3, 7, 16)


def test_attention_qkv_hidden_sizes_follow_the_kept_heads():
    m = build(MS + """g (float[B,S,16] x, float[16,64] w, float[64] b, float[32,16] wo) => (float[B,S,16] y)
    { a = com.microsoft.Attention <num_heads=4, qkv_hidden_sizes=[16, 16, 32]> (x, w, b)  y = MatMul(a, wo) }""")
    _, groups = groups_of(m)
    assert groups["w:1"].size == 4 and {"a[2]", "wo[0]"} <= dims_of(groups["w:1"])
    check_masked_equivalence(m, input_shapes=SHAPES)
    loaded, g, pruned = prune_one(m, "w:1", [1, 2, 3], input_shapes=SHAPES)
    assert list(attrs(node_of(pruned, "Attention"))["qkv_hidden_sizes"]) == [12, 12, 24]
    assert pruned.graph.initializers["wo"].shape == (24, 16)


def test_multi_head_attention_with_packed_bias():
    m = build(MS + """g (float[B,S,16] x, float[16,16] wq, float[16,16] wk, float[16,16] wv, float[48] b,
                        float[16,16] wo) => (float[B,S,16] y)
    { q = MatMul(x, wq)  k = MatMul(x, wk)  v = MatMul(x, wv)
      a = com.microsoft.MultiHeadAttention <num_heads=4> (q, k, v, b)  y = MatMul(a, wo) }""")
    dg, groups = groups_of(m)
    g = groups["wq:1"]
    assert g.kind == "heads" and g.size == 4
    assert {"wk[1]", "wv[1]", "b[0]", "wo[0]"} <= dims_of(g)
    b = next(p for p in g.members if p.dim.value == "b")
    np.testing.assert_array_equal(b.channel, np.tile(np.repeat(np.arange(4), 4), 3))
    check_masked_equivalence(m, input_shapes=SHAPES)
    _, _, pruned = prune_one(m, "wq:1", [2], input_shapes=SHAPES)
    assert attrs(node_of(pruned, "MultiHeadAttention"))["num_heads"] == 1
    assert pruned.graph.initializers["b"].shape == (12,)


def test_multi_head_attention_with_packed_qkv_groups_by_the_heads_axis():
    """onnxruntime's CPU provider does not run packed QKV: the couplings are checked, not run."""
    m = build(MS + """g (float[2,5,16] x, float[16,48] w, float[16,16] wo) => (float[2,5,16] y)
    { qkv = MatMul(x, w)  s = Constant <value = int64[5] {2, 5, 4, 3, 4}> ()  p = Reshape(qkv, s)
      a = com.microsoft.MultiHeadAttention <num_heads=4> (p)  y = MatMul(a, wo) }""")
    _, groups = groups_of(m)
    g = groups["w:1"]
    assert g.kind == "heads" and g.size == 4 and {"p[2]", "wo[0]"} <= dims_of(g) and g.heads.head_dim == 4
    w = next(p for p in g.params if p.param == "w")
    np.testing.assert_array_equal(w.channel, np.repeat(np.arange(4), 12))  # [heads, 3, head_size] per head


GQA = MS + """g (float[2,6,16] x, float[16,64] wq, float[16,32] wk, float[16,32] wv, float[64,16] wo,
                float[8,8] cc, float[8,8] cs) => (float[2,6,16] y)
{ q = MatMul(x, wq)  k = MatMul(x, wk)  v = MatMul(x, wv)
  sl = Constant <value = int32[2] {5, 5}> ()  tl = Constant <value = int32 {6}> ()
  a, pk, pv = com.microsoft.GroupQueryAttention <num_heads=4, kv_num_heads=2, do_rotary=1>
      (q, k, v, "", "", sl, tl, cc, cs)
  y = MatMul(a, wo) }"""


def test_group_query_attention_prunes_kv_groups_and_query_heads_within_them():
    m = build(GQA)
    dg, groups = groups_of(m)
    g = groups["wq:1"]
    assert g.kind == "heads" and g.size == 2
    assert (g.heads.q_heads, g.heads.kv_groups, g.heads.head_dim, g.heads.slots) == (4, 2, 16, 2)
    q = next(p for p in g.params if p.param == "wq")
    np.testing.assert_array_equal(q.channel, np.repeat([0, 1], 32))  # q heads 0,1 read K/V head 0
    assert {"wk[1]", "wv[1]", "wo[0]", "pk[1]"} <= dims_of(g)
    check_masked_equivalence(m)
    loaded, g, whole = prune_one(m, "wq:1", [1])  # one K/V group and its two query heads
    assert {k: attrs(node_of(whole, "GroupQueryAttention"))[k] for k in ("num_heads", "kv_num_heads")} == \
        {"num_heads": 2, "kv_num_heads": 1}
    assert whole.graph.initializers["wk"].shape == (16, 16)
    _, g, within = prune_one(m, "wq:1", [0, 1], slots=[0])  # query heads 0 and 2, both K/V heads
    assert {k: attrs(node_of(within, "GroupQueryAttention"))[k] for k in ("num_heads", "kv_num_heads")} == \
        {"num_heads": 2, "kv_num_heads": 2}
    assert within.graph.initializers["wq"].shape == (16, 32) and within.graph.initializers["wk"].shape == (16, 32)
    assert_masked_equal(loaded, g, within, [0, 1], [0])


def test_kv_cache_graph_inputs_fix_the_kv_heads():
    """The caches are [batch, kv_heads, seq, head_size] graph inputs. past_k pairs with the output
    pk (state, cut with the heads), but past_v has no present output to pair with: a pruned model
    would need another past_v, so the heads group is blocked, naming that cache."""
    m = build(GQA.replace("float[8,8] cs)", "float[8,8] cs, float[2,2,5,16] past_k, float[2,2,5,16] past_v)")
              .replace("float[2,6,16] x", "float[2,1,16] x")
              .replace("=> (float[2,6,16] y)", "=> (float[2,1,16] y, float[2,2,6,16] pk)")
              .replace('(q, k, v, "", "", sl, tl, cc, cs)', "(q, k, v, past_k, past_v, sl, tl, cc, cs)"))
    dg, groups = groups_of(m)
    assert "wq:1" not in groups
    blocked = next(b for b in dg.blocked_groups if b.key == "wq:1")
    assert "past_v" in blocked.reason and "past_k" not in blocked.reason
    assert run(spa.load(m), feeds_for(spa.load(m)))[1].shape == (2, 2, 6, 16)


def test_rotary_embedding_couples_whole_heads():
    m = build(MS + """g (float[2,6,16] x, float[16,16] wq, float[16,16] wk, float[16,16] wv, float[16,16] wo,
                        float[8,2] cc, float[8,2] cs) => (float[2,6,16] y)
    { q = MatMul(x, wq)  k = MatMul(x, wk)  v = MatMul(x, wv)
      pos = Constant <value = int64[2,6] {0,1,2,3,4,5,0,1,2,3,4,5}> ()
      qr = com.microsoft.RotaryEmbedding <num_heads=4> (q, pos, cc, cs)
      kr = com.microsoft.RotaryEmbedding <interleaved=1> (k, pos, cc, cs)
      a = com.microsoft.MultiHeadAttention <num_heads=4> (qr, kr, v)  y = MatMul(a, wo) }""")
    dg, groups = groups_of(m)
    g = groups["wq:1"]
    assert g.kind == "heads" and g.size == 4 and {"qr[2]", "kr[2]", "wk[1]"} <= dims_of(g)
    check_masked_equivalence(m)
    _, _, pruned = prune_one(m, "wq:1", [0, 2])
    rotary = [attrs(n) for n in pruned.graph if n.op_type == "RotaryEmbedding"]
    assert rotary[0]["num_heads"] == 2 and "num_heads" not in rotary[1]


def test_rotary_embedding_on_bnsh_heads_keeps_head_size():
    m = build(MS + """g (float[2,6,16] x, float[16,16] wq, float[16,16] wk, float[16,16] wv, float[16,16] wo,
                        float[8,2] cc, float[8,2] cs) => (float[2,6,16] y)
    { q = MatMul(x, wq)  k = MatMul(x, wk)  v = MatMul(x, wv)
      s4 = Constant <value = int64[4] {2, 6, 4, 4}> ()  q4 = Reshape(q, s4)  qt = Transpose <perm=[0,2,1,3]> (q4)
      pos = Constant <value = int64[2,6] {0,1,2,3,4,5,0,1,2,3,4,5}> ()
      qr = com.microsoft.RotaryEmbedding (qt, pos, cc, cs)  qb = Transpose <perm=[0,2,1,3]> (qr)
      s3 = Constant <value = int64[3] {2, 6, 16}> ()  q3 = Reshape(qb, s3)
      a = com.microsoft.MultiHeadAttention <num_heads=4> (q3, k, v)  y = MatMul(a, wo) }""")
    _, groups = groups_of(m)
    g = groups["wq:1"]
    assert g.kind == "heads" and g.size == 4 and {"qr[1]", "wk[1]"} <= dims_of(g) and "qr[3]" not in dims_of(g)
    check_masked_equivalence(m)


def test_fused_matmul_with_transposed_weight():
    m = build(MS + """g (float[2,5,8] x, float[16,8] w1, float[16] b1, float[16,3] w2) => (float[2,5,3] y)
        <float[2,5,16] h, float[2,5,16] r>
    { t = com.microsoft.FusedMatMul <transB=1, alpha=0.5> (x, w1)  h = Add(t, b1)  r = Relu(h)
      y = com.microsoft.FusedMatMul <alpha=2.0> (r, w2) }""")
    _, groups = groups_of(m)
    g = groups["w1:0"]
    assert {str(p.dim): p.role for p in g.params} == {"w1[0]": "out", "b1[0]": "param", "w2[0]": "in"}
    check_masked_equivalence(m)
    loaded, g, pruned = prune_one(m, "w1:0", [1, 5, 9])
    assert pruned.graph.initializers["w1"].shape == (3, 8) and pruned.graph.initializers["w2"].shape == (3, 3)


def test_bias_add_ties_bias_and_skip_to_the_channels():
    """onnxruntime runs BiasAdd on CUDA only: the couplings are checked, not run."""
    m = build(MS + """g (float[2,5,8] x, float[8,16] w1, float[16] b1, float[16,3] w2) => (float[2,5,3] y)
        <float[2,5,16] a>
    { h = MatMul(x, w1)  r = Relu(h)  a = com.microsoft.BiasAdd (h, b1, r)  y = MatMul(a, w2) }""")
    _, groups = groups_of(m)
    g = groups["w1:1"]
    assert {str(p.dim): p.role for p in g.params} == {"w1[1]": "out", "b1[0]": "bias", "w2[0]": "in"}
    assert {"r[2]", "a[2]"} <= dims_of(g)


def test_fused_matmul_with_batch_transpose_is_a_barrier():
    m = build(MS + """g (float[2,5,8] x, float[8,16] w1, float[16,3] w2) => (float[2,3,5] y)
    { h = MatMul(x, w1)  t = Relu(h)  y = com.microsoft.FusedMatMul <transBatchA=1> (w2, t) }""")
    dg, groups = groups_of(m)
    assert "w1:1" not in groups
    assert any(b.op == "FusedMatMul" and "transBatch" in b.reason for b in dg.barriers)


def test_static_sizes_read_off_shape_fold_into_slice_bounds():
    """rotate_half as TorchScript exports it: x[..., : x.shape[-1] // 2] with the shape read at run
    time (through a Gather of the permuted shape, as onnxruntime's optimizer leaves it)."""
    m = build(HEAD + """g (float[B,S,16] x, float[16,16] w, float[16,16] wo) => (float[B,S,16] y)
    { h = MatMul(x, w)  sh = Shape(h)  i = Constant <value = int64 {2}> ()  d = Gather <axis=0> (sh, i)
      two = Constant <value = int64 {2}> ()  half = Div(d, two)  z = Constant <value = int64[1] {0}> ()
      hu = Unsqueeze(half, z)  big = Constant <value = int64[1] {1000}> ()  ax = Constant <value = int64[1] {-1}> ()
      lo = Slice(h, z, hu, ax)  hi = Slice(h, hu, big, ax)  c = Concat <axis=-1> (hi, lo)  y = MatMul(c, wo) }""")
    loaded = spa.load(m)
    assert not [n for n in loaded.graph if n.op_type in ("Shape", "Gather")]
    dg = spa.dependency_graph(loaded)
    assert not dg.barriers and "w:1" in {g.key for g in dg.groups}


# ---- models through onnxruntime's transformer optimizer -------------------------------------
def _optimized(name: str):
    """A small model of ``name`` (random init; eager attention, the form the fusions match),
    exported with the TorchScript exporter and optimized by onnxruntime."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    import onnx

    class Tokens(torch.nn.Module):
        """Logits (or the last hidden state) of a `transformers` model fed ids and a mask."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            out = self.model(input_ids, attention_mask=attention_mask)
            return out.logits if hasattr(out, "logits") else out.last_hidden_state

    torch.manual_seed(0)
    if name == "bert":
        cfg = transformers.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=96, max_position_embeddings=64)
        model_cls, model_type = transformers.BertModel, "bert"
    elif name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        model_cls, model_type = transformers.GPT2LMHeadModel, "gpt2"
    else:
        cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=80, max_position_embeddings=64)
        model_cls, model_type = transformers.LlamaForCausalLM, "gpt2"
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    with torch.no_grad():  # distinct norm weights and biases: the optimizer shares equal constants
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ids, mask = torch.randint(0, 97, (2, 12)), torch.ones(2, 12, dtype=torch.int64)
    names = ["input_ids", "attention_mask"]
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Tokens(model), (ids, mask), f, dynamo=False, input_names=names, opset_version=17,
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})
    return optimizer.optimize_model(onnx.load_from_string(f.getvalue()), model_type=model_type, num_heads=4,
                                    hidden_size=64).model


def _fused_ops(proto) -> set[str]:
    return {n.op_type for n in proto.graph.node if n.domain == "com.microsoft"}


def _prune_and_check(proto):
    result = spa.prune(proto, ratio=0.3)
    assert result.equivalence is not None and result.equivalence.exact and result.equivalence.checked_groups
    check_structure(result.model)  # onnx.checker with strict shape inference
    loaded = spa.load(proto)
    feeds = feeds_for(loaded, {"batch": 2, "seq": 7})
    assert run(result.model, feeds)[0].shape == run(loaded, feeds)[0].shape
    assert count_params(result.model) < count_params(loaded)
    return result


def test_optimized_bert_attention_heads_are_pruned():
    proto = _optimized("bert")
    assert {"Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu"} <= _fused_ops(proto)
    dg = spa.dependency_graph(proto)
    heads = {g.key: g for g in dg.groups if g.kind == "heads"}
    assert set(heads) == {"Attention_0_qkv_weight:1", "Attention_1_qkv_weight:1"}
    assert all(g.size == 4 and g.heads.head_dim == 16 for g in heads.values())
    assert not dg.relevant_barriers()
    result = _prune_and_check(proto)
    att = [n for n in result.model.graph if n.op_type == "Attention"]
    assert [attrs(n)["num_heads"] for n in att] == [3, 3]
    assert att[0].inputs[1].const_value.shape == (64, 144)


def test_optimized_gpt2_heads_and_ffn_through_fused_norms_and_gelu():
    proto = _optimized("gpt2")
    assert {"SkipLayerNormalization", "FastGelu"} <= _fused_ops(proto)
    dg = spa.dependency_graph(proto)
    kinds = [g.kind for g in dg.groups]
    assert kinds.count("heads") == 2 and kinds.count("hidden") == 1
    assert not dg.relevant_barriers()
    result = _prune_and_check(proto)
    assert sum(n.op_type == "FastGelu" for n in result.model.graph) == 2


def test_optimized_llama_prunes_through_simplified_norms():
    proto = _optimized("llama")
    assert "SkipSimplifiedLayerNormalization" in _fused_ops(proto)
    assert any(n.op_type == "SimplifiedLayerNormalization" and not n.domain for n in proto.graph.node)
    dg = spa.dependency_graph(proto)
    hidden = [g for g in dg.groups if g.kind == "hidden"]
    assert len(hidden) == 1 and not hidden[0].exact
    heads = [g for g in dg.groups if g.kind == "heads"]  # rotate_half's computed slices fold away
    assert [(g.heads.q_heads, g.heads.kv_groups, g.heads.slots) for g in heads] == [(4, 2, 2)] * 2
    assert not [b for b in dg.relevant_barriers() if b.domain or b.op == "SimplifiedLayerNormalization"]
    _prune_and_check(proto)

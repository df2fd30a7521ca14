"""Rules for what transformer graphs contain, on hand-written ONNX graphs: LayerNorm and its
fused variants, RMSNorm as exported, heads split/merged by Reshape with computed targets, the
folded batch×heads axis of decomposed SDPA, GQA's K/V repeat, Einsum, shared zero biases."""

from __future__ import annotations

import numpy as np
from helpers import build, check_masked_equivalence, dims_of, feeds_for, groups_of, run, single_group_plan

import spa

HEAD = '<ir_version: 9, opset_import: ["" : 18]>\n'
MS = '<ir_version: 9, opset_import: ["" : 18, "com.microsoft" : 1]>\n'


def prune(model, key, keep):
    loaded = spa.load(model)
    dg = spa.dependency_graph(loaded)
    return loaded, spa.apply_plan(loaded, single_group_plan(dg, dg.group(key), keep))


def test_layer_norm_scale_and_bias_follow_the_normalized_axis_not_exact():
    m = build(HEAD + """g (float[2,5,8] x, float[8,16] w1, float[16] s1, float[16] b1, float[16,3] w2)
        => (float[2,5,3] y)
    { h = MatMul(x, w1)  n = LayerNormalization <axis=-1> (h, s1, b1)  y = MatMul(n, w2) }""")
    dg, groups = groups_of(m)
    g = groups["w1:1"]
    assert {"s1[0]", "b1[0]", "n[2]", "w2[0]"} <= dims_of(g)
    assert {str(p.dim): p.role for p in g.params if p.param in ("s1", "b1")} == {"s1[0]": "scale", "b1[0]": "bias"}
    assert not g.exact and g.kind == "hidden"
    _, pruned = prune(m, "w1:1", range(0, 16, 2))
    assert pruned.graph.initializers["s1"].shape == (8,)


def test_fused_ort_norms_carry_the_hidden_axis():
    m = build(MS + """g (float[2,5,8] x, float[8,16] w1, float[8,16] w3, float[16] s1, float[16] s2,
                        float[16] b2, float[16,3] w2) => (float[2,5,3] y)
    { h = MatMul(x, w1)  n = com.microsoft.SimplifiedLayerNormalization <axis=-1> (h, s1)
      k = MatMul(x, w3)  o, mean, inv, sum = com.microsoft.SkipLayerNormalization (n, k, s2, b2)
      y = MatMul(o, w2) }""")
    dg, groups = groups_of(m)
    g = groups["w1:1"]
    assert {"w3[1]", "s1[0]", "s2[0]", "b2[0]", "sum[2]", "w2[0]"} <= dims_of(g) and not g.exact
    assert not dg.relevant_barriers()


def test_rmsnorm_as_exported_prunes_hidden_and_stays_valid():
    m = build(HEAD + """g (float[2,5,8] x, float[8,16] w1, float[16] s1, float[16,3] w2) => (float[2,5,3] y)
    { h = MatMul(x, w1)  two = Constant <value = float {2.0}> ()  p = Pow(h, two)
      ax = Constant <value = int64[1] {-1}> ()  ms = ReduceMean <keepdims=1> (p, ax)
      eps = Constant <value = float {1e-6}> ()  a = Add(ms, eps)  r = Sqrt(a)  d = Div(h, r)
      n = Mul(s1, d)  y = MatMul(n, w2) }""")
    dg, groups = groups_of(m)
    g = groups["w1:1"]
    assert {"p[2]", "d[2]", "s1[0]", "n[2]", "w2[0]"} <= dims_of(g) and not g.exact
    loaded, pruned = prune(m, "w1:1", [1, 4, 9, 15])
    feeds = feeds_for(loaded)
    assert run(pruned, feeds)[0].shape == (2, 5, 3)


ATTENTION = """g (float[B,S,16] x, float[16,16] wq, float[16,16] wk, float[16,16] wv, float[16,16] wo)
    => (float[B,S,16] y)
{ q = MatMul(x, wq)  k = MatMul(x, wk)  v = MatMul(x, wv)
  s0 = Shape <start=0, end=1> (x)  s1 = Shape <start=1, end=2> (x)
  nh = Constant <value = int64[1] {4}> ()  hd = Constant <value = int64[1] {4}> ()
  tq = Concat <axis=0> (s0, s1, nh, hd)
  q4 = Reshape(q, tq)  k4 = Reshape(k, tq)  v4 = Reshape(v, tq)
  qt = Transpose <perm=[0,2,1,3]> (q4)  kt = Transpose <perm=[0,2,3,1]> (k4)  vt = Transpose <perm=[0,2,1,3]> (v4)
  sc = MatMul(qt, kt)  p = Softmax <axis=-1> (sc)  o = MatMul(p, vt)
  ot = Transpose <perm=[0,2,1,3]> (o)  m1 = Constant <value = int64[1] {-1}> ()
  tm = Concat <axis=0> (s0, s1, m1)  om = Reshape(ot, tm)  y = MatMul(om, wo) }"""


def test_heads_split_by_a_computed_reshape_target_and_its_head_count_rewritten():
    m = build(HEAD + ATTENTION)
    dg, groups = groups_of(m)
    g = groups["wq:1"]
    assert g.kind == "heads" and g.size == 4 and g.heads.head_dim == 4
    assert {"wk[1]", "wv[1]", "wo[0]", "sc[1]", "o[1]"} <= dims_of(g)
    assert "qt[3]" not in dims_of(g)  # head_dim is never cut
    check_masked_equivalence(m, input_shapes={"B": 2, "S": 7})
    loaded, pruned = prune(m, "wq:1", [0, 3])
    concat = next(n for n in pruned.graph if n.op_type == "Concat" and n.outputs[0].name == "tq")
    assert concat.inputs[2].const_value.numpy().tolist() == [2]  # literal head count follows
    for shapes in ({"B": 1, "S": 3}, {"B": 3, "S": 11}):
        assert run(pruned, feeds_for(loaded, shapes))[0].shape == (shapes["B"], shapes["S"], 16)


def test_decomposed_sdpa_fold_of_batch_and_heads_keeps_heads_prunable():
    """[B,H,S,D] -> [-1,S,D] -> Transpose -> [B,H,D,S] (how SDPA exports Kᵀ) is a periodic fold."""
    m = build(HEAD + ATTENTION.replace(
        "kt = Transpose <perm=[0,2,3,1]> (k4)",
        """k3 = Transpose <perm=[0,2,1,3]> (k4)  sS = Shape <start=2, end=3> (k3)  sB = Shape <start=0, end=2> (k3)
           hd2 = Constant <value = int64[1] {4}> ()  m2 = Constant <value = int64[1] {-1}> ()
           f = Concat <axis=0> (m2, sS, hd2)
           kf = Reshape(k3, f)  kft = Transpose <perm=[0,2,1]> (kf)
           tu = Concat <axis=0> (sB, hd2, sS)  kt = Reshape(kft, tu)"""))
    loaded = spa.load(m)
    dg = spa.dependency_graph(loaded)
    g = dg.group("wq:1")
    assert g.kind == "heads" and g.size == 4
    assert {"kf[0]", "kft[0]"} <= dims_of(g)  # the folded axis (4*B) is periodic: channel = i % 4
    check_masked_equivalence(m, input_shapes={"B": 2, "S": 5})
    _, pruned = prune(m, "wq:1", [1, 2, 3])
    assert run(pruned, feeds_for(loaded, {"B": 3, "S": 6}))[0].shape == (3, 6, 16)


def test_gqa_repeat_couples_each_kv_head_with_its_query_heads_and_rewrites_expand():
    m = build(HEAD + """g (float[2,6,16] x, float[16,16] wq, float[16,8] wk, float[16,8] wv, float[16,16] wo)
        => (float[2,6,16] y)
    { q = MatMul(x, wq)  k = MatMul(x, wk)  v = MatMul(x, wv)
      sq = Constant <value = int64[4] {2, 6, 4, 4}> ()  skv = Constant <value = int64[4] {2, 6, 2, 4}> ()
      q4 = Reshape(q, sq)  k4 = Reshape(k, skv)  v4 = Reshape(v, skv)
      qt = Transpose <perm=[0,2,1,3]> (q4)  kt0 = Transpose <perm=[0,2,1,3]> (k4)  vt0 = Transpose <perm=[0,2,1,3]> (v4)
      a2 = Constant <value = int64[1] {2}> ()  ku = Unsqueeze(kt0, a2)  vu = Unsqueeze(vt0, a2)
      es = Constant <value = int64[5] {2, 2, 2, 6, 4}> ()  ke = Expand(ku, es)  ve = Expand(vu, es)
      rs = Constant <value = int64[4] {2, 4, 6, 4}> ()  kr = Reshape(ke, rs)  vr = Reshape(ve, rs)
      ktt = Transpose <perm=[0,1,3,2]> (kr)  sc = MatMul(qt, ktt)  p = Softmax <axis=-1> (sc)
      o = MatMul(p, vr)  ot = Transpose <perm=[0,2,1,3]> (o)  so = Constant <value = int64[3] {2, 6, 16}> ()
      om = Reshape(ot, so)  y = MatMul(om, wo) }""")
    dg, groups = groups_of(m)
    g = groups["wq:1"]
    assert g.size == 2 and (g.heads.q_heads, g.heads.kv_groups, g.heads.head_dim) == (4, 2, 4)
    q = next(p for p in g.params if p.param == "wq")
    np.testing.assert_array_equal(q.channel, np.repeat([0, 1], 8))  # q heads 0,1 -> KV 0; 2,3 -> KV 1
    check_masked_equivalence(m)
    _, pruned = prune(m, "wq:1", [1])
    expand = next(n for n in pruned.graph if n.op_type == "Expand")
    assert expand.inputs[1].const_value.numpy().tolist() == [2, 1, 2, 6, 4]
    reshape = next(n for n in pruned.graph if n.outputs[0].name == "kr")
    assert reshape.inputs[1].const_value.numpy().tolist() == [2, 2, 6, 4]
    # Query heads within K/V groups: keep position 1 of each group (q heads 1 and 3).
    assert g.heads.slots == 2
    np.testing.assert_array_equal(q.slot, np.tile(np.repeat([0, 1], 4), 2))
    loaded = spa.load(m)
    within = spa.apply_plan(loaded, single_group_plan(dg, g, [0, 1], slots=[1]))
    expand = next(n for n in within.graph if n.op_type == "Expand")
    assert expand.inputs[1].const_value.numpy().tolist() == [2, 2, 1, 6, 4]
    assert within.graph.initializers["wq"].shape == (16, 8) and within.graph.initializers["wk"].shape == (16, 8)
    feeds = feeds_for(loaded)
    from helpers import masked_model

    np.testing.assert_allclose(run(within, feeds)[0], run(masked_model(loaded, g, [0, 1], [1]), feeds)[0],
                               atol=1e-5, rtol=1e-5)


def test_fused_qkv_split_on_the_channel_axis():
    m = build(HEAD + """g (float[2,6,16] x, float[16,48] wqkv, float[16,16] wo) => (float[2,6,16] y)
    { qkv = MatMul(x, wqkv)  sp = Constant <value = int64[3] {16, 16, 16}> ()
      q, k, v = Split <axis=2> (qkv, sp)
      s = Constant <value = int64[4] {2, 6, 4, 4}> ()  q4 = Reshape(q, s)  k4 = Reshape(k, s)  v4 = Reshape(v, s)
      qt = Transpose <perm=[0,2,1,3]> (q4)  kt = Transpose <perm=[0,2,3,1]> (k4)  vt = Transpose <perm=[0,2,1,3]> (v4)
      sc = MatMul(qt, kt)  p = Softmax <axis=-1> (sc)  o = MatMul(p, vt)  ot = Transpose <perm=[0,2,1,3]> (o)
      so = Constant <value = int64[3] {2, 6, 16}> ()  om = Reshape(ot, so)  y = MatMul(om, wo) }""")
    dg, groups = groups_of(m)
    g = groups["wqkv:1"]
    assert g.kind == "heads" and g.size == 4
    qkv = next(p for p in g.params if p.param == "wqkv")
    np.testing.assert_array_equal(qkv.channel, np.tile(np.repeat(np.arange(4), 4), 3))  # q|k|v thirds
    check_masked_equivalence(m)
    _, pruned = prune(m, "wqkv:1", [0, 2])
    split = next(n for n in pruned.graph if n.op_type == "Split")
    assert split.inputs[1].const_value.numpy().tolist() == [8, 8, 8]


def test_einsum_contraction_roles_and_broadcast():
    m = build(HEAD + """g (float[2,5,8] x, float[8,3,4] w1, float[3,4,6] w2) => (float[2,5,6] y)
    { h = Einsum <equation = "bsd,dhe->bshe"> (x, w1)  r = Relu(h)  y = Einsum <equation = "...he,hef->...f"> (r, w2) }""")
    dg, groups = groups_of(m)
    assert set(groups) == {"w1:1", "w1:2"}
    roles = {str(p.dim): p.role for p in groups["w1:1"].params}
    assert roles == {"w1[1]": "out", "w2[0]": "in"}
    check_masked_equivalence(m)


def test_shared_zero_bias_does_not_couple_unrelated_layers():
    m = build(HEAD + """g (float[2,8] x, float[8,16] w1, float[16,8] w2, float[8,16] w3, float[16,4] w4)
        => (float[2,4] y)
    { z = Constant <value = float[16] {0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0}> ()
      h1 = MatMul(x, w1)  a1 = Add(h1, z)  r1 = Relu(a1)  o1 = MatMul(r1, w2)
      h2 = MatMul(o1, w3)  a2 = Add(h2, z)  r2 = Relu(a2)  y = MatMul(r2, w4) }""")
    _, groups = groups_of(m)
    assert {"w1:1", "w3:1"} <= set(groups)  # two layers, two groups, though the zeros are one tensor
    check_masked_equivalence(m)

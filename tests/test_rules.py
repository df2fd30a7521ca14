"""Per-rule tests: exact group membership, masked equivalence and rewritten attributes."""

from __future__ import annotations

import pytest
from helpers import build, check_masked_equivalence, dims_of, groups_of, single_group_plan

import spa
from spa.dims import Dim
from spa.ops.elementwise import UNARY_OPS

HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'


def head(opset=17):
    return f'<ir_version: 8, opset_import: ["" : {opset}]>\n'


def prune_one(model, key, keep):
    loaded = spa.load(model)
    dg = spa.dependency_graph(loaded)
    return spa.apply_plan(loaded, single_group_plan(dg, dg.group(key), keep))


def node_attr(model, op_type, attr):
    return [n.attributes[attr].value for n in model.graph if n.op_type == op_type and attr in n.attributes]


def test_conv_relu_conv_group_membership():
    m = build(HEAD + """g (float[1,3,8,8] x) => (float[1,4,8,8] y)
    { h = Conv <pads=[1,1,1,1]> (x, w1, b1)  r = Relu(h)  y = Conv(r, w2) }
    """.replace("(float[1,3,8,8] x)", "(float[1,3,8,8] x, float[8,3,3,3] w1, float[8] b1, float[4,8,1,1] w2)"))
    dg, groups = groups_of(m)
    assert list(groups) == ["w1:0"]
    g = groups["w1:0"]
    assert g.size == 8
    assert dims_of(g) == {"w1[0]", "b1[0]", "h[1]", "r[1]", "w2[1]"}
    roles = {str(p.dim): p.role for p in g.params}
    assert roles == {"w1[0]": "out", "b1[0]": "bias", "w2[1]": "in"}
    assert {b.key for b in dg.blocked_groups} == {"w1:1", "w2:0"}
    check_masked_equivalence(m)


def test_explain_names_the_chain():
    m = build(HEAD + """g (float[1,3,8,8] x, float[8,3,3,3] w1, float[4,8,1,1] w2) => (float[1,4,8,8] y)
    { h = Conv <pads=[1,1,1,1]> (x, w1)  r = Relu(h)  y = Conv(r, w2) }""")
    dg, _ = groups_of(m)
    steps = dg.explain(Dim("w1", 0), Dim("w2", 1))
    assert len(steps) == 3 and "Conv" in steps[0] and "Relu" in steps[1] and "Conv" in steps[2]


DW = """g (float[1,3,8,8] x, float[8,3,1,1] w1, float[8,1,3,3] wd, float[8] bd, float[5,8,1,1] w3)
    => (float[1,5,8,8] y)
{ h = Conv(x, w1)  d = Conv <group=8, pads=[1,1,1,1]> (h, wd, bd)  r = Relu(d)  y = Conv(r, w3) }"""


def test_depthwise_conv_couples_in_and_out_and_rewrites_group():
    m = build(HEAD + DW)
    _, groups = groups_of(m)
    g = groups["w1:0"]
    assert g.size == 8
    assert {"w1[0]", "h[1]", "wd[0]", "bd[0]", "d[1]", "r[1]", "w3[1]"} <= dims_of(g)
    pruned = prune_one(m, "w1:0", [0, 2, 5])
    assert node_attr(pruned, "Conv", "group") == [3]
    check_masked_equivalence(m)


def test_grouped_conv_prunes_whole_conv_groups():
    m = build(HEAD + """g (float[1,3,8,8] x, float[8,3,1,1] w1, float[12,4,3,3] wg, float[5,12,1,1] w3)
        => (float[1,5,8,8] y)
    { h = Conv(x, w1)  d = Conv <group=2, pads=[1,1,1,1]> (h, wg)  y = Conv(d, w3) }""")
    _, groups = groups_of(m)
    g = groups["w1:0"]
    assert g.size == 2  # two conv groups of 4 input / 6 output channels
    assert g.member(Dim("h", 1)).channel.tolist() == [0] * 4 + [1] * 4
    assert g.member(Dim("d", 1)).channel.tolist() == [0] * 6 + [1] * 6
    pruned = prune_one(m, "w1:0", [1])
    assert node_attr(pruned, "Conv", "group") == [1]
    assert pruned.graph.initializers["wg"].const_value.shape.numpy() == (6, 4, 3, 3)
    check_masked_equivalence(m)


def test_strided_slice_on_channel_axis_blocks():
    m = build(HEAD + """g (float[1,3,6,6] x, float[12,3,1,1] w1, float[4,6,1,1] w2) => (float[1,4,6,6] y)
    { h = Conv(x, w1)  st = Constant <value = int64[1] {0}> ()  en = Constant <value = int64[1] {12}> ()
      ax = Constant <value = int64[1] {1}> ()  sp = Constant <value = int64[1] {2}> ()
      s = Slice(h, st, en, ax, sp)  y = Conv(s, w2) }""")
    dg, groups = groups_of(m)
    assert not groups
    assert "not carried through Slice" in {b.key: b.reason for b in dg.blocked_groups}["w1:0"]


def test_conv_transpose_plain_and_depthwise():
    m = build(HEAD + """g (float[1,3,4,4] x, float[8,3,1,1] w1, float[8,6,2,2] wt, float[6] bt,
                          float[6,1,3,3] wd, float[2,6,1,1] w3) => (float[1,2,8,8] y)
    { h = Conv(x, w1)  u = ConvTranspose <strides=[2,2]> (h, wt, bt)
      d = ConvTranspose <group=6, pads=[1,1,1,1]> (u, wd)  y = Conv(d, w3) }""")
    _, groups = groups_of(m)
    assert set(groups) == {"w1:0", "wt:1"}
    assert {"h[1]", "wt[0]"} <= dims_of(groups["w1:0"])
    assert {"wt[1]", "bt[0]", "u[1]", "wd[0]", "d[1]", "w3[1]"} <= dims_of(groups["wt:1"])
    check_masked_equivalence(m)
    assert node_attr(prune_one(m, "wt:1", [0, 3]), "ConvTranspose", "group") == [2]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_chain(trans_b):
    shape = "[16,8]" if not trans_b else "[8,16]"
    shape2 = "[8,4]" if not trans_b else "[4,8]"
    m = build(HEAD + f"""g (float[N,16] x, float{shape} w1, float[8] b1, float{shape2} w2) => (float[N,4] y)
    {{ h = Gemm <transB={trans_b}> (x, w1, b1)  r = Sigmoid(h)  y = Gemm <transB={trans_b}> (r, w2) }}""")
    _, groups = groups_of(m)
    g = groups[f"w1:{1 - trans_b}"]
    assert dims_of(g) == {f"w1[{1 - trans_b}]", "b1[0]", "h[1]", "r[1]", f"w2[{trans_b}]"}
    check_masked_equivalence(m, input_shapes={"N": 3})


def test_matmul_with_constant_weight_on_3d_input():
    m = build(HEAD + """g (float[2,5,16] x, float[16,12] w1, float[12] b1, float[12,16] w2) => (float[2,5,16] y)
    { h = MatMul(x, w1)  a = Add(h, b1)  r = Relu(a)  y = MatMul(r, w2) }""")
    _, groups = groups_of(m)
    assert dims_of(groups["w1:1"]) == {"w1[1]", "h[2]", "b1[0]", "a[2]", "r[2]", "w2[0]"}
    check_masked_equivalence(m)


def test_batch_and_instance_norm():
    m = build(HEAD + """g (float[1,3,8,8] x, float[8,3,3,3] w1, float[8] s1, float[8] b1, float[8] c1, float[8] s2,
                          float[8] s3, float[8] b3, float[4,8,1,1] w2) => (float[1,4,8,8] y)
    { h = Conv <pads=[1,1,1,1]> (x, w1)  n = BatchNormalization(h, s1, b1, c1, s2)
      i = InstanceNormalization(n, s3, b3)  y = Conv(i, w2) }""")
    _, groups = groups_of(m)
    g = groups["w1:0"]
    roles = {str(p.dim): p.role for p in g.params}
    assert roles == {"w1[0]": "out", "s1[0]": "scale", "b1[0]": "bias", "c1[0]": "stat", "s2[0]": "stat",
                     "s3[0]": "scale", "b3[0]": "bias", "w2[1]": "in"}
    check_masked_equivalence(m)


def test_group_norm_prunes_whole_norm_groups():
    m = build(head(21) + """g (float[1,3,8,8] x, float[8,3,3,3] w1, float[8] s1, float[8] b1, float[4,8,1,1] w2)
        => (float[1,4,8,8] y)
    { h = Conv <pads=[1,1,1,1]> (x, w1)  n = GroupNormalization <num_groups=4, epsilon=1e-5> (h, s1, b1)
      y = Conv(n, w2) }""")
    _, groups = groups_of(m)
    g = groups["w1:0"]
    assert g.size == 4 and g.member(Dim("h", 1)).channel.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert node_attr(prune_one(m, "w1:0", [0, 3]), "GroupNormalization", "num_groups") == [2]
    check_masked_equivalence(m)


FLOAT_UNARY = sorted(UNARY_OPS - {"Not", "IsNaN", "IsInf", "BitwiseNot", "Cast", "CastLike", "Dropout",
                                  "Identity", "Swish"})
# Inputs inside each op's domain (0 * NaN is NaN, so masking needs finite values).
_DOMAIN_PREP = {"Log": "Abs", "Sqrt": "Abs", "Reciprocal": "Abs", "Acosh": "Exp", "Asin": "Sigmoid",
                "Acos": "Sigmoid", "Atanh": "Sigmoid"}


@pytest.mark.parametrize("op", FLOAT_UNARY)
def test_unary_ops_carry_channels(op):
    pre = _DOMAIN_PREP.get(op, "Identity")
    m = build(head(20) + f"""g (float[1,3,6,6] x, float[8,3,1,1] w1, float[4,8,1,1] w2) => (float[1,4,6,6] y)
    {{ h = Conv(x, w1)  q = Abs(h)  p = {pre}(q)  a = {op}(p)  y = Conv(a, w2) }}""")
    _, groups = groups_of(m)
    assert "a[1]" in dims_of(groups["w1:0"])
    check_masked_equivalence(m, atol=1e-3)


def test_cast_and_dropout_and_clip_carry_channels():
    m = build(HEAD + """g (float[1,3,6,6] x, float[8,3,1,1] w1, float[4,8,1,1] w2) => (float[1,4,6,6] y)
    { h = Conv(x, w1)  c = Cast <to=10> (h)  c2 = Cast <to=1> (c)  d = Dropout(c2)
      lo = Constant <value = float {-1.0}> ()  k = Clip(d, lo)  y = Conv(k, w2) }""")
    _, groups = groups_of(m)
    assert {"c[1]", "c2[1]", "k[1]"} <= dims_of(groups["w1:0"])
    check_masked_equivalence(m, atol=1e-2)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu"])
def test_broadcast_ops_with_per_channel_constants(op):
    m = build(HEAD + f"""g (float[1,3,6,6] x, float[8,3,1,1] w1, float[8,1,1] c1, float[4,8,1,1] w2)
        => (float[1,4,6,6] y)
    {{ h = Conv(x, w1)  a = Abs(h)  o = {op}(a, c1)  y = Conv(o, w2) }}""")
    _, groups = groups_of(m)
    g = groups["w1:0"]
    assert {"c1[0]", "o[1]", "a[1]"} <= dims_of(g)
    assert "c1[1]" not in dims_of(g)  # broadcast size-1 axes couple to nothing
    check_masked_equivalence(m, atol=1e-3)


def test_where_and_squeeze_excitation():
    m = build(HEAD + """g (float[1,3,6,6] x, float[8,3,1,1] w1, float[2,8,1,1] w2, float[8,2,1,1] w3,
                          float[4,8,1,1] w4) => (float[1,4,6,6] y)
    { h = Conv(x, w1)  p = GlobalAveragePool(h)  s1 = Conv(p, w2)  s2 = Relu(s1)  s3 = Conv(s2, w3)
      s = Sigmoid(s3)  e = Mul(h, s)  z = Constant <value = float {0.0}> ()  c = Greater(e, z)
      q = Where(c, e, z)  y = Conv(q, w4) }""")
    _, groups = groups_of(m)
    g = groups["w1:0"]
    assert {"h[1]", "p[1]", "w2[1]", "w3[0]", "s[1]", "e[1]", "c[1]", "q[1]", "w4[1]"} <= dims_of(g)
    assert set(groups) == {"w1:0", "w2:0"}
    check_masked_equivalence(m)


@pytest.mark.parametrize("pool", ["MaxPool <kernel_shape=[2,2], strides=[2,2]>", "AveragePool <kernel_shape=[3,3]>",
                                  "GlobalMaxPool", "GlobalAveragePool", "LpPool <kernel_shape=[2,2]>"])
def test_pooling_carries_channels(pool):
    m = build(HEAD + f"""g (float[1,3,6,6] x, float[8,3,1,1] w1, float[4,8,1,1] w2) => (float[1,4,?,?] y)
    {{ h = Conv(x, w1)  p = {pool}(h)  y = Conv(p, w2) }}""")
    _, groups = groups_of(m)
    assert "p[1]" in dims_of(groups["w1:0"])
    check_masked_equivalence(m)


def test_resize_with_scales_and_with_sizes():
    m = build(HEAD + """g (float[1,3,4,4] x, float[8,3,1,1] w1, float[4,8,1,1] w2) => (float[1,4,16,16] y)
    { h = Conv(x, w1)  sc = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()
      u = Resize <mode="nearest"> (h, , sc)  sz = Constant <value = int64[4] {1, 8, 16, 16}> ()
      v = Resize <mode="linear"> (u, , , sz)  y = Conv(v, w2) }""")
    _, groups = groups_of(m)
    assert {"u[1]", "v[1]"} <= dims_of(groups["w1:0"])
    pruned = prune_one(m, "w1:0", [1, 2, 3])
    sizes = [n for n in pruned.graph if n.op_type == "Resize"][1].inputs[3].const_value.numpy()
    assert sizes.tolist() == [1, 3, 16, 16]
    check_masked_equivalence(m)


def test_pad_on_spatial_axes_carries_channels_and_on_channel_axis_blocks():
    m = build(HEAD + """g (float[1,3,4,4] x, float[8,3,1,1] w1, float[4,8,1,1] w2, float[4,10,1,1] w3)
        => (float[1,4,6,6] y, float[1,4,4,4] z)
    { h = Conv(x, w1)  pd = Constant <value = int64[8] {0,0,1,1,0,0,1,1}> ()  p = Pad(h, pd)  y = Conv(p, w2)
      h2 = Conv(x, w1)  pc = Constant <value = int64[8] {0,1,0,0,0,1,0,0}> ()  q = Pad(h2, pc)  z = Conv(q, w3) }""")
    dg, groups = groups_of(m)
    assert "p[1]" in dims_of(groups["w1:0"]) if "w1:0" in groups else True
    assert not groups, "w1 feeds a channel-padded branch too, so its group must be blocked"
    assert any("not carried through Pad" in b.reason for b in dg.blocked_groups)


def test_concat_and_split_on_channel_axis():
    m = build(head(18) + """g (float[1,3,6,6] x, float[4,3,1,1] wa, float[6,3,1,1] wb, float[5,10,1,1] w2,
                               float[3,4,1,1] w3, float[3,6,1,1] w4) => (float[1,3,6,6] y, float[1,3,6,6] z)
    { a = Conv(x, wa)  b = Conv(x, wb)  c = Concat <axis=1> (a, b)  d = Relu(c)
      sp = Constant <value = int64[2] {4, 6}> ()  s1, s2 = Split <axis=1> (d, sp)
      y = Conv(s1, w3)  z = Conv(s2, w4)  e = Conv(d, w2) }""".replace("(float[1,3,6,6] y, float[1,3,6,6] z)", "(float[1,3,6,6] y, float[1,3,6,6] z, float[1,5,6,6] e)"))
    _, groups = groups_of(m)
    g = groups["wa:0"]
    assert g.size == 10
    assert g.member(Dim("wb", 0)).channel.tolist() == list(range(4, 10))
    assert g.member(Dim("s2", 1)).channel.tolist() == list(range(4, 10))
    pruned = prune_one(m, "wa:0", [0, 1, 4, 5, 6])
    split = next(n for n in pruned.graph if n.op_type == "Split")
    assert split.inputs[1].const_value.numpy().tolist() == [2, 3]
    check_masked_equivalence(m)


def test_split_with_num_outputs_gets_explicit_sizes():
    m = build(head(18) + """g (float[1,3,6,6] x, float[8,3,1,1] w1, float[3,4,1,1] w3, float[3,4,1,1] w4)
        => (float[1,3,6,6] y, float[1,3,6,6] z)
    { h = Conv(x, w1)  s1, s2 = Split <axis=1, num_outputs=2> (h)  y = Conv(s1, w3)  z = Conv(s2, w4) }""")
    pruned = prune_one(m, "w1:0", [0, 4, 5, 6])
    split = next(n for n in pruned.graph if n.op_type == "Split")
    assert "num_outputs" not in split.attributes
    assert split.inputs[1].const_value.numpy().tolist() == [1, 3]
    check_masked_equivalence(m)


def test_slice_on_channel_axis_rewrites_bounds():
    m = build(HEAD + """g (float[1,3,6,6] x, float[12,3,1,1] w1, float[4,6,1,1] w2) => (float[1,4,6,6] y)
    { h = Conv(x, w1)  st = Constant <value = int64[1] {3}> ()  en = Constant <value = int64[1] {9}> ()
      ax = Constant <value = int64[1] {1}> ()  s = Slice(h, st, en, ax)  y = Conv(s, w2) }""")
    _, groups = groups_of(m)
    g = groups["w1:0"]
    assert g.member(Dim("s", 1)).channel.tolist() == list(range(3, 9))
    pruned = prune_one(m, "w1:0", [0, 2, 4, 5, 8, 10])
    sl = next(n for n in pruned.graph if n.op_type == "Slice")
    assert (sl.inputs[1].const_value.numpy().tolist(), sl.inputs[2].const_value.numpy().tolist()) == ([2], [5])
    check_masked_equivalence(m)


@pytest.mark.parametrize("fold", ["Flatten <axis=1> (h)", "Reshape(h, shp)"])
def test_conv_features_folded_into_gemm(fold):
    m = build(HEAD + f"""g (float[1,3,3,3] x, float[4,3,1,1] w1, float[36,5] w2) => (float[1,5] y)
    {{ h = Conv(x, w1)  shp = Constant <value = int64[2] {{1, 36}}> ()  f = {fold}  y = MatMul(f, w2) }}""")
    _, groups = groups_of(m)
    g = groups["w1:0"]
    assert g.member(Dim("w2", 0)).channel.tolist() == [c for c in range(4) for _ in range(9)]
    pruned = prune_one(m, "w1:0", [1, 3])
    assert pruned.graph.initializers["w2"].const_value.shape.numpy() == (18, 5)
    if "Reshape" in fold:
        r = next(n for n in pruned.graph if n.op_type == "Reshape")
        assert r.inputs[1].const_value.numpy().tolist() == [1, 18]
    check_masked_equivalence(m)


def test_reshape_with_dynamic_batch_and_minus_one():
    m = build(HEAD + """g (float[N,3,2,2] x, float[4,3,1,1] w1, float[16,5] w2) => (float[N,5] y)
    { h = Conv(x, w1)  shp = Constant <value = int64[2] {-1, 16}> ()  f = Reshape(h, shp)  y = MatMul(f, w2) }""")
    pruned = prune_one(m, "w1:0", [0, 1, 2])
    r = next(n for n in pruned.graph if n.op_type == "Reshape")
    assert r.inputs[1].const_value.numpy().tolist() == [-1, 12]
    check_masked_equivalence(m, input_shapes={"N": 2})


def test_transpose_to_channels_last():
    m = build(HEAD + """g (float[1,3,4,4] x, float[8,3,1,1] w1, float[8,6] w2) => (float[1,4,4,6] y)
    { h = Conv(x, w1)  t = Transpose <perm=[0,2,3,1]> (h)  y = MatMul(t, w2) }""")
    _, groups = groups_of(m)
    assert dims_of(groups["w1:0"]) == {"w1[0]", "h[1]", "t[3]", "w2[0]"}
    check_masked_equivalence(m)


def test_squeeze_unsqueeze_view_rule():
    m = build(HEAD + """g (float[1,3,4,4] x, float[8,3,1,1] w1, float[5,8] w2) => (float[1,5] y)
    { h = Conv(x, w1)  p = GlobalAveragePool(h)  ax = Constant <value = int64[2] {2, 3}> ()  s = Squeeze(p, ax)
      a0 = Constant <value = int64[1] {2}> ()  u = Unsqueeze(s, a0)  s2 = Squeeze(u, a0)
      y = Gemm <transB=1> (s2, w2) }""")
    _, groups = groups_of(m)
    assert {"s[1]", "u[1]", "s2[1]", "w2[1]"} <= dims_of(groups["w1:0"])
    check_masked_equivalence(m)


def test_reduce_over_channels_frees_the_axis_but_is_not_exact():
    m = build(head(18) + """g (float[1,3,4,4] x, float[8,3,1,1] w1, float[5,8] w2, float[6,3,1,1] w3,
                          float[4,3,1,1] w4, float[7,3,1,1] w5)
        => (float[1,5] y, float[1,1,4,4] z, float[1,1,4,4] m, int64[1,1,4,4] a)
    { h = Conv(x, w1)  ax = Constant <value = int64[2] {2, 3}> ()  r = ReduceMean <keepdims=0> (h, ax)
      y = Gemm <transB=1> (r, w2)  k = Conv(x, w3)  c = Constant <value = int64[1] {1}> ()
      z = ReduceSum <keepdims=1> (k, c)  k4 = Conv(x, w4)  m = ReduceMean <keepdims=1> (k4, c)
      k5 = Conv(x, w5)  a = ArgMax <axis=1> (k5) }""")
    dg, groups = groups_of(m)
    assert set(groups) == {"w1:0", "w3:0", "w4:0"}
    assert "r[1]" in dims_of(groups["w1:0"])
    # The removed channels' values no longer enter the reduction: prunable, not exact.
    assert not groups["w3:0"].exact and not groups["w4:0"].exact
    assert groups["w3:0"].size == 6 and groups["w4:0"].size == 4
    blocked = {b.key: b.reason for b in dg.blocked_groups}
    assert "not carried through ArgMax" in blocked["w5:0"]
    check_masked_equivalence(m)
    for key in ("w3:0", "w4:0"):  # valid, and the reduced outputs keep their shapes
        pruned = spa.apply_plan(spa.load(m), single_group_plan(dg, groups[key], [0, 2]))
        assert [tuple(d for d in o.shape) for o in pruned.graph.outputs][1:3] == [(1, 1, 4, 4), (1, 1, 4, 4)]


def test_softmax_over_channels_blocks_over_spatial_carries():
    m = build(HEAD + """g (float[1,3,4,4] x, float[8,3,1,1] w1, float[5,8,1,1] w2, float[6,3,1,1] w3,
                          float[2,6,1,1] w4) => (float[1,5,4,4] y, float[1,2,4,4] z)
    { h = Conv(x, w1)  s = Softmax <axis=-1> (h)  y = Conv(s, w2)
      k = Conv(x, w3)  t = Softmax <axis=1> (k)  z = Conv(t, w4) }""")
    dg, groups = groups_of(m)
    assert set(groups) == {"w1:0"}
    assert "not carried through Softmax" in {b.key: b.reason for b in dg.blocked_groups}["w3:0"]
    check_masked_equivalence(m)


def test_expand_and_tile_follow_pruned_channels():
    m = build(HEAD + """g (float[1,3,4,4] x, float[8,3,1,1] w1, float[5,8,1,1] w2) => (float[1,5,4,8] y)
    { h = Conv(x, w1)  b1 = GlobalMaxPool(h)  es = Constant <value = int64[4] {1, 8, 4, 4}> ()
      e = Expand(b1, es)  a = Add(h, e)
      rp = Constant <value = int64[4] {1, 1, 1, 2}> ()  t = Tile(a, rp)  y = Conv(t, w2) }""")
    _, groups = groups_of(m)
    assert {"b1[1]", "e[1]", "t[1]"} <= dims_of(groups["w1:0"])
    pruned = prune_one(m, "w1:0", [0, 1, 2, 7])
    ex = next(n for n in pruned.graph if n.op_type == "Expand")
    assert ex.inputs[1].const_value.numpy().tolist() == [1, 4, 4, 4]
    check_masked_equivalence(m)


def test_gather_on_channel_axis_blocks():
    m = build(HEAD + """g (float[1,3,4,4] x, float[8,3,1,1] w1, int64[2] idx) => (float[1,2,4,4] y)
    { h = Conv(x, w1)  y = Gather <axis=1> (h, idx) }""", weights="wi")
    dg, groups = groups_of(m)
    assert not groups
    assert "not carried through Gather" in {b.key: b.reason for b in dg.blocked_groups}["w1:0"]


def test_custom_op_is_a_barrier_and_listed():
    m = build('<ir_version: 8, opset_import: ["" : 17, "my.ops" : 1]>\n' +
              """g (float[1,3,4,4] x, float[8,3,1,1] w1, float[8,8,1,1] w2, float[4,8,1,1] w3)
                 => (float[1,4,4,4] y)
    { h = Conv(x, w1)  c = my.ops.Mystery(h)  k = Conv(c, w2)  y = Conv(k, w3) }""")
    dg, groups = groups_of(m)
    assert [(b.op, b.domain) for b in dg.barriers] == [("Mystery", "my.ops")]
    assert "never assumed elementwise" in dg.barriers[0].reason
    assert set(groups) == {"w2:0"}  # pruned around the barrier
    assert "w1:0" in {b.key for b in dg.blocked_groups}


def test_concat_on_a_spatial_axis_ties_the_channels_of_its_inputs():
    m = build(HEAD + """g (float[1,3,4,4] x, float[8,3,1,1] wa, float[8,3,1,1] wb, float[5,8,1,1] w2)
        => (float[1,5,8,4] y)
    { a = Conv(x, wa)  b = Conv(x, wb)  c = Concat <axis=2> (a, b)  y = Conv(c, w2) }""")
    _, groups = groups_of(m)
    g = groups["wa:0"]
    assert g.size == 8 and dims_of(g) == {"wa[0]", "wb[0]", "a[1]", "b[1]", "c[1]", "w2[1]"}
    check_masked_equivalence(m)


def test_constant_of_shape_too_large_to_fold_follows_the_channels():
    m = build(HEAD + """g (float[1,3,256,256] x, float[8,3,1,1] w1, float[2,8,1,1] w2) => (float[1,2,256,256] y)
    { h = Conv(x, w1)  s = Constant <value = int64[4] {1, 8, 256, 256}> ()
      one = ConstantOfShape <value = float[1] {1.0}> (s)  a = Add(h, one)  y = Conv(a, w2) }""")
    loaded = spa.load(m)
    assert [n.op_type for n in loaded.graph].count("ConstantOfShape") == 1  # not folded
    pruned = prune_one(m, "w1:0", [0, 5, 6])
    cos = next(n for n in pruned.graph if n.op_type == "ConstantOfShape")
    assert cos.inputs[0].const_value.numpy().tolist() == [1, 3, 256, 256]
    check_masked_equivalence(m)

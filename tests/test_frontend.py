"""Models as other exporters write them: Constant weights, weights behind Identity/Cast,
decomposed activations, symbolic dims, external data, old opsets, channels-last graphs."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from helpers import build, check_masked_equivalence, dims_of, groups_of
from onnx import helper, numpy_helper

import spa
from spa.errors import FrontendError


def head(opset=17):
    return f'<ir_version: 8, opset_import: ["" : {opset}]>\n'


CHAIN = """g (float[1,3,6,6] x, float[8,3,3,3] w1, float[8] b1, float[4,8,1,1] w2) => (float[1,4,6,6] y)
{ h = Conv <pads=[1,1,1,1]> (x, w1, b1)  r = Relu(h)  y = Conv(r, w2) }"""


def initializers_to_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    consts = [helper.make_node("Constant", [], [i.name], value=i) for i in model.graph.initializer]
    nodes = consts + list(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_constant_nodes_instead_of_initializers():
    m = initializers_to_constants(build(head() + CHAIN))
    assert not m.graph.initializer
    _, groups = groups_of(m)
    assert dims_of(groups["w1:0"]) == {"w1[0]", "b1[0]", "h[1]", "r[1]", "w2[1]"}
    check_masked_equivalence(m)


def test_weights_behind_identity_and_cast():
    m = build(head() + """g (float[1,3,6,6] x, float16[8,3,3,3] w1, float[4,8,1,1] w2) => (float[1,4,6,6] y)
    { wc = Cast <to=1> (w1)  wi = Identity(w2)  h = Conv <pads=[1,1,1,1]> (x, wc)  r = Relu(h)  y = Conv(r, wi) }""")
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float16), "w1"))
    dg, groups = groups_of(m)
    g = groups[next(iter(groups))]
    assert {m.param for m in g.params} == {"w1", "w2"}  # traced back through Cast and Identity
    result = spa.prune(m, 0.5)
    inits = result.model.graph.initializers
    assert inits["w1"].const_value.shape.numpy() == (4, 3, 3, 3)
    assert inits["w1"].const_value.dtype == spa.load(m).graph.initializers["w1"].const_value.dtype  # still fp16
    assert inits["w2"].const_value.shape.numpy() == (4, 4, 1, 1)


def test_decomposed_hardswish_and_erf_gelu():
    m = build(head() + """g (float[1,3,6,6] x, float[8,3,3,3] w1, float[8,8,1,1] w2, float[4,8,1,1] w3)
        => (float[1,4,6,6] y)
    { h = Conv <pads=[1,1,1,1]> (x, w1)
      three = Constant <value = float {3.0}> ()  six = Constant <value = float {6.0}> ()
      zero = Constant <value = float {0.0}> ()  a = Add(h, three)  c = Clip(a, zero, six)  m = Mul(h, c)
      hs = Div(m, six)  k = Conv(hs, w2)
      rt2 = Constant <value = float {1.4142135}> ()  half = Constant <value = float {0.5}> ()
      one = Constant <value = float {1.0}> ()  d = Div(k, rt2)  e = Erf(d)  e1 = Add(e, one)
      km = Mul(k, e1)  gl = Mul(km, half)  y = Conv(gl, w3) }""")
    _, groups = groups_of(m)
    assert {"a[1]", "c[1]", "m[1]", "hs[1]"} <= dims_of(groups["w1:0"])
    assert {"d[1]", "e[1]", "e1[1]", "km[1]", "gl[1]"} <= dims_of(groups["w2:0"])
    check_masked_equivalence(m)


def test_symbolic_batch_and_spatial_dims():
    m = build(head() + CHAIN.replace("float[1,3,6,6] x", "float[N,3,H,W] x").replace("float[1,4,6,6] y",
                                                                                       "float[N,4,H,W] y"))
    _, groups = groups_of(m)
    assert list(groups) == ["w1:0"]
    check_masked_equivalence(m, input_shapes={"N": 2, "H": 5, "W": 7})


def test_external_data_is_read_and_left_untouched(tmp_path):
    m = build(head() + CHAIN)
    path = tmp_path / "model.onnx"
    onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.data",
              size_threshold=0)
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    out = tmp_path / "out" / "small.onnx"
    spa.prune(path, 0.5, output=out)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir() if p.is_file()} == digests
    pruned = onnx.load(out)
    assert {tuple(i.dims) for i in pruned.graph.initializer} >= {(4, 3, 3, 3), (4, 4, 1, 1)}


def test_opset_11_is_supported():
    check_masked_equivalence(build(head(11) + CHAIN))


def test_opset_below_7_is_refused_with_advice():
    m = build(head(6) + CHAIN)
    with pytest.raises(FrontendError, match="opset 6.*version_converter"):
        spa.load(m)


def test_tf2onnx_style_channels_last_graph():
    m = build(head(13) + """g (float[N,6,6,3] x, float[8,3,3,3] w1, float[8] b1, float[8,16] w2, float[16] b2,
                             float[16,5] w3) => (float[N,5] y)
    { t = Transpose <perm=[0,3,1,2]> (x)  h = Conv <pads=[1,1,1,1]> (t, w1, b1)  r = Relu(h)
      back = Transpose <perm=[0,2,3,1]> (r)  d = MatMul(back, w2)  da = Add(d, b2)  dr = Relu(da)
      ax = Constant <value = int64[2] {1, 2}> ()  p = ReduceMean <keepdims=0> (dr, ax)  y = MatMul(p, w3) }"""
              .replace("ReduceMean <keepdims=0> (dr, ax)", "ReduceMean <keepdims=0, axes=[1,2]> (dr)")
              .replace("ax = Constant <value = int64[2] {1, 2}> ()  ", ""))
    _, groups = groups_of(m)
    assert dims_of(groups["w1:0"]) == {"w1[0]", "b1[0]", "h[1]", "r[1]", "back[3]", "w2[0]"}
    assert {"w2[1]", "b2[0]", "d[3]", "da[3]", "dr[3]", "p[1]", "w3[0]"} <= dims_of(groups["w2:1"])
    check_masked_equivalence(m, input_shapes={"N": 2})


def test_fp16_matmul_weights_behind_cast():
    m = build(head() + """g (float[2,16] x, float16[16,12] w1, float16[12,4] w2) => (float[2,4] y)
    { c1 = Cast <to=1> (w1)  h = MatMul(x, c1)  r = Relu(h)  c2 = Cast <to=1> (w2)  y = MatMul(r, c2) }""")
    for init in m.graph.initializer:
        arr = np.random.default_rng(1).standard_normal(tuple(init.dims)).astype(np.float16)
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
    _, groups = groups_of(m)
    g = groups["w1:1"]
    assert {p.param for p in g.params} == {"w1", "w2"}
    check_masked_equivalence(m, atol=1e-2)


def test_large_models_are_saved_with_external_data(tmp_path, monkeypatch):
    import spa.io

    monkeypatch.setattr(spa.io, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "small.onnx"
    spa.prune(build(head() + CHAIN), 0.5, output=out)
    assert (tmp_path / "small.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.onnx", "small.onnx.data"]
    reloaded = onnx.load(out)  # reads the external data back
    onnx.checker.check_model(reloaded, full_check=True)
    assert {tuple(i.dims) for i in reloaded.graph.initializer} >= {(4, 3, 3, 3), (4, 4, 1, 1)}


def test_paddle2onnx_style_graph():
    m = build(head(14) + """g (float[N,3,8,8] x, float[8,3,3,3] w1, float[8] s1, float[8] b1, float[8] c1, float[8] s2,
                             float[8,6] w2, float[6] b2) => (float[N,6] y)
    { h = Conv <pads=[1,1,1,1], strides=[2,2]> (x, w1)  n = BatchNormalization(h, s1, b1, c1, s2)
      a = HardSwish(n)  p = GlobalAveragePool(a)  shp = Constant <value = int64[2] {0, -1}> ()
      f = Reshape(p, shp)  mm = MatMul(f, w2)  y = Add(mm, b2) }""")
    _, groups = groups_of(m)
    assert dims_of(groups["w1:0"]) == {"w1[0]", "h[1]", "s1[0]", "b1[0]", "c1[0]", "s2[0]", "n[1]", "a[1]",
                                       "p[1]", "f[1]", "w2[0]"}
    check_masked_equivalence(m, input_shapes={"N": 2})

"""Allocations that read the calibration inputs: global OBS cost (``obs``) and masked-output
sensitivity (``sensitivity``), through ``spa.prune`` on ONNX models, with its built-in checks;
and OBSPA reconstruction where it used to fall back (GQA query-head slots, Einsum consumers)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as oh
from onnx import numpy_helper as nh

import spa
from spa.allocation.obs import obs_ratios, params_per_channel
from spa.calibration.activations import collect_stats
from spa.metrics import count_params


def _model(nodes, inits, inputs, outputs):
    g = oh.make_graph(nodes, "g", inputs, outputs, [nh.from_array(a, n) for n, a in inits.items()])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)], ir_version=9)


def two_branches(scale=100.0, seed=0) -> onnx.ModelProto:
    """Two ReLU MLP branches, each normalised at the output (LayerNorm). Branch A's hidden layer
    is redundant (8 distinct features repeated 4x, 10% noise) and its output layer 100x larger; branch B's
    32 hidden features are independent."""
    rng = np.random.default_rng(seed)
    f = np.float32
    base = rng.standard_normal((16, 8))
    w = {"wa1": (np.repeat(base, 4, axis=1) * (1 + 0.1 * rng.standard_normal((16, 32)))).astype(f),
         "wa2": (scale * rng.standard_normal((32, 8))).astype(f),
         "wb1": rng.standard_normal((16, 32)).astype(f), "wb2": rng.standard_normal((32, 8)).astype(f),
         "s": np.ones(8, f), "b": np.zeros(8, f)}
    nodes = []
    for br in "ab":
        nodes += [oh.make_node("MatMul", ["x", f"w{br}1"], [f"h{br}"]), oh.make_node("Relu", [f"h{br}"], [f"r{br}"]),
                  oh.make_node("MatMul", [f"r{br}", f"w{br}2"], [f"z{br}"]),
                  oh.make_node("LayerNormalization", [f"z{br}", "s", "b"], [f"y{br}"], axis=-1)]
    return _model(nodes, w, [oh.make_tensor_value_info("x", T.FLOAT, ["N", 16])],
                  [oh.make_tensor_value_info(f"y{br}", T.FLOAT, ["N", 8]) for br in "ab"])


def _calib(n=4, dim=16, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((64, dim)).astype(np.float32)} for _ in range(n)]


def _output_error(dense, pruned, feeds) -> float:
    from helpers import run

    num = den = 0.0
    for f in feeds:
        for w, g in zip(run(dense, f), run(pruned, f)):
            num += float(((g - w) ** 2).sum())
            den += float((w ** 2).sum())
    return num / den


def _kept(result) -> dict:
    return {g.key: len(g.keep) for g in result.plan.groups}


def test_obs_allocation_ranks_by_relative_error_not_raw_scale():
    model, cal = two_branches(), _calib()
    loaded = spa.load(model)
    dg = spa.dependency_graph(loaded)
    assert sorted(g.key for g in dg.groups) == ["wa1:1", "wb1:1"]
    stats = collect_stats(loaded, dg, cal)
    rel = obs_ratios(dg.groups, stats, dg.weights, 0.5)
    raw = obs_ratios(dg.groups, stats, dg.weights, 0.5, normalise="none")
    # relative error: the redundant branch loses most, although its weights are 100x larger
    assert rel["wa1:1"] > 0.6 and rel["wb1:1"] < 0.4
    assert raw["wa1:1"] < raw["wb1:1"]  # the raw loss is dominated by the scale
    r = spa.prune(model, ratio=0.5, criterion="obspa", allocation="obs", calibration=cal)
    assert r.equivalence.exact and r.plan.meta["allocation"] == "obs"
    kept = _kept(r)
    assert kept["wa1:1"] < kept["wb1:1"] and min(kept.values()) >= 4  # cap: 10% stays
    uni = spa.prune(model, ratio=0.5, criterion="obspa", calibration=cal)
    test = _calib(seed=7)
    assert _output_error(model, r.model, test) < 0.7 * _output_error(model, uni.model, test)


def test_obs_allocation_meets_the_parameter_target():
    model, cal = two_branches(), _calib()
    for ratio in (0.3, 0.5):
        r = spa.prune(model, ratio=ratio, criterion="obspa", allocation="obs", calibration=cal)
        groups = {g.key: g for g in r.graph.groups}
        removed = sum((gp.size - len(gp.keep)) * params_per_channel(groups[gp.key], r.graph.weights)
                      for gp in r.plan.groups)
        total = sum(g.size * params_per_channel(g, r.graph.weights) for g in groups.values())
        assert abs(removed / total - ratio) <= 1.5 / 32  # one channel per group at most
        assert count_params(r.model) < count_params(r.dense)


def test_obs_and_sensitivity_honour_protect_kinds_round_to():
    model, cal = two_branches(), _calib()
    for alloc in ("obs", "sensitivity"):
        r = spa.prune(model, ratio=0.5, criterion="obspa", allocation=alloc, calibration=cal, protect=["wa1"])
        kept = _kept(r)
        assert kept["wa1:1"] == 32 and kept["wb1:1"] < 32
        r = spa.prune(model, ratio=0.5, criterion="l1", allocation=alloc, calibration=cal, round_to=4)
        assert all(k % 4 == 0 and 0 < k < 32 for k in _kept(r).values()), _kept(r)
        r = spa.prune(model, ratio=0.5, criterion="l1", allocation=alloc, calibration=cal, kinds=["heads"])
        assert not r.plan.pruned_groups


def test_obs_allocation_reads_consumers_of_a_conv_net():
    from helpers import build

    text = """<ir_version: 9, opset_import: ["" : 18]>
    g (float[N,3,8,8] x, float[8,3,3,3] w1, float[16,8,3,3] w2, float[4,16,1,1] w3) => (float[N,4,8,8] y)
    { a = Conv<pads=[1,1,1,1]>(x, w1)  b = Relu(a)  c = Conv<pads=[1,1,1,1]>(b, w2)  d = Relu(c)  y = Conv(d, w3) }"""
    model = build(text)
    rng = np.random.default_rng(0)
    cal = [{"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    r = spa.prune(model, ratio=0.4, criterion="obspa", allocation="obs", calibration=cal)
    kept = _kept(r)
    assert set(kept) == {"w1:0", "w2:0"} and all(k >= 1 for k in kept.values())
    assert r.equivalence.exact and count_params(r.model) < count_params(r.dense)


def sensitive_and_not(seed=0) -> onnx.ModelProto:
    """Branch A reaches the output 100x stronger than branch B (same structure otherwise)."""
    rng = np.random.default_rng(seed)
    f = np.float32
    w = {"wa1": rng.standard_normal((16, 32)).astype(f), "wa2": (10 * rng.standard_normal((32, 8))).astype(f),
         "wb1": rng.standard_normal((16, 32)).astype(f), "wb2": (0.1 * rng.standard_normal((32, 8))).astype(f)}
    nodes = []
    for br in "ab":
        nodes += [oh.make_node("MatMul", ["x", f"w{br}1"], [f"h{br}"]), oh.make_node("Relu", [f"h{br}"], [f"r{br}"]),
                  oh.make_node("MatMul", [f"r{br}", f"w{br}2"], [f"z{br}"])]
    nodes.append(oh.make_node("Add", ["za", "zb"], ["y"]))
    return _model(nodes, w, [oh.make_tensor_value_info("x", T.FLOAT, ["N", 16])],
                  [oh.make_tensor_value_info("y", T.FLOAT, ["N", 8])])


def test_sensitivity_allocation_spares_the_sensitive_group():
    from spa.allocation import sensitivity

    model, cal = sensitive_and_not(), _calib()
    r = spa.prune(model, ratio=0.5, criterion="l1", allocation="sensitivity", calibration=cal)
    kept = _kept(r)
    assert kept["wa1:1"] > kept["wb1:1"]
    assert 32 - len(kept) <= sum(32 - k for k in kept.values()) <= 32  # the target (equal widths), floored
    assert r.equivalence.exact and r.plan.meta["allocation"] == "sensitivity"
    assert sensitivity.LAST_COST["runs"] == 2 * 3 and any("sensitivity allocation" in n for n in r.notes)
    uni = spa.prune(model, ratio=0.5, criterion="l1", calibration=cal)
    test = _calib(seed=7)
    assert _output_error(model, r.model, test) < _output_error(model, uni.model, test)


def test_allocation_choices_are_checked():
    with pytest.raises(spa.SpaError):
        spa.prune(two_branches(), ratio=0.5, allocation="nope")


# ---- reconstruction where OBSPA used to fall back ------------------------------------------
def _calib_error(result, feeds) -> tuple[float, float]:
    """Output error on ``feeds`` of the reconstructed model and of the same plan without it."""
    plain = spa.apply_plan(result.dense, result.plan)
    return _output_error(result.dense, result.model, feeds), _output_error(result.dense, plain, feeds)


def einsum_mlp(eq2: str, w2_shape) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    f = np.float32
    base = rng.standard_normal((16, 8))
    w = {"w1": (np.repeat(base, 3, axis=1) * (1 + 0.1 * rng.standard_normal((16, 24)))).astype(f),
         "w2": rng.standard_normal(w2_shape).astype(f)}
    nodes = [oh.make_node("Einsum", ["x", "w1"], ["h"], equation="bsd,df->bsf"), oh.make_node("Relu", ["h"], ["r"]),
             oh.make_node("Einsum", ["r", "w2"], ["y"], equation=eq2)]
    return _model(nodes, w, [oh.make_tensor_value_info("x", T.FLOAT, ["B", "S", 16])],
                  [oh.make_tensor_value_info("y", T.FLOAT, None)])


@pytest.mark.parametrize("eq2,shape", [("bsf,fo->bso", (24, 8)), ("bsf,of->bso", (8, 24)),
                                       ("...f,hfk->...hk", (2, 24, 4))])
def test_einsum_consumers_are_reconstructed(eq2, shape):
    from spa.calibration.activations import consumers

    model = einsum_mlp(eq2, shape)
    dg = spa.dependency_graph(spa.load(model))
    (g,) = dg.groups
    assert g.key == "w1:1" and g.size == 24 and len(consumers(dg, g)) == 1
    rng = np.random.default_rng(3)
    cal = [{"x": rng.standard_normal((4, 6, 16)).astype(np.float32)} for _ in range(4)]
    r = spa.prune(model, 0.5, criterion="obspa", calibration=cal)
    assert r.equivalence.exact and count_params(r.model) < count_params(r.dense)
    recon, plain = _calib_error(r, cal)
    assert recon < 0.2 * plain
    assert any("1 of 1 consumer layers" in n for n in r.notes)


def test_einsum_with_a_second_shared_subscript_has_no_layer_view():
    from spa.calibration.activations import consumers

    model = einsum_mlp("bsf,sfo->bso", (6, 24, 8))  # s shared: a per-position weight, not one layer
    dg = spa.dependency_graph(spa.load(model))
    (g,) = dg.groups
    assert consumers(dg, g) == []


def test_grouped_and_depthwise_convs_go_whole_and_the_next_layer_is_reconstructed():
    from helpers import build

    text = """<ir_version: 9, opset_import: ["" : 18]>
    g (float[N,3,8,8] x, float[8,3,3,3] w1, float[8,1,3,3] wd, float[8,2,3,3] wg, float[4,8,1,1] w3)
      => (float[N,4,8,8] y)
    { a = Conv<pads=[1,1,1,1]>(x, w1)  b = Relu(a)  c = Conv<pads=[1,1,1,1],group=8>(b, wd)  d = Relu(c)
      e = Conv<pads=[1,1,1,1],group=4>(d, wg)  f = Relu(e)  y = Conv(f, w3) }"""
    model = build(text)
    dg = spa.dependency_graph(spa.load(model))
    (g,) = dg.groups  # the conv groups of wg: 4 channels of 2
    assert g.size == 4 and {(m.param, m.role) for m in g.params} == {("w1", "out"), ("wd", "out"), ("wg", "out"),
                                                                     ("w3", "in")}
    rng = np.random.default_rng(0)
    cal = [{"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    r = spa.prune(model, 0.5, criterion="obspa", calibration=cal)
    assert r.equivalence.exact
    recon, plain = _calib_error(r, cal)
    assert recon < plain
    assert any("1 of 1 consumer layers" in n for n in r.notes)


GQA = """<ir_version: 9, opset_import: ["" : 18]>
g (float[2,6,32] x, float[32,32] wq, float[32,8] wk, float[32,8] wv, float[32,32] wo) => (float[2,6,32] y)
{ q = MatMul(x, wq)  k = MatMul(x, wk)  v = MatMul(x, wv)
  sq = Constant <value = int64[4] {2, 6, 8, 4}> ()  skv = Constant <value = int64[4] {2, 6, 2, 4}> ()
  q4 = Reshape(q, sq)  k4 = Reshape(k, skv)  v4 = Reshape(v, skv)
  qt = Transpose <perm=[0,2,1,3]> (q4)  kt = Transpose <perm=[0,2,3,1]> (k4)  vt = Transpose <perm=[0,2,1,3]> (v4)
  one = Constant <value = int64[1] {2}> ()  ku = Unsqueeze(kt, one)  vu = Unsqueeze(vt, one)
  ek = Constant <value = int64[5] {2, 2, 4, 4, 6}> ()  ev = Constant <value = int64[5] {2, 2, 4, 6, 4}> ()
  ke = Expand(ku, ek)  ve = Expand(vu, ev)
  rk = Constant <value = int64[4] {2, 8, 4, 6}> ()  rv = Constant <value = int64[4] {2, 8, 6, 4}> ()
  kr = Reshape(ke, rk)  vr = Reshape(ve, rv)  sc = MatMul(qt, kr)  p = Softmax <axis=-1> (sc)
  a = MatMul(p, vr)  o = Transpose <perm=[0,2,1,3]> (a)  so = Constant <value = int64[3] {2, 6, 32}> ()
  om = Reshape(o, so)  y = MatMul(om, wo) }"""


def test_gqa_query_head_slots_reconstruct_the_consumer():
    from helpers import build

    model = build(GQA)
    dg = spa.dependency_graph(spa.load(model))
    g = dg.group("wq:1")
    assert g.kind == "heads" and g.size == 2 and g.heads.slots == 4
    rng = np.random.default_rng(0)
    cal = [{"x": rng.standard_normal((2, 6, 32)).astype(np.float32)} for _ in range(8)]
    r = spa.prune(model, 0.5, criterion="obspa", kinds=["heads"], gqa="q", calibration=cal)
    (gp,) = r.plan.pruned_groups
    assert gp.key == "wq:1" and gp.keep == (0, 1) and len(gp.slots) == 2  # 2 of 4 query heads per K/V group
    assert r.equivalence.exact and r.model.graph.initializers["wo"].shape == (16, 32)
    assert any("1 of 1 consumer layers" in n for n in r.notes)
    recon, plain = _calib_error(r, cal)
    assert recon < 0.8 * plain

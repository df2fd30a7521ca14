"""Right, not only valid: the defects a review found (each a regression test), the op and
criterion registries, and the built-in equivalence check."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import build, feeds_for, run
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import spa
from spa import zoo
from spa.errors import ArgumentError, EquivalenceError, UnsupportedModelError

HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'


def _init(rng, name, *shape):
    return nh.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _conv_softmax_conv(domain: str, opset: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("Softmax", ["c1"], ["s"], name="sm", axis=1),
             h.make_node("Conv", ["s", "w2"], ["y"], name="conv2")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 4, 8, 8])],
                     [_init(rng, "w1", 8, 3, 3, 3), _init(rng, "b1", 8), _init(rng, "w2", 4, 8, 1, 1)])
    m = h.make_model(g, opset_imports=[h.make_opsetid(domain, opset)])
    m.ir_version = 7
    return m


@pytest.mark.parametrize("domain", ["", "ai.onnx"])
def test_opset_read_however_the_default_domain_is_spelled(domain):
    """Softmax-11 normalizes over C·H·W: its channels are not per-channel, so conv1 is blocked."""
    dg = spa.dependency_graph(_conv_softmax_conv(domain, 11))
    assert dg.opsets[""] == 11
    assert "w1:0" not in [g.key for g in dg.groups]
    assert any(b.key == "w1:0" for b in dg.blocked_groups)
    # At opset 13 the same graph normalizes over axis 1 only: conv1's channels are tied through
    # it but the consumer sees a cross-channel softmax, so still not a group.
    assert "w1:0" not in [g.key for g in spa.dependency_graph(_conv_softmax_conv(domain, 13)).groups]


def test_softmax_opset_ranges_are_two_specs():
    old, new = spa.ops.lookup_spec("", "Softmax", 11), spa.ops.lookup_spec("", "Softmax", 13)
    assert old.until == 12 and new.since == 13 and old.rule is not new.rule


def test_a_second_registration_of_an_op_is_an_error():
    with pytest.raises(spa.ops.DuplicateOpError, match="Conv"):
        spa.ops.op("Conv")(lambda ctx: None)
    with pytest.raises(spa.ops.DuplicateOpError):
        spa.ops.op("Softmax", since=12, until=13)(lambda ctx: None)


def _fused_conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("FusedConv", ["c1", "w2", "b2"], ["c2"], name="fused", domain="com.microsoft",
                         activation="Relu", pads=[1, 1, 1, 1]),
             h.make_node("Conv", ["c2", "w3"], ["y"], name="conv3")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 4, 8, 8])],
                     [_init(rng, "w1", 8, 3, 3, 3), _init(rng, "b1", 8), _init(rng, "w2", 6, 8, 3, 3),
                      _init(rng, "b2", 6), _init(rng, "w3", 4, 6, 1, 1)])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])


def test_one_registration_adds_an_op_everywhere():
    """com.microsoft::FusedConv is one spec (spa/ops/contrib.py): coupling, shape completion,
    OBSPA's layer view and MACs all come from it."""
    proto = _fused_conv_model()
    model = spa.load(proto)
    fused = next(n for n in model.graph if n.op_type == "FusedConv")
    assert list(fused.outputs[0].shape)[1] == 6  # shape completion where ONNX inference stops
    dg = spa.dependency_graph(model)
    assert [g.key for g in dg.groups] == ["w1:0", "w2:0"]
    from spa.calibration.activations import consumers

    cons = consumers(dg, dg.group("w1:0"))
    assert [c.node.op_type for c in cons] == ["FusedConv"] and cons[0].view.kernel == (3, 3)
    from spa.metrics import count_macs

    assert count_macs(model) == 64 * (8 * 27 + 6 * 72 + 4 * 6)
    result = spa.prune(proto, 0.5, criterion="obspa")
    assert result.equivalence.checked_groups == ("w1:0", "w2:0")
    assert result.equivalence.max_abs_diff <= result.equivalence.tolerance


# ---- criteria ------------------------------------------------------------------------------
MLP = HEAD + """g (float[N,12] x, float[12,16] w1, float[16] b1, float[16,5] w2) => (float[N,5] y)
{ h = MatMul(x, w1)  a = Add(h, b1)  r = Relu(a)  y = MatMul(r, w2) }"""


@pytest.mark.parametrize("criterion, needs", [("obspa", "activation"), ("wanda", "activation"),
                                              ("flap", "activation"), ("taylor", "gradients")])
def test_score_refuses_a_criterion_whose_needs_are_missing(criterion, needs):
    dg = spa.dependency_graph(build(MLP))
    with pytest.raises(ArgumentError, match=needs):
        spa.score(dg, criterion)


def test_score_with_activation_statistics_is_not_l1():
    dg = spa.dependency_graph(build(MLP))
    stats = spa.collect_stats(dg, batches=2)
    obs, l1 = spa.score(dg, "obspa", stats=stats), spa.score(dg, "l1")
    assert obs.criterion == "obspa"
    assert not np.allclose(obs["w1:1"], l1["w1:1"])


def test_unknown_criterion_lists_the_registered_ones():
    with pytest.raises(ArgumentError, match="obspa"):
        spa.score(spa.dependency_graph(build(MLP)), "nope")


@pytest.mark.parametrize("allocation", ["alpha", "owl"])
def test_layerwise_allocation_with_global_pruning_is_refused(allocation):
    with pytest.raises(ArgumentError, match="global"):
        spa.prune(build(MLP), 0.3, allocation=allocation, global_pruning=True)


CONCAT = HEAD + """g (float[N,3,8,8] x, float[4,3,3,3] wa, float[2,3,3,3] wb, float[6,6,1,1] w2)
  => (float[N,6,8,8] y)
{ a = Conv <pads = [1,1,1,1]> (x, wa)  b = Conv <pads = [1,1,1,1]> (x, wb)
  c = Concat <axis = 1> (a, b)  r = Relu(c)  y = Conv(r, w2) }"""


def test_obspa_reconstructs_for_the_kept_set_it_ships():
    """Greedy OBSPA never empties a Concat input, so the weights it solves for are those of the
    shipped keep set: equal to a one-shot OBS solve for the final removed set."""
    from spa.criteria.obspa import _Layer, reconstruct

    model = spa.load(build(CONCAT))
    dg = spa.dependency_graph(model)
    g = dg.group("wa:0")
    stats = spa.collect_stats(dg, batches=2)
    plan = spa.make_plan(dg, spa.score(dg, "obspa", stats=stats), ratio=0.7)
    new_plan, updates = reconstruct(dg, plan, stats)
    keep = new_plan.groups[0].keep
    assert len(keep) == len(plan.groups[0].keep)
    for m in g.members:  # every member keeps a channel
        assert set(np.unique(m.channel)) & set(keep)
    (c,) = stats.consumers[g.key]
    layer = _Layer(c, dg.weights(c.member.param), stats.moments[c.key], g.size)
    removed = [ch for ch in range(g.size) if ch not in keep]
    layer.remove(np.concatenate([layer.cols[ch] for ch in removed]))
    np.testing.assert_allclose(updates[c.member.param], layer.updated(), rtol=1e-4, atol=1e-5)


# ---- preconditions, labels, imports -----------------------------------------------------------
def test_dependency_graph_canonicalizes_a_raw_model_and_the_class_refuses_one():
    raw = ir.serde.deserialize_model(build(MLP))
    assert [g.key for g in spa.dependency_graph(raw).groups] == ["w1:1"]
    with pytest.raises(UnsupportedModelError, match="spa.load"):
        spa.DependencyGraph(raw)


def test_channelwise_mean_of_a_cnn_is_inexact_channels_not_hidden():
    proto = build(HEAD + """g (float[N,3,8,8] x, float[8,3,3,3] w1, float[4,8,1,1] w2) => (float[N,4,8,8] y)
    { c = Conv <pads = [1,1,1,1]> (x, w1)  m = ReduceMean <axes = [1], keepdims = 1> (c)
      s = Sigmoid(m)  g = Mul(c, s)  y = Conv(g, w2) }""")
    (g,) = spa.dependency_graph(proto).groups
    assert g.kind == "channels" and not g.exact


def test_layernorm_stream_is_hidden():
    proto = build(HEAD + """g (float[N,T,8] x, float[8,8] w1, float[8] s, float[8] b, float[8,4] w2)
      => (float[N,T,4] y)
    { p = MatMul(x, w1)  n = LayerNormalization <axis = -1> (p, s, b)  y = MatMul(n, w2) }""")
    (g,) = spa.dependency_graph(proto).groups
    assert g.kind == "hidden" and not g.exact


def test_pruning_an_onnx_file_does_not_import_torch(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(build(MLP), path)
    code = (f"import sys, spa; spa.prune({str(path)!r}, 0.5); "
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@spa.ops.op("Broken", domain="test.spa")
def _broken(ctx):
    raise KeyError("oops")


CUSTOM = HEAD.replace('"" : 17', '"" : 17, "test.spa" : 1') + """
g (float[N,4] x, float[4,6] w1, float[6,3] w2) => (float[N,3] y)
{ a = MatMul(x, w1)  b = test.spa.Broken(a)  y = MatMul(b, w2) }"""


def test_nothing_is_written_to_the_working_directory(tmp_path, monkeypatch):
    """onnxruntime's symbolic shape inference writes a temporary model into the working
    directory when it meets an op it does not know: SPA runs it elsewhere."""
    monkeypatch.chdir(tmp_path)
    spa.prune(_fused_conv_model(), 0.5)  # a contrib op and a dynamic batch: the tool falls back
    assert list(tmp_path.iterdir()) == []


def test_a_rule_that_raises_is_a_barrier_and_a_warning(caplog):
    model = spa.load(build(CUSTOM))
    for n in model.graph:  # the custom op has no shape inference: give it its input's
        if n.op_type == "Broken":
            n.outputs[0].shape, n.outputs[0].type = n.inputs[0].shape, n.inputs[0].type
    with caplog.at_level(logging.WARNING, logger="spa"):
        dg = spa.dependency_graph(model)
    assert [b.op for b in dg.rule_errors] == ["Broken"]
    assert "rule for test.spa::Broken" in caplog.text
    assert not dg.groups


@pytest.mark.parametrize("source", ["resnet", "mlp", "concat"])
def test_lint_finds_nothing_on_sound_graphs(source):
    proto = {"resnet": lambda: zoo.resnet((1, 1), (16, 32), image=16, classes=5), "mlp": lambda: build(MLP),
             "concat": lambda: build(CONCAT)}[source]()
    dg = spa.dependency_graph(proto)
    assert dg.groups and dg.lint() == []


# ---- the built-in equivalence check --------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet():
    return zoo.resnet((1, 1), (16, 32), image=16, classes=5)


def test_prune_proves_exact_groups_equal_masking_and_reports_it(resnet, tmp_path):
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    result = spa.prune(resnet, 0.5, output=out, report=report)
    eqr = result.equivalence
    assert set(eqr.checked_groups) == {gp.key for gp in result.plan.pruned_groups}
    assert eqr.max_abs_diff <= eqr.tolerance and eqr.fidelity is None
    data = json.loads(report.read_text())
    assert data["equivalence"]["checked_groups"] == list(eqr.checked_groups)
    assert data["equivalence"]["max_abs_diff"] == eqr.max_abs_diff and data["output"] == str(out)


def test_a_wrong_rewrite_is_caught_named_and_nothing_is_written(resnet, tmp_path, monkeypatch):
    """A valid model with wrong numbers: the rewrite keeps the right count of input channels
    of one conv but the wrong ones. The check names the group and writes nothing."""
    from spa.passes import apply_plan as ap

    real = ap.ApplyPlanPass._slice
    dg = spa.dependency_graph(resnet)
    victim = dg.group("w10:0").params[-1].param  # the input channels of the conv after w10
    assert [m.role for m in dg.group("w10:0").params if m.param == victim] == ["in"]

    def wrong(dg_, kept):
        bad = dict(kept)
        for d, idx in kept.items():
            if d.value == victim and d.axis == 1:
                bad[d] = np.sort(np.setdiff1d(np.arange(dg_.size(d)), idx))[: idx.size]
        real(dg_, bad)

    monkeypatch.setattr(ap.ApplyPlanPass, "_slice", staticmethod(wrong))
    out = tmp_path / "small.onnx"
    with pytest.raises(EquivalenceError, match=r"pruning group '.*' alone causes it.*--protect") as err:
        spa.prune(resnet, 0.5, output=out)
    guilty = str(err.value).split("pruning group '")[1].split("'")[0]
    assert any(m.param == victim for m in dg.group(guilty).members)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_inexact_and_compensated_groups_get_a_fidelity_figure():
    hidden = spa.prune(build(HEAD + """g (float[N,T,8] x, float[8,16] w1, float[16] s, float[16] b,
        float[16,4] w2) => (float[N,T,4] y)
    { p = MatMul(x, w1)  n = LayerNormalization <axis = -1> (p, s, b)  y = MatMul(n, w2) }"""), 0.5)
    f = hidden.equivalence.fidelity
    assert hidden.equivalence.inexact_groups and 0 < f.rel_error and f.cosine < 1
    obspa = spa.prune(build(MLP), 0.5, criterion="obspa")
    assert obspa.equivalence.checked_groups == ("w1:1",) and obspa.equivalence.max_abs_diff <= 1e-4
    l1 = spa.prune(build(MLP), 0.5)
    assert obspa.fidelity is not None and l1.fidelity is None
    feeds = feeds_for(build(MLP))
    dense = run(build(MLP), feeds)[0]
    err = lambda m: np.linalg.norm(run(m, feeds)[0] - dense)  # noqa: E731
    assert err(obspa.model) < err(l1.model)


def test_the_check_can_be_turned_off_or_skips_big_models(resnet, monkeypatch):
    off = spa.prune(resnet, 0.5, check_equivalence=False)
    assert off.equivalence.skipped == "turned off" and off.verify_report.ran
    from spa import equivalence

    monkeypatch.setattr(equivalence, "CHECK_LIMIT_BYTES", 10)
    big = spa.prune(resnet, 0.5)
    assert "GiB of weights" in big.equivalence.skipped and any("skipped" in n for n in big.notes)
    forced = spa.prune(resnet, 0.5, check_equivalence=True)
    assert forced.equivalence.checked_groups


def test_cli_prints_the_check_and_writes_the_report(resnet, tmp_path, capsys):
    from spa.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(resnet, src)
    assert main(["prune", str(src), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.5",
                 "--report", str(tmp_path / "r.json")]) == 0
    assert "equal the masked dense model" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["equivalence"]["checked_groups"]
    assert main(["prune", str(src), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5",
                 "--no-check-equivalence"]) == 0
    assert "equal the masked" not in capsys.readouterr().out

"""End-to-end API behaviour: ratio 0, plans, allocation options, safety guarantees."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from helpers import build, feeds_for, run

import spa
from spa import zoo
from spa.errors import ArgumentError, FrontendError, PlanError, ValidationError

HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'


@pytest.fixture(scope="module")
def resnet():
    return zoo.resnet((1, 1), (16, 32), image=16, classes=5)


@pytest.fixture()
def resnet_file(tmp_path, resnet):
    path = tmp_path / "resnet.onnx"
    onnx.save(resnet, path)
    return path


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ratio_zero_keeps_outputs_identical(resnet):
    result = spa.prune(resnet, 0.0)
    assert not result.plan.pruned_groups
    feeds = feeds_for(resnet)
    for a, b in zip(run(resnet, feeds), run(result.model, feeds)):
        np.testing.assert_array_equal(a, b)


def test_prune_writes_a_valid_smaller_model_and_never_touches_the_input(resnet_file, tmp_path):
    before = digest(resnet_file)
    out = tmp_path / "small.onnx"
    result = spa.prune(resnet_file, 0.5, output=out, plan_out=tmp_path / "plan.json")
    assert digest(resnet_file) == before
    onnx.checker.check_model(onnx.load(out), full_check=True)
    from spa.metrics import count_params

    assert count_params(spa.load(out)) < 0.4 * count_params(spa.load(resnet_file))
    assert result.verify_report.output_shapes == {"logits": (1, 5)}
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_output_path_equal_to_input_is_refused(resnet_file):
    with pytest.raises(ArgumentError, match="never overwrites"):
        spa.prune(resnet_file, 0.5, output=resnet_file)


def test_plan_round_trips_through_json_and_reapplies_identically(resnet, tmp_path):
    result = spa.prune(resnet, 0.4, criterion="l2", round_to=4)
    path = tmp_path / "plan.json"
    result.plan.to_json(path)
    data = json.loads(path.read_text())
    assert data["format"] == "spa-plan" and len(data["groups"]) == len(result.graph.groups)
    plan = spa.Plan.from_json(path)
    assert plan.groups == result.plan.groups
    again = spa.apply_plan(spa.load(resnet), plan)
    feeds = feeds_for(resnet)
    np.testing.assert_array_equal(run(again, feeds)[0], run(result.model, feeds)[0])


def test_plan_for_another_model_is_rejected(resnet):
    plan = spa.prune(zoo.mlp(), 0.5).plan
    with pytest.raises(PlanError, match="not a prunable group of this model|channels, the model.s has"):
        spa.apply_plan(spa.load(resnet), plan)


@pytest.mark.parametrize("bad", [{"format": "x"}, {"format": "spa-plan", "version": 1,
                                                   "groups": [{"key": "w1:0", "size": 4, "keep": []}]},
                                 {"format": "spa-plan", "version": 1, "groups": [{"key": "a", "size": 2, "keep": [5]}]}])
def test_malformed_plans_are_rejected(bad):
    with pytest.raises(PlanError):
        spa.Plan.from_dict(bad)


def test_uniform_ratio_and_round_to(resnet):
    result = spa.prune(resnet, 0.3, round_to=8)
    for gp in result.plan.groups:
        assert len(gp.keep) % 8 == 0
        assert len(gp.keep) == 8 * round((gp.size - int(gp.size * 0.3)) / 8)


def test_global_pruning_removes_the_requested_share_unevenly(resnet):
    result = spa.prune(resnet, 0.5, global_pruning=True)
    total = sum(g.size for g in result.plan.groups)
    removed = sum(g.removed for g in result.plan.groups)
    assert removed == total // 2
    assert len({g.removed / g.size for g in result.plan.groups}) > 1


def test_protect_by_glob_keeps_the_group_whole(resnet):
    dg = spa.dependency_graph(spa.load(resnet))
    target = dg.groups[1]
    producer = next(m.node for m in target.params if m.role == "out")
    result = spa.prune(resnet, 0.5, protect=[producer, "no_such_node*"])
    kept = {g.key: g for g in result.plan.groups}[target.key]
    assert kept.removed == 0
    assert sum(1 for g in result.plan.groups if g.removed) == len(dg.groups) - 1


def test_never_empties_a_group():
    result = spa.prune(zoo.mlp((8, 3, 2, 4)), 0.99)
    assert all(len(g.keep) >= 1 for g in result.plan.groups)
    assert [len(g.keep) for g in result.plan.groups] == [1, 1]


def test_random_criterion_is_seeded(resnet):
    a = spa.prune(resnet, 0.5, criterion="random", seed=1).plan
    b = spa.prune(resnet, 0.5, criterion="random", seed=1).plan
    c = spa.prune(resnet, 0.5, criterion="random", seed=2).plan
    assert a.groups == b.groups and a.groups != c.groups


def _conv_conv_model(weights):
    m = build(HEAD + """g (float[1,2,4,4] x, float[4,2,1,1] w1, float[4] s1, float[4] b1, float[4] c1, float[4] s2,
                          float[3,4,1,1] w2) => (float[1,3,4,4] y)
    { h = Conv(x, w1)  n = BatchNormalization(h, s1, b1, c1, s2)  r = Relu(n)  y = Conv(r, w2) }""")
    for init in m.graph.initializer:
        if init.name in weights:
            init.CopyFrom(onnx.numpy_helper.from_array(weights[init.name], init.name))
    return m


def test_l1_keeps_the_largest_channels():
    w1 = np.ones((4, 2, 1, 1), np.float32)
    w1[[0, 2]] *= 0.01
    w2 = np.ones((3, 4, 1, 1), np.float32)
    plan = spa.prune(_conv_conv_model({"w1": w1, "w2": w2}), 0.5).plan
    assert plan.groups[0].keep == (1, 3)


def test_bn_criterion_reads_the_norm_scale():
    s1 = np.array([0.1, 5.0, 0.2, 3.0], np.float32)
    w1 = np.ones((4, 2, 1, 1), np.float32)
    w1[[1, 3]] *= 0.01  # magnitude would say the opposite
    plan = spa.prune(_conv_conv_model({"s1": s1, "w1": w1}), 0.5, criterion="bn").plan
    assert plan.groups[0].keep == (1, 3)


def test_bn_criterion_keeps_groups_without_a_norm_whole():
    plan = spa.prune(zoo.mlp(), 0.5, criterion="bn").plan
    assert not plan.pruned_groups


@pytest.mark.parametrize("reduction", ["mean", "sum", "max"])
@pytest.mark.parametrize("normalization", ["none", "mean", "max"])
def test_reductions_and_normalizations(resnet, reduction, normalization):
    model = spa.load(resnet)
    dg = spa.dependency_graph(model)
    scores = spa.score(dg, "l2", reduction, normalization)
    for g in dg.groups:
        s = scores[g.key]
        assert s.shape == (g.size,) and np.all(s >= 0)
        if normalization == "max":
            assert s.max() == pytest.approx(1.0)
        if normalization == "mean":
            assert s.mean() == pytest.approx(1.0)


def test_bad_arguments_name_the_argument(resnet):
    with pytest.raises(ArgumentError, match="ratio"):
        spa.prune(resnet, 1.0)
    with pytest.raises(ArgumentError, match="criterion"):
        spa.prune(resnet, 0.5, criterion="magic")
    with pytest.raises(ArgumentError, match="round_to"):
        spa.prune(resnet, 0.5, round_to=0)


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all", "truncate"])
def test_malformed_or_truncated_file_gets_a_clear_error_and_no_output(tmp_path, resnet, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(resnet.SerializeToString()[:5000] if content == "truncate" else content)
    out = tmp_path / "out.onnx"
    with pytest.raises(FrontendError, match="not a valid ONNX model|empty ONNX model"):
        spa.prune(bad, 0.5, output=out)
    assert not out.exists()


def test_missing_file_error():
    with pytest.raises(FrontendError, match="does not exist"):
        spa.load("/nonexistent/model.onnx")


def test_invalid_rewrite_names_the_group_and_writes_nothing(tmp_path, resnet, monkeypatch):
    from spa.passes.apply_plan import ApplyPlanPass

    original = ApplyPlanPass._slice

    def broken_slice(dg, kept):  # forget to slice one weight: the model becomes inconsistent
        victim = next(d for d in kept if d.value == dg.groups[0].params[0].param)
        original(dg, {d: k for d, k in kept.items() if d != victim})

    monkeypatch.setattr(ApplyPlanPass, "_slice", staticmethod(broken_slice))
    out = tmp_path / "out.onnx"
    with pytest.raises(ValidationError, match="(?s)pruning group .*makes the model invalid.*nothing was written"):
        spa.prune(resnet, 0.5, output=out)
    assert not out.exists()


def test_custom_op_model_is_pruned_around_the_op(tmp_path):
    m = build('<ir_version: 8, opset_import: ["" : 17, "my.ops" : 1]>\n' +
              """g (float[1,3,4,4] x, float[8,3,1,1] w1, float[8,8,1,1] w2, float[4,8,1,1] w3)
                 => (float[1,4,4,4] y)
    { h = Conv(x, w1)  c = my.ops.Mystery(h)  k = Conv(c, w2)  y = Conv(k, w3) }""")
    result = spa.prune(m, 0.5, output=tmp_path / "out.onnx")
    assert [g.key for g in result.plan.pruned_groups] == ["w2:0"]
    assert [b.op for b in result.graph.barriers] == ["Mystery"]
    assert any("does not run in onnxruntime" in n for n in result.notes)
    pruned = onnx.load(tmp_path / "out.onnx")
    shapes = {i.name: tuple(onnx.numpy_helper.to_array(i).shape) for i in pruned.graph.initializer}
    assert shapes["w1"] == (8, 3, 1, 1) and shapes["w2"] == (4, 8, 1, 1) and shapes["w3"] == (4, 4, 1, 1)


def test_onnx_ir_model_input_is_not_modified(resnet):
    model = spa.load(resnet)
    before = {n: v.const_value.numpy().shape for n, v in model.graph.initializers.items()}
    spa.prune(model, 0.5)
    assert {n: v.const_value.numpy().shape for n, v in model.graph.initializers.items()} == before

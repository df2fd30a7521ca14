"""Prune to a budget (``spa.targets``): params / MACs / bytes targets met within 1% of the dense
figure on a CNN and a small transformer, absolute units, depth under the same target,
unreachable targets refused with nothing written, and latency targets reported honestly."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

import spa
from spa import targets, zoo
from spa.cli import main
from spa.errors import ArgumentError
from spa.metrics import count_macs, count_params
from tests import transformer_models as tm


@pytest.fixture(scope="module")
def cnn():
    return zoo.resnet((1, 1), (16, 32), image=16, classes=5)


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return tm.export(*tm.bert(), dynamo=False)  # the TorchScript exporter: 3 s instead of 15


@pytest.fixture()
def cnn_file(tmp_path, cnn):
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn, path)
    return path


def _figure(kind, model):
    return {"params": count_params, "macs": count_macs, "bytes": targets.weight_bytes}[kind](model)


@pytest.mark.parametrize("spec, kind, value, relative", [
    ("params=0.5", "params", 0.5, True), ("params=3.5M", "params", 3.5e6, False),
    ("macs=2G", "macs", 2e9, False), ("params=20000", "params", 20000, False),
    ("bytes=40MB", "bytes", 40e6, False), ("bytes=40MiB", "bytes", 40 * 2 ** 20, False),
    ("latency=12ms", "latency", 12.0, False), ("latency=0.5s", "latency", 500.0, False),
    ("latency=0.6", "latency", 0.6, True), ("MACs = 1.5k", "macs", 1500, False),
])
def test_targets_parse_ratios_and_absolute_units(spec, kind, value, relative):
    t = targets.parse(spec)
    assert (t.kind, t.relative) == (kind, relative)
    assert t.value == pytest.approx(value)


@pytest.mark.parametrize("spec, match", [
    ("flops=0.5", "KIND one of"), ("params", "KIND=VALUE"), ("params=abc", "not a number"),
    ("latency=12", "with its unit"), ("bytes=3XB", "unknown unit"), ("params=0", "positive"),
])
def test_malformed_targets_are_refused_with_the_form_expected(spec, match):
    with pytest.raises(ArgumentError, match=match):
        targets.parse(spec)


@pytest.mark.parametrize("kind", ["params", "macs", "bytes"])
@pytest.mark.parametrize("model", ["cnn", "bert"])
def test_ratio_targets_are_met_within_one_percent_of_the_dense_figure(kind, model, request):
    proto = request.getfixturevalue(model)
    result = spa.prune(proto, target=f"{kind}=0.45")
    dense, after = _figure(kind, result.dense), _figure(kind, result.model)
    assert abs(after - 0.45 * dense) <= 0.01 * dense
    assert result.target.met and result.target.achieved == after
    assert result.plan.meta["target"] == f"{kind}=0.45"


def test_global_and_layerwise_allocations_meet_the_target(bert):
    for kwargs in ({"global_pruning": True}, {"allocation": "alpha"}):
        result = spa.prune(bert, target="params=0.6", **kwargs)
        dense = count_params(result.dense)
        assert abs(count_params(result.model) - 0.6 * dense) <= 0.01 * dense, kwargs


def test_round_to_and_protect_hold_under_a_target(cnn):
    dg = spa.dependency_graph(spa.load(cnn))
    protected = dg.groups[0]
    result = spa.prune(cnn, target="params=0.5", round_to=4, protect=[protected.params[0].param])
    dense = count_params(result.dense)
    assert abs(count_params(result.model) - 0.5 * dense) <= 0.01 * dense
    for gp in result.plan.groups:
        if gp.key == protected.key:
            assert len(gp.keep) == gp.size
        elif gp.size > 4:
            assert len(gp.keep) % 4 == 0, gp


def test_an_absolute_parameter_target_is_met(cnn):
    result = spa.prune(cnn, target="params=20K")
    assert abs(count_params(result.model) - 20000) <= 0.01 * count_params(result.dense)
    assert result.target.goal == 20000 and not result.target.target.relative


def test_depth_counts_toward_the_target(bert):
    result = spa.prune(bert, target="params=0.5", depth=1)
    deep = count_params(spa.load(bert))
    assert result.plan.blocks  # a layer went ...
    assert count_params(result.dense) == deep  # ... and the target is a share of the model before it
    assert abs(count_params(result.model) - 0.5 * deep) <= 0.01 * deep
    assert result.target.dense == deep


def test_an_unreachable_target_is_refused_saying_what_is_reachable_and_writes_nothing(cnn_file, tmp_path):
    out = tmp_path / "small.onnx"
    first = spa.dependency_graph(spa.load(cnn_file)).groups[0].params[0].param  # its 64 channels stay
    with pytest.raises(ArgumentError, match=r"cannot be reached.*reaches [\d,]+ \(0\.\d+\).*Ask for at least") as exc:
        spa.prune(cnn_file, target="params=0.1", protect=[first], output=out, plan_out=tmp_path / "plan.json")
    assert "nothing was written" in str(exc.value)
    assert not out.exists() and not (tmp_path / "plan.json").exists()


def test_target_and_ratio_are_exclusive(cnn_file, tmp_path, capsys):
    with pytest.raises(ArgumentError, match="exclusive"):
        spa.prune(cnn_file, 0.3, target="params=0.5")
    out = tmp_path / "small.onnx"
    assert main(["prune", str(cnn_file), "-o", str(out), "--target", "params=0.5", "--ratio", "0.3"]) == 1
    assert "are exclusive" in capsys.readouterr().err
    assert not out.exists()


def test_cli_target_prints_the_target_and_the_achieved_figure(cnn_file, tmp_path, capsys):
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    assert main(["prune", str(cnn_file), "-o", str(out), "--target", "macs=0.5", "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "target macs=0.5: goal" in printed and "achieved" in printed and "within 1%" in printed
    data = json.loads(report.read_text())["target"]
    dense = count_macs(spa.load(cnn_file))
    assert data["kind"] == "macs" and data["met"]
    assert data["achieved"] == count_macs(spa.load(out))
    assert abs(data["achieved"] - 0.5 * dense) <= 0.01 * dense


def test_a_latency_target_is_met_or_reported_with_what_is_reachable(cnn_file, tmp_path, capsys):
    out = tmp_path / "small.onnx"
    code = main(["prune", str(cnn_file), "-o", str(out), "--target", "latency=0.7", "--threads", "1",
                 "--input-shape", "input=8,3,16,16"])
    printed = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "target latency=0.7: goal" in printed and " ms" in printed
    assert ("within 5%" in printed) or ("not met within 5%" in printed and "reachable on cpu" in printed)


def test_a_latency_search_times_few_models(cnn):
    result = spa.prune(cnn, target="latency=0.7", threads=1, input_shapes={"input": [8, 3, 16, 16]}, round_to=1)
    t = result.target
    assert t.target.kind == "latency" and t.achieved > 0 and t.dense > 0
    assert t.timed <= 2 + len(targets.LATENCY_POINTS) + targets.LATENCY_ROUNDS  # not one model per plan tried
    assert t.plans_tried > t.timed
    assert t.met or any("not met within 5%" in n for n in result.notes)
    assert result.report()["target"]["achieved"] == t.achieved


def test_an_unreachable_latency_target_is_refused(cnn):
    with pytest.raises(ArgumentError, match="cannot be reached.*ms"):
        spa.prune(cnn, target="latency=0.01ms", threads=1)


def _latency_prune(model, **kw):
    """``spa.prune`` with a latency target on a model that runs in tens of microseconds. How far
    pruning can cut its latency depends on the machine (fixed per-run overhead against compute):
    a slow or loaded machine puts the most-pruned point above 0.7, which the prune refuses
    honestly, naming the lowest reachable share. These tests check the search's logic, not the
    machine, so the target then moves just above that share (once)."""
    import re

    try:
        return spa.prune(model, **kw)
    except ArgumentError as exc:
        found = re.search(r"Ask for at least ([0-9.]+)", str(exc))
        if "cannot be reached" not in str(exc) or found is None:
            raise
        return spa.prune(model, **{**kw, "target": f"latency={min(float(found.group(1)) + 0.05, 0.99):.3f}"})


def test_latency_targets_round_channel_counts_to_16_unless_told(cnn):
    result = _latency_prune(cnn, target="latency=0.7", threads=1)
    assert any("multiples of 16" in n for n in result.notes)
    assert all(len(gp.keep) % 16 == 0 for gp in result.plan.groups if gp.size > 16)


def test_the_layer_table_times_every_weight_layer_and_shrinks_with_the_plan(cnn, bert):
    for proto, ops in ((cnn, ("Conv", "Gemm")), (bert, ("MatMul", "Gemm"))):
        model = spa.load(proto)
        table = targets.LayerTable(model, threads=1, runs=2)
        weights = [n for n in model.graph if n.op_type in ops and n.inputs[1] is not None
                   and n.inputs[1].const_value is not None]
        assert len(table.layers) == len(weights) and table.timed <= len(weights)
        half = spa.prune(proto, 0.5, verify=False).model
        assert 0 < table(half) < table(model)


def test_a_latency_search_on_macs_or_the_layer_table(cnn, monkeypatch):
    result = _latency_prune(cnn, target="latency=0.7", threads=1, round_to=1)
    t = result.target
    assert t.layers == sum(n.op_type in ("Conv", "Gemm") for n in spa.load(cnn).graph)  # the default
    assert t.met or any("not met within 5%" in n and "reachable" in n for n in result.notes)
    monkeypatch.setattr(targets, "LATENCY_MODEL", "macs")
    result = _latency_prune(cnn, target="latency=0.7", threads=1, round_to=1)
    t = result.target
    assert t.layers == 0
    assert t.met or any("not met within 5%" in n and "reachable" in n for n in result.notes)


def test_a_depth_that_alone_goes_below_the_target_is_said_and_prunes_no_channel(bert):
    result = spa.prune(bert, target="params=0.95", depth=1)
    assert not result.plan.pruned_groups and result.plan.blocks
    assert not result.target.met
    assert any("depth pruning alone reaches" in n for n in result.notes)


def test_the_layer_table_sees_weights_through_a_transpose():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Transpose", ["w1"], ["w1t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w1t"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="down")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4])], inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model = spa.load(proto)
    table = targets.LayerTable(model, threads=1, runs=2)
    assert {k: v[:2] for k, v in table.layers.items()} == {"up": (16, 32), "down": (32, 4)}
    half = spa.prune(proto, 0.5, verify=False).model
    assert 0 < table(half) <= table(model)

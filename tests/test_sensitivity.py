"""The sensitivity report (``spa sensitivity``, ``spa.sensitivity``): groups and layers pruned
alone, their fidelity against the dense model and what they save; the JSON schema, the on-disk
cache, the plot and the errors a user can cause."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as oh
from onnx import numpy_helper as nh

import spa
from spa.cli import main

D, H = 16, 32  # stream width, hidden channels of each residual block
SLOW = os.environ.get("SPA_SLOW") == "1"


def residual_mlp(tiny: int = 1, scale: float = 1e-3, blocks: int = 3, seed: int = 0) -> onnx.ModelProto:
    """``blocks`` residual ReLU MLP blocks ``x + W2·relu(W1·x)``; block ``tiny`` multiplies its
    hidden activations by ``scale``, so pruning its channels barely moves the output."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits, nodes, x = [], [], "x"
    for b in range(blocks):
        inits += [nh.from_array(rng.standard_normal((D, H)).astype(f), f"w{b}a"),
                  nh.from_array((rng.standard_normal((H, D)) / np.sqrt(H)).astype(f), f"w{b}b")]
        nodes += [oh.make_node("MatMul", [x, f"w{b}a"], [f"h{b}"]), oh.make_node("Relu", [f"h{b}"], [f"r{b}"])]
        r = f"r{b}"
        if b == tiny:
            inits.append(nh.from_array(np.array(scale, f), "tiny"))
            nodes.append(oh.make_node("Mul", [r, "tiny"], [f"s{b}"]))
            r = f"s{b}"
        nodes += [oh.make_node("MatMul", [r, f"w{b}b"], [f"z{b}"]), oh.make_node("Add", [x, f"z{b}"], [f"y{b}"])]
        x = f"y{b}"
    nodes.append(oh.make_node("Identity", [x], ["y"]))
    g = oh.make_graph(nodes, "residual_mlp", [oh.make_tensor_value_info("x", T.FLOAT, ["N", D])],
                      [oh.make_tensor_value_info("y", T.FLOAT, ["N", D])], inits)
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)], ir_version=9)


def normed() -> onnx.ModelProto:
    """A LayerNorm over the hidden channels: an inexact group (masking is not pruning)."""
    rng = np.random.default_rng(1)
    f = np.float32
    inits = [nh.from_array(rng.standard_normal((D, H)).astype(f), "w1"), nh.from_array(np.ones(H, f), "s"),
             nh.from_array(np.zeros(H, f), "b"), nh.from_array(rng.standard_normal((H, 8)).astype(f), "w2")]
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["h"]),
             oh.make_node("LayerNormalization", ["h", "s", "b"], ["n"], axis=-1),
             oh.make_node("MatMul", ["n", "w2"], ["y"])]
    g = oh.make_graph(nodes, "normed", [oh.make_tensor_value_info("x", T.FLOAT, ["N", D])],
                      [oh.make_tensor_value_info("y", T.FLOAT, ["N", 8])], inits)
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)], ir_version=9)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test caches into its own folder (never the user's ~/.cache/spa)."""
    monkeypatch.setenv("SPA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "residual.onnx"
    path.write_bytes(residual_mlp().SerializeToString())
    return path


def _pruned_fidelity(source, plan_groups, feeds):
    """Fidelity of the model with ``plan_groups`` actually pruned (the reference for the report)."""
    from spa import runtime
    from spa.api import pruned_copy
    from spa.equivalence import fidelity
    from spa.io import to_proto
    from spa.plan import Plan

    model = spa.load(source)
    dense = runtime.session(to_proto(model), optimize=False)
    pruned = runtime.session(to_proto(pruned_copy(model, Plan(tuple(plan_groups)))), optimize=False)
    return fidelity([a for f in feeds for a in pruned.run(None, f)], [a for f in feeds for a in dense.run(None, f)])


def test_the_group_scaled_by_a_tiny_constant_comes_out_least_sensitive():
    result = spa.sensitivity(residual_mlp(tiny=1), cache=False)
    assert result.groups[0].key == "w1a:1"
    assert result.layers[0].key == "block1" and result.layers[0].groups == ("w1a:1",)
    assert {u.key for u in result.groups} == {"w0a:1", "w1a:1", "w2a:1"}  # the stream is a graph input: blocked
    assert {u.key: u.layer for u in result.groups} == {"w0a:1": "block0", "w1a:1": "block1", "w2a:1": "block2"}
    tiny, others = result.unit("w1a:1"), [result.unit("w0a:1"), result.unit("w2a:1")]
    for r in result.ratios:
        assert tiny.at(r).relative_error < 1e-2 * min(o.at(r).relative_error for o in others)
        assert tiny.at(r).cosine > 0.9999
    # the tiny block moved: the ranking follows the measurement, not the position
    assert spa.sensitivity(residual_mlp(tiny=2), cache=False).groups[0].key == "w2a:1"


def test_probes_count_what_the_pruned_alone_model_saves_and_match_a_real_prune():
    from spa import calibration as cal
    from spa.plan import GroupPlan
    from spa.runtime import ModelInputs
    from spa.sensitivity_report import _removed

    result = spa.sensitivity(residual_mlp(), ratios="0.25,0.5", cache=False, input_shapes={"N": 4})
    assert result.ratios == (0.25, 0.5) and result.settings["calibration_batches"] == 2
    unit = result.unit("w0a:1")
    assert unit.exact and unit.channels == H
    for r in result.ratios:
        p = unit.at(r)
        n = int(H * r)
        assert p.removed == n and p.measured == "masked"
        assert p.params_saved == n * 2 * D  # a column of w0a and a row of w0b per channel
        assert p.macs_saved == 4 * n * 2 * D  # batch 4: both MatMuls shrink
        assert p.latency_saved_ms is None
    # the masked run is the pruned model's output (the invariant the report relies on)
    model = spa.load(residual_mlp())
    dg = spa.dependency_graph(model)
    group = next(g for g in dg.groups if g.key == "w0a:1")
    removed = _removed(group, spa.score(dg, "l1")[group.key], 0.5)
    keep = tuple(int(i) for i in np.setdiff1d(np.arange(H), removed))
    feeds = cal.batches(None, model, ModelInputs(model), 2, {"N": 4}, 0)
    want = _pruned_fidelity(residual_mlp(), [GroupPlan(group.key, H, keep)], feeds)
    assert unit.at(0.5).relative_error == pytest.approx(want.rel_error, rel=1e-4)
    assert unit.at(0.5).cosine == pytest.approx(want.cosine, rel=1e-6)
    assert result.model["params"] == spa.metrics.count_params(model)


def depthwise() -> onnx.ModelProto:
    """Conv -> depthwise Conv (its ``group`` shrinks with the channels) -> Conv."""
    from helpers import build

    return build("""<ir_version: 9, opset_import: ["" : 18]>
    g (float[N,3,8,8] x, float[8,3,3,3] w1, float[8,1,3,3] w2, float[8] b2, float[4,8,1,1] w3) => (float[N,4,8,8] y)
    { a = Conv<pads=[1,1,1,1]>(x, w1)  r = Relu(a)  c = Conv<pads=[1,1,1,1], group=8>(r, w2, b2)  d = Relu(c)
      y = Conv(d, w3) }""")


def _counts_agree(proto, input_shapes=None):
    """Every unit's parameters and MACs saved, counted from shapes and on its pruned copy."""
    from spa import calibration as cal
    from spa.runtime import ModelInputs
    from spa.sensitivity_report import _Probes, _removed, layer_groups

    model = spa.load(proto)
    dg = spa.dependency_graph(model)
    scores = spa.score(dg, "l1")
    groups = [g for g in dg.groups if g.size > 1]
    probes = _Probes(dg, groups, cal.batches(None, model, ModelInputs(model), 1, input_shapes, 0), input_shapes,
                     False, 0, None)
    from_shapes = 0
    for gs in [[g] for g in groups] + list(layer_groups(model, groups).values()):
        for r in (0.25, 0.5):
            chosen = [(g, _removed(g, scores[g.key], r)) for g in gs]
            probes.count_from_shapes = True
            a = probes.probe(chosen, r)
            from_shapes += probes._shrunk(chosen) is not None
            probes.count_from_shapes = False
            b = probes.probe(chosen, r)
            assert (a.params_saved, a.macs_saved) == (b.params_saved, b.macs_saved), ([g.key for g in gs], r)
            assert a.params_saved > 0 or not a.removed
    return from_shapes


@pytest.mark.parametrize("name", ["resnet", "residual", "normed", "depthwise", "mlp"])
def test_savings_counted_from_shapes_equal_the_pruned_copys(name):
    from spa import zoo

    proto = {"resnet": zoo.small_resnet, "residual": residual_mlp, "normed": normed, "depthwise": depthwise,
             "mlp": zoo.mlp}[name]()
    assert _counts_agree(proto, {"N": 2} if name in ("residual", "depthwise") else None) > 0


@pytest.mark.skipif(not SLOW, reason="SPA_SLOW=1: exports LLaMA and BERT (5-20 s each)")
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_savings_counted_from_shapes_equal_the_pruned_copys_on_transformers(name):
    pytest.importorskip("transformers")
    import transformer_models as tm

    model, x = tm.llama("sdpa", layers=2) if name == "llama" else tm.bert("sdpa")
    assert _counts_agree(tm.export(model, x)) > 0


def test_an_inexact_group_is_measured_on_the_pruned_model():
    result = spa.sensitivity(normed(), ratios=[0.5], cache=False)
    unit = result.unit("w1:1")
    assert not unit.exact and unit.at(0.5).measured == "pruned"
    assert 0 < unit.at(0.5).relative_error < 10 and unit.at(0.5).params_saved == 16 * (D + 2 + 8)


def test_json_schema_and_round_trip(model_file, tmp_path, capsys):
    out = tmp_path / "sens.json"
    assert main(["sensitivity", str(model_file), "--ratios", "0.5,0.1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ranked least sensitive first" in text and "w1a:1" in text.splitlines()[3]
    data = json.loads(out.read_text())
    assert data["schema"] == "spa.sensitivity/1" and data["latency_method"] is None and data["notes"] == []
    assert set(data["model"]) == {"sha256", "params", "macs", "latency_ms"} and len(data["model"]["sha256"]) == 64
    assert data["settings"]["ratios"] == [0.1, 0.5] and data["settings"]["criterion"] == "l1"
    assert data["settings"]["calibration"] is None and data["settings"]["seed"] == 0
    kinds = [u["kind"] for u in data["units"]]
    assert kinds == ["group"] * 3 + ["layer"] * 3
    for u in data["units"]:
        assert set(u) == {"key", "kind", "group_kind", "layer", "groups", "channels", "exact", "results"}
        assert [p["ratio"] for p in u["results"]] == [0.1, 0.5]
        for p in u["results"]:
            assert set(p) == {"ratio", "removed", "relative_error", "cosine", "params_saved", "macs_saved",
                              "latency_saved_ms", "measured"}
            assert isinstance(p["removed"], int) and isinstance(p["relative_error"], float)
    back = spa.SensitivityResult.from_dict(data)
    assert back.to_dict() == data


def test_the_cache_is_hit_on_a_second_call_and_missed_when_a_setting_changes(model_file, private_cache, capsys):
    first = spa.sensitivity(str(model_file))
    assert not first.cached and first.cache_path.parent == private_cache / "sensitivity"
    again = spa.sensitivity(str(model_file))
    assert again.cached and again.cache_path == first.cache_path
    assert [u.to_dict() for u in again.units] == [u.to_dict() for u in first.units]
    # the same content under another name is the same model
    copy = model_file.with_name("copy.onnx")
    copy.write_bytes(model_file.read_bytes())
    assert spa.sensitivity(str(copy)).cached
    for change in ({"ratios": (0.2,)}, {"criterion": "l2"}, {"seed": 1}, {"calibration_batches": 3},
                   {"calibration": "model"}, {"input_shapes": {"N": 2}}):
        assert not spa.sensitivity(str(model_file), **change).cached, change
    other = residual_mlp(seed=1)
    assert not spa.sensitivity(other).cached and spa.sensitivity(other).cached
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((4, D)).astype(np.float32)}]
    assert not spa.sensitivity(str(model_file), calibration=data).cached
    assert spa.sensitivity(str(model_file), calibration=[{"x": data[0]["x"].copy()}]).cached
    assert not spa.sensitivity(str(model_file), calibration=[{"x": data[0]["x"] + 1}]).cached
    # the command line says it reused them; --cache-dir moves the cache
    capsys.readouterr()
    assert main(["sensitivity", str(model_file)]) == 0
    assert f"reused cached results from {first.cache_path}" in capsys.readouterr().out
    assert main(["sensitivity", str(model_file), "--cache-dir", str(private_cache / "elsewhere")]) == 0
    assert "reused" not in capsys.readouterr().out
    assert len(list((private_cache / "elsewhere" / "sensitivity").glob("*.json"))) == 1


def test_an_unhashable_calibration_is_not_cached(model_file):
    rng = np.random.default_rng(0)
    result = spa.sensitivity(str(model_file), calibration=lambda: [{"x": rng.standard_normal((2, D)).astype(np.float32)}])
    assert not result.cached and result.cache_path is None
    assert any("cannot be hashed" in n for n in result.notes)


def test_latency_is_measured_on_the_pruned_alone_models(model_file, capsys):
    result = spa.sensitivity(str(model_file), ratios=[0.5], latency=True, latency_runs=2, cache=False)
    assert result.latency_method == "measured" and result.model["latency_ms"] > 0
    assert all(isinstance(u.at(0.5).latency_saved_ms, float) for u in result.units)
    assert "ms saved@0.5" in result.table()


def test_plot_writes_a_png(model_file, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'spa-prune[plot]')")
    out = tmp_path / "sens.png"
    assert main(["sensitivity", str(model_file), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(model_file, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    out = tmp_path / "sens.png"
    assert main(["sensitivity", str(model_file), "--plot", str(out)]) == 1
    err = capsys.readouterr().err
    assert 'needs matplotlib, which is not installed: pip install "spa-prune[plot]"' in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--ratios", "0,0.5"], "ratio 0 is not in (0, 1)"),
    (["--ratios", "0.5,1"], "ratio 1 is not in (0, 1)"),
    (["--ratios", "half"], "--ratios 'half': expected a comma list"),
    (["--ratios", ","], "give at least one ratio"),
    (["--criterion", "nope"], "criterion='nope' is not one of"),
    (["--criterion", "taylor"], "needs an nn.Module"),
    (["--calibration-batches", "0"], "--calibration-batches"),
    (["--calibration", "/no/such/dir"], "is neither a directory of .npy files"),
])
def test_user_errors_are_spa_errors(model_file, capsys, args, message):
    assert main(["sensitivity", str(model_file), *args]) == 1
    err = capsys.readouterr().err
    assert "spa: error: " in err and message in err.split("spa: error: ", 1)[1] and "Traceback" not in err


def test_a_unit_that_cannot_be_pruned_alone_is_left_out_with_a_note(monkeypatch):
    from spa import sensitivity_report as sr
    from spa.errors import PlanError

    probe = sr._Probes.probe

    def failing(self, chosen, ratio):
        if any(g.key == "w2a:1" for g, _ in chosen):
            raise PlanError("plan group 'w2a:1' cannot be applied")
        return probe(self, chosen, ratio)

    monkeypatch.setattr(sr._Probes, "probe", failing)
    first = spa.sensitivity(residual_mlp())
    assert {u.key for u in first.units} == {"w0a:1", "w1a:1", "block0", "block1"}
    assert first.notes == ["group w2a:1: not measured, pruning it alone fails (plan group 'w2a:1' cannot be applied)",
                           "layer block2: not measured, pruning it alone fails (plan group 'w2a:1' cannot be applied)"]
    assert spa.sensitivity(residual_mlp()).notes == first.notes  # kept in the cache


def test_an_unprunable_model_says_so(tmp_path, capsys):
    g = oh.make_graph([oh.make_node("Relu", ["x"], ["y"])], "g", [oh.make_tensor_value_info("x", T.FLOAT, [2, 4])],
                      [oh.make_tensor_value_info("y", T.FLOAT, [2, 4])])
    path = tmp_path / "relu.onnx"
    path.write_bytes(oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)], ir_version=9).SerializeToString())
    assert main(["sensitivity", str(path)]) == 1
    assert "no group of this model can be pruned" in capsys.readouterr().err


@pytest.mark.skipif(not SLOW, reason="SPA_SLOW=1: exports a LLaMA model (5-20 s)")
def test_transformer_layers_hold_their_heads_and_ffn_groups():
    pytest.importorskip("transformers")
    import transformer_models as tm

    model, x = tm.llama("sdpa", layers=2)
    result = spa.sensitivity(tm.export(model, x), ratios=[0.5], calibration="zipf", cache=False)
    assert [u.key for u in sorted(result.layers, key=lambda u: u.key)] == ["layer0", "layer1"]
    for layer in result.layers:
        kinds = {result.unit(k).group_kind for k in layer.groups}
        assert kinds == {"heads", "channels"}
        assert all(result.unit(k).layer == layer.key for k in layer.groups)
    assert all(u.layer is None for u in result.groups if u.group_kind == "hidden")

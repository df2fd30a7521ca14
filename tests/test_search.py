"""The allocation search (``spa.search``, ``spa search``, ``spa worker``) on a small MLP: the
parameter target, the enqueued heuristics, determinism for a seed, 1 vs 2 local workers (and
Ray, marker ``ray``), resuming from the journal, Ctrl-C, a dying worker and best_plan.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

optuna = pytest.importorskip("optuna")

import spa  # noqa: E402
from spa import zoo  # noqa: E402
from spa.cli import main  # noqa: E402
from spa.metrics import count_params  # noqa: E402
from spa.search.space import HEURISTICS, parse_target  # noqa: E402

HEUR = [name for name, _ in HEURISTICS]
SLOW = os.environ.get("SPA_SLOW") == "1"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("m") / "mlp.onnx"
    onnx.save(zoo.mlp((32, 96, 64, 48, 10)), path)
    return path


def _complete(study):
    from optuna.trial import TrialState

    return [t for t in study.trials if t.state == TrialState.COMPLETE]


def _by_heuristic(study) -> dict:
    return {t.user_attrs["heuristic"]: t.values[0] for t in _complete(study) if t.user_attrs.get("heuristic")}


def test_heuristics_enqueued_first_and_target_met(model_path, tmp_path):
    r = spa.search(str(model_path), "params=0.5", trials=7, out=tmp_path, seed=1)
    trials = sorted(_complete(r.study), key=lambda t: t.number)
    assert [t.user_attrs.get("heuristic") for t in trials[:4]] == HEUR
    assert [t.params["family"] for t in trials[:4]] == HEUR
    assert len(trials) == 7
    assert r.best["values"][0] <= min(_by_heuristic(r.study).values())  # never worse than a heuristic
    for t in trials:  # the plan meets the target within 1% of the dense count, checked on the pruned model
        assert abs(t.user_attrs["result"]["params_ratio"] - 0.5) <= 0.01
        assert t.user_attrs["result"]["params_ratio"] == pytest.approx(t.user_attrs["plan"]["params_ratio"], abs=1e-9)
    for name in ("best_plan.json", "pareto.json", "study.log", "scores.npz", "calibration.npz"):
        assert (tmp_path / name).is_file(), name
    doc = json.loads((tmp_path / "pareto.json").read_text())
    assert doc["best"] == r.best["number"] and set(doc["heuristics"]) == set(HEUR)
    assert len(doc["trials"]) == 7 and doc["front"]
    assert (tmp_path / "pareto.png").is_file() or any("matplotlib" in n for n in r.notes)


def test_best_plan_applies_and_meets_target(model_path, tmp_path):
    spa.search(str(model_path), "params=0.4", trials=5, out=tmp_path)
    plan = spa.Plan.from_json(tmp_path / "best_plan.json")
    dense = spa.load(model_path)
    pruned = spa.apply_plan(dense, plan)  # verified: checker, onnxruntime, masked equivalence
    assert abs(count_params(pruned) / count_params(dense) - 0.4) <= 0.01
    assert plan.meta["allocation"] == "search" and plan.meta["target"] == {"params": 0.4}
    out = tmp_path / "small.onnx"
    assert main(["apply", str(model_path), str(tmp_path / "best_plan.json"), "-o", str(out)]) == 0
    assert out.is_file()


@pytest.mark.parametrize("sampler", ["tpe", "cmaes"])
def test_deterministic_for_a_seed(model_path, tmp_path, sampler):
    a = spa.search(str(model_path), "params=0.5", trials=8, out=tmp_path / "a", seed=3, sampler=sampler)
    b = spa.search(str(model_path), "params=0.5", trials=8, out=tmp_path / "b", seed=3, sampler=sampler)
    va = [(t.params, t.values) for t in sorted(_complete(a.study), key=lambda t: t.number)]
    vb = [(t.params, t.values) for t in sorted(_complete(b.study), key=lambda t: t.number)]
    assert va == vb
    assert json.loads((tmp_path / "a" / "best_plan.json").read_text())["groups"] == \
        json.loads((tmp_path / "b" / "best_plan.json").read_text())["groups"]


def test_two_local_workers_equal_one(model_path, tmp_path):
    one = spa.search(str(model_path), "params=0.5", trials=4, out=tmp_path / "one")
    two = spa.search(str(model_path), "params=0.5", trials=4, out=tmp_path / "two", workers="local:2")
    h1, h2 = _by_heuristic(one.study), _by_heuristic(two.study)
    assert set(h1) == set(HEUR) and set(h2) == set(HEUR)
    for name in HEUR:
        assert h2[name] == pytest.approx(h1[name], rel=1e-6, abs=1e-9)
    pids = {t.user_attrs["result"]["pid"] for t in _complete(two.study)}
    assert os.getpid() not in pids and len(pids) == 2  # ran in the two worker processes


@pytest.mark.ray
def test_ray_workers_equal_one(model_path, tmp_path):
    ray = pytest.importorskip("ray")
    one = spa.search(str(model_path), "params=0.5", trials=4, out=tmp_path / "one")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:  # the activations' batches sharded over the Ray workers too
        r = spa.search(str(model_path), "params=0.5", trials=4, out=tmp_path / "ray", workers="ray",
                       shard_calibration=True)
    finally:
        ray.shutdown()
    h1, hr = _by_heuristic(one.study), _by_heuristic(r.study)
    assert set(hr) == set(HEUR)
    for name in HEUR:
        assert hr[name] == pytest.approx(h1[name], rel=1e-6, abs=1e-9)


def test_resume_continues_the_journal(model_path, tmp_path):
    first = spa.search(str(model_path), "params=0.5", trials=5, out=tmp_path, seed=2)
    best = first.best["values"][0]
    numbers = sorted(t.number for t in _complete(first.study))
    again = spa.search(str(model_path), "params=0.5", trials=8, out=tmp_path, seed=2)
    done = _complete(again.study)
    assert len(done) == 8
    assert numbers == sorted(t.number for t in done)[:5]  # the first run's trials are still there
    assert again.best["values"][0] <= best
    assert sorted(t.user_attrs.get("heuristic") for t in done if t.user_attrs.get("heuristic")) == sorted(HEUR)
    # the same command once more: nothing left to run, same best
    same = spa.search(str(model_path), "params=0.5", trials=8, out=tmp_path, seed=2)
    assert len(_complete(same.study)) == 8 and same.best["number"] == again.best["number"]


def test_other_settings_in_the_same_folder_are_refused(model_path, tmp_path):
    spa.search(str(model_path), "params=0.5", trials=4, out=tmp_path)
    with pytest.raises(spa.ArgumentError, match="other settings"):
        spa.search(str(model_path), "params=0.6", trials=4, out=tmp_path)


_CALLS = {"n": 0}


def _interrupt_third(sess) -> float:
    _CALLS["n"] += 1
    if _CALLS["n"] == 3:
        raise KeyboardInterrupt
    return 1.0


def _output_norm(sess) -> float:
    x = np.linspace(-1, 1, 32, dtype=np.float32)[None]
    return float(np.abs(sess.run(None, {sess.get_inputs()[0].name: x})[0]).sum())


def test_metric_replaces_fidelity_and_ctrl_c_leaves_a_resumable_study(model_path, tmp_path):
    from optuna.trial import TrialState

    _CALLS["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        spa.search(str(model_path), "params=0.5", trials=6, out=tmp_path, metric=_interrupt_third)
    study = optuna.load_study(study_name="spa-search", storage=spa.search.driver.storage(None, tmp_path))
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 2
    assert [t.user_attrs.get("interrupted") for t in study.trials if t.state == TrialState.FAIL] == [True]
    r = spa.search(str(model_path), "params=0.5", trials=6, out=tmp_path, metric=_interrupt_third)
    assert len(_complete(r.study)) == 6
    assert set(_by_heuristic(r.study)) == set(HEUR)  # the interrupted heuristic was enqueued again
    m = spa.search(str(model_path), "params=0.5", trials=4, out=tmp_path / "m", metric=_output_norm)
    assert m.study.direction == optuna.study.StudyDirection.MAXIMIZE
    for t in _complete(m.study):
        assert t.values[0] == t.user_attrs["result"]["metric"] and t.values[0] > 0


def _crash_first(sess) -> float:
    marker = Path(os.environ["SPA_TEST_CRASH_MARKER"])
    if not marker.exists():
        marker.write_text("crashed")
        os._exit(3)  # the worker process dies mid-trial
    return 1.0


@pytest.mark.skipif(not SLOW, reason="SPA_SLOW=1: spawns three worker processes (~12 s)")
def test_a_dying_worker_fails_its_trial_not_the_study(model_path, tmp_path, monkeypatch):
    from optuna.trial import TrialState

    monkeypatch.setenv("SPA_TEST_CRASH_MARKER", str(tmp_path / "crashed"))
    r = spa.search(str(model_path), "params=0.5", trials=5, out=tmp_path / "s", workers="local:2",
                   metric=_crash_first)
    failed = [t for t in r.study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs.get("worker_died")
    assert len(_complete(r.study)) == 4  # the failed trial counts towards --trials


def test_cli_search_sqlite_storage_and_worker(model_path, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    out = tmp_path / "out"
    assert main(["search", str(model_path), "--target", "params=0.5", "--trials", "4", "--out", str(out),
                 "--storage", url, "--sampler", "nsga2"]) == 0
    text = capsys.readouterr().out
    assert "search:" in text and "uniform:" in text and (out / "best_plan.json").is_file()
    assert not (out / "study.log").exists()
    assert main(["worker", "--storage", url, "--trials", "6"]) == 0
    assert "ran 2 trials" in capsys.readouterr().out
    study = optuna.load_study(study_name="spa-search", storage=url)
    assert len(_complete(study)) == 6


@pytest.mark.parametrize("args, match", [
    (["--target", "latency=0.5"], "--objective latency"),
    (["--target", "latency=3ms"], "not supported by the search"),
    (["--target", "params=1.0"], r"share in \(0, 1\)"),
    (["--target", "params=10M"], "already meet it"),
    (["--target", "params=0.01"], "out of reach"),
    (["--target", "params=0.5", "--workers", "gpu:2"], "local:N, ray or ray:ADDRESS"),
    (["--target", "params=0.5", "--objective", "both", "--sampler", "cmaes"], "needs tpe or nsga2"),
])
def test_cli_refuses_bad_arguments(model_path, tmp_path, capsys, args, match):
    import re

    assert main(["search", str(model_path), "--out", str(tmp_path / "o"), "--trials", "2", *args]) == 1
    assert re.search(match, capsys.readouterr().err)


def test_a_model_that_does_not_load_leaves_no_study_folder(tmp_path, capsys):
    bad = tmp_path / "empty.onnx"
    bad.write_bytes(b"")
    assert main(["search", str(bad), "--target", "params=0.5", "--trials", "2", "--out", str(tmp_path / "o")]) == 1
    assert "empty" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_parse_target():
    t = parse_target("params=0.25")
    assert (t.kind, t.value, t.relative) == ("params", 0.25, True)
    assert (parse_target("bytes=40MB").kind, parse_target("bytes=40MB").value) == ("bytes", 40e6)
    assert parse_target(0.5).text == "params=0.5"  # a study started when the search took params only
    with pytest.raises(spa.ArgumentError, match="KIND=VALUE"):
        parse_target("0.5")


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("c") / "resnet.onnx"
    onnx.save(zoo.resnet((1, 1), (8, 16), image=16, classes=4, batch=1), path)
    return path


@pytest.mark.parametrize("target", ["macs=0.5", "bytes=0.4"])
def test_macs_and_bytes_targets_met_by_best_plan(cnn_path, tmp_path, target):
    """MACs and weight bytes are counted as ``spa prune --target`` counts them (spa.targets.count)."""
    from spa import targets

    kind, share = target.split("=")[0], float(target.split("=")[1])
    r = spa.search(str(cnn_path), target, trials=6, out=tmp_path, seed=0)
    plan = spa.Plan.from_json(tmp_path / "best_plan.json")
    dense = spa.load(cnn_path)
    pruned = spa.apply_plan(dense, plan)
    got = targets.count(kind, pruned) / targets.count(kind, dense)
    assert abs(got - share) <= 0.01
    assert plan.meta["target"] == {kind: share} and plan.meta[f"{kind}_ratio"] == pytest.approx(got, abs=1e-9)
    if kind == "macs":  # on a CNN MACs and parameters part: the plan is fitted to MACs, not to parameters
        assert abs(plan.meta["params_ratio"] - share) > 0.01
    assert json.loads((tmp_path / "pareto.json").read_text())["target"] == target


def test_absolute_target_and_unreachable_one(cnn_path, tmp_path):
    from spa import targets

    dense = spa.load(cnn_path)
    half = targets.weight_bytes(dense) / 2
    spa.search(str(cnn_path), f"bytes={half / 1e3:.3f}kB", trials=4, out=tmp_path / "a")
    pruned = spa.apply_plan(dense, spa.Plan.from_json(tmp_path / "a" / "best_plan.json"))
    assert abs(targets.weight_bytes(pruned) - half) <= 0.01 * targets.weight_bytes(dense)
    with pytest.raises(spa.ArgumentError, match=r"out of reach.*ask for macs >="):
        spa.search(str(cnn_path), "macs=0.01", trials=2, out=tmp_path / "b")


def test_both_objectives_give_a_front_with_latency(model_path, tmp_path):
    r = spa.search(str(model_path), "params=0.5", trials=6, out=tmp_path, objective="both")
    assert r.study.directions == [optuna.study.StudyDirection.MINIMIZE] * 2
    doc = json.loads((tmp_path / "pareto.json").read_text())
    assert len(doc["trials"]) == 6 and all(t["latency_ms"] > 0 for t in doc["trials"])
    front = [tuple(t["values"]) for t in doc["front"]]
    for a in front:  # no front member dominates another
        assert not any(b != a and b[0] <= a[0] and b[1] <= a[1] for b in front)
    for t in doc["trials"]:  # every trial is dominated by (or is) a front member
        assert any(f[0] <= t["values"][0] and f[1] <= t["values"][1] for f in front)


@pytest.mark.skipif(not SLOW, reason="SPA_SLOW=1: two torch exports (~15 s)")
def test_best_plan_prunes_the_torch_module_it_was_exported_from(tmp_path):
    torch = pytest.importorskip("torch")
    from spa.frontends.torch import export

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48), torch.nn.ReLU(),
                                 torch.nn.Linear(48, 4)).eval()
    x = torch.randn(2, 16)
    path = tmp_path / "m.onnx"
    path.write_bytes(export(module, x).SerializeToString())
    r = spa.search(str(path), "params=0.5", trials=5, out=tmp_path / "s")
    small = spa.apply_plan(module, spa.Plan.from_json(tmp_path / "s" / "best_plan.json"), example_inputs=x)
    kept = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in module.parameters())
    assert kept == pytest.approx(r.best["params_ratio"], abs=1e-9)
    assert small(x).shape == (2, 4)


def test_a_foreign_study_is_refused(model_path, tmp_path):
    url = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(study_name="spa-search", storage=url)
    with pytest.raises(spa.ArgumentError, match="not an SPA search study"):
        spa.search(str(model_path), "params=0.5", trials=2, out=tmp_path / "o", storage=url)


@pytest.fixture(scope="module")
def residual_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("r") / "resnet.onnx"  # blocks 1 and 3 are removable (identity shortcuts)
    onnx.save(zoo.resnet((2, 2), (16, 32), image=16, classes=4, batch=1), path)
    return path


def test_depth_in_the_search_space(residual_path, tmp_path):
    """A trial may remove k residual units (lowest block influence first) besides channels; the
    heuristics have k = 0; the plan carries the blocks and the target counts them."""
    from spa import depth, targets

    r = spa.search(str(residual_path), "params=0.5", trials=10, out=tmp_path, seed=0)
    sp = r.space
    assert sp.max_depth == 1 and {u.key for u in sp.units} == {"block1", "block3"}
    rows = sorted(r.trials, key=lambda t: t["number"])
    assert [t["params"]["depth"] for t in rows[:4]] == [0, 0, 0, 0]
    assert any(t["params"]["depth"] == 1 for t in rows[4:])
    dense = spa.load(residual_path)
    feeds = spa.search.cache.load_calibration(tmp_path)[0]
    assert depth.select(dense, 1, feeds=feeds)[0].key == sp.units[0].key  # what prune --depth 1 removes
    plan = sp.plan({"family": "global", "depth": 1})
    assert [b.key for b in plan.blocks] == [sp.units[0].key] and plan.meta["depth"] == 1
    path = tmp_path / "depth_plan.json"
    plan.to_json(path)
    pruned = spa.apply_plan(dense, spa.Plan.from_json(path))  # verified: depth check, then width
    assert abs(targets.count("params", pruned) / targets.count("params", dense) - 0.5) <= 0.01
    assert plan.meta["params_ratio"] == pytest.approx(count_params(pruned) / count_params(dense), abs=1e-9)
    assert len([n for n in pruned.graph if n.op_type == "Conv"]) == len([n for n in dense.graph
                                                                        if n.op_type == "Conv"]) - 2
    with_depth = [t for t in _complete(r.study) if t.params.get("depth") == 1]
    for t in with_depth:  # the worker measured the shallower model
        assert t.user_attrs["result"]["params_ratio"] == pytest.approx(t.user_attrs["plan"]["params_ratio"], abs=1e-9)


def test_max_depth_zero_is_width_only(residual_path, tmp_path):
    r = spa.search(str(residual_path), "params=0.5", trials=5, out=tmp_path, max_depth=0)
    assert r.space.max_depth == 0 and all("depth" not in t["params"] for t in r.trials)
    with pytest.raises(spa.ArgumentError, match="max_depth"):
        spa.search(str(residual_path), "params=0.5", trials=5, out=tmp_path / "b", max_depth=-1)


def test_cli_search_macs_target(cnn_path, tmp_path, capsys):
    from spa import targets

    assert main(["search", str(cnn_path), "--target", "macs=0.6", "--trials", "4", "--out", str(tmp_path)]) == 0
    assert "best_plan.json" in capsys.readouterr().out
    dense = spa.load(cnn_path)
    pruned = spa.apply_plan(dense, spa.Plan.from_json(tmp_path / "best_plan.json"))
    assert abs(targets.count("macs", pruned) / targets.count("macs", dense) - 0.6) <= 0.01

"""Activation statistics with the calibration batches sharded over workers
(``spa.calibration.sharded``) equal one process's within float tolerance."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from spa import zoo
from spa.api import dependency_graph, load
from spa.calibration.activations import collect_stats
from spa.calibration.sharded import collect_stats as sharded


def _same(a, b):
    assert set(a.moments) == set(b.moments) and len(a.moments) > 0
    for k in a.moments:
        np.testing.assert_allclose(b.moments[k], a.moments[k], rtol=1e-5, atol=1e-6)
    assert set(a.moments.means) == set(b.moments.means)
    for k in a.moments.means:
        np.testing.assert_allclose(b.moments.means[k], a.moments.means[k], rtol=1e-6, atol=1e-7)
    assert len(a.feeds) == len(b.feeds)


@pytest.mark.parametrize("build", [lambda: zoo.mlp((32, 64, 48, 10)), lambda: zoo.small_resnet()],
                         ids=["mlp", "resnet (block-wise)"])
def test_shards_reduce_to_one_process(build, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(build(), path)
    model = load(path)
    one = collect_stats(model, dependency_graph(model), None, 3, None, 0)
    _same(one, sharded(path, None, 3, workers="local:1", shards=2))


@pytest.mark.skipif(os.environ.get("SPA_SLOW") != "1", reason="SPA_SLOW=1: spawns two worker processes")
def test_two_local_processes(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(zoo.mlp((32, 64, 48, 10)), path)
    model = load(path)
    _same(collect_stats(model, dependency_graph(model), None, 4, None, 0), sharded(path, None, 4, workers="local:2"))


@pytest.mark.ray
def test_ray_shards(tmp_path):
    ray = pytest.importorskip("ray")
    path = tmp_path / "m.onnx"
    onnx.save(zoo.mlp((32, 64, 48, 10)), path)
    model = load(path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        got = sharded(path, None, 4, workers="ray")
    finally:
        ray.shutdown()
    _same(collect_stats(model, dependency_graph(model), None, 4, None, 0), got)


@pytest.mark.parametrize("criterion", [
    "wanda",
    pytest.param("flap", marks=pytest.mark.skipif(os.environ.get("SPA_SLOW") != "1",
                                                  reason="SPA_SLOW=1: two more worker processes (~8 s)")),
    pytest.param("obspa", marks=pytest.mark.skipif(os.environ.get("SPA_SLOW") != "1",
                                                   reason="SPA_SLOW=1: two more worker processes (~11 s)")),
])
def test_prune_with_two_local_workers_equals_one_process(criterion, tmp_path):
    """``spa.prune(workers="local:2")``: the block-wise activation statistics come from two
    processes, reduced on the driver; the plan keeps the same channels, scores within float
    tolerance."""
    import spa

    path = tmp_path / "m.onnx"
    onnx.save(zoo.resnet((2, 2), (16, 32), image=16, classes=4, batch=1), path)  # several blocks: block-wise
    one = spa.prune(str(path), 0.4, criterion=criterion, calibration_batches=4)
    two = spa.prune(str(path), 0.4, criterion=criterion, calibration_batches=4, workers="local:2")
    assert [(g.key, g.keep) for g in two.plan.groups] == [(g.key, g.keep) for g in one.plan.groups]
    assert any(g.changes for g in one.plan.groups)
    keys = [g.key for g in one.graph.groups if one.scores[g.key] is not None]
    assert keys and keys == [g.key for g in two.graph.groups if two.scores[g.key] is not None]
    for k in keys:
        np.testing.assert_allclose(two.scores[k], one.scores[k], rtol=1e-5, atol=1e-7)


def test_prune_workers_argument_is_checked(tmp_path):
    import spa

    path = tmp_path / "m.onnx"
    onnx.save(zoo.mlp((32, 64, 48, 10)), path)
    with pytest.raises(spa.ArgumentError, match="local:N"):
        spa.prune(str(path), 0.3, criterion="wanda", workers="gpu:2")
    r = spa.prune(str(path), 0.3, workers="local:2")  # l1 needs no activations: nothing is spawned
    assert any("workers local:2: unused" in n for n in r.notes)

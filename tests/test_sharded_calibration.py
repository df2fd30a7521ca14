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

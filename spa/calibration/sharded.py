"""Activation statistics with the calibration batches sharded over workers (``local:N`` processes
or Ray), the executors of the allocation search.

Each worker loads the model from its path, runs its share of the batches (block by block where
the model has cuts, as :func:`spa.calibration.activations.collect_stats` does) and returns the raw
per-input sums: Σ XᵀX (float64), row counts and column sums. The driver adds them up and divides
once, so the result is one process's up to the order of the float64 sums. Workers get paths
(the model, a private file of the batches) and batch indices, never a model or a session.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from spa.calibration.activations import Accumulator


class _Sums(Accumulator):
    """An Accumulator that hands over the raw sums instead of averaging them."""

    def __init__(self, by_key, means):
        super().__init__(by_key, means)
        self.raw: dict = {}

    def result(self, into=None):
        for k in list(self.sums):
            self.raw[k] = (self.sums.pop(k), self.counts[k], None if self.means is None else self.means.pop(k, None))
        return {} if into is None else into


def _load_feeds(path: str, indices) -> list[dict]:
    with np.load(path, allow_pickle=False) as data:
        names = [str(n) for n in data["names"]]
        return [{n: data[f"b{i}_{j}"] for j, n in enumerate(names)} for i in indices]


def shard_sums(model_path: str, feeds_path: str, indices: list[int]) -> dict:
    """Raw sums of one shard of batches: consumer key -> (Σ XᵀX, rows, column sums)."""
    from spa.api import load
    from spa.calibration import blockwise
    from spa.calibration.activations import collect, collect_blockwise, consumers
    from spa.depgraph import DependencyGraph

    model = load(model_path)
    dg = DependencyGraph(model)
    flat = [c for g in dg.groups for c in consumers(dg, g)]
    if not flat or not indices:
        return {}
    feeds = _load_feeds(feeds_path, indices)
    holder: dict = {}

    def make(by_key, means):
        return holder.setdefault("acc", _Sums(by_key, means))

    blocks = blockwise.partition(model)
    if len(blocks) > 1:
        collect_blockwise(model, flat, blockwise.BlockRunner(model, feeds, blocks), {}, accumulator=make)
    else:
        collect(model, flat, feeds, means={}, accumulator=make)
    return holder["acc"].raw if "acc" in holder else {}


def _save_feeds(feeds: list[dict], path: Path) -> None:
    names = list(feeds[0])
    arrays = {"names": np.array(names)}
    for i, f in enumerate(feeds):
        for j, n in enumerate(names):
            arrays[f"b{i}_{j}"] = f[n]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def _run_shards(workers: str, model_path: str, feeds_path: str, shards: list[list[int]]) -> list[dict]:
    from spa.search.workers import parse

    kind, value = parse(workers)
    if kind == "ray":
        try:
            import ray
        except ImportError as exc:
            from spa.errors import ArgumentError

            raise ArgumentError('--workers ray needs Ray: pip install "spa-prune[ray]"') from exc
        started = not ray.is_initialized()
        if started:
            ray.init(address=value, include_dashboard=False, log_to_driver=False)
        try:
            task = ray.remote(num_cpus=1)(shard_sums)
            return ray.get([task.remote(model_path, feeds_path, s) for s in shards])
        finally:
            if started:
                ray.shutdown()
    if value == 1:
        return [shard_sums(model_path, feeds_path, s) for s in shards]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(value, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(shard_sums, [model_path] * len(shards), [feeds_path] * len(shards), shards))


def collect_stats(model_path, calibration=None, n_batches: int = 8, input_shapes: dict | None = None,
                  seed: int = 0, workers: str = "local:2", shards: int | None = None, dg=None):
    """:func:`spa.calibration.activations.collect_stats` of the model at ``model_path`` with its
    batches sharded over ``workers`` (``local:N``: N shards, one per process, ``local:1`` in this
    process; ``ray`` / ``ray:ADDRESS``: one shard per batch), or into ``shards`` shards. ``dg``:
    the dependency graph of the model already loaded from that path (its consumers are used)."""
    from spa import calibration as cal
    from spa import runtime
    from spa.api import load
    from spa.calibration import blockwise
    from spa.calibration.activations import Moments, Stats, consumers
    from spa.depgraph import DependencyGraph
    from spa.search.workers import parse

    kind, value = parse(workers)
    model_path = str(Path(model_path).resolve())
    if dg is None:
        dg = DependencyGraph(load(model_path))
    model = dg.model
    cons = {g.key: consumers(dg, g) for g in dg.groups}
    sess = runtime.session(model, optimize=False)
    feeds = cal.batches(calibration, model, sess, n_batches, input_shapes, seed)
    n = shards or (len(feeds) if kind == "ray" else value)
    shards = [list(s) for s in np.array_split(np.arange(len(feeds)), max(n, 1)) if len(s)]
    tmp = tempfile.mkdtemp(prefix="spa-shards-")
    try:
        feeds_path = os.path.join(tmp, "feeds.npz")
        _save_feeds(feeds, Path(feeds_path))
        parts = _run_shards(workers, model_path, feeds_path, [[int(i) for i in s] for s in shards])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total: dict = {}
    for part in parts:  # in shard order: the same sums whatever finished first
        for k, (h, rows, cols) in part.items():
            if k in total:
                th, trows, tcols = total[k]
                total[k] = (th + h, trows + rows, None if cols is None else tcols + cols)
            else:
                total[k] = (h, rows, cols)
    hs = {k: (h / max(rows, 1)).astype(np.float32) for k, (h, rows, _) in total.items()}
    means = {k: cols / max(rows, 1) for k, (_, rows, cols) in total.items() if cols is not None}
    blocks = blockwise.partition(model) if any(cons.values()) else None
    return Stats(cons, Moments(hs, means), feeds, blocks)

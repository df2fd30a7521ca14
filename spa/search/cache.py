"""What the driver computes once and every worker reads from the study folder.

* ``scores.npz``: the channel scores of every group and the per-group metrics of the space
  (α, OWL's outlier shares), under the settings key they were computed for;
* ``calibration.npz``: the calibration batches and the dense model's outputs on them.

A key (the model file's hash and the settings) names what was computed: a folder holding
another key is recomputed, never silently reused.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from spa.criteria.registry import Scores
from spa.io import atomic_write_bytes

SCORES = "scores.npz"
CALIBRATION = "calibration.npz"


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def settings_key(model_path: Path, **settings) -> str:
    text = json.dumps({"model": file_hash(model_path), **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_npz(path: Path, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _read_npz(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError):
        return None


def save_scores(folder: Path, key: str, groups, statistics) -> None:
    """The scores of ``groups`` (the dg's, in order) and the space's metrics."""
    keys = [g.key for g in groups]
    arrays = {"key": np.array(key), "groups": np.array(keys), "criterion": np.array(statistics.scores.criterion),
              "alpha": statistics.alpha}
    for i, k in enumerate(keys):
        s = statistics.scores[k]
        if s is not None:
            arrays[f"s{i}"] = np.asarray(s)
        slot = statistics.scores.slots.get(k)
        if slot is not None:
            arrays[f"q{i}"] = np.asarray(slot)
    if statistics.owl is not None:
        arrays["owl"] = statistics.owl
    _write_npz(folder / SCORES, arrays)


def load_scores(folder: Path, key: str, groups):
    """The cached :class:`~spa.search.space.Statistics`, or None when the folder holds none for ``key``."""
    from spa.search.space import Statistics

    data = _read_npz(folder / SCORES)
    if data is None or str(data["key"]) != key or list(data["groups"]) != [g.key for g in groups]:
        return None
    by_key = {g.key: data.get(f"s{i}") for i, g in enumerate(groups)}
    slots = {g.key: data[f"q{i}"] for i, g in enumerate(groups) if f"q{i}" in data}
    return Statistics(Scores(by_key, str(data["criterion"]), slots), data["alpha"], data.get("owl"))


def save_calibration(folder: Path, key: str, feeds: list[dict], outputs: list[list[np.ndarray]]) -> None:
    meta = {"key": key, "inputs": [list(f) for f in feeds], "outputs": [len(o) for o in outputs]}
    arrays = {"meta": np.array(json.dumps(meta))}
    for b, f in enumerate(feeds):
        for j, name in enumerate(f):
            arrays[f"x{b}_{j}"] = f[name]
    for b, outs in enumerate(outputs):
        for j, arr in enumerate(outs):
            arrays[f"y{b}_{j}"] = arr
    _write_npz(folder / CALIBRATION, arrays)


def load_calibration(folder: Path, key: str | None = None):
    """(feeds, dense outputs) from the folder; None when absent or of another key."""
    data = _read_npz(folder / CALIBRATION)
    if data is None:
        return None
    meta = json.loads(str(data["meta"]))
    if key is not None and meta["key"] != key:
        return None
    feeds = [{name: data[f"x{b}_{j}"] for j, name in enumerate(names)} for b, names in enumerate(meta["inputs"])]
    outputs = [[data[f"y{b}_{j}"] for j in range(n)] for b, n in enumerate(meta["outputs"])]
    return feeds, outputs

"""Activation statistics: input second moments H = XᵀX of every consumer layer of a group,
collected with onnxruntime on calibration inputs.

A *consumer* is a node whose op spec has a layer view (``spa.ops.layers``: MatMul/Gemm with a
constant weight, ungrouped Conv, ...) and that reads a group's channels on its input columns.
Its H is over the columns its weight multiplies. Intermediate tensors are requested from
onnxruntime a few at a time and reduced to H at once, so a large model's activations are never
all held together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from spa.depgraph import DependencyGraph
from spa.groups import Group, Member
from spa.ops import LayerView, spec_of

log = logging.getLogger("spa")


@dataclass(slots=True)
class Consumer:
    """One layer reading a group's channels: its node, the weight member and its layer view."""

    node: object
    member: Member
    view: LayerView

    @property
    def key(self) -> tuple:
        return self.view.key

    @property
    def x(self) -> str:
        return self.view.x

    def column_channels(self) -> np.ndarray:
        """Input index (of the member dim) of every weight column."""
        return np.repeat(np.arange(self.member.size), self.view.per_channel)

    def matrix(self, array: np.ndarray) -> np.ndarray:
        return self.view.matrix(array)

    def unmatrix(self, mat: np.ndarray, like: np.ndarray) -> np.ndarray:
        return self.view.unmatrix(mat, like)


def consumers(dg: DependencyGraph, group: Group) -> list[Consumer]:
    """The group's consumer layers (its ``in`` weight members on nodes with a layer view)."""
    nodes = {n.name: n for n in dg.model.graph}
    out = []
    for m in group.params:
        node = nodes.get(m.node) if m.role == "in" else None
        spec = spec_of(node, dg.opsets) if node is not None else None
        if spec is None or spec.layer is None:
            continue
        view = spec.layer(node, m)
        if view is not None:
            out.append(Consumer(node, m, view))
    return out


def collect(model, consumers_: list[Consumer], feeds: list[dict], chunk: int = 8,
            means: dict | None = None) -> dict[tuple, np.ndarray]:
    """Mean XᵀX per distinct consumer input (keyed by ``Consumer.key``), over all batches;
    the column means go into ``means`` when given (FLAP's bias compensation)."""
    from spa import runtime

    by_key: dict[tuple, Consumer] = {}
    for c in consumers_:
        by_key.setdefault(c.key, c)
    names = sorted({c.x for c in by_key.values()})
    sess = runtime.session_exposing(model, names)
    sums: dict[tuple, np.ndarray] = {}
    counts: dict[tuple, int] = {}
    for start in range(0, len(names), chunk):
        part = names[start:start + chunk]
        for batch in feeds:
            values = dict(zip(part, sess.run(part, batch)))
            for key, c in by_key.items():
                if c.x not in values:
                    continue
                cols = c.view.columns(values[c.x].astype(np.float32))
                h = (cols.T @ cols).astype(np.float64)  # float32 product, float64 running sum
                sums[key] = sums.get(key, 0) + h
                counts[key] = counts.get(key, 0) + cols.shape[0]
                if means is not None:
                    means[key] = means.get(key, 0) + cols.sum(axis=0, dtype=np.float64)
            del values
    if means is not None:
        for k in list(means):
            means[k] = means[k] / max(counts[k], 1)
    return {k: sums[k] / max(counts[k], 1) for k in sums}


class Moments(dict):
    """H per consumer input (a dict), with the column means alongside (``.means``)."""

    def __init__(self, hs: dict, means: dict):
        super().__init__(hs)
        self.means = means


@dataclass(slots=True)
class Stats:
    """Activation statistics of a model: consumers per group key and their input moments."""

    consumers: dict[str, list[Consumer]]
    moments: Moments


def collect_stats(model, dg, calibration, n_batches: int = 8, input_shapes: dict | None = None,
                  seed: int = 0) -> Stats:
    """Consumers of every group and the H of their inputs, from the calibration source."""
    from spa import calibration as cal
    from spa import runtime
    from spa.io import to_proto

    cons = {g.key: consumers(dg, g) for g in dg.groups}
    sess = runtime.session(to_proto(model), optimize=False)
    feeds = cal.batches(calibration, model, sess, n_batches, input_shapes, seed)
    flat = [c for cs in cons.values() for c in cs]
    means: dict = {}
    hs = collect(model, flat, feeds, means=means) if flat else {}
    return Stats(cons, Moments(hs, means))

"""Activation statistics: input second moments H = XᵀX of every consumer layer of a group,
collected with onnxruntime on calibration inputs.

A *consumer* is a node whose op spec has a layer view (``spa.ops.layers``: MatMul/Gemm with a
constant weight, ungrouped Conv, ...) and that reads a group's channels on its input columns.
Its H is over the columns its weight multiplies. A model with cuts
(``spa.calibration.blockwise``) runs block by block, each block once per batch with all its
consumer inputs exposed; a model without one runs whole, its intermediate tensors requested a
few at a time. Either way they are reduced to H at once, so a large model's activations are
never all held together.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
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


#: The dtype of the Σ XᵀX sums here and of OBSPA's reconstruction math (the damped H⁻¹, the
#: greedy downdates, the final solve: ``spa.criteria.obspa``). float32 (numpy's sgemm) measured
#: as faithful as float64 with the damping OBSPA applies (same fidelity cosine to 4 digits) at
#: about 13% less OBSPA CPU time on the BERT-base shape (examples/bench_obspa_cost.py); float64
#: restores the double-precision path.
DTYPE = np.float32
#: When set, Σ XᵀX of an input reads at most this many times its width in rows over all the
#: batches of a calibration pass (random rows, seeded, spread evenly over the batches); the row
#: count divides by the rows read. None (the default): every row. At 4 on the BERT-base shape it
#: saved under 2% of OBSPA's time relative to L1 and moved the fidelity cosine by 7e-3.
SUBSAMPLE = None


class Accumulator:
    """Running Σ XᵀX (float32 products, :data:`DTYPE` sums), row counts and column sums per
    consumer input key."""

    def __init__(self, by_key: dict[tuple, Consumer], means: dict | None = None):
        self.by_key, self.means = by_key, means
        self.sums: dict[tuple, np.ndarray] = {}
        self.counts: dict[tuple, int] = {}
        #: the batches a pass adds (set by the collectors; :data:`SUBSAMPLE` spreads its rows over them)
        self.batches: int | None = None
        self._rng = np.random.default_rng(0)

    def _rows(self, cols: np.ndarray) -> np.ndarray:
        """The rows of ``cols`` that Σ XᵀX reads (:data:`SUBSAMPLE`)."""
        if SUBSAMPLE is None or not self.batches:
            return cols
        cap = -(-int(SUBSAMPLE) * cols.shape[1] // self.batches)
        if cols.shape[0] <= cap:
            return cols
        return cols[np.sort(self._rng.choice(cols.shape[0], cap, replace=False))]

    def add(self, values: dict) -> None:
        for key, c in self.by_key.items():
            if c.x not in values:
                continue
            cols = c.view.columns(np.asarray(values[c.x], dtype=np.float32))
            part = self._rows(cols)
            h = part.T @ part
            if key in self.sums:
                self.sums[key] += h
            else:
                self.sums[key] = h.astype(DTYPE, copy=False)
            self.counts[key] = self.counts.get(key, 0) + part.shape[0]
            if self.means is not None:
                self.means[key] = self.means.get(key, 0) + cols.sum(axis=0, dtype=np.float64)

    def result(self, into: dict | None = None) -> dict[tuple, np.ndarray]:
        """The mean H of every key added so far, float32 once averaged (a model's H all together
        weigh as much as its weights, not twice), moved into ``into`` when given; the sums are
        dropped, so the accumulator can go on with the next block's keys."""
        if self.means is not None:
            for k in list(self.sums):
                if k in self.means:
                    self.means[k] = self.means[k] / max(self.counts.get(k, 0), 1)
        out = {} if into is None else into
        for k in list(self.sums):
            out[k] = (self.sums.pop(k) / max(self.counts[k], 1)).astype(np.float32)
        return out


def distinct_inputs(consumers_: list[Consumer]) -> dict[tuple, Consumer]:
    by_key: dict[tuple, Consumer] = {}
    for c in consumers_:
        by_key.setdefault(c.key, c)
    return by_key


def collect(model, consumers_: list[Consumer], feeds: list[dict], chunk: int = 8,
            means: dict | None = None, accumulator=Accumulator) -> dict[tuple, np.ndarray]:
    """Mean XᵀX per distinct consumer input (keyed by ``Consumer.key``), over all batches;
    the column means go into ``means`` when given (FLAP's bias compensation). The whole model
    runs once per ``chunk`` inputs. ``accumulator`` makes the Accumulator (sharded
    calibration keeps the raw sums)."""
    from spa import runtime

    acc = accumulator(distinct_inputs(consumers_), means)
    acc.batches = len(feeds)
    names = sorted({c.x for c in acc.by_key.values()})
    sess = runtime.session_exposing(model, names)
    for start in range(0, len(names), chunk):
        part = names[start:start + chunk]
        for batch in feeds:
            acc.add(dict(zip(part, sess.run(part, batch))))
    return acc.result()


def collect_blockwise(model, consumers_: list[Consumer], runner, means: dict | None = None,
                      transform=None, accumulator=Accumulator) -> dict[tuple, np.ndarray]:
    """As :func:`collect`, running the model block by block (``spa.calibration.blockwise``):
    every block once per batch, all its consumer inputs read in that run, and only the current
    cut's values held between blocks."""
    from spa.calibration.blockwise import block_of_nodes

    acc = accumulator(distinct_inputs(consumers_), means)
    acc.batches = len(runner.feeds)
    where = block_of_nodes(model, runner.blocks)
    out = Moments({}, means if means is not None else {})
    for block in runner.blocks:
        xs = sorted({c.x for c in acc.by_key.values() if where.get(c.node.name) == block.index})
        runner.run(block.index, acc.add, xs, transform=transform)
        acc.result(into=out)  # one block's sums at a time; its H spill out of memory
    return out


#: An H larger than this is kept in a private temporary file, not in memory, between uses.
SPILL_BYTES = 4 << 20


class ArrayCache:
    """Arrays derived from H (OBSPA's damped inverses), keyed as the moments: computed once per
    prune, kept on disk past :data:`SPILL_BYTES` like H, and handed out as fresh copies (the
    caller may change them)."""

    def __init__(self):
        self._arrays: dict = {}
        self._dir: str | None = None
        self._saved = 0

    def __contains__(self, key) -> bool:
        return key in self._arrays

    def put(self, key, value: np.ndarray) -> None:
        if value.nbytes > SPILL_BYTES:
            value = _spill(self, "spa-derived-", value)
        else:
            value = np.array(value, copy=True)
        self._arrays[key] = value

    def get(self, key) -> np.ndarray:
        value = self._arrays[key]
        return np.load(value.path) if isinstance(value, _Spilled) else np.array(value, copy=True)

    def drop(self, key) -> None:
        self._arrays.pop(key, None)


class Moments(dict):
    """H per consumer input (a dict), with the column means alongside (``.means``) and arrays
    derived from them (``.derived``, an :class:`ArrayCache`; a new H for a key drops its own).

    An H over :data:`SPILL_BYTES` is written to a private temporary folder (removed with the
    object) and read back on each ``moments[key]``: whoever reads it holds it while using it,
    so a large model's H (as heavy as its weights) never all sit in memory at once.
    ``loaded`` counts the reads and ``live_bytes()`` what the reads handed out still hold."""

    def __init__(self, hs: dict, means: dict):
        super().__init__()
        self.means = means
        self._dir: str | None = None
        self._saved = 0
        self._live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.loaded = 0
        self.derived = ArrayCache()
        for k, v in hs.items():
            self[k] = v

    def __setitem__(self, key, value) -> None:
        value = np.asarray(value)
        self.derived.drop(key)
        if value.nbytes > SPILL_BYTES:
            value = _spill(self, "spa-moments-", value)
        super().__setitem__(key, value)

    def __getitem__(self, key) -> np.ndarray:
        value = super().__getitem__(key)
        if isinstance(value, _Spilled):
            value = np.load(value.path)
            self.loaded += 1
            self._live[self.loaded] = value
        return value

    def get(self, key, default=None):
        return self[key] if key in self else default

    def values(self):
        return [self[k] for k in self]

    def items(self):
        return [(k, self[k]) for k in self]

    def live_bytes(self) -> int:
        """Bytes of the spilled H read back and still referenced somewhere."""
        return sum(a.nbytes for a in list(self._live.values()))


@dataclass(frozen=True, slots=True)
class _Spilled:
    path: str


def _spill(owner, prefix: str, value: np.ndarray) -> _Spilled:
    """``value`` written to ``owner``'s private temporary folder (made on first use as
    ``owner._dir``, removed with the owner), as a new file."""
    if owner._dir is None:
        owner._dir = tempfile.mkdtemp(prefix=prefix)
        weakref.finalize(owner, shutil.rmtree, owner._dir, True)
    path = os.path.join(owner._dir, f"{owner._saved}.npy")
    owner._saved += 1
    np.save(path, value)
    return _Spilled(path)


@dataclass(slots=True)
class Stats:
    """Activation statistics of a model: consumers per group key and their input moments."""

    consumers: dict[str, list[Consumer]]
    moments: Moments
    feeds: list | None = None  # the calibration batches (sequential reconstruction reruns them)
    blocks: list | None = None  # spa.calibration.blockwise.Block chain the moments came from


def collect_stats(model, dg, calibration, n_batches: int = 8, input_shapes: dict | None = None,
                  seed: int = 0) -> Stats:
    """Consumers of every group and the H of their inputs, from the calibration source."""
    from spa import calibration as cal
    from spa import runtime
    from spa.calibration import blockwise

    cons = {g.key: consumers(dg, g) for g in dg.groups}
    # a session (the whole model's weights handed to onnxruntime) only for sources that run the
    # model (lm-sample, text synthesis); the others need its inputs' names and shapes
    runs = isinstance(calibration, str) and calibration != "gaussian"
    sess = runtime.session(model, optimize=False) if runs else runtime.ModelInputs(model)
    feeds = cal.batches(calibration, model, sess, n_batches, input_shapes, seed)
    flat = [c for cs in cons.values() for c in cs]
    means: dict = {}
    blocks = None
    if flat:
        blocks = blockwise.partition(model)
        if len(blocks) > 1:
            hs = collect_blockwise(model, flat, blockwise.BlockRunner(model, feeds, blocks), means)
        else:
            hs = Moments(collect(model, flat, feeds, means=means), means)
    else:
        hs = Moments({}, means)
    return Stats(cons, hs, feeds, blocks)

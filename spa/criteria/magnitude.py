"""Weight criteria: L1 / L2 magnitude, BN scale, random; and the per-member reduction that the
gradient criteria share. One score per group channel, reduced over members and normalized."""

from __future__ import annotations

from typing import Callable

import numpy as np

from spa.criteria.registry import LazyScores, Scores, ScoringInputs, criterion, normalize
from spa.groups import MAGNITUDE_ROLES, Group
from spa.ops.quantized import real_weight

ArrayOf = Callable[[str], np.ndarray]
#: Per-index importance of a parameter along one axis: (array moved to axis 0, flattened) -> [n].
PerIndex = Callable[[np.ndarray], np.ndarray]


def abs_sum(flat: np.ndarray) -> np.ndarray:
    return np.abs(flat).sum(axis=1)


def square_sum(flat: np.ndarray) -> np.ndarray:
    return np.square(flat).sum(axis=1)


def signed_sum(flat: np.ndarray) -> np.ndarray:
    return flat.sum(axis=1)


#: Elements converted to float64 at a time by :func:`per_index` (8 MiB).
CHUNK = 1 << 20


def per_index(arr: np.ndarray, axis: int, fn: PerIndex) -> np.ndarray:
    """``fn`` of each index of ``axis`` over the rest of the array, in float64. Rows are
    converted a block at a time: no float64 copy of the whole weight (an embedding of a large
    vocabulary is gigabytes), and each row's result is the same as in one piece."""
    arr = np.asarray(arr)
    n = arr.shape[axis]
    moved = np.moveaxis(arr, axis, 0)  # a view: a block is laid out (copied) only when converted
    step = max(1, CHUNK // max(arr.size // max(n, 1), 1))
    if step >= n:
        return fn(moved.reshape(n, -1).astype(np.float64, copy=False))
    return np.concatenate([fn(moved[i:i + step].reshape(min(step, n - i), -1).astype(np.float64))
                           for i in range(0, n, step)])


def cached_per_index(array_of: ArrayOf, fn: PerIndex, cache: dict | None = None):
    """``(param, axis) -> per_index(array_of(param), axis, fn)``, computed once per pair: a
    weight read by several members (heads and their slots, a shared tensor) is reduced once."""
    cache = {} if cache is None else cache

    def of(param: str, axis: int) -> np.ndarray:
        key = (param, axis, fn)
        if key not in cache:
            cache[key] = per_index(array_of(param), axis, fn)
        return cache[key]
    return of


def group_scores(group: Group, array_of: ArrayOf, fn: PerIndex = abs_sum, reduction: str = "mean",
                 normalization: str = "mean", roles=MAGNITUDE_ROLES, reduced=None) -> np.ndarray | None:
    """Scores of the ``group.size`` channels from its parameter members of ``roles``, or None
    when it has none (``bn`` on a group without a normalization scale). ``reduced``: a
    :func:`cached_per_index` shared among groups."""
    reduced = reduced or cached_per_index(array_of, fn)
    total = np.zeros(group.size)
    count = np.zeros(group.size)
    seen = False
    for m in group.params:
        if m.role not in roles:
            continue
        per_ch = np.bincount(m.channel, weights=reduced(m.param, m.param_axis), minlength=group.size)
        covered = np.bincount(m.channel, minlength=group.size) > 0
        total = np.maximum(total, per_ch) if reduction == "max" else total + per_ch
        count += covered
        seen = True
    if not seen:
        return None
    if reduction == "mean":
        total = total / np.maximum(count, 1)
    return normalize(total, normalization)


def slot_scores(group: Group, array_of: ArrayOf, fn: PerIndex = abs_sum,
                rng: np.random.Generator | None = None, reduced=None) -> np.ndarray | None:
    """Scores of the query-head positions within K/V groups of a GQA heads group (summed over
    the K/V groups and the query-side weights), or None without such positions."""
    n = group.heads.slots if group.heads is not None else 0
    if not n:
        return None
    if rng is not None:
        return rng.random(n)
    reduced = reduced or cached_per_index(array_of, fn)
    total = np.zeros(n)
    for m in group.params:
        if m.slot is None or m.role not in MAGNITUDE_ROLES:
            continue
        q = m.slot >= 0
        total += np.bincount(m.slot[q], weights=reduced(m.param, m.param_axis)[q], minlength=n)
    return total


def real_weights(inputs: ScoringInputs) -> ArrayOf:
    """Parameter values as real numbers: an integer weight dequantized ((q - zero point) × scale)."""
    def array_of(name: str) -> np.ndarray:
        key = ("real", name)
        if key in inputs._cache:
            return inputs._cache[key]
        real = real_weight(inputs.dg.values[name])
        if real is None:
            return inputs.weights(name)
        inputs._cache[key] = real  # dequantized: small integer weights
        return real
    return array_of


def weight_scores(inputs: ScoringInputs, name: str, fn: PerIndex, roles=MAGNITUDE_ROLES,
                  array_of: ArrayOf | None = None) -> Scores:
    """Scores of every group from per-index importances of its parameters."""
    array_of = array_of or real_weights(inputs)
    reduced = cached_per_index(array_of, fn)
    groups = inputs.dg.groups
    by_key = LazyScores(groups, lambda g: group_scores(g, array_of, fn, inputs.reduction, inputs.normalization,
                                                       roles, reduced))
    slots = LazyScores([g for g in groups if g.heads and g.heads.slots],
                       lambda g: slot_scores(g, array_of, fn, reduced=reduced))
    return Scores(by_key, name, slots)


@criterion("l1")
def l1(inputs: ScoringInputs) -> Scores:
    """Σ|w| of the channel's weights (data-free)."""
    return weight_scores(inputs, "l1", abs_sum)


@criterion("l2")
def l2(inputs: ScoringInputs) -> Scores:
    """Σw² of the channel's weights (data-free)."""
    return weight_scores(inputs, "l2", square_sum)


@criterion("bn")
def bn(inputs: ScoringInputs) -> Scores:
    """|γ| of the normalization scale over the channel (groups without one are kept)."""
    return weight_scores(inputs, "bn", abs_sum, roles=frozenset({"scale"}))


@criterion("random")
def random(inputs: ScoringInputs) -> Scores:
    """Uniform random scores (seeded): a baseline."""
    rng = np.random.default_rng(inputs.seed)
    groups = inputs.dg.groups
    by_key = {g.key: rng.random(g.size) for g in groups}
    slots = {g.key: slot_scores(g, inputs.weights, rng=rng) for g in groups if g.heads and g.heads.slots}
    return Scores(by_key, "random", slots)

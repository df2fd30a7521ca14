"""Importance criteria: one score per group channel, reduced over members and normalized."""

from __future__ import annotations

from typing import Callable

import numpy as np

from spa.errors import ArgumentError
from spa.groups import MAGNITUDE_ROLES, Group

#: Criteria computed with autograd on an nn.Module (``spa.frontends.gradients``): their arrays
#: are per-element importances already, summed (signed) per channel.
GRADIENT_CRITERIA = ("taylor", "snip", "grasp")
#: Criteria that read activations from calibration data (or data-free inputs): ``spa.passes.obs``.
ACTIVATION_CRITERIA = ("wanda", "flap", "obspa")
CRITERIA = ("l1", "l2", "random", "bn") + GRADIENT_CRITERIA + ACTIVATION_CRITERIA
REDUCTIONS = ("mean", "sum", "max")
NORMALIZATIONS = ("none", "mean", "max")

ArrayOf = Callable[[str], np.ndarray]


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ArgumentError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def _per_index(arr: np.ndarray, axis: int, criterion: str) -> np.ndarray:
    flat = np.moveaxis(np.asarray(arr, dtype=np.float64), axis, 0).reshape(arr.shape[axis], -1)
    if criterion in GRADIENT_CRITERIA:
        return flat.sum(axis=1)
    if criterion == "l2":
        return np.square(flat).sum(axis=1)
    return np.abs(flat).sum(axis=1)


def _roles_for(criterion: str) -> frozenset[str]:
    return frozenset({"scale"}) if criterion == "bn" else MAGNITUDE_ROLES


def group_scores(
    group: Group,
    array_of: ArrayOf,
    criterion: str = "l1",
    reduction: str = "mean",
    normalization: str = "mean",
    rng: np.random.Generator | None = None,
) -> np.ndarray | None:
    """Scores of the ``group.size`` channels, or None when the criterion has no member to read
    (e.g. ``bn`` on a group without a normalization scale)."""
    check_choice("criterion", criterion, CRITERIA)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("normalization", normalization, NORMALIZATIONS)
    if criterion == "random":
        return (rng or np.random.default_rng(0)).random(group.size)
    roles = _roles_for(criterion)
    total = np.zeros(group.size)
    count = np.zeros(group.size)
    seen = False
    for m in group.params:
        if m.role not in roles:
            continue
        per_idx = _per_index(array_of(m.param), m.param_axis, criterion)
        per_ch = np.bincount(m.channel, weights=per_idx, minlength=group.size)
        covered = np.bincount(m.channel, minlength=group.size) > 0
        if reduction == "max":
            total = np.maximum(total, per_ch)
        else:
            total += per_ch
        count += covered
        seen = True
    if not seen:
        return None
    if reduction == "mean":
        total = total / np.maximum(count, 1)
    return normalize(total, normalization)


def normalize(scores: np.ndarray, normalization: str) -> np.ndarray:
    if normalization == "mean":
        d = scores.mean()
    elif normalization == "max":
        d = scores.max()
    else:
        return scores
    return scores / d if d > 0 else scores


def slot_scores(group: Group, array_of: ArrayOf, criterion: str = "l1",
                rng: np.random.Generator | None = None) -> np.ndarray | None:
    """Scores of the query-head positions within K/V groups of a GQA heads group (summed over
    the K/V groups and the query-side weights), or None without such positions."""
    n = group.heads.slots if group.heads is not None else 0
    if not n:
        return None
    if criterion == "random":
        return (rng or np.random.default_rng(0)).random(n)
    total = np.zeros(n)
    for m in group.params:
        if m.slot is None or m.role not in MAGNITUDE_ROLES:
            continue
        per_idx = _per_index(array_of(m.param), m.param_axis, criterion if criterion in GRADIENT_CRITERIA or
                             criterion == "l2" else "l1")
        q = m.slot >= 0
        total += np.bincount(m.slot[q], weights=per_idx[q], minlength=n)
    return total

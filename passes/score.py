"""Analysis: score every group's channels with an importance criterion."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spa.depgraph import DependencyGraph
from spa.importance import group_scores, slot_scores


@dataclass(frozen=True, slots=True)
class Scores:
    """Per group key: channel scores (None where the criterion does not apply)."""

    by_key: dict
    criterion: str
    slots: dict = field(default_factory=dict)  # GQA heads groups: scores of query-head positions

    def __getitem__(self, key: str) -> np.ndarray | None:
        return self.by_key.get(key)


def score_groups(
    dg: DependencyGraph,
    criterion: str = "l1",
    reduction: str = "mean",
    normalization: str = "mean",
    seed: int = 0,
    arrays: dict | None = None,
) -> Scores:
    """``arrays`` (gradient criteria) replaces each parameter's values by its per-element
    importance; a parameter without one (a buffer) contributes zero."""
    rng = np.random.default_rng(seed)
    cache: dict[str, np.ndarray] = {}

    def array_of(name: str) -> np.ndarray:
        if name not in cache:
            weights = dg.values[name].const_value.numpy()
            if arrays is None:
                cache[name] = weights
            else:
                imp = arrays.get(name)
                cache[name] = np.zeros(weights.shape) if imp is None else np.asarray(imp).reshape(weights.shape)
        return cache[name]

    by_key = {g.key: group_scores(g, array_of, criterion, reduction, normalization, rng) for g in dg.groups}
    slots = {g.key: slot_scores(g, array_of, criterion, rng) for g in dg.groups if g.heads and g.heads.slots}
    return Scores(by_key, criterion, slots)

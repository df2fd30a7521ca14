"""Shared by the activation criteria: scores read off a group's consumer layers (their weight
and input moments H), with L1 where a group has no consumer layer to read."""

from __future__ import annotations

from typing import Callable

import numpy as np

from spa.criteria.magnitude import abs_sum, cached_per_index, group_scores, real_weights, slot_scores
from spa.criteria.registry import Scores, ScoringInputs, normalize
from spa.groups import Group

#: (group, its consumers, weights(name) -> array, moments) -> channel scores or None.
ConsumerScore = Callable[[Group, list, Callable, object], "np.ndarray | None"]


def per_channel(group: Group, cons, hs, per_column) -> np.ndarray | None:
    """Σ over consumers and over each channel's columns of ``per_column(consumer, H)``."""
    total = np.zeros(group.size)
    seen = False
    for c in cons:
        if c.key not in hs:
            continue
        col_ch = c.member.channel[c.column_channels()]
        total += np.bincount(col_ch, weights=per_column(c, hs[c.key]), minlength=group.size)
        seen = True
    return total if seen else None


def consumer_scores(inputs: ScoringInputs, name: str, fn: ConsumerScore) -> Scores:
    """Scores of every group by ``fn`` on its consumers; groups without one fall back to L1."""
    stats = inputs.stats
    weights = real_weights(inputs)  # integer weights dequantized (np.abs of int8 -128 wraps)
    reduced = cached_per_index(weights, abs_sum)  # each weight reduced once for the L1 fallbacks and slots
    by_key = {}
    for g in inputs.dg.groups:
        s = fn(g, stats.consumers.get(g.key, []), weights, stats.moments)
        if s is None:
            s = group_scores(g, weights, abs_sum, inputs.reduction, "none", reduced=reduced)
        by_key[g.key] = None if s is None else normalize(s, inputs.normalization)
    slots = {g.key: slot_scores(g, weights, reduced=reduced) for g in inputs.dg.groups if g.heads and g.heads.slots}
    return Scores(by_key, name, slots)

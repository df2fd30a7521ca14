"""Wanda: |W|·‖X‖ per weight column, summed over a channel's columns and its consumers."""

from __future__ import annotations

import numpy as np

from spa.criteria.consumer import consumer_scores, per_channel
from spa.criteria.registry import Scores, ScoringInputs, criterion
from spa.groups import Group


def wanda_scores(group: Group, cons, weights, hs) -> np.ndarray | None:
    """Σ over a channel's columns of |W[:,col]|·‖X_col‖, summed over consumers."""
    def per_column(c, h):
        norm = np.sqrt(np.maximum(np.diag(h), 0))
        return (np.abs(c.matrix(weights(c.member.param))) * norm[None, :]).sum(axis=0)

    return per_channel(group, cons, hs, per_column)


@criterion("wanda", needs=("weights", "activations"))
def wanda(inputs: ScoringInputs) -> Scores:
    """Σ|W|·‖X‖ over the channel's input columns (calibration or data-free inputs)."""
    return consumer_scores(inputs, "wanda", wanda_scores)

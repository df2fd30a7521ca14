"""FLAP: fluctuation scores Var(X)·‖W‖² and bias compensation of the removed columns' mean."""

from __future__ import annotations

import numpy as np

from spa.criteria.consumer import consumer_scores, per_channel
from spa.criteria.registry import Scores, ScoringInputs, criterion
from spa.groups import Group


def flap_scores(group: Group, cons, weights, hs) -> np.ndarray | None:
    """FLAP's fluctuation: Σ over a channel's columns of Var(X_col)·‖W[:,col]‖²."""
    def per_column(c, h):
        var = np.maximum(np.diag(h) - hs.means[c.key] ** 2, 0)
        return var * (c.matrix(weights(c.member.param)).astype(np.float64) ** 2).sum(axis=0)

    return per_channel(group, cons, hs, per_column)


def _bias_of(node):
    """The bias initializer added to a consumer's output (Gemm/Conv input 2, or the Add after a
    MatMul), with the axis it runs along; None when there is none."""
    if node.op_type in ("Gemm", "Conv") and len(node.inputs) > 2 and node.inputs[2] is not None:
        return (node.inputs[2].name, 0) if node.inputs[2].const_value is not None else None
    uses = node.outputs[0].uses()
    if node.op_type == "MatMul" and len(uses) == 1 and uses[0][0].op_type == "Add":
        add = uses[0][0]
        other = add.inputs[1 - uses[0][1]]
        if other is not None and other.const_value is not None and len(other.shape) == 1:
            return other.name, 0
    return None


def flap_compensate(dg, plan, stats) -> tuple:
    """FLAP's bias compensation: the removed columns' mean contribution W[:,Q]·E[X_Q] is folded
    into each consumer's bias (where it has one). Returns (plan, {initializer: new array})."""
    groups = {g.key: g for g in dg.groups}
    hs = stats.moments
    updates: dict[str, np.ndarray] = {}
    for gp in plan.groups:
        g = groups.get(gp.key)
        if g is None or not gp.removed:
            continue
        removed = np.setdiff1d(np.arange(g.size), gp.keep)
        for c in stats.consumers.get(gp.key, []):
            bias = _bias_of(c.node)
            if bias is None or c.key not in hs.means:
                continue
            w = c.matrix(dg.weights(c.member.param)).astype(np.float64)
            q = np.flatnonzero(np.isin(c.member.channel[c.column_channels()], removed))
            shift = w[:, q] @ hs.means[c.key][q]
            name = bias[0]
            base = updates.get(name, dg.weights(name))
            if base.shape == shift.shape:
                updates[name] = (base + shift).astype(base.dtype)
    return plan, updates


@criterion("flap", needs=("weights", "activations"), compensate=flap_compensate)
def flap(inputs: ScoringInputs) -> Scores:
    """Var(X)·‖W‖² per channel, removed columns' mean folded into the consumer's bias."""
    return consumer_scores(inputs, "flap", flap_scores)

"""OBSPA: structured Optimal Brain Surgeon with closed-form weight reconstruction.

For a consumer layer with weight W ([out, columns]) and input second moment H (damped), the
loss of removing the columns Q of a set of channels is

    L(Q) = ½ Σ_rows W[:,Q] (H⁻¹[Q,Q])⁻¹ W[:,Q]ᵀ

and the remaining columns are updated in closed form, ΔW = −W[:,Q] (H⁻¹[Q,Q])⁻¹ H⁻¹[Q,:].
A group's loss sums its consumers'. Channels are removed greedily in batches, H⁻¹ and W
updated between batches. A channel is a whole head in a heads group: heads go whole.

The greedy removal never empties a member (a Concat input, a Split output), so the weights it
solves for are those of the kept set the plan ships.
"""

from __future__ import annotations

import numpy as np

from spa.groups import Group
from spa.calibration.activations import Consumer
from spa.criteria.consumer import consumer_scores
from spa.criteria.registry import Scores, ScoringInputs, criterion

DAMP = 0.01


class _Layer:
    """One consumer's W and H⁻¹ during greedy removal."""

    def __init__(self, consumer: Consumer, weight: np.ndarray, h: np.ndarray, group_size: int):
        self.consumer = consumer
        self.weight = weight
        self.w = consumer.matrix(weight).astype(np.float64)
        h = np.array(h, dtype=np.float64)
        damp = DAMP * float(np.mean(np.diag(h))) + 1e-8
        self.hinv = np.linalg.inv(h + damp * np.eye(h.shape[0]))
        col_ch = consumer.member.channel[consumer.column_channels()]
        self.cols = [np.flatnonzero(col_ch == c) for c in range(group_size)]

    def channel_losses(self, channels) -> np.ndarray:
        """Loss of removing each channel alone; one vectorized pass when channels are single
        columns (Linear inputs), a small solve per channel otherwise (heads, conv kernels)."""
        if all(self.cols[c].size == 1 for c in channels):
            idx = np.array([self.cols[c][0] for c in channels])
            d = np.diag(self.hinv)[idx]
            return 0.5 * (self.w[:, idx] ** 2).sum(axis=0) / np.maximum(d, 1e-12)
        return np.array([self.loss(self.cols[c]) for c in channels])

    def loss(self, q: np.ndarray) -> float:
        if q.size == 0:
            return 0.0
        wq = self.w[:, q]
        inv_qq = np.linalg.pinv(self.hinv[np.ix_(q, q)])
        return 0.5 * float(np.einsum("ij,jk,ik->", wq, inv_qq, wq))

    def remove(self, q: np.ndarray) -> None:
        if q.size == 0:
            return
        inv_qq = np.linalg.pinv(self.hinv[np.ix_(q, q)])
        hq = self.hinv[q, :]
        self.w -= self.w[:, q] @ inv_qq @ hq
        self.hinv -= self.hinv[:, q] @ inv_qq @ hq
        self.w[:, q] = 0.0

    def updated(self) -> np.ndarray:
        return self.consumer.unmatrix(self.w, self.weight).astype(self.weight.dtype)


def _layers(group: Group, cons: list[Consumer], weights, hs) -> list[_Layer]:
    return [_Layer(c, weights(c.member.param), hs[c.key], group.size) for c in cons if c.key in hs]


def _member_channels(group: Group) -> list[np.ndarray]:
    return [np.unique(m.channel) for m in group.members if m.size]


def obs_select(group: Group, cons, weights, hs, n_keep: int, steps: int = 8):
    """Greedy structured OBS: remove ``size - n_keep`` channels in up to ``steps`` batches,
    updating H⁻¹ and the weights between batches; a channel whose removal would empty a member
    is kept. Returns (kept channels, {param: new weight})."""
    layers = _layers(group, cons, weights, hs)
    alive = list(range(group.size))
    to_remove = group.size - n_keep
    if not layers or to_remove <= 0:
        return tuple(alive), {}
    members = _member_channels(group)
    alive_in = [len(ch) for ch in members]
    member_of = [[] for _ in range(group.size)]
    for k, ch in enumerate(members):
        for c in ch:
            member_of[int(c)].append(k)
    batch = max(1, int(np.ceil(to_remove / steps)))
    while to_remove > 0:
        losses = sum(layer.channel_losses(alive) for layer in layers)
        take = min(batch, to_remove)
        chosen = []
        for i in np.argsort(losses, kind="stable"):
            c = alive[i]
            if any(alive_in[k] <= 1 for k in member_of[c]):
                continue  # the last channel of a member stays
            chosen.append(c)
            for k in member_of[c]:
                alive_in[k] -= 1
            if len(chosen) == take:
                break
        if not chosen:
            break
        for layer in layers:
            layer.remove(np.concatenate([layer.cols[c] for c in chosen]))
        alive = [c for c in alive if c not in chosen]
        to_remove -= len(chosen)
    return tuple(sorted(alive)), {layer.consumer.member.param: layer.updated() for layer in layers}


def obs_scores(group: Group, cons, weights, hs) -> np.ndarray | None:
    """Loss of removing each channel alone (summed over consumers)."""
    layers = _layers(group, cons, weights, hs)
    if not layers:
        return None
    return sum(layer.channel_losses(range(group.size)) for layer in layers)


def _reconstruct_fixed(group: Group, cons, weights, hs, gp) -> dict:
    """Consumer weights reconstructed for the plan's kept set as it is (one OBS step per layer):
    the columns of removed K/V groups and of removed query-head slots go together."""
    keep, slots = np.asarray(gp.keep), np.asarray(gp.slots)
    out = {}
    for layer in _layers(group, cons, weights, hs):
        m = layer.consumer.member
        gone = ~np.isin(layer.consumer.column_channels(), m.kept_indices(keep, slots))
        layer.remove(np.flatnonzero(gone))
        out[m.param] = layer.updated()
    return out


def reconstruct(dg, plan, stats, steps: int = 8) -> tuple:
    """OBSPA on every pruned group: greedy keep sets (the plan's counts) and the consumer
    weights reconstructed for exactly those sets. Returns (new plan, {initializer: array})."""
    from spa.plan import GroupPlan, Plan

    updates: dict[str, np.ndarray] = {}
    cache: dict[str, np.ndarray] = {}

    def weights(name: str) -> np.ndarray:
        if name in updates:
            return updates[name]
        if name not in cache:
            cache[name] = dg.weights(name)
        return cache[name]

    groups = {g.key: g for g in dg.groups}
    cons, hs = stats.consumers, stats.moments
    entries = []
    for gp in plan.groups:
        g = groups.get(gp.key)
        if g is None or not (gp.removed or gp.slots is not None) or not cons.get(gp.key):
            entries.append(gp)
            continue
        if gp.slots is not None:  # GQA within groups: the plan's K/V groups and query-head slots
            updates.update(_reconstruct_fixed(g, cons[gp.key], weights, hs, gp))
            entries.append(gp)
            continue
        keep, new = obs_select(g, cons[gp.key], weights, hs, len(gp.keep), steps)
        if not new:
            entries.append(gp)
            continue
        updates.update(new)
        entries.append(GroupPlan(gp.key, gp.size, keep))
    return Plan(tuple(entries), plan.meta), updates


@criterion("obspa", needs=("weights", "activations"), compensate=reconstruct)
def obspa(inputs: ScoringInputs) -> Scores:
    """Structured OBS loss of removing each channel; the kept weights are reconstructed."""
    return consumer_scores(inputs, "obspa", obs_scores)

"""Analysis: activation-aware channel scores and OBSPA, structured Optimal Brain Surgeon.

For a consumer layer with weight W ([out, columns]) and input second moment H (damped), the
loss of removing the columns Q of a set of channels is

    L(Q) = ½ Σ_rows W[:,Q] (H⁻¹[Q,Q])⁻¹ W[:,Q]ᵀ

and the remaining columns are updated in closed form, ΔW = −W[:,Q] (H⁻¹[Q,Q])⁻¹ H⁻¹[Q,:].
A group's loss sums its consumers'. Channels are removed greedily in batches, H⁻¹ and W
updated between batches. A channel is a whole head in a heads group: heads go whole.

Wanda-style scores are Σ |W[:,col]| · ‖X_col‖ over a channel's columns.
"""

from __future__ import annotations

import numpy as np

from spa.groups import Group
from spa.passes.activations import Consumer

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


def obs_scores(group: Group, cons, weights, hs) -> np.ndarray | None:
    """Loss of removing each channel alone (summed over consumers)."""
    layers = _layers(group, cons, weights, hs)
    if not layers:
        return None
    return sum(layer.channel_losses(range(group.size)) for layer in layers)


def _per_channel(group: Group, cons, hs, per_column) -> np.ndarray | None:
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


def wanda_scores(group: Group, cons, weights, hs) -> np.ndarray | None:
    """Σ over a channel's columns of |W[:,col]|·‖X_col‖, summed over consumers."""
    def per_column(c, h):
        norm = np.sqrt(np.maximum(np.diag(h), 0))
        return (np.abs(c.matrix(weights(c.member.param))) * norm[None, :]).sum(axis=0)

    return _per_channel(group, cons, hs, per_column)


def flap_scores(group: Group, cons, weights, hs) -> np.ndarray | None:
    """FLAP's fluctuation: Σ over a channel's columns of Var(X_col)·‖W[:,col]‖²."""
    def per_column(c, h):
        var = np.maximum(np.diag(h) - hs.means[c.key] ** 2, 0)
        return var * (c.matrix(weights(c.member.param)).astype(np.float64) ** 2).sum(axis=0)

    return _per_channel(group, cons, hs, per_column)


def _bias_of(node, dg):
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


def flap_compensate(dg, plan, cons, hs) -> dict:
    """FLAP's bias compensation: the removed columns' mean contribution W[:,Q]·E[X_Q] is folded
    into each consumer's bias (where it has one). Returns {initializer: new array}."""
    groups = {g.key: g for g in dg.groups}
    updates: dict[str, np.ndarray] = {}
    for gp in plan.groups:
        g = groups.get(gp.key)
        if g is None or not gp.removed:
            continue
        removed = np.setdiff1d(np.arange(g.size), gp.keep)
        for c in cons.get(gp.key, []):
            bias = _bias_of(c.node, dg)
            if bias is None or c.key not in hs.means:
                continue
            w = c.matrix(dg.values[c.member.param].const_value.numpy()).astype(np.float64)
            q = np.flatnonzero(np.isin(c.member.channel[c.column_channels()], removed))
            shift = w[:, q] @ hs.means[c.key][q]
            name = bias[0]
            base = updates.get(name, dg.values[name].const_value.numpy())
            if base.shape == shift.shape:
                updates[name] = (base + shift).astype(base.dtype)
    return updates


def obs_select(group: Group, cons, weights, hs, n_keep: int, steps: int = 8):
    """Greedy structured OBS: remove ``size - n_keep`` channels in up to ``steps`` batches,
    updating H⁻¹ and the weights between batches. Returns (kept channels, {param: new weight})."""
    layers = _layers(group, cons, weights, hs)
    alive = list(range(group.size))
    to_remove = group.size - n_keep
    if not layers or to_remove <= 0:
        return tuple(alive), {}
    batch = max(1, int(np.ceil(to_remove / steps)))
    while to_remove > 0:
        losses = sum(layer.channel_losses(alive) for layer in layers)
        take = min(batch, to_remove)
        chosen = [alive[i] for i in np.argsort(losses, kind="stable")[:take]]
        for layer in layers:
            layer.remove(np.concatenate([layer.cols[c] for c in chosen]))
        alive = [c for c in alive if c not in chosen]
        to_remove -= take
    return tuple(sorted(alive)), {layer.consumer.member.param: layer.updated() for layer in layers}


def collect_stats(model, dg, calibration, n_batches: int = 8, input_shapes: dict | None = None, seed: int = 0):
    """Consumers of every group and the H of their inputs, from the calibration source."""
    from spa import calibration as cal
    from spa import runtime
    from spa.io import to_proto
    from spa.passes.activations import collect, consumers

    cons = {g.key: consumers(dg, g) for g in dg.groups}
    sess = runtime.session(to_proto(model), optimize=False)
    feeds = cal.batches(calibration, model, sess, n_batches, input_shapes, seed)
    flat = [c for cs in cons.values() for c in cs]
    means: dict = {}
    hs = collect(model, flat, feeds, means=means) if flat else {}
    hs = _Moments(hs, means)
    return cons, hs


class _Moments(dict):
    """H per consumer input (a dict), with the column means alongside (``.means``)."""

    def __init__(self, hs: dict, means: dict):
        super().__init__(hs)
        self.means = means


def activation_scores(dg, criterion: str, cons, hs, fallback) -> dict:
    """Channel scores per group key: OBS single-removal loss or Wanda; ``fallback(group)`` (L1)
    where a group has no supported consumer."""
    weights = _weights(dg, {})
    fn = {"obspa": obs_scores, "wanda": wanda_scores, "flap": flap_scores}[criterion]
    out = {}
    for g in dg.groups:
        s = fn(g, cons[g.key], weights, hs)
        out[g.key] = s if s is not None else fallback(g)
    return out


def _weights(dg, updates: dict):
    cache: dict[str, np.ndarray] = {}

    def weights(name: str) -> np.ndarray:
        if name in updates:
            return updates[name]
        if name not in cache:
            cache[name] = dg.values[name].const_value.numpy()
        return cache[name]

    return weights


def reconstruct(dg, plan, cons, hs, steps: int = 8):
    """OBSPA on every pruned group: greedy keep sets (the plan's counts) and updated consumer
    weights. Returns (new plan, {initializer name: updated full-size array})."""
    from spa.plan import GroupPlan, Plan

    updates: dict[str, np.ndarray] = {}
    weights = _weights(dg, updates)
    groups = {g.key: g for g in dg.groups}
    entries = []
    for gp in plan.groups:
        g = groups.get(gp.key)
        if g is None or not gp.removed or gp.slots is not None or not cons.get(gp.key):
            entries.append(gp)
            continue
        keep, new = obs_select(g, cons[gp.key], weights, hs, len(gp.keep), steps)
        if not new:
            entries.append(gp)
            continue
        updates.update(new)
        entries.append(GroupPlan(gp.key, gp.size, _keep_every_member(g, keep, gp.keep)))
    return Plan(tuple(entries), plan.meta), updates


def _keep_every_member(group, keep, fallback):
    """No member left empty (a Concat input): fall back to the plan's own choice then."""
    kept = set(keep)
    for m in group.members:
        if not kept.intersection(np.unique(m.channel).tolist()):
            return tuple(fallback)
    return tuple(keep)

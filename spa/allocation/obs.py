"""Global OBS allocation: channels of all groups ranked together by their OBS removal cost.

A group's channels are removed greedily in batches (structured OBS: the H⁻¹ and W of every
consumer layer updated between batches), so the cost of its k-th channel is what removing it
adds *after* the first k-1 went, not k times the first one's. Each consumer's loss is
normalised by that layer's output energy ½·trace(W H Wᵀ): a cost is a relative squared output
error, comparable between a layer whose outputs are 100x larger and one whose are not
(``normalise="none"`` keeps the raw loss, for comparison).

The target is in parameters: ``ratio`` of the parameters held by the candidate groups' weights
(a channel of a wide FFN group weighs more than one of a narrow conv), and channels are taken
cheapest cost-per-parameter first. A group keeps at least ``1 - max_group_ratio`` of its
channels and every member keeps one. A group without a consumer layer to read (no OBS cost)
loses the target ratio itself. The counts then go through ``allocate`` as per-group ratios, so
protect / kinds / round_to apply as for any allocation.
"""

from __future__ import annotations

import math

import numpy as np

from spa.criteria.obspa import _layers, _member_channels

NORMALISATIONS = ("relative", "none")


def _energy(layer, h) -> float:
    """½·trace(W H Wᵀ): the layer's mean squared output (the loss of removing everything)."""
    w = layer.w
    return 0.5 * float(np.einsum("ij,jk,ik->", w, np.asarray(h, dtype=np.float64), w)) + 1e-12


def removal_costs(group, cons, weights, hs, max_remove: int, steps: int = 16,
                  normalise: str = "relative") -> np.ndarray | None:
    """Cost of the 1st, 2nd, … channel the greedy OBS removal takes from ``group`` (at most
    ``max_remove``), made non-decreasing so that any prefix is what the greedy removes."""
    layers = _layers(group, cons, weights, hs)
    if not layers or max_remove <= 0:
        return None
    scale = [1.0 / _energy(layer, hs[layer.consumer.key]) if normalise == "relative" else 1.0
             for layer in layers]
    members = _member_channels(group)
    alive_in = [len(ch) for ch in members]
    member_of = [[] for _ in range(group.size)]
    for k, ch in enumerate(members):
        for c in ch:
            member_of[int(c)].append(k)
    alive = list(range(group.size))
    costs: list[float] = []
    batch = max(1, math.ceil(max_remove / steps))
    while len(costs) < max_remove:
        single = sum(s * layer.channel_losses(alive) for s, layer in zip(scale, layers))
        chosen, shares = [], []
        for i in np.argsort(single, kind="stable"):
            c = alive[i]
            if any(alive_in[k] <= 1 for k in member_of[c]):
                continue  # a member's last channel stays
            chosen.append(c)
            shares.append(single[i])
            for k in member_of[c]:
                alive_in[k] -= 1
            if len(chosen) == min(batch, max_remove - len(costs)):
                break
        if not chosen:
            break
        joint = 0.0
        for s, layer in zip(scale, layers):
            q = np.concatenate([layer.cols[c] for c in chosen])
            joint += s * layer.loss(q)  # the batch's exact increase, before the update
            layer.remove(q)
        shares = np.asarray(shares, dtype=np.float64)
        part = shares / shares.sum() if shares.sum() > 0 else np.full(len(chosen), 1.0 / len(chosen))
        costs.extend(np.sort(joint * part).tolist())
        alive = [c for c in alive if c not in chosen]
    return np.maximum.accumulate(np.asarray(costs)) if costs else None


def params_per_channel(group, weights) -> float:
    """Weight elements one channel of the group holds (over all its parameter members)."""
    total = 0.0
    for m in group.params:
        shape = np.shape(weights(m.param))
        total += math.prod(shape) / shape[m.param_axis] * m.size
    return max(total / group.size, 1.0)


def obs_ratios(groups, stats, weights, ratio: float, max_group_ratio: float = 0.9, steps: int = 16,
               normalise: str = "relative") -> dict[str, float]:
    """Per-group ratios of the global OBS allocation (see the module docstring)."""
    if normalise not in NORMALISATIONS:
        from spa.errors import ArgumentError

        raise ArgumentError(f"normalise={normalise!r} is not one of {', '.join(NORMALISATIONS)}")
    out: dict[str, float] = {}
    costs, unit, budget = [], [], 0.0
    for g in groups:
        cap = min(g.size - 1, math.floor(g.size * max_group_ratio))
        c = removal_costs(g, stats.consumers.get(g.key, []), weights, stats.moments, cap, steps, normalise)
        if c is None:
            out[g.key] = ratio
            continue
        p = params_per_channel(g, weights)
        costs.append((g, c))
        unit.append(p)
        budget += ratio * g.size * p
    if not costs:
        return out
    cost = np.concatenate([c / p for (_, c), p in zip(costs, unit)])
    owner = np.concatenate([np.full(c.size, i) for i, (_, c) in enumerate(costs)])
    weight = np.asarray(unit)[owner]
    order = np.argsort(cost, kind="stable")
    taken = np.cumsum(weight[order])
    n = int(np.searchsorted(taken, budget - 1e-9)) + 1 if budget > 0 else 0  # first prefix reaching it
    removed = np.bincount(owner[order[:min(n, order.size)]], minlength=len(costs))
    for i, (g, _) in enumerate(costs):
        out[g.key] = (removed[i] + 0.5) / g.size if removed[i] else 0.0
    return out

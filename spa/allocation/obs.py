"""Global OBS allocation: channels of all groups ranked together by their OBS removal cost.

A group's channels are removed greedily in batches (structured OBS: the H⁻¹ and W of every
consumer layer updated between batches), so the cost of its k-th channel is what removing it
adds *after* the first k-1 went, not k times the first one's. Each consumer's loss is
normalised by that layer's output energy ½·trace(W H Wᵀ): a cost is a relative squared output
error, comparable between a layer whose outputs are 100x larger and one whose are not
(``normalise="none"`` keeps the raw loss, for comparison).

The target is in parameters: ``ratio`` of Σ size·(parameters per channel) over the candidate
groups (a channel of a wide FFN group weighs more than one of a narrow conv), and channels are
taken cheapest cost-per-parameter first. A weight between two groups counts in both (its rows
in one, its columns in the other), so the model's parameter count falls about as much as under
the uniform allocation at the same ratio (30% of channels: about half the weights of a conv
net), which keeps the two comparable. A group keeps at least ``1 - max_group_ratio`` of its
channels and every member keeps one. A group without a consumer layer to read (no OBS cost)
loses the target ratio itself. The counts then go through ``allocate`` as per-group ratios, so
protect / kinds / round_to apply as for any allocation.
"""

from __future__ import annotations

import math

import numpy as np

from spa.criteria.obspa import _layers, _member_channels

NORMALISATIONS = ("relative", "none")
#: The normalisation ``obs_ratios`` uses when none is given (``spa.prune(allocation="obs")``).
NORMALISE = "relative"


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
    scale = [1.0 / _energy(layer, hs[layer.consumers[0].key]) if normalise == "relative" else 1.0
             for layer in layers]
    inside = np.zeros((0, group.size), dtype=bool)  # inside[k, c]: channel c feeds member k
    for ch in _member_channels(group):
        row = np.zeros((1, group.size), dtype=bool)
        row[0, ch] = True
        inside = np.vstack([inside, row])
    alive_in = inside.sum(axis=1)
    alive = list(range(group.size))
    costs: list[float] = []
    batch = max(1, math.ceil(max_remove / steps))
    while len(costs) < max_remove:
        single = sum(s * layer.channel_losses(alive) for s, layer in zip(scale, layers))
        chosen, shares = [], []
        for i in np.argsort(single, kind="stable"):
            c = alive[i]
            if (alive_in[inside[:, c]] <= 1).any():
                continue  # a member's last channel stays
            chosen.append(c)
            shares.append(single[i])
            alive_in -= inside[:, c]
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
               normalise: str | None = None) -> dict[str, float]:
    """Per-group ratios of the global OBS allocation (see the module docstring)."""
    normalise = NORMALISE if normalise is None else normalise
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


def reconstruction_note(dg, plan, stats, criterion: str = "obspa") -> str | None:
    """What a criterion's compensation (OBSPA's reconstruction) covers in ``plan``: consumer layers with a layer view out of all
    the nodes reading a pruned group's channels through a weight, and the groups without one
    (their channels scored by L1, nothing reconstructed)."""
    if stats is None:
        return None
    groups = {g.key: g for g in dg.groups}
    ops = {n.name: n.op_type for n in dg.model.graph}
    read, seen, missed, l1 = set(), set(), {}, 0
    for gp in plan.groups:
        g = groups.get(gp.key)
        if g is None or not (gp.removed or gp.slots is not None):
            continue
        viewed = {c.node.name for c in stats.consumers.get(gp.key, []) if c.key in stats.moments}
        l1 += not viewed
        for m in g.params:
            if m.role == "in" and m.node is not None:
                read.add(m.node)
                if m.node in viewed:
                    seen.add(m.node)
                else:
                    missed[ops.get(m.node, "?")] = missed.get(ops.get(m.node, "?"), 0) + 1
    if not read and not l1:
        return None
    note = f"{criterion} compensation: {len(seen)} of {len(read)} consumer layers of the pruned groups reconstructed"
    if missed:
        note += "; not reconstructed: " + ", ".join(f"{n} {op}" for op, n in sorted(missed.items()))
    if l1:
        note += f"; {l1} pruned group(s) without a consumer layer scored by L1"
    return note

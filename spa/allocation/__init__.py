"""Allocation: turn channel scores into a plan (uniform or global ratio, layer-wise ratios,
protection, round_to)."""

from __future__ import annotations

import fnmatch
import logging
import math

import numpy as np

from spa.depgraph import DependencyGraph
from spa.errors import ArgumentError
from spa.groups import GROUP_KINDS, Group
from spa.plan import GroupPlan, Plan
from spa.criteria.registry import Scores

log = logging.getLogger("spa")


def is_protected(group: Group, patterns) -> bool:
    """True when a node producing the group's channels (or its weight) matches a glob pattern.

    A protected node keeps its output channels; its inputs may still shrink with the group
    that feeds it (the meaning of Torch-Pruning's ``ignored_layers``).
    """
    producers = [m for m in group.params if m.role == "out"] or list(group.params)
    names = {m.node for m in producers} | {m.param for m in producers}
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names if n)


def _round_keep(keep: int, size: int, round_to: int) -> int:
    if round_to > 1 and size > round_to:
        keep = round_to * int(round(keep / round_to))
        keep = min(max(keep, round_to), size)
    return min(max(keep, 1), size)


def _top(scores: np.ndarray | None, n_keep: int) -> tuple[int, ...]:
    size = len(scores)
    order = np.lexsort((np.arange(size), -scores))  # high score first, ties by index
    return tuple(sorted(int(i) for i in order[:n_keep]))


def allocate(
    dg: DependencyGraph,
    scores: Scores,
    ratio: float,
    global_pruning: bool = False,
    round_to: int = 1,
    protect=(),
    max_group_ratio: float = 0.9,
    kinds=None,
    gqa: str = "kv",
    ratios: dict | None = None,
) -> Plan:
    """Keep the best channels of each group.

    ``ratio`` is the fraction of channels removed: per group (uniform), or over all groups
    together (global, ranking normalized scores; no group loses more than ``max_group_ratio``).
    ``kinds`` limits pruning to groups of those kinds (``heads``, ``channels``, ``hidden``).
    ``gqa`` says how a heads group under GQA loses its share: ``kv`` removes whole K/V groups
    (their K/V heads with the query heads that read them), ``q`` keeps every K/V head and
    removes query heads within each group (the same positions in all groups), ``both`` splits
    the ratio between the two. Within-group pruning is uniform even with global allocation.
    ``ratios`` (layer-wise allocation, ``spa.allocation.layerwise``) gives each group its own ratio.
    """
    if not 0.0 <= ratio < 1.0:
        raise ArgumentError(f"ratio={ratio} must be in [0, 1)")
    if round_to < 1:
        raise ArgumentError(f"round_to={round_to} must be a positive integer")
    protect = tuple(protect)
    if global_pruning and ratios is not None:
        raise ArgumentError("per-group ratios (a layer-wise allocation) and global pruning cannot be combined: "
                            "global pruning ranks channels across groups and would drop the ratios")
    if gqa not in GQA_MODES:
        raise ArgumentError(f"gqa={gqa!r} is not one of {', '.join(GQA_MODES)}")
    if kinds is not None:
        kinds = frozenset(kinds)
        unknown = kinds - GROUP_KINDS
        if unknown:
            raise ArgumentError(f"unknown group kind(s) {', '.join(sorted(unknown))}; "
                                f"choose from {', '.join(sorted(GROUP_KINDS))}")
    entries: dict[str, GroupPlan] = {}
    candidates = []
    for g in dg.groups:  # protect and kinds first: scores are read (computed) only for candidates
        if protect and is_protected(g, protect):
            log.info("group %s: protected, kept whole", g.key)
        elif kinds is not None and g.kind not in kinds:
            log.info("group %s: kind %s not selected, kept whole", g.key, g.kind)
        elif scores[g.key] is None:
            log.info("group %s: criterion %s does not apply, kept whole", g.key, scores.criterion)
        elif g.heads is not None and g.heads.slots > 1 and gqa != "kv":
            entries[g.key] = _within_groups(g, scores, ratio, gqa)
            continue
        else:
            candidates.append(g)
            continue
        entries[g.key] = GroupPlan(g.key, g.size, tuple(range(g.size)))
    if global_pruning:
        keep_n = _global_counts(candidates, scores, ratio, round_to, max_group_ratio)
    else:
        per = ratios or {}
        keep_n = {g.key: _round_keep(g.size - math.floor(g.size * per.get(g.key, ratio)), g.size, round_to)
                  for g in candidates}
    for g in candidates:
        keep = _keep_every_member(g, _top(scores[g.key], keep_n[g.key]), scores[g.key])
        entries[g.key] = GroupPlan(g.key, g.size, keep)
    meta = {"ratio": ratio, "global": global_pruning, "round_to": round_to, "criterion": scores.criterion}
    if kinds is not None:
        meta["kinds"] = sorted(kinds)
    if gqa != "kv":
        meta["gqa"] = gqa
    return Plan(tuple(entries[g.key] for g in dg.groups), meta)


GQA_MODES = ("kv", "q", "both")


def _within_groups(g: Group, scores: Scores, ratio: float, gqa: str) -> GroupPlan:
    """Plan of a GQA heads group pruned within its K/V groups (``q``) or both ways (``both``)."""
    rep = g.heads.slots
    frac = 1.0 - ratio
    if gqa == "q":
        n_kv, n_slots = g.size, rep - math.floor(rep * ratio)
    else:
        n_kv = max(1, round(g.size * math.sqrt(frac)))
        n_slots = max(1, round(rep * frac * g.size / n_kv))
        n_slots = min(n_slots, rep)
    slot_s = scores.slots.get(g.key)
    slots = _top(slot_s, n_slots) if slot_s is not None else tuple(range(n_slots))
    return GroupPlan(g.key, g.size, _top(scores[g.key], max(1, n_kv)), slots if n_slots < rep else None)


def _keep_every_member(group: Group, keep: tuple[int, ...], scores: np.ndarray) -> tuple[int, ...]:
    """Add back the best channel of any member the plan would empty (a Concat input, a Split
    output): a tensor is never left with zero channels."""
    kept = set(keep)
    for m in group.members:
        chans = np.unique(m.channel)
        if not kept.intersection(chans.tolist()):
            kept.add(int(chans[np.argmax(scores[chans])]))
    return tuple(sorted(kept))


def _global_counts(groups, scores: Scores, ratio: float, round_to: int, max_group_ratio: float) -> dict[str, int]:
    if not groups:
        return {}
    total = sum(g.size for g in groups)
    to_remove = math.floor(total * ratio)
    floor_keep = {g.key: max(1, math.ceil(g.size * (1 - max_group_ratio))) for g in groups}
    all_scores = np.concatenate([scores[g.key] for g in groups])
    owner = np.concatenate([np.full(g.size, i) for i, g in enumerate(groups)])
    keep = {g.key: g.size for g in groups}
    removed = 0
    for idx in np.argsort(all_scores, kind="stable"):
        if removed >= to_remove:
            break
        g = groups[owner[idx]]
        if keep[g.key] > floor_keep[g.key]:
            keep[g.key] -= 1
            removed += 1
    return {g.key: _round_keep(keep[g.key], g.size, round_to) for g in groups}

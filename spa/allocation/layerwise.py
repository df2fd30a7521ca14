"""Layer-wise allocation: per-group pruning ratios that keep an overall target.

* ``alpha`` (AlphaPruning-style, no data): the heavy-tailed spectrum of each group's producer
  weights. The Hill estimate α of the tail of the eigenvalues of WWᵀ is smaller for
  better-trained layers (heavier tails); those lose fewer channels.
* ``owl`` (OWL-style, needs activations): the share of outliers among |W|·‖X‖ of a group's
  consumer weights; groups with more outliers lose fewer channels.

Both map the metric linearly into ``ratio ± spread`` and shift the result so the channels
removed over all groups are the target share.
"""

from __future__ import annotations

import numpy as np

ALLOCATIONS = ("uniform", "global", "alpha", "owl", "obs", "sensitivity")


def hill_alpha(w: np.ndarray) -> float:
    """Hill estimator of the power-law exponent of the eigenvalue tail of WWᵀ."""
    sv = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    eig = np.sort(sv ** 2)[::-1]
    eig = eig[eig > 0]
    k = max(2, eig.size // 2)
    if eig.size < 3:
        return float("nan")
    tail = eig[:k]
    logs = np.log(tail / tail[-1])
    return float(1.0 + (k - 1) / max(logs[:-1].sum(), 1e-12))


def _producer_matrices(group, weights):
    for m in group.params:
        if m.role == "out":
            a = np.moveaxis(weights(m.param), m.param_axis, 0)
            yield a.reshape(a.shape[0], -1)


def fit_target(sizes: np.ndarray, ratios: np.ndarray, target: float, cap: float = 0.9) -> np.ndarray:
    """Shift ``ratios`` by one constant (clipped to [0, cap]) so the size-weighted mean is ``target``."""
    lo, hi = -1.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        mean = float((np.clip(ratios + mid, 0, cap) * sizes).sum() / sizes.sum())
        lo, hi = (mid, hi) if mean < target else (lo, mid)
    return np.clip(ratios + (lo + hi) / 2, 0, cap)


def _spread(metric: np.ndarray, ratio: float, spread: float, higher_keeps: bool) -> np.ndarray:
    ok = np.isfinite(metric)
    out = np.full(metric.shape, ratio)
    if ok.sum() < 2 or np.ptp(metric[ok]) == 0:
        return out
    z = (metric[ok] - metric[ok].min()) / np.ptp(metric[ok]) * 2 - 1  # [-1, 1]
    out[ok] = ratio - spread * z if higher_keeps else ratio + spread * z
    return out


def alpha_metric(groups, weights) -> np.ndarray:
    """The mean Hill α of each group's producer weights (NaN where it has none)."""
    return np.array([np.nanmean([hill_alpha(w) for w in _producer_matrices(g, weights)] or [np.nan])
                     for g in groups])


def alpha_ratios(groups, weights, ratio: float, spread: float = 0.2) -> dict[str, float]:
    """AlphaPruning-style ratios: lower α (heavier tail) -> fewer channels removed."""
    raw = _spread(alpha_metric(groups, weights), ratio, spread, higher_keeps=False)
    sizes = np.array([g.size for g in groups], dtype=float)
    return dict(zip((g.key for g in groups), fit_target(sizes, raw, ratio)))


def owl_metric(groups, weights, stats, ms=(5.0,)) -> np.ndarray:
    """Share of |W|·‖X‖ outliers (> m × mean) over each group's consumer weights, one row per
    ``m`` of ``ms`` (NaN where a group has no consumer layer with statistics)."""
    cons, hs = stats.consumers, stats.moments
    metric = np.full((len(ms), len(groups)), np.nan)
    for j, g in enumerate(groups):
        parts = []
        for c in cons.get(g.key, []):
            if c.key not in hs:
                continue
            score = np.abs(c.matrix(weights(c.member.param))) * np.sqrt(np.maximum(np.diag(hs[c.key]), 0))[None, :]
            parts.append([float((score > m * score.mean()).mean()) for m in ms])
        if parts:
            metric[:, j] = np.mean(parts, axis=0)
    return metric


def owl_ratios(groups, weights, stats, ratio: float, spread: float = 0.08, m: float = 5.0) -> dict[str, float]:
    """OWL-style ratios: a larger share of |W|·‖X‖ outliers (> m × mean) -> fewer removed."""
    raw = _spread(owl_metric(groups, weights, stats, (m,))[0], ratio, spread, higher_keeps=True)
    sizes = np.array([g.size for g in groups], dtype=float)
    return dict(zip((g.key for g in groups), fit_target(sizes, raw, ratio)))

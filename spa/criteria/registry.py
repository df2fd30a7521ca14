"""The criterion table: one :class:`Criterion` per name, with what it needs and its optional
compensation step. ``score_groups`` refuses a criterion whose needs are not met.

Needs: ``weights`` (every criterion reads the model's initializers), ``activations``
(calibration statistics: ``spa.calibration.activations.collect_stats``), ``gradients``
(per-parameter importance arrays from autograd: ``spa.frontends.gradients``), ``module`` (an
``nn.Module``, not an ONNX file: gradients and BN-matched inputs come from it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from spa.errors import ArgumentError

NEEDS = frozenset({"weights", "activations", "gradients", "module"})
REDUCTIONS = ("mean", "sum", "max")
NORMALIZATIONS = ("none", "mean", "max")


def check_choice(name: str, value: str, choices) -> str:
    if value not in choices:
        raise ArgumentError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


class LazyScores(Mapping):
    """Group key -> ``score(group)``, computed when first read: groups a plan never looks at
    (kinds left out, protected ones) cost nothing."""

    def __init__(self, groups, score: Callable):
        self._groups = {g.key: g for g in groups}
        self._score = score
        self._done: dict = {}

    def __getitem__(self, key):
        if key not in self._done:
            self._done[key] = self._score(self._groups[key])
        return self._done[key]

    def get(self, key, default=None):
        return self[key] if key in self._groups else default  # a KeyError while scoring is no absent key

    def __contains__(self, key) -> bool:
        return key in self._groups

    def __iter__(self):
        return iter(self._groups)

    def __len__(self) -> int:
        return len(self._groups)


@dataclass(frozen=True, slots=True)
class Scores:
    """Per group key: channel scores (None where the criterion does not apply)."""

    by_key: Mapping  # a dict, or LazyScores
    criterion: str
    slots: dict = field(default_factory=dict)  # GQA heads groups: scores of query-head positions

    def __getitem__(self, key: str) -> np.ndarray | None:
        return self.by_key.get(key)


#: Weights up to this size are cached between reads while scoring.
CACHE_BYTES = 16 << 20


@dataclass(slots=True)
class ScoringInputs:
    """What a criterion may read: the graph, and the optional statistics its needs ask for."""

    dg: object
    reduction: str = "mean"
    normalization: str = "mean"
    seed: int = 0
    arrays: dict | None = None  # gradients: parameter name -> per-element importance
    stats: object = None  # activations: spa.calibration.activations.Stats
    _cache: dict = field(default_factory=dict)

    def weights(self, name: str) -> np.ndarray:
        """A parameter's values; small ones are kept for the next read, large ones (read on
        demand from their file) are not, so scoring a large model never holds all its weights."""
        if name in self._cache:
            return self._cache[name]
        arr = self.dg.weights(name)
        if arr.nbytes <= CACHE_BYTES:
            self._cache[name] = arr
        return arr


#: (dg, plan, stats) -> (plan, {initializer: new full-size array}): weights changed to make up
#: for what was removed. It may change the plan's kept channels but never their counts.
Compensation = Callable[[object, object, object], tuple]


@dataclass(frozen=True, slots=True)
class Criterion:
    name: str
    needs: frozenset[str]
    score: Callable[[ScoringInputs], Scores]
    compensate: Compensation | None = None
    summary: str = ""


_CRITERIA: dict[str, Criterion] = {}


def criterion(name: str, needs=("weights",), compensate: Compensation | None = None, summary: str = ""):
    """Decorator: register ``fn(inputs) -> Scores`` as criterion ``name``."""
    needs = frozenset(needs)
    if needs - NEEDS:
        raise ValueError(f"unknown needs {sorted(needs - NEEDS)} for criterion {name!r}")

    def deco(fn):
        if name in _CRITERIA:
            raise ValueError(f"criterion {name!r} is already registered")
        _CRITERIA[name] = Criterion(name, needs, fn, compensate, summary or (fn.__doc__ or "").split("\n")[0])
        return fn

    return deco


def get(name: str) -> Criterion:
    _load()
    if name not in _CRITERIA:
        raise ArgumentError(f"criterion={name!r} is not one of {', '.join(names())}")
    return _CRITERIA[name]


def names() -> tuple[str, ...]:
    _load()
    return tuple(_CRITERIA)


def _load() -> None:
    from spa.criteria import flap, gradient, magnitude, obspa, wanda  # noqa: F401  (registrations)


def missing_needs(c: Criterion, *, module: bool, arrays, stats) -> list[str]:
    have = {"weights"} | ({"module"} if module else set()) | ({"gradients"} if arrays is not None else set()) \
        | ({"activations"} if stats is not None else set())
    return sorted(c.needs - have)


_HOW = {
    "activations": "activation statistics (spa.prune computes them from calibration inputs; with the graph "
                   "API pass stats=spa.collect_stats(model, dg, calibration))",
    "gradients": "gradients (spa.prune(module, example_inputs, data=...) computes them; with the graph API "
                 "pass arrays=spa.frontends.gradients.gradient_importance(module, criterion, data))",
    "module": "an nn.Module (pass the module, not an ONNX model)",
}


def score_groups(dg, name: str = "l1", reduction: str = "mean", normalization: str = "mean", seed: int = 0,
                 arrays: dict | None = None, stats=None, module: bool = False) -> Scores:
    """Channel scores of every group with criterion ``name``; refuses when a need is missing."""
    c = get(name)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("normalization", normalization, NORMALIZATIONS)
    missing = missing_needs(c, module=module, arrays=arrays, stats=stats)
    if missing:
        raise ArgumentError(f"criterion '{name}' needs " + "; and ".join(_HOW.get(m, m) for m in missing))
    return c.score(ScoringInputs(dg, reduction, normalization, seed, arrays, stats))


def normalize(scores: np.ndarray, normalization: str) -> np.ndarray:
    if normalization == "mean":
        d = scores.mean()
    elif normalization == "max":
        d = scores.max()
    else:
        return scores
    return scores / d if d > 0 else scores

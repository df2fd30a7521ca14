"""The search space of the allocation search and the ``params`` target.

A trial picks an allocation *family* (a categorical) and that family's parameters:

* ``uniform`` / ``global``: the two fixed heuristics (no parameter);
* ``owl``: OWL's outlier threshold ``owl_m`` (a grid whose metric is cached) and spread;
* ``alpha``: AlphaPruning's spread over the Hill α of each group's weights;
* ``dsa``: a DSA-style function of a per-group statistic, ``ratio_i = c + a·rank(stat_i)^b``
  (rank normalized to [0, 1]; the statistic is α or the OWL outlier share);
* ``layers``: one ratio per layer (the groups of one transformer layer share it; a group
  outside any layer is its own).

Where ``spa.depth`` finds removable residual units, every trial also picks ``depth`` = k (0
included; the enqueued heuristics have k = 0) and removes the k units of lowest block influence
first; width is then allocated on the shallower graph and the target counts both (the dense
figure is the model's before depth).

Every parameter is suggested in every trial (a flat space, so CMA-ES and multivariate TPE see
the same parameters in each trial); a family reads only its own. The raw per-group ratios are
then shifted by one constant (clipped to ``[0, cap]``) until the plan's parameter count is the
target: a first guess from the groups' parameters per channel (``layerwise.fit_target`` over
``obs.params_per_channel``), then a bisection on the exact count of the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spa.allocation import allocate, is_protected
from spa.allocation.layerwise import _spread, alpha_metric, fit_target, owl_metric
from spa.allocation.obs import params_per_channel
from spa.criteria.registry import Scores
from spa.errors import ArgumentError
from spa.plan import Plan
from spa.targets import _plan_key, fmt

FAMILIES = ("uniform", "global", "owl", "alpha", "dsa", "layers")
#: The heuristics enqueued as the first trials: (name, fixed parameters).
HEURISTICS = (
    ("uniform", {"family": "uniform", "depth": 0}),
    ("global", {"family": "global", "depth": 0}),
    ("owl", {"family": "owl", "owl_m": 5.0, "owl_spread": 0.08, "depth": 0}),
    ("alpha", {"family": "alpha", "alpha_spread": 0.2, "depth": 0}),
)
OWL_MS = (3.0, 5.0, 7.0, 10.0)
TARGET_KINDS = ("params", "macs", "bytes")
#: A plan's figure is fitted to within this share of the dense figure.
TARGET_TOLERANCE = 0.005


def parse_target(text):
    """``params=0.5``, ``macs=0.4``, ``bytes=40MB``, ...: a :class:`spa.targets.Target` the
    search can fit (``spa.targets.parse``; latency is refused: it is timed, not counted)."""
    from spa import targets

    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = f"params={float(text):g}"  # a share, as studies started before other kinds stored it
    target = targets.parse(text)
    if target.kind not in TARGET_KINDS:
        raise ArgumentError(f"target {target.text}: a latency budget is not supported by the search (a trial's plan "
                            "is fitted by counting, and latency is timed); search for a counted budget and minimize "
                            f"the time with --objective latency (or both), e.g. --target macs={target.value:g} "
                            "--objective both, or prune to a latency with `spa prune --target latency=...`")
    if target.relative and not target.value < 1.0:
        raise ArgumentError(f"target {target.text} must be a share in (0, 1) of the dense model (or an absolute "
                            "figure below the dense one)")
    return target


@dataclass
class Statistics:
    """What the space reads besides the graph: channel scores and per-group metrics (cached)."""

    scores: Scores
    alpha: np.ndarray  # Hill α per candidate group
    owl: np.ndarray | None  # outlier share per OWL_MS row and candidate group (None without activations)


def candidates(dg, scores: Scores, protect=(), kinds=None) -> list:
    """The groups the search allocates: scored, not protected, of the selected kinds."""
    return [g for g in dg.groups if scores[g.key] is not None and g.size > 1
            and not (protect and is_protected(g, protect)) and (kinds is None or g.kind in kinds)]


def layer_index(model, groups) -> list[int]:
    """The layer of each group: the transformer layer (``spa.depth``) holding its producer
    node, else a layer of its own."""
    from spa import depth
    from spa.errors import SpaError

    try:
        blocks = depth.find_blocks(model)
    except SpaError:
        blocks = []
    node_layer = {n: b.layer for b in blocks if b.layer is not None for n in b.nodes}
    out, own = [], {}
    for g in groups:
        producers = [m.node for m in g.params if m.role == "out" and m.node] or [m.node for m in g.params if m.node]
        layer = next((node_layer[n] for n in producers if n in node_layer), None)
        out.append(("layer", layer) if layer is not None else ("group", g.key))
    for k in out:
        own.setdefault(k, len(own))
    return [own[k] for k in out]


class _View:
    """The graph a trial's plan prunes: the dense model's, or the shallower one left when the
    ``blocks`` (depth units) are removed. Its candidate groups, their position among the dense
    model's candidates (``index``: the ratios and scores of the dense candidates carry over),
    and the plan's figure, counted."""

    def __init__(self, dg, scores: Scores, groups, index, kind: str, input_shapes, blocks=()):
        self.dg, self.scores, self.groups, self.index = dg, scores, groups, np.asarray(index, dtype=int)
        self.kind, self.input_shapes, self.blocks = kind, input_shapes, tuple(blocks)
        self._dense = _param_sizes(dg.model)
        self.dense_params = int(sum(math.prod(s) for s in self._dense.values()))
        self._axes = [(m.param, m.param_axis, g.key, m) for g in dg.groups for m in g.params
                      if m.param in self._dense and m.param_axis is not None]
        self._figures: dict = {}

    def params(self, plan: Plan) -> int:
        """Parameters of the model ``plan`` prunes to, counted from the kept indices."""
        kept = {g.key: g for g in plan.groups}
        axes: dict[str, dict[int, int]] = {}
        for param, axis, key, member in self._axes:
            gp = kept.get(key)
            if gp is None or not gp.changes:
                continue
            n = len(member.kept_indices(np.asarray(gp.keep), gp.slots))
            axes.setdefault(param, {})[axis] = n
        total = 0
        for name, shape in self._dense.items():
            cut = axes.get(name)
            total += math.prod(cut.get(i, d) for i, d in enumerate(shape)) if cut else math.prod(shape)
        return int(total)

    def value(self, plan: Plan) -> float:
        """The target's figure of the model ``plan`` prunes to: parameters counted from the kept
        indices; MACs and weight bytes counted on the pruned copy (``spa.targets.count``)."""
        if self.kind == "params":
            return float(self.params(plan))
        key = _plan_key(plan)
        if key not in self._figures:
            from spa.api import pruned_copy

            self._figures[key] = count_figure(self.kind, pruned_copy(self.dg.model, plan), self.input_shapes)
        return self._figures[key]


def count_figure(kind: str, model, input_shapes=None) -> float:
    from spa import targets

    return targets.count(kind, model, input_shapes)


def _param_sizes(model) -> dict[str, tuple[int, ...]]:
    from spa.metrics import param_elements

    sizes = param_elements(model)
    shapes = {n: tuple(v.const_value.shape.numpy()) for gr in model.graphs()
              for n, v in gr.initializers.items() if v.const_value is not None}
    return {n: shapes.get(n, (k,)) for n, k in sizes.items()}


class Space:
    """Turns a trial's parameters into per-group ratios and a plan that meets the target.

    ``units``: removable depth units (``spa.depth.rank_units``: lowest influence first); a trial
    also picks ``depth`` = k in [0, ``max_depth``] and removes the first k (width is then
    allocated on the shallower graph, whose groups take the dense groups' scores and ratios;
    the target counts the dense model before depth, as ``spa.targets`` does)."""

    def __init__(self, dg, stats: Statistics, target, protect=(), kinds=None, round_to: int = 1,
                 cap: float = 0.9, input_shapes: dict | None = None, units=(), max_depth: int | None = None):
        self.dg, self.stats, self.target = dg, stats, parse_target(target)
        self.kind, self.input_shapes = self.target.kind, input_shapes
        self.protect, self.kinds, self.round_to, self.cap = tuple(protect), kinds, round_to, cap
        self.groups = candidates(dg, stats.scores, self.protect, kinds)
        self.layer = np.array(layer_index(dg.model, self.groups), dtype=int)
        self.n_layers = int(self.layer.max()) + 1 if self.groups else 0
        self.ppc = np.array([params_per_channel(g, dg.weights) for g in self.groups])
        self.sizes = np.array([g.size for g in self.groups], dtype=float)
        self.units = tuple(units)
        limit = max(len(self.units) - 1, 0)  # SPA keeps at least one unit
        self.max_depth = limit if max_depth is None else min(max_depth, limit)
        self._views = {0: _View(dg, stats.scores, self.groups, range(len(self.groups)), self.kind, input_shapes)}
        dense = self._views[0]
        self.dense_params = dense.dense_params
        self.dense = float(self.dense_params) if self.kind == "params" else count_figure(self.kind, dg.model,
                                                                                          input_shapes)
        self.goal = self.target.goal(self.dense)
        self.share = self.goal / max(self.dense, 1e-12)  # the share of the dense figure kept
        if not self.share < 1.0:
            raise ArgumentError(f"target {self.target.text}: the dense model's {self.kind} "
                                f"({fmt(self.kind, self.dense)}) already meet it; ask for less")
        self._check_reachable()

    # ---- parameters ----------------------------------------------------------------------
    def suggest(self, trial) -> dict:
        """Suggest every parameter of the space on an Optuna trial; returns them."""
        fams = FAMILIES if self.stats.owl is not None else tuple(f for f in FAMILIES if f != "owl")
        p = {"family": trial.suggest_categorical("family", fams)}
        if self.stats.owl is not None:
            p["owl_m"] = trial.suggest_categorical("owl_m", OWL_MS)
            p["owl_spread"] = trial.suggest_float("owl_spread", 0.0, 0.3)
        p["alpha_spread"] = trial.suggest_float("alpha_spread", 0.0, 0.4)
        p["dsa_stat"] = trial.suggest_categorical("dsa_stat", ("alpha", "owl") if self.stats.owl is not None
                                                  else ("alpha",))
        p["dsa_a"] = trial.suggest_float("dsa_a", -0.4, 0.4)
        p["dsa_b"] = trial.suggest_float("dsa_b", 0.25, 4.0, log=True)
        for i in range(self.n_layers):
            p[f"layer_{i}"] = trial.suggest_float(f"layer_{i}", 0.0, self.cap)
        if self.max_depth:
            p["depth"] = trial.suggest_int("depth", 0, self.max_depth)
        return p

    def raw_ratios(self, p: dict) -> np.ndarray:
        """Per-group ratios of a family before the target shift (around the target's ratio)."""
        fam = p["family"]
        base = np.full(len(self.groups), 0.5)
        if fam == "uniform":
            return base
        if fam == "owl":
            row = self.stats.owl[OWL_MS.index(float(p["owl_m"]))]
            return _spread(row, 0.5, float(p["owl_spread"]), higher_keeps=True)
        if fam == "alpha":
            return _spread(self.stats.alpha, 0.5, float(p["alpha_spread"]), higher_keeps=False)
        if fam == "dsa":
            stat = self.stats.alpha if p["dsa_stat"] == "alpha" else self.stats.owl[OWL_MS.index(5.0)]
            return 0.5 + float(p["dsa_a"]) * _rank(stat) ** float(p["dsa_b"])
        if fam == "layers":
            per = np.array([float(p[f"layer_{i}"]) for i in range(self.n_layers)])
            return per[self.layer] if self.n_layers else base
        raise ArgumentError(f"unknown allocation family {fam!r}; one of {', '.join(FAMILIES)}")

    # ---- depth ---------------------------------------------------------------------------
    def view(self, k: int) -> _View:
        """The graph with the ``k`` lowest-scored depth units removed (built once per k)."""
        k = int(k)
        if k not in self._views:
            if not 0 <= k <= self.max_depth:
                raise ArgumentError(f"depth {k}: the search removes 0 to {self.max_depth} of the model's "
                                    f"{len(self.units)} removable units")
            from spa import depth
            from spa.api import clone
            from spa.depgraph import DependencyGraph

            removed = sorted(self.units[:k], key=lambda b: b.index)
            shallow = depth.remove(clone(self.dg.model), removed)
            dg = DependencyGraph(shallow)
            owner = {(m.param, m.param_axis): g for g in self.dg.groups for m in g.params if m.param}
            where = {g.key: i for i, g in enumerate(self.groups)}
            by_key, groups, index = {}, [], []
            for g in dg.groups:  # a shallow group takes the scores of the dense group it shares a weight with
                dense = next((owner[m.param, m.param_axis] for m in g.params if (m.param, m.param_axis) in owner), None)
                if dense is None or dense.size != g.size:
                    continue
                by_key[g.key] = self.stats.scores[dense.key]
                if dense.key in where and by_key[g.key] is not None:
                    groups.append(g)
                    index.append(where[dense.key])
            scores = Scores(by_key, self.stats.scores.criterion, dict(self.stats.scores.slots))
            self._views[k] = _View(dg, scores, groups, index, self.kind, self.input_shapes, depth.to_plans(removed))
        return self._views[k]

    # ---- plans ---------------------------------------------------------------------------
    def plan(self, p: dict) -> Plan:
        """The plan of a trial's parameters, fitted to the target."""
        v = self.view(p.get("depth", 0))
        if p["family"] == "global":
            plan = self._fit(v, lambda c: self._plan(v, c, None), 0.0, 0.99)
        else:
            raw = self.raw_ratios(p)[v.index]
            # first guess: the shift that removes 1 - target of the channels' parameters
            fitted = fit_target((self.sizes * self.ppc)[v.index], raw, 1.0 - self.share, self.cap)
            free = (fitted > 0) & (fitted < self.cap)
            c0 = float(np.median((fitted - raw)[free])) if free.any() else 0.0
            lo, hi = self._bracket(v, lambda c: self._plan(v, c, raw), c0)
            plan = self._fit(v, lambda c: self._plan(v, c, raw), lo, hi)
        got = v.value(plan)
        if v.blocks and got < self.goal - TARGET_TOLERANCE * self.dense:
            raise ArgumentError(f"depth {len(v.blocks)}: removing {', '.join(b.key for b in v.blocks)} alone leaves "
                                f"{got / self.dense:.3f} of the dense {self.kind}, below the target "
                                f"{self.target.text}; this trial has no plan (fewer units meet it)")
        total = sum(g.size for g in plan.groups)
        meta = {**plan.meta, "ratio": sum(g.removed for g in plan.groups) / max(total, 1),  # channels removed
                "allocation": "search", "family": p["family"],
                "target": {self.kind: self.target.value}, "params_ratio": v.params(plan) / max(self.dense_params, 1),
                f"{self.kind}_ratio": got / max(self.dense, 1e-12)}
        if v.blocks:
            meta.update(depth=len(v.blocks), depth_unit="layer", depth_score="bi")
        return Plan(plan.groups, meta, v.blocks)

    def _plan(self, v: _View, c: float, raw) -> Plan:
        if raw is None:
            return allocate(v.dg, v.scores, min(max(c, 0.0), 0.99), global_pruning=True,
                            round_to=self.round_to, protect=self.protect, max_group_ratio=self.cap, kinds=self.kinds)
        ratios = dict(zip((g.key for g in v.groups), np.clip(raw + c, 0.0, self.cap).tolist()))
        return allocate(v.dg, v.scores, 0.0, round_to=self.round_to, protect=self.protect,
                        kinds=self.kinds, ratios=ratios, max_group_ratio=self.cap)

    def _bracket(self, v: _View, make, c0: float) -> tuple[float, float]:
        """A shift interval around ``c0`` whose ends keep more and fewer than the target."""
        lo, hi, step = c0 - 0.1, c0 + 0.1, 0.2
        while lo > -2.0 and v.value(make(lo)) < self.goal:
            lo, step = lo - step, step * 2
        step = 0.2
        while hi < 2.0 and v.value(make(hi)) > self.goal:
            hi, step = hi + step, step * 2
        return max(lo, -2.0), min(hi, 2.0)

    def _fit(self, v: _View, make, lo: float, hi: float) -> Plan:
        """Bisection on the shift: the plan whose figure is closest to the target."""
        best, best_err = None, math.inf
        for _ in range(40):
            mid = (lo + hi) / 2
            plan = make(mid)
            got = v.value(plan)
            if abs(got - self.goal) < best_err:
                best, best_err = plan, abs(got - self.goal)
            if best_err <= TARGET_TOLERANCE * self.dense or hi - lo < 1e-7:
                break
            lo, hi = (lo, mid) if got < self.goal else (mid, hi)
        return best

    # ---- counting ------------------------------------------------------------------------
    def params(self, plan: Plan) -> int:
        """Parameters of the model ``plan`` prunes to (its blocks removed first)."""
        return self.view(len(plan.blocks)).params(plan)

    def value(self, plan: Plan) -> float:
        """The target's figure of the model ``plan`` prunes to (its blocks removed first)."""
        return self.view(len(plan.blocks)).value(plan)

    def _check_reachable(self) -> None:
        if not self.groups:
            raise ArgumentError("the model has no prunable group the search could allocate (all blocked, protected "
                                "or not scored); `spa inspect MODEL` lists the barriers")
        v = self.view(0)
        floor = v.value(self._plan(v, self.cap, np.zeros(len(self.groups))))
        least = floor / self.dense
        if least > self.share + TARGET_TOLERANCE:
            raise ArgumentError(f"target {self.target.text} is out of reach: pruning every candidate group to "
                                f"{self.cap:.0%} of its channels keeps {least:.3f} of the dense {self.kind} "
                                f"({fmt(self.kind, floor)}; the rest is blocked or protected); ask for "
                                f"{self.kind} >= {least:.3f}")


def _rank(stat: np.ndarray) -> np.ndarray:
    """Ranks of ``stat`` normalized to [0, 1] (NaN ranks in the middle)."""
    out = np.full(stat.shape, 0.5)
    ok = np.isfinite(stat)
    if ok.sum() >= 2:
        order = np.argsort(np.argsort(stat[ok], kind="stable"), kind="stable")
        out[ok] = order / (ok.sum() - 1)
    return out


def statistics(dg, scores: Scores, stats, protect=(), kinds=None) -> Statistics:
    """The per-group metrics of the candidate groups (α always; OWL's with activations)."""
    groups = candidates(dg, scores, protect, kinds)
    alpha = alpha_metric(groups, dg.weights)
    owl = owl_metric(groups, dg.weights, stats, OWL_MS) if stats is not None else None
    return Statistics(scores, alpha, owl)

"""Prune to a budget: ``params``, ``macs``, ``bytes`` or ``latency`` targets.

A target is a ratio to the dense model (``params=0.5``: half the parameters) or an absolute
figure (``params=3.5M``, ``macs=2G``, ``bytes=40MB``, ``latency=12ms``). :func:`parse` reads
one; :func:`search` finds the plan that meets it.

How a plan is found. Scores are computed once; allocation is cheap, so the search walks over
plans, not models:

* ``uniform`` and ``global`` allocations become a *schedule*: a sequence of single removals
  (one channel, or ``round_to`` channels, of one group). ``uniform`` orders them by the share of
  its group each removal reaches (so any prefix is the most even split), ``global`` by the
  channel's normalized score (the ranking of ``--global``). A prefix of the schedule is a plan;
  the figure falls with the prefix, so the prefix meeting the target is found by bisection. A
  group whose single step is coarser than the tolerance (one head of a four-head layer) is held
  where it was and the bisection runs again over the others, so the target is met to the
  tolerance wherever the finer groups can absorb the rest.
* layer-wise allocations (``alpha``, ``owl``, ``obs``) bisect the overall ratio they are given.

Each candidate plan is applied to a copy of the model and its figure counted
(``spa.metrics``); protect, kinds and round_to hold because every plan goes through
``spa.allocation.allocate``.

Latency (onnxruntime, on the current device, with the user's threads and input shapes) uses a
latency model: the dense model and the model pruned at a few points of the schedule are timed,
giving latency as a monotone piecewise-linear function of a feature of the pruned model; the
bisection then runs on predicted latency (the feature is counted, not timed). The feature is the
sum of a per-layer latency table (``LATENCY_MODEL = "layers"``, the default; HALP-style: every
weight layer timed alone at eight widths, :class:`LayerTable`) or the model's MACs (``"macs"``).
CPU time is not smooth in width (a 3x3 convolution at 32x32 goes from 2.2 ms at 64 channels to
7.2 ms at 80), which the table sees and MACs do not; ``examples/bench_targets.py`` compares the
two. The chosen plan's model is timed (interleaved with the dense model, see :class:`Timer`);
when it misses the tolerance, that point joins the model and the search repeats (at most
``LATENCY_ROUNDS`` times), and the closest model timed is kept. Latency targets depend on
timing: the same command can choose a slightly different plan on a busy machine. onnxruntime's
blocked (NCHWc) CPU kernels want channel counts in multiples of 8 or 16, so latency targets
round kept counts to ``LATENCY_ROUND_TO`` unless ``round_to`` is given.

Tolerances are shares of the *dense* figure: ``TOLERANCE`` (1%) for params / MACs / bytes,
``LATENCY_TOLERANCE`` (5%) for latency.

Depth (``--depth``) runs first; its removed units count toward the target: the dense figure is
the model's before depth, and width pruning removes what remains to reach the target.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from spa.errors import ArgumentError

KINDS = ("params", "macs", "bytes", "latency")
TOLERANCE = 0.01
LATENCY_TOLERANCE = 0.05
LATENCY_ROUNDS = 4
#: ``round_to`` of latency targets when none is given (onnxruntime's CPU kernels block channels by 16).
LATENCY_ROUND_TO = 16
#: The latency model's feature: ``layers`` (the per-layer table, :class:`LayerTable`) or ``macs``.
LATENCY_MODEL = "layers"
#: Schedule points (shares of the whole schedule) the latency model times, besides the dense model.
LATENCY_POINTS = (0.25, 0.5, 0.75, 1.0)

_COUNT = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BYTES = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30,
          "tib": 2 ** 40}
_TIME = {"ms": 1.0, "s": 1e3, "us": 1e-3}


@dataclass(frozen=True)
class Target:
    """``kind`` (params / macs / bytes / latency) and a ratio to the dense model, or an absolute
    ``value`` (a count, bytes, or milliseconds)."""

    kind: str
    value: float
    relative: bool
    text: str

    def goal(self, dense: float) -> float:
        """The figure to reach, given the dense model's."""
        return self.value * dense if self.relative else self.value

    @property
    def tolerance(self) -> float:
        return LATENCY_TOLERANCE if self.kind == "latency" else TOLERANCE


def parse(spec) -> Target:
    """``KIND=VALUE``: ``params=0.5`` (a ratio in (0, 1]), ``params=3.5M``, ``macs=2G``,
    ``bytes=40MB`` / ``40MiB``, ``latency=0.6``, ``latency=12ms``. A ``Target`` passes through."""
    if isinstance(spec, Target):
        return spec
    if not isinstance(spec, str):
        raise ArgumentError(f"target {spec!r}: expected a string KIND=VALUE such as 'params=0.5' or 'bytes=40MB'")
    kind, sep, value = spec.replace(" ", "").partition("=")
    kind = kind.lower()
    if not sep or kind not in KINDS:
        raise ArgumentError(f"target {spec!r}: expected KIND=VALUE with KIND one of {', '.join(KINDS)} "
                            "(e.g. params=0.5, macs=0.4, bytes=40MB, latency=12ms)")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)([a-zA-Z]*)", value)
    if not m:
        raise ArgumentError(f"target {spec!r}: {value!r} is not a number with an optional unit")
    number, unit = float(m.group(1)), m.group(2).lower()
    if not unit:
        if 0 < number <= 1:
            return Target(kind, number, True, spec)
        if kind == "latency":
            raise ArgumentError(f"target {spec!r}: a latency is a ratio in (0, 1] or a time with its unit "
                                "(12ms, 0.5s, 800us)")
        if number <= 0:
            raise ArgumentError(f"target {spec!r}: must be positive")
        return Target(kind, number, False, spec)
    table = _TIME if kind == "latency" else _BYTES if kind == "bytes" else _COUNT
    if unit not in table:
        raise ArgumentError(f"target {spec!r}: unknown unit {m.group(2)!r} for {kind} "
                            f"(use {', '.join(u.upper() if kind != 'latency' else u for u in table if u)})")
    if number <= 0:
        raise ArgumentError(f"target {spec!r}: must be positive")
    return Target(kind, number * table[unit], False, spec)


def weight_bytes(model) -> int:
    """Bytes of every initializer (If / Loop / Scan bodies included): the weights on disk."""
    return int(sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values()
                   if v.const_value is not None))


def count(kind: str, model, input_shapes=None) -> float:
    """The model's parameters, MACs or weight bytes."""
    from spa.metrics import count_macs, count_params

    if kind == "params":
        return float(count_params(model))
    if kind == "macs":
        return float(count_macs(model, input_shapes))
    if kind == "bytes":
        return float(weight_bytes(model))
    raise ArgumentError(f"count({kind!r}): latency is measured, not counted (spa.targets.Timer)")


def fmt(kind: str, value: float) -> str:
    if kind == "latency":
        return f"{value:.3f} ms"
    if kind == "bytes":
        return f"{value / 2 ** 20:,.2f} MiB" if value >= 2 ** 20 else f"{value:,.0f} B"
    return f"{value:,.0f}"


class Timer:
    """Median onnxruntime latency of models on the current device, with fixed feeds. Each model
    is timed interleaved with the dense one (run for run) and scaled by how far the dense
    model's median moved from its first one, so a machine that gets busier or quieter between
    two models does not move the figures (a ratio target compares like with like)."""

    def __init__(self, dense, threads: int | None = None, input_shapes=None, runs: int = 20):
        from spa import runtime

        self.threads, self.runs = threads, runs
        self.dense = runtime.session(dense, threads=threads)
        self.feeds = runtime.random_feeds(self.dense, input_shapes)
        self.calls = 1
        self.reference = runtime.latency_ms(self.dense, self.feeds, warmup=3, runs=runs)

    def __call__(self, model) -> float:
        import time

        from spa import runtime

        sess = runtime.session(model, threads=self.threads)
        self.calls += 1
        runs = (runtime.runner(self.dense, self.feeds), runtime.runner(sess, self.feeds))
        for _ in range(3):
            runs[1]()
        times = ([], [])
        for _ in range(self.runs):
            for run, out in zip(runs, times):
                t0 = time.perf_counter()
                run()
                out.append(time.perf_counter() - t0)
        drift = float(np.median(times[0])) * 1e3 / self.reference
        return float(np.median(times[1])) * 1e3 / max(drift, 1e-9)


class LatencyModel:
    """Latency as a monotone piecewise-linear function of a feature (MACs, or the per-layer
    table's sum), through the (feature, timed ms) points of the models timed."""

    def __init__(self):
        self.points: list[tuple[float, float]] = []

    def add(self, macs: float, ms: float) -> None:
        self.points.append((float(macs), float(ms)))

    def __call__(self, macs: float) -> float:
        pts = sorted(self.points)
        x = np.array([p[0] for p in pts])
        y = np.maximum.accumulate(np.array([p[1] for p in pts]))  # more MACs never predict less time
        if len(pts) == 1:
            return float(y[0])
        return float(np.interp(macs, x, y))


class LayerTable:
    """A per-layer latency table (HALP-style): every weight layer of the model (Conv, Gemm,
    MatMul reading an initializer) is timed alone, as a one-node model with its own input shape,
    at ``FRACTIONS`` of its widths; layers of one configuration share their timings. A pruned
    model's figure is the sum, over its layers, of the time interpolated at the layer's width
    (the geometric mean of its input and output shares). The figure is a feature: the latency
    model maps it to whole-model time through the models it timed (fusions, other ops, the
    runtime's overhead)."""

    FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)

    def __init__(self, model, threads: int | None = None, input_shapes=None, runs: int = 10):
        from spa.metrics import value_shapes

        self.threads, self.runs = threads, runs
        nodes = [n for n in model.graph if self._weight(n) is not None]
        shapes = value_shapes(model, [n.inputs[0].name for n in nodes], input_shapes)
        self.layers: dict[str, tuple] = {}  # node name -> (dense cin, cout, times at FRACTIONS, depthwise)
        timed: dict = {}
        for n in nodes:
            spec = self._spec(n, shapes.get(n.inputs[0].name))
            if spec is None:
                continue
            if spec not in timed:
                timed[spec] = self._time(spec)
            self.layers[n.name] = (spec[2], spec[3], timed[spec], dict(spec[4]).get("group", 1) > 1)
        self.timed = len(timed)

    @staticmethod
    def _weight(node):
        """The shape of the weight a Conv / Gemm / MatMul reads: an initializer, or one seen through
        Transpose / Cast (exports that keep parameter names transpose ``W`` explicitly)."""
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            return None
        w, perm = node.inputs[1], None
        p = w.producer() if w is not None else None
        if p is not None and p.op_type in ("Transpose", "Cast") and p.domain in ("", "ai.onnx") and p.inputs:
            perm = p.attributes.get_ints("perm", None) if p.op_type == "Transpose" else None
            if p.op_type == "Transpose" and perm is None:
                perm = "reverse"
            w = p.inputs[0]
        if w is None or w.const_value is None or not w.const_value.dtype.is_floating_point():
            return None
        shape = tuple(int(d) for d in w.const_value.shape.numpy())
        if perm == "reverse":
            return shape[::-1]
        return tuple(shape[i] for i in perm) if perm is not None else shape

    def _spec(self, node, x_shape):
        """(op, x shape without its channel, cin, cout, attributes) or None (not modelled)."""
        w = self._weight(node)
        if x_shape is None:
            return None
        attrs = tuple(sorted((k, tuple(a.value) if isinstance(a.value, (list, tuple)) else a.value)
                             for k, a in node.attributes.items() if isinstance(a.value, (int, float, list, tuple))))
        if node.op_type == "Conv":
            group = node.attributes.get_int("group", 1)
            if len(w) < 3 or len(x_shape) != len(w) or group not in (1, w[0]) or (group > 1 and w[1] != 1):
                return None
            return ("Conv", (x_shape[0],) + tuple(x_shape[2:]), w[1] * group, w[0], attrs + (("_k", w[2:]),))
        if node.op_type == "Gemm":
            if len(w) != 2 or len(x_shape) != 2 or node.attributes.get_int("transA", 0):
                return None
            cin, cout = (w[1], w[0]) if node.attributes.get_int("transB", 0) else w
            return ("Gemm", (x_shape[0],), cin, cout, attrs)
        if len(w) != 2 or len(x_shape) < 2 or x_shape[-1] != w[0]:
            return None
        return ("MatMul", tuple(x_shape[:-1]), w[0], w[1], ())

    def _model(self, spec, f: float) -> bytes:
        from onnx import TensorProto, helper, numpy_helper

        op, lead, cin, cout, attrs = spec
        ci, co = max(1, round(cin * f)), max(1, round(cout * f))
        rng = np.random.default_rng(0)
        kw = {k: v for k, v in attrs if not k.startswith("_")}
        if op == "Conv":
            depthwise = kw.get("group", 1) > 1
            if depthwise:
                co = ci
                kw["group"] = ci
            k = dict(attrs)["_k"]
            w = rng.standard_normal((co, 1 if depthwise else ci, *k)).astype(np.float32)
            x = [lead[0], ci, *lead[1:]]
        elif op == "Gemm":
            w = rng.standard_normal((co, ci) if kw.get("transB", 0) else (ci, co)).astype(np.float32)
            x = [lead[0], ci]
        else:
            w = rng.standard_normal((ci, co)).astype(np.float32)
            x = [*lead, ci]
        node = helper.make_node(op, ["x", "w"], ["y"], **kw)
        g = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

    def _time(self, spec) -> np.ndarray:
        from spa import runtime

        out = []
        for f in self.FRACTIONS:
            sess = runtime.session(self._model(spec, f), threads=self.threads)
            out.append(runtime.latency_ms(sess, runtime.random_feeds(sess), warmup=2, runs=self.runs))
        return np.maximum.accumulate(np.asarray(out))  # a wider layer never predicts less time

    def __call__(self, model) -> float:
        """The summed layer times of ``model`` (a pruned copy of the model the table was built on)."""
        total = 0.0
        for n in model.graph:
            entry = self.layers.get(n.name)
            shape = self._weight(n) if entry is not None else None
            if shape is None:
                continue
            cin0, cout0, times, depthwise = entry
            if n.op_type == "Conv":
                cin, cout = (shape[0] if depthwise else shape[1]), shape[0]
            elif n.op_type == "Gemm" and n.attributes.get_int("transB", 0):
                cin, cout = shape[1], shape[0]
            else:
                cin, cout = shape[0], shape[1]
            f = math.sqrt(cin * cout / (cin0 * cout0))
            total += float(np.interp(f, (0.0,) + self.FRACTIONS, np.concatenate([[0.0], times])))
        return total


@dataclass
class Outcome:
    """What a target search reached."""

    target: Target
    dense: float  # the dense model's figure (before depth)
    goal: float
    achieved: float
    plans_tried: int = 0
    timed: int = 0  # models timed (latency targets)
    predicted: float | None = None  # the latency model's figure for the chosen plan
    reachable: float | None = None  # the lowest figure the prunable part allows
    notes: list = field(default_factory=list)
    rounds: list = field(default_factory=list)  # latency: (predicted, timed) per search round
    curve: list = field(default_factory=list)  # latency: the (feature, ms) points of the latency model
    layers: int = 0  # latency: weight layers in the per-layer table (0: MACs were the feature)

    @property
    def error(self) -> float:
        """|achieved - goal| as a share of the dense figure."""
        return abs(self.achieved - self.goal) / max(self.dense, 1e-12)

    @property
    def met(self) -> bool:
        return self.error <= self.target.tolerance + 1e-12

    def as_dict(self) -> dict:
        return {"target": self.target.text, "kind": self.target.kind, "dense": self.dense, "goal": self.goal,
                "achieved": self.achieved, "achieved_ratio": self.achieved / max(self.dense, 1e-12),
                "error": self.error, "tolerance": self.target.tolerance, "met": self.met,
                "reachable": self.reachable, "plans_tried": self.plans_tried, "models_timed": self.timed,
                "predicted": self.predicted, "rounds": self.rounds,
                "latency_model": (("layers" if self.layers else "macs") if self.target.kind == "latency" else None)}

    def summary(self) -> str:
        k = self.target.kind
        line = (f"target {self.target.text}: goal {fmt(k, self.goal)} ({self.goal / max(self.dense, 1e-12):.3f} of "
                f"the dense {fmt(k, self.dense)}), achieved {fmt(k, self.achieved)} "
                f"({self.achieved / max(self.dense, 1e-12):.3f}); ")
        if self.met:
            return line + f"within {100 * self.target.tolerance:g}% of the dense figure"
        return line + (f"off by {100 * self.error:.1f}% of the dense figure (tolerance "
                       f"{100 * self.target.tolerance:g}%)")


# ---- schedules ------------------------------------------------------------------------------
def _units(size: int, round_to: int) -> int:
    return round_to if round_to > 1 and size > round_to else 1


def uniform_schedule(groups) -> list[tuple[str, int]]:
    """(group key, channels) removals ordered by the share of its group each one reaches."""
    events = []
    for order, (g, unit) in enumerate(groups):
        k = 1
        while g.size - k * unit >= max(unit, 1):
            events.append((k * unit / g.size, order, g.key, unit))
            k += 1
    events.sort()
    return [(key, unit) for _, _, key, unit in events]


def global_schedule(groups, scores, max_group_ratio: float = 0.9) -> list[tuple[str, int]]:
    """One-channel removals in the order of ``--global``'s ranking of normalized scores."""
    if not groups:
        return []
    all_scores = np.concatenate([scores[g.key] for g, _ in groups])
    owner = np.concatenate([np.full(g.size, i) for i, (g, _) in enumerate(groups)])
    left = {g.key: g.size - max(1, math.ceil(g.size * (1 - max_group_ratio))) for g, _ in groups}
    out = []
    for idx in np.argsort(all_scores, kind="stable"):
        g = groups[owner[idx]][0]
        if left[g.key] > 0:
            left[g.key] -= 1
            out.append((g.key, 1))
    return out


class _Search:
    """Plans from removal counts, their figures cached."""

    def __init__(self, make_plan, value, sizes: dict, units: dict | None = None):
        self.make_plan, self.value, self.sizes = make_plan, value, sizes
        self.units = units or {k: 1 for k in sizes}
        self.cache: dict = {}

    def at(self, counts: dict):
        key = tuple(sorted((k, v) for k, v in counts.items() if v))
        if key not in self.cache:
            ratios = {k: (counts.get(k, 0) + 0.5) / n if counts.get(k, 0) else 0.0 for k, n in self.sizes.items()}
            total = sum(self.sizes.values())
            share = sum(counts.values()) / total if total else 0.0
            plan = self.make_plan(min(share, 0.99), ratios)
            self.cache[key] = (plan, self.value(plan))
        return self.cache[key]


def _counts(base: dict, events, n: int) -> dict:
    out = dict(base)
    for key, unit in events[:n]:
        out[key] = out.get(key, 0) + unit
    return out


def fit_schedule(search: _Search, events, goal: float, tol: float, rounds: int = 8, polish: int = 64):
    """The plan of the schedule prefix closest to ``goal``: bisection for the first prefix at or
    under it; a group whose step there is coarser than ``tol`` is held before that step and
    the rest of the schedule bisected again. Still outside ``tol``: one step more or less of
    single groups (at most ``polish`` plans). Returns (plan, figure)."""
    base: dict = {}
    best = None  # (counts, plan, figure)
    for _ in range(rounds):
        lo, hi = 0, len(events)  # f(lo) > goal (or lo == 0), f(hi) <= goal (or the end)
        if search.at(_counts(base, events, hi))[1] > goal:
            lo = hi
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if search.at(_counts(base, events, mid))[1] <= goal:
                    hi = mid
                else:
                    lo = mid
            if search.at(_counts(base, events, lo))[1] <= goal:
                hi = lo
        for n in (lo, hi):
            counts = _counts(base, events, n)
            plan, f = search.at(counts)
            if best is None or abs(f - goal) < abs(best[2] - goal) - 1e-12:
                best = (counts, plan, f)
        if abs(best[2] - goal) <= tol or hi == lo or hi == 0:
            break
        coarse = events[hi - 1][0]  # the step that crossed the goal: hold its group before it
        base = _counts(base, events, hi - 1)
        events = [e for e in events[hi - 1:] if e[0] != coarse]
        if not events:
            break
    return _polish(search, best, goal, tol, polish)


def _polish(search: _Search, best, goal: float, tol: float, budget: int):
    """One group's step more or less while that brings the figure closer to ``goal``."""
    units = {key: unit for key, unit in search.units.items()}
    while abs(best[2] - goal) > tol and budget > 0:
        counts, improved = best[0], None
        for key, unit in units.items():
            for step in (unit, -unit):
                c = counts.get(key, 0) + step
                if c < 0 or search.sizes[key] - c < max(unit, 1) or budget <= 0:
                    continue
                budget -= 1
                trial = {**counts, key: c}
                plan, f = search.at(trial)
                if abs(f - goal) < abs((improved or best)[2] - goal) - 1e-12:
                    improved = (trial, plan, f)
        if improved is None:
            break
        best = improved
    return best[1], best[2]


def fit_ratio(make, value, goal: float, tol: float, top: float = 0.95, steps: int = 16):
    """Bisection over an overall ratio (layer-wise allocations). Returns (plan, figure)."""
    lo, hi = 0.0, top
    plan_hi = make(hi)
    f_hi = value(plan_hi)
    best = (plan_hi, f_hi)
    if f_hi > goal:
        return best
    for _ in range(steps):
        mid = (lo + hi) / 2
        plan = make(mid)
        f = value(plan)
        if abs(f - goal) < abs(best[1] - goal):
            best = (plan, f)
        if abs(f - goal) <= tol / 4:
            break
        if f <= goal:
            hi = mid
        else:
            lo = mid
    return best


def unreachable(target: Target, dense: float, goal: float, reachable: float) -> ArgumentError:
    k = target.kind
    return ArgumentError(
        f"target {target.text} cannot be reached: it asks for {fmt(k, goal)} ({goal / max(dense, 1e-12):.3f} of the "
        f"dense {fmt(k, dense)}), and pruning every prunable group as far as it goes reaches "
        f"{fmt(k, reachable)} ({reachable / max(dense, 1e-12):.3f}); the rest of the model is blocked, "
        f"protected or not selected (`spa inspect MODEL` lists why). Ask for at least "
        f"{reachable / max(dense, 1e-12):.3f} ({fmt(k, reachable)}); nothing was written")


# ---- the search over a prune job --------------------------------------------------------------
def candidates(job) -> list:
    """The groups ``allocate`` may prune with a ratio of their own (the filters it applies)."""
    from spa.allocation import is_protected

    out = []
    for g in job.dg.groups:
        if job.protect and is_protected(g, job.protect):
            continue
        if job.kinds is not None and g.kind not in job.kinds:
            continue
        if job.scores[g.key] is None or (g.heads is not None and g.heads.slots > 1 and job.gqa != "kv"):
            continue
        out.append((g, _units(g.size, job.round_to)))
    return out


class _Family:
    """The plans a search walks over: schedule prefixes (uniform, global) or overall ratios
    (layer-wise allocations), indexed by a share ``p`` in [0, 1] of the way to the most pruned."""

    TOP = 0.95  # the largest overall ratio a layer-wise allocation is given

    def __init__(self, job, layer_ratios):
        from spa.allocation import allocate

        self.job = job
        groups = candidates(job)
        self.sizes = {g.key: g.size for g, _ in groups}
        self.units = {g.key: unit for g, unit in groups}

        def make_plan(share, ratios):
            return allocate(job.dg, job.scores, share, False, job.round_to, job.protect, kinds=job.kinds,
                            gqa=job.gqa, ratios=ratios)

        self.make_plan = make_plan
        self.layer_ratios = layer_ratios
        if layer_ratios is None:
            self.events = (global_schedule(groups, job.scores) if job.global_pruning else uniform_schedule(groups))

    def ratio_plan(self, ratio: float):
        return self.make_plan(ratio, self.layer_ratios(ratio))

    def at(self, p: float):
        if self.layer_ratios is not None:
            return self.ratio_plan(p * self.TOP)
        n = int(round(p * len(self.events)))
        return _Search(self.make_plan, lambda plan: None, self.sizes).at(_counts({}, self.events, n))[0]

    def fit(self, value, goal: float, tol: float):
        if self.layer_ratios is not None:
            return fit_ratio(self.ratio_plan, value, goal, tol, self.TOP)
        return fit_schedule(_Search(self.make_plan, value, self.sizes, self.units), self.events, goal, tol)


def _plan_key(plan) -> tuple:
    return tuple((g.key, g.keep, g.slots) for g in plan.groups)


def search(job, layer_ratios=None):
    """The plan meeting ``job.target`` (see the module docstring) and its :class:`Outcome`.
    ``layer_ratios(ratio)``: the per-group ratios of a layer-wise allocation (None: uniform or
    global). Raises ArgumentError when the target is beyond what the prunable groups reach."""
    from spa.api import pruned_copy

    target = job.target
    kind = target.kind
    dense_model = job.deep if job.deep is not None else job.model
    family = _Family(job, layer_ratios)
    if kind == "latency":
        return _latency_search(job, family, dense_model)
    dense = count(kind, dense_model, job.input_shapes)
    goal, tol = target.goal(dense), target.tolerance * dense
    tried = [0]

    def value(plan):
        tried[0] += 1
        return count(kind, pruned_copy(job.model, plan), job.input_shapes)

    return _fit(job, family, value, dense, goal, tol, tried)


def _fit(job, family, value, dense, goal, tol, tried, outcome_extra=None):
    target = job.target
    start = family.at(0.0)
    f0 = value(start)
    if f0 <= goal + tol:
        out = Outcome(target, dense, goal, f0, tried[0])
        if f0 < goal - tol:
            out.notes.append(f"target {target.text}: depth pruning alone reaches {fmt(target.kind, f0)} "
                             f"({f0 / max(dense, 1e-12):.3f} of the dense model), below the target; no channel was "
                             "pruned")
        elif not job.depth and f0 >= goal:
            out.notes.append(f"target {target.text}: the dense model already meets it; no channel was pruned")
        return start, out
    most = family.at(1.0)
    reachable = value(most)
    if reachable > goal + tol:
        raise unreachable(target, dense, goal, reachable)
    plan, f = family.fit(value, goal, tol)
    out = Outcome(target, dense, goal, f, tried[0], reachable=reachable)
    if not out.met:
        out.notes.append(_granularity_note(target, f, dense, job.round_to))
    return plan, out


def _granularity_note(target: Target, f: float, dense: float, round_to: int) -> str:
    return (f"target {target.text} not met within {100 * target.tolerance:g}%: the nearest plan reaches "
            f"{fmt(target.kind, f)} ({f / max(dense, 1e-12):.3f} of the dense model); the steps between plans are "
            "coarser here (whole heads, round_to=" + str(round_to) + ", few prunable groups)")


def _latency_search(job, family, dense_model):
    from spa.api import pruned_copy
    from spa.metrics import count_macs

    target = job.target
    timer = Timer(dense_model, job.threads, job.input_shapes)
    dense = timer.reference
    goal, tol = target.goal(dense), target.tolerance * dense
    models: dict = {}

    def model_of(plan):
        key = _plan_key(plan)
        if key not in models:
            models.clear()  # one pruned copy at a time
            models[key] = pruned_copy(job.model, plan)
        return models[key]

    table = LayerTable(job.model, job.threads, job.input_shapes) if LATENCY_MODEL == "layers" else None
    if table is not None and not table.layers:
        table = None  # no weight layer to time: MACs stand in

    def feature(model) -> float:
        return table(model) if table is not None else float(count_macs(model, job.input_shapes))

    features: dict = {}

    def macs_of(plan) -> float:  # the latency model's feature of a plan
        key = _plan_key(plan)
        if key not in features:
            features[key] = feature(model_of(plan))
        return features[key]

    lat = LatencyModel()
    lat.add(feature(dense_model), dense)
    timed = {}
    for p in (0.0, *LATENCY_POINTS):
        plan = family.at(p)
        key = _plan_key(plan)
        if key not in timed:
            timed[key] = (plan, timer(model_of(plan)))
            lat.add(macs_of(plan), timed[key][1])
    reachable = min(ms for _, ms in timed.values())
    if reachable > goal + tol:
        raise unreachable(target, dense, goal, reachable)
    tried = [0]
    best = None
    predicted = None
    rounds: list = []  # (predicted, timed) of each plan the latency model chose, before it was timed
    for _ in range(LATENCY_ROUNDS):
        def value(plan):
            tried[0] += 1
            return lat(macs_of(plan))

        plan, pred = family.fit(value, goal, tol)
        key = _plan_key(plan)
        if key not in timed:
            timed[key] = (plan, timer(model_of(plan)))
            lat.add(macs_of(plan), timed[key][1])
            rounds.append((pred, timed[key][1]))
        ms = timed[key][1]
        if best is None or abs(ms - goal) < abs(best[1] - goal):
            best, predicted = (plan, ms), pred
        if abs(ms - goal) <= tol:
            break
    closest = min(timed.values(), key=lambda t: abs(t[1] - goal))  # a timed point of the model may be closer
    if abs(closest[1] - goal) < abs(best[1] - goal):
        best, predicted = closest, lat(macs_of(closest[0]))
    plan, ms = best
    out = Outcome(target, dense, goal, ms, tried[0], timer.calls, predicted, reachable)
    out.rounds = rounds
    out.curve = sorted(lat.points)
    out.layers = 0 if table is None else len(table.layers)
    if not out.met:
        out.notes.append(f"target {target.text} not met within {100 * target.tolerance:g}%: the closest plan timed "
                         f"{ms:.3f} ms ({ms / dense:.3f} of the dense {dense:.3f} ms); reachable on "
                         f"{_device_name()}: {reachable:.3f} ms ({reachable / dense:.3f}) to {dense:.3f} ms")
    return plan, out


def _device_name() -> str:
    from spa import runtime

    return runtime.current_device().name


__all__ = ["KINDS", "LatencyModel", "Outcome", "TOLERANCE", "LATENCY_TOLERANCE", "Target", "Timer", "count",
           "fit_ratio", "fit_schedule", "global_schedule", "parse", "search", "uniform_schedule", "weight_bytes"]

"""The sensitivity report: how far the outputs move when one group (or one layer: the groups of
one residual block / transformer layer together) alone is pruned at each ratio, beside what it
saves.

For every prunable group the criterion's lowest-scored ``floor(size * ratio)`` channels are
removed (at least one kept, as ``spa.allocation`` does); the fidelity is the relative error and
cosine of the graph outputs against the dense model on the calibration inputs
(``spa.equivalence.fidelity``, all batches together). Exact groups are *masked* in one
onnxruntime session whose group weights are graph inputs (``spa.allocation.sensitivity``): by the
masked-equivalence invariant that is the pruned model's output. Inexact groups (a norm over the
pruned axis) and layers holding one are run *pruned* (a pruned copy in its own session).
Parameters and MACs saved are those of the pruned-alone model (MACs of one forward pass at
``input_shapes``, default batch 1), counted from the dense model's shapes with the groups' axes
shrunk (``spa.metrics.Counter``) where the rewrite only slices those axes (default-domain ops,
no constant shared with a node outside the group), else on a pruned copy; with ``latency=True`` so does the time
saved: median onnxruntime latency of the dense model minus that of the pruned-alone model, on
random inputs of ``input_shapes`` as ``spa bench`` times them (*measured*, timing-dependent). No compensation (OBSPA's
reconstruction, FLAP's bias) is applied: the criterion only chooses the channels.

Units are ranked least sensitive first (the safest to prune at the top): by relative error at
the largest ratio, then at the smaller ones, then by key.

Results are cached (``spa.cache``) under ``sensitivity/``, keyed by the model's content hash and
the settings (ratios, criterion, reduction, normalization, calibration, batches, seed, input
shapes, latency and its runs / threads / device).

JSON schema (``spa.sensitivity/1``)::

    {"schema": "spa.sensitivity/1",
     "model": {"sha256": str, "params": int, "macs": int, "latency_ms": float | null},
     "settings": {"ratios": [float], "criterion": str, "reduction": str, "normalization": str,
                  "calibration": str | {"directory"|"arrays": sha256} | null,
                  "calibration_batches": int, "seed": int, "input_shapes": {..} | null,
                  "latency": bool, ...},
     "ranking": str,                        # how "units" is ordered
     "latency_method": "measured" | null,
     "seconds": float,                      # time the measurement took
     "notes": [str],                        # units left out (pruning them alone fails) and why
     "units": [{"key": str,                 # group key (w1:0) or layer key (layer3, block2)
                "kind": "group" | "layer",
                "group_kind": "channels" | "heads" | "hidden" | null,   # groups only
                "layer": str | null,        # the layer a group belongs to
                "groups": [str],            # the group keys pruned together
                "channels": int,            # channels of the unit (sum over a layer's groups)
                "exact": bool,              # masking equals pruning for every group
                "results": [{"ratio": float, "removed": int, "relative_error": float,
                             "cosine": float, "params_saved": int, "macs_saved": int,
                             "latency_saved_ms": float | null,
                             "measured": "masked" | "pruned"}]}]}
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from spa.errors import ArgumentError, SpaError
from spa.progress import SILENT, Progress

SCHEMA = "spa.sensitivity/1"
RANKING = "least sensitive first: relative error at the largest ratio, then the smaller ratios, ascending"
DEFAULT_RATIOS = (0.1, 0.3, 0.5)


@dataclass(frozen=True, slots=True)
class Probe:
    """One unit pruned alone at one ratio."""

    ratio: float
    removed: int
    relative_error: float
    cosine: float
    params_saved: int
    macs_saved: int
    latency_saved_ms: float | None
    measured: str  # "masked" (exact: weights zeroed in one session) or "pruned" (a pruned copy run)


@dataclass(frozen=True, slots=True)
class Unit:
    """A group, or a layer (its groups pruned together), with one probe per ratio."""

    key: str
    kind: str  # "group" or "layer"
    group_kind: str | None
    layer: str | None
    groups: tuple[str, ...]
    channels: int
    exact: bool
    results: tuple[Probe, ...]

    def at(self, ratio: float) -> Probe:
        for p in self.results:
            if math.isclose(p.ratio, ratio):
                return p
        raise KeyError(ratio)

    def rank_key(self) -> tuple:
        """Relative error at the largest ratio, then at the smaller ones (NaN last), then key."""
        return (*[_order(p.relative_error) for p in reversed(self.results)], self.key)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["groups"] = list(self.groups)
        d["results"] = [asdict(p) for p in self.results]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Unit:
        return cls(d["key"], d["kind"], d.get("group_kind"), d.get("layer"), tuple(d["groups"]), int(d["channels"]),
                   bool(d["exact"]), tuple(Probe(**p) for p in d["results"]))


def _order(x: float) -> float:
    return float("inf") if math.isnan(x) else x


@dataclass
class SensitivityResult:
    """What :func:`sensitivity` measured. ``groups`` and ``layers`` are ranked least sensitive
    first; ``cached`` says whether it was read from ``cache_path``."""

    model: dict
    settings: dict
    units: list[Unit]
    latency_method: str | None = None
    seconds: float = 0.0
    cached: bool = False
    cache_path: Path | None = None
    notes: list = field(default_factory=list)

    @property
    def ratios(self) -> tuple[float, ...]:
        return tuple(self.settings["ratios"])

    @property
    def groups(self) -> list[Unit]:
        return [u for u in self.units if u.kind == "group"]

    @property
    def layers(self) -> list[Unit]:
        return [u for u in self.units if u.kind == "layer"]

    def unit(self, key: str) -> Unit:
        for u in self.units:
            if u.key == key:
                return u
        raise KeyError(key)

    def errors(self, ratio: float) -> dict[str, float]:
        """Relative error of every group pruned alone at ``ratio`` (one of the measured ratios)."""
        return {u.key: u.at(ratio).relative_error for u in self.groups}

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "model": dict(self.model), "settings": dict(self.settings), "ranking": RANKING,
                "latency_method": self.latency_method, "seconds": self.seconds, "notes": list(self.notes),
                "units": [u.to_dict() for u in self.units]}

    @classmethod
    def from_dict(cls, d: dict) -> SensitivityResult:
        if d.get("schema") != SCHEMA:
            raise ArgumentError(f"not a {SCHEMA} sensitivity report (schema {d.get('schema')!r})")
        return cls(d["model"], d["settings"], [Unit.from_dict(u) for u in d["units"]], d.get("latency_method"),
                   float(d.get("seconds", 0.0)), notes=list(d.get("notes", [])))

    def to_json(self, path) -> Path:
        import json

        from spa.io import atomic_write_bytes

        atomic_write_bytes(Path(path), json.dumps(self.to_dict(), indent=1).encode())
        return Path(path)

    def table(self, kind: str = "group", top: int | None = None) -> str:
        """The ranked terminal table of the groups (``kind="group"``) or layers."""
        from spa.report import table

        units = [u for u in self.units if u.kind == kind][:top]
        last = self.ratios[-1]
        params, macs = self.model["params"] or 1, self.model["macs"] or 1
        headers = ["#", kind, "channels", *[f"err@{r:g}" for r in self.ratios], f"cos@{last:g}",
                   f"params saved@{last:g}", f"MACs saved@{last:g}"]
        if self.latency_method:
            headers.append(f"ms saved@{last:g}")
        rows = []
        for i, u in enumerate(units, 1):
            p = u.at(last)
            name = u.key if kind == "layer" else f"{u.key} ({u.group_kind}{', ' + u.layer if u.layer else ''})"
            row = [i, name, u.channels, *[f"{u.at(r).relative_error:.4f}" for r in self.ratios], f"{p.cosine:.4f}",
                   f"{p.params_saved:,} ({100 * p.params_saved / params:.1f}%)",
                   f"{p.macs_saved:,} ({100 * p.macs_saved / macs:.1f}%)"]
            if self.latency_method:
                row.append("-" if p.latency_saved_ms is None else f"{p.latency_saved_ms:.3f}")
            rows.append(row)
        return table(headers, rows, "rlr" + "r" * (len(headers) - 3))

    def plot(self, path) -> Path:
        """A PNG: relative error against ratio per unit (layers bold), and against the share of
        parameters saved. Needs matplotlib (``pip install "spa-prune[plot]"``)."""
        from spa.io import atomic_write_bytes

        plt = _pyplot()
        import io

        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5))
        dense = self.model["params"] or 1
        for u in self.units:
            errs = [max(p.relative_error, 1e-9) for p in u.results]
            saved = [p.params_saved / dense for p in u.results]
            style = dict(lw=2.2, marker="s") if u.kind == "layer" else dict(lw=0.9, marker="o", ms=3, alpha=0.7)
            a.plot(self.ratios, errs, label=u.key, **style)
            b.plot(saved, errs, **style)
        for ax in (a, b):
            ax.set_yscale("log")
            ax.set_ylabel("relative output error")
            ax.grid(True, alpha=0.3)
        a.set_xlabel("share of the unit's channels removed")
        b.set_xlabel("share of the model's parameters saved")
        a.set_title("pruned alone (layers: squares)")
        b.set_title(f"criterion {self.settings['criterion']}, calibration {_what(self.settings['calibration'])}")
        if len(self.units) <= 16:
            a.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(Path(path), buf.getvalue())
        return Path(path)


def _what(calibration) -> str:
    if isinstance(calibration, dict):
        return "data" if "arrays" in calibration else "directory"
    return calibration or "gaussian"


def _pyplot():
    """matplotlib's pyplot on the Agg backend; an ArgumentError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ArgumentError('--plot needs matplotlib, which is not installed: pip install "spa-prune[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def parse_ratios(ratios) -> tuple[float, ...]:
    """Ratios from a comma list or a sequence: each in (0, 1); sorted, duplicates dropped."""
    if isinstance(ratios, str):
        try:
            ratios = [float(r) for r in ratios.split(",") if r.strip()]
        except ValueError:
            raise ArgumentError(f"--ratios {ratios!r}: expected a comma list of numbers in (0, 1), "
                                "e.g. 0.1,0.3,0.5") from None
    try:
        values = sorted({float(r) for r in ratios})
    except (TypeError, ValueError):
        raise ArgumentError(f"ratios={ratios!r}: expected numbers in (0, 1), e.g. (0.1, 0.3, 0.5)") from None
    if not values:
        raise ArgumentError("ratios: give at least one ratio in (0, 1), e.g. 0.1,0.3,0.5")
    bad = [r for r in values if not 0.0 < r < 1.0]
    if bad:
        raise ArgumentError(f"ratio {bad[0]:g} is not in (0, 1): a ratio is the share of a group's channels removed")
    return tuple(values)


# ---- measurement ------------------------------------------------------------------------
def _removed(group, scores: np.ndarray, ratio: float) -> np.ndarray:
    """The channels the allocation removes from ``group`` alone at ``ratio`` (lowest scores)."""
    from spa.allocation import _keep_every_member, _top

    n_keep = max(1, group.size - math.floor(group.size * ratio))
    keep = _keep_every_member(group, _top(scores, n_keep), scores)
    return np.setdiff1d(np.arange(group.size), np.asarray(keep, dtype=np.int64))


def layer_groups(model, groups) -> dict[str, list]:
    """Groups of each layer (``spa.depth`` units: transformer layers, else residual blocks): those
    whose producing weights all lie in the layer's own weights. Layers without a group are left out."""
    from spa import depth

    out = {}
    for unit in depth.units(depth.find_blocks(model), "layer"):
        own = set(unit.params)
        members = []
        for g in groups:
            producers = {m.param for m in g.params if m.role == "out"} or {m.param for m in g.params}
            if producers and producers <= own:
                members.append(g)
        if members:
            out[unit.key] = members
    return out


class _Probes:
    """Runs the model with a set of groups pruned: masked in one session when all are exact,
    else a pruned copy. What it saves is counted from shapes (``spa.metrics.Counter``) where
    the plan only slices the groups' axes, else on the pruned copy."""

    def __init__(self, dg, groups, feeds, input_shapes, latency: bool, runs: int, threads):
        from collections import defaultdict

        from spa import runtime
        from spa.allocation.sensitivity import masking_session
        from spa.io import to_proto
        from spa.metrics import Counter

        model = dg.model
        self.model, self.feeds, self.input_shapes = model, feeds, input_shapes
        self.coupled = defaultdict(set)  # value -> nodes that tie its axes to a group (as the rewrite reads it)
        for e in dg.edges:
            self.coupled[e.src.value].add(e.node)
            self.coupled[e.dst.value].add(e.node)
        self.latency, self.runs, self.threads = latency, runs, threads
        self.mask = True  # False: every unit runs its pruned copy (examples/bench_sensitivity.py)
        self.count_from_shapes = True  # False: every unit is counted on its pruned copy (tests)
        proto = to_proto(model)
        self.sess, self.outs, self.values = masking_session(model, groups, proto)
        self.base = [a for f in feeds for a in self.sess.run(self.outs, {**f, **self.values})]
        self.counter = Counter(model, input_shapes)
        self.params, self.macs = self.counter.params(), self.counter.macs()
        self.plain = (len(list(model.graphs())) == 1  # MAC formulas of contrib ops read attributes
                      and all(n.domain in ("", "ai.onnx") for n in model.graph))
        self.dense_ms = self.dense_sess = None
        if latency:  # timed on the inputs MACs are counted for (as `spa bench` does)
            self.dense_sess = runtime.session(proto, threads=threads)
            self.timed = runtime.random_feeds(self.dense_sess, input_shapes)
            self.dense_ms = runtime.latency_ms(self.dense_sess, self.timed, runs=runs)

    def _saved_ms(self, sess) -> float:
        """Median dense latency minus median pruned latency, the two timed in alternation (one
        run each, ``runs`` times) so that load on the machine hits both alike."""
        from spa import runtime

        dense, pruned = [], []
        for _ in range(self.runs):
            dense.append(runtime.latency_ms(self.dense_sess, self.timed, warmup=1, runs=1))
            pruned.append(runtime.latency_ms(sess, self.timed, warmup=1, runs=1))
        return float(np.median(dense) - np.median(pruned))

    def _shrunk(self, chosen) -> dict | None:
        """(value, axis) -> size left when ``chosen`` is pruned, or None where slicing the
        groups' axes is not all the plan does (a constant that a node outside the group also
        reads is copied) or where a known shape disagrees with the group."""
        graph = self.model.graph
        out = {}
        for g, removed in chosen:
            keep = np.setdiff1d(np.arange(g.size), removed)
            for m in g.members:
                if m.dim.virtual:
                    continue
                shape = self.counter.shapes.get(m.dim.value)
                if shape is None:  # no count reads it: the dense count did without it too
                    continue
                if shape[m.dim.axis] != m.size:
                    return None
                init = graph.initializers.get(m.dim.value)
                coupled = self.coupled[m.dim.value]
                if init is not None and any((node.name or f"<{node.op_type}>") not in coupled for node, _ in init.uses()):
                    return None
                out[(m.dim.value, m.dim.axis)] = int(m.kept_indices(keep).size)
        return out

    def probe(self, chosen: list, ratio: float) -> Probe:
        """``chosen``: (group, removed channels) pairs pruned together."""
        from spa import runtime
        from spa.equivalence import fidelity
        from spa.io import to_proto

        removed = sum(len(r) for _, r in chosen)
        if not removed:
            return Probe(ratio, 0, 0.0, 1.0, 0, 0, 0.0 if self.latency else None, "masked")
        exact = self.mask and all(g.exact for g, _ in chosen)
        shrunk = self._shrunk(chosen) if self.count_from_shapes and self.plain else None
        pruned = self._pruned(chosen) if not exact or self.latency or shrunk is None else None
        sess = None
        if exact:
            from spa.allocation.sensitivity import _masked

            values = dict(self.values)
            for g, r in chosen:
                values.update(_masked(g, values, r))
            got = [a for f in self.feeds for a in self.sess.run(self.outs, {**f, **values})]
        else:
            sess = runtime.session(to_proto(pruned), threads=self.threads)
            got = [a for f in self.feeds for a in sess.run(self.outs, f)]
        fid = fidelity(got, self.base)
        saved_ms = None
        if self.latency:
            saved_ms = self._saved_ms(sess or runtime.session(to_proto(pruned), threads=self.threads))
        if shrunk is not None:
            params, macs = self.counter.params(shrunk), self.counter.macs(shrunk)
        else:
            from spa.metrics import count_macs, count_params

            params, macs = count_params(pruned), count_macs(pruned, self.input_shapes)
        return Probe(ratio, removed, fid.rel_error, fid.cosine, self.params - params, self.macs - macs, saved_ms,
                     "masked" if exact else "pruned")

    def _pruned(self, chosen):
        from spa.api import pruned_copy
        from spa.plan import GroupPlan, Plan

        return pruned_copy(self.model, Plan(tuple(
            GroupPlan(g.key, g.size, tuple(int(i) for i in np.setdiff1d(np.arange(g.size), r))) for g, r in chosen)))


def _settings(model_hash, ratios, criterion, reduction, normalization, calibration, batches, seed, input_shapes,
              latency, runs, threads, device) -> dict:
    from spa import __version__
    from spa.cache import calibration_digest

    s = {"model_sha256": model_hash, "spa": __version__, "schema": SCHEMA, "ratios": list(ratios),
         "criterion": criterion, "reduction": reduction, "normalization": normalization,
         "calibration": calibration_digest(calibration), "calibration_batches": batches, "seed": seed,
         "input_shapes": input_shapes, "latency": latency}
    if latency:
        s.update(latency_runs=runs, threads=threads, device=device)
    return s


def sensitivity(model, ratios=DEFAULT_RATIOS, criterion: str = "l1", calibration=None, calibration_batches: int = 2,
                input_shapes: dict | None = None, seed: int = 0, reduction: str = "mean",
                normalization: str = "mean", latency: bool = False, latency_runs: int = 20,
                threads: int | None = None, cache: bool = True, cache_dir=None,
                progress: Progress = SILENT, device: str = "auto", provider: str | None = None) -> SensitivityResult:
    """The sensitivity of every prunable group and layer of ``model`` (a path, bytes, ModelProto
    or onnx_ir.Model) at each of ``ratios``: see the module docstring. Cached on disk (``cache_dir``,
    else ``$SPA_CACHE_DIR``, else ``~/.cache/spa``) unless ``cache=False``; a hit is returned with
    ``cached=True``."""
    from spa import cache as disk
    from spa import runtime
    from spa.criteria.registry import NORMALIZATIONS, REDUCTIONS, check_choice, get

    ratios = parse_ratios(ratios)
    spec = get(criterion)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("normalization", normalization, NORMALIZATIONS)
    if "module" in spec.needs or "gradients" in spec.needs:
        raise ArgumentError(f"criterion '{criterion}' needs an nn.Module and gradients; the sensitivity report "
                            "scores ONNX models: use l1, l2, random, bn, wanda, flap or obspa")
    if not isinstance(calibration_batches, int) or calibration_batches < 1:
        raise ArgumentError(f"calibration_batches={calibration_batches!r} (--calibration-batches) must be a "
                            "positive integer")
    if latency and (not isinstance(latency_runs, int) or latency_runs < 1):
        raise ArgumentError(f"latency_runs={latency_runs!r} (--runs) must be a positive integer")
    with runtime.use_device(device, provider) as dev:
        with progress.step("hashing the model"):
            digest = disk.model_digest(model)
        settings = _settings(digest, ratios, criterion, reduction, normalization, calibration, calibration_batches,
                             seed, input_shapes, latency, latency_runs, threads, dev.name)
        hashable = calibration is None or settings["calibration"] is not None
        path = disk.entry_path("sensitivity", settings, cache_dir) if cache and digest and hashable else None
        if path is not None:
            hit = disk.load(path)
            if hit is not None:
                try:
                    result = SensitivityResult.from_dict(hit)
                except (SpaError, KeyError, TypeError, ValueError):
                    result = None
                if result is not None:
                    result.cached, result.cache_path = True, path
                    progress.note(f"reused cached sensitivity results: {path}")
                    return result
        result = _measure(model, ratios, spec, calibration, calibration_batches, input_shapes, seed, reduction,
                          normalization, latency, latency_runs, threads, progress)
        result.model["sha256"] = digest
        result.settings = {k: v for k, v in settings.items() if k not in ("model_sha256", "schema")}
        if cache and not hashable:
            result.notes.append("not cached: the calibration source (a callable) cannot be hashed")
        if path is not None:
            try:
                disk.store(path, result.to_dict())
                result.cache_path = path
            except SpaError as exc:
                result.notes.append(f"not cached: {exc}")
        return result


def _measure(source, ratios, spec, calibration, batches, input_shapes, seed, reduction, normalization, latency,
             runs, threads, progress) -> SensitivityResult:
    from spa import calibration as cal
    from spa import runtime
    from spa.api import load
    from spa.criteria import score_groups
    from spa.depgraph import DependencyGraph
    from spa.runtime import ModelInputs

    t0 = time.perf_counter()
    with progress.step("loading and discovering groups"):
        model = load(source)
        dg = DependencyGraph(model)
        _ = dg.groups
    stats = None
    if "activations" in spec.needs:
        from spa.calibration.activations import collect_stats

        with progress.step(f"collecting activations ({spec.name})"):
            stats = collect_stats(model, dg, calibration, batches, input_shapes, seed)
    with progress.step(f"scoring ({spec.name})"):
        scores = score_groups(dg, spec.name, reduction, normalization, seed, stats=stats)
    groups = [g for g in dg.groups if g.size > 1 and scores[g.key] is not None]
    if not groups:
        raise ArgumentError(f"no group of this model can be pruned with criterion '{spec.name}' "
                            f"({len(dg.blocked_groups)} parameter axes are blocked); `spa inspect MODEL` says why")
    feeds = cal.batches(calibration, model, ModelInputs(model), batches, input_shapes, seed)[:batches]
    with progress.step("finding layers"):
        layers = layer_groups(model, groups)
    layer_of = {g.key: name for name, gs in layers.items() for g in gs}
    with progress.step("running the dense model" + (" and timing it" if latency else "")):
        probes = _Probes(dg, groups, feeds, input_shapes, latency, runs, threads)
    todo = [(g.key, "group", [g]) for g in groups] + [(name, "layer", gs) for name, gs in layers.items()]
    units, done, notes = [], {}, []
    every = max(1, len(todo) // 10)
    progress.note(f"pruning {len(groups)} groups and {len(layers)} layers alone at {len(ratios)} ratios")
    for i, (key, kind, gs) in enumerate(todo):
        keys = tuple(g.key for g in gs)
        if keys not in done:  # a layer of one group is that group
            try:
                done[keys] = tuple(probes.probe([(g, _removed(g, scores[g.key], r)) for g in gs], r) for r in ratios)
            except (SpaError, *runtime.ort_errors()) as exc:
                done[keys] = " ".join(str(exc).split())[:300]
        if isinstance(done[keys], str):
            notes.append(f"{kind} {key}: not measured, pruning it alone fails ({done[keys]})")
            continue
        units.append(Unit(key, kind, gs[0].kind if kind == "group" else None,
                          layer_of.get(key) if kind == "group" else None, keys,
                          sum(g.size for g in gs), all(g.exact for g in gs), done[keys]))
        if (i + 1) % every == 0 or i + 1 == len(todo):
            progress.note(f"  {i + 1}/{len(todo)} units ({time.perf_counter() - t0:.1f}s)")
    units.sort(key=lambda u: (u.kind != "group", u.rank_key()))
    return SensitivityResult({"params": probes.params, "macs": probes.macs, "latency_ms": probes.dense_ms}, {},
                             units, "measured" if latency else None, time.perf_counter() - t0, notes=notes)

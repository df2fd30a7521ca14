"""The driver of an allocation search: prepare the folder once, then ask Optuna for trials,
turn each into a plan, send it to a worker and tell Optuna what came back."""

from __future__ import annotations

import json
import logging
import math
import time
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from pathlib import Path

from spa.errors import ArgumentError, SpaError
from spa.plan import Plan
from spa.search import space as sp

log = logging.getLogger("spa")

STUDY = "spa-search"
JOURNAL = "study.log"
SAMPLERS = ("tpe", "cmaes", "nsga2")


@dataclass
class Settings:
    """What a study was started with (stored in the study, so `spa worker` can join it)."""

    model: str
    folder: str
    target: str  # the target's text (params=0.5, macs=0.4, bytes=40MB)
    trials: int
    objective: str = "fidelity"
    criterion: str = "l1"
    calibration: str | None = None
    calibration_batches: int = 4
    seed: int = 0
    protect: tuple = ()
    kinds: tuple | None = None
    round_to: int = 1
    input_shapes: dict | None = None
    metric: bool = False  # a user metric replaces fidelity (maximized)
    max_depth: int | None = None  # depth units a trial may remove (None: all but one of the removable; 0: none)
    key: str = ""

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Settings:
        d = dict(d)
        d["protect"] = tuple(d.get("protect") or ())
        d["kinds"] = tuple(d["kinds"]) if d.get("kinds") else None
        if isinstance(d.get("target"), (int, float)):  # studies started when the search took params only
            d["target"] = f"params={float(d['target']):g}"
        return cls(**d)

    @property
    def directions(self) -> list[str]:
        fid = "maximize" if self.metric else "minimize"
        return {"fidelity": [fid], "latency": ["minimize"], "both": [fid, "minimize"]}[self.objective]


def storage(url: str | None, folder: Path):
    """An Optuna storage: the journal file ``folder/study.log`` by default; an RDB URL
    (``sqlite:///x.db``, ``postgresql://...``) or a journal file path otherwise."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if url is None:
        return JournalStorage(JournalFileBackend(str(folder / JOURNAL)))
    if "://" in url:
        try:
            return optuna.storages.RDBStorage(url)
        except (ImportError, ValueError, optuna.exceptions.StorageInternalError) as exc:
            raise ArgumentError(f"--storage {url}: cannot open it as an RDB storage ({exc})") from exc
    return JournalStorage(JournalFileBackend(str(Path(url).resolve())))


def sampler(name: str, seed: int, n_done: int):
    """A seeded Optuna sampler; the seed moves on with the trials already done, so a resumed
    study does not replay the first run's samples."""
    import optuna

    s = seed + 7919 * n_done
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=s, multivariate=True)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=s, warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s)
    raise ArgumentError(f"--sampler {name!r} is not one of {', '.join(SAMPLERS)}")


# ---- preparing the folder -----------------------------------------------------------------
@dataclass
class Prepared:
    dg: object
    space: sp.Space
    settings: Settings


def prepare(settings: Settings, progress, workers: str = "local:1") -> Prepared:
    """Graph, scores and per-group metrics (cached in the folder by settings key), the
    calibration batches and the dense outputs (cached too), and the space. With ``workers``
    other than ``local:1``, the activations' calibration batches are sharded over them."""
    from spa import runtime
    from spa.api import dependency_graph, load
    from spa.calibration.activations import collect_stats
    from spa.criteria import get, score_groups
    from spa.search import cache

    folder = Path(settings.folder)
    with progress.step(f"loading {settings.model}"):
        model = load(settings.model)
        dg = dependency_graph(model)
        _ = dg.groups
    spec = get(settings.criterion)
    if "gradients" in spec.needs or "module" in spec.needs:
        raise ArgumentError(f"criterion '{settings.criterion}' needs an nn.Module; the search prunes ONNX files "
                            "(use l1, l2, wanda, flap or obspa)")
    stats_data = cache.load_scores(folder, settings.key, dg.groups)
    cal = cache.load_calibration(folder, settings.key)
    if stats_data is None or cal is None:
        with progress.step(f"collecting activations (calibration: {settings.calibration or 'gaussian'}"
                           + (f", sharded over {workers})" if workers != "local:1" else ")")):
            if workers == "local:1":
                stats = collect_stats(model, dg, settings.calibration, settings.calibration_batches,
                                      settings.input_shapes, settings.seed)
            else:
                from spa.calibration import sharded

                stats = sharded.collect_stats(settings.model, settings.calibration, settings.calibration_batches,
                                              settings.input_shapes, settings.seed, workers=workers, dg=dg)
        with progress.step(f"scoring ({settings.criterion}) and caching the scores in {folder}"):
            scores = score_groups(dg, settings.criterion, seed=settings.seed, stats=stats)
            scores = type(scores)({g.key: scores[g.key] for g in dg.groups}, scores.criterion, dict(scores.slots))
            stats_data = sp.statistics(dg, scores, stats, settings.protect, settings.kinds)
            cache.save_scores(folder, settings.key, dg.groups, stats_data)
        with progress.step("running the dense model on the calibration inputs"):
            sess = runtime.session(model)
            feeds = list(stats.feeds)
            cache.save_calibration(folder, settings.key, feeds, [runtime.run_flat(sess, f)[1] for f in feeds])
    else:
        progress.note(f"scores and calibration outputs read from {folder}")
    units = ()
    if settings.max_depth != 0:
        from spa import depth

        with progress.step("ranking the removable residual units (block influence)"):
            units = depth.rank_units(model, cache.load_calibration(folder, settings.key)[0])
    space = sp.Space(dg, stats_data, settings.target, settings.protect, settings.kinds, settings.round_to,
                     input_shapes=settings.input_shapes, units=units, max_depth=settings.max_depth)
    return Prepared(dg, space, settings)


# ---- the trial loop ------------------------------------------------------------------------
def _values(settings: Settings, res: dict) -> list[float]:
    fid = res["metric"] if settings.metric else res["rel_error"]
    if settings.objective == "fidelity":
        return [fid]
    return [res["latency_ms"]] if settings.objective == "latency" else [fid, res["latency_ms"]]


def counted(study) -> int:
    """Trials that count towards ``--trials``: complete ones and those that failed (not interrupted)."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")))


def enqueue_heuristics(study) -> list[str]:
    """Enqueue the heuristics not yet complete nor waiting; returns their names."""
    from optuna.trial import TrialState

    # a RUNNING one may be left over from a driver that was killed: enqueued again (at worst twice)
    have = {t.user_attrs.get("heuristic") for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.WAITING)}
    added = []
    for name, params in sp.HEURISTICS:
        if name not in have:
            study.enqueue_trial(params, user_attrs={"heuristic": name})
            added.append(name)
    return added


def run_trials(study, prepared: Prepared, pool, total: int, progress, on_trial=None) -> int:
    """Ask, plan, submit and tell until ``total`` trials count; returns how many ran here.
    Ctrl-C fails the trials in flight (marked interrupted: they do not count) and re-raises."""
    import optuna
    from optuna.trial import TrialState

    settings, space = prepared.settings, prepared.space
    flight: dict = {}  # future -> (trial, slot, t0)
    free = list(range(pool.size))
    ran = 0
    done = counted(study)  # kept here between the storage reads
    asked = None  # a trial asked and not yet submitted
    try:
        while True:
            while free and done + len(flight) < total:
                t_ask = time.perf_counter()
                asked = study.ask()
                try:
                    params = space.suggest(asked)
                    t0 = time.perf_counter()
                    plan = space.plan(params)
                except SpaError as exc:  # this trial's plan cannot be made: it fails, the study goes on
                    asked.set_user_attr("error", str(exc)[:400])
                    study.tell(asked, state=TrialState.FAIL)
                    asked = None
                    done += 1
                    continue
                # one storage write per attribute (a journal append): the plan's figures go as one
                asked.set_user_attr("plan", {"family": params["family"], "seconds": time.perf_counter() - t0,
                                             "ask_seconds": t0 - t_ask, "params_ratio": plan.meta["params_ratio"]})
                slot = free.pop(0)
                flight[pool.submit(slot, plan.to_dict())] = (asked, slot, t0)
                asked = None
            if not flight:
                done = counted(study)  # other workers (spa worker) may have added trials meanwhile
                if done >= total:
                    return ran
                continue
            finished, _ = wait(list(flight), return_when=FIRST_COMPLETED)
            for fut in finished:
                trial, slot, t0 = flight.pop(fut)
                free.append(slot)
                ran += 1
                try:
                    res = fut.result()
                except Exception as exc:  # the trial fails; a dead worker is replaced
                    from spa.search.workers import died

                    trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:400])
                    if died(pool, exc):
                        trial.set_user_attr("worker_died", True)
                        pool.restart(slot)
                    study.tell(trial, state=TrialState.FAIL)
                    done += 1
                    log.warning("trial %d failed: %s", trial.number, exc)
                    continue
                trial.set_user_attr("result", {**res, "trial_seconds": time.perf_counter() - t0})
                values = _values(settings, res)
                done += 1
                if not all(math.isfinite(v) for v in values):
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                frozen = study.tell(trial, values)
                if on_trial is not None:
                    on_trial(frozen)
    except BaseException:
        for trial in [t for t, _, _ in flight.values()] + ([asked] if asked is not None else []):
            try:
                trial.set_user_attr("interrupted", True)
                study.tell(trial, state=TrialState.FAIL)
            except (optuna.exceptions.OptunaError, RuntimeError, ValueError):
                pass
        raise


# ---- what the folder receives --------------------------------------------------------------
@dataclass
class SearchResult:
    """The best plan and the figures of the trials (see ``pareto.json``)."""

    plan: Plan
    best: dict
    heuristics: dict
    front: list
    trials: list
    folder: Path
    study: object = None
    notes: list = field(default_factory=list)
    space: object = None  # the spa.search.space.Space the plans came from

    def plan_of(self, number: int) -> Plan:
        """The plan of trial ``number`` (rebuilt from its parameters)."""
        row = next((r for r in self.trials if r["number"] == number), None)
        if row is None:
            raise ArgumentError(f"trial {number} is not a complete trial of the study")
        return self.space.plan(row["params"])

    def summary(self) -> list[str]:
        lines = []
        for name, row in self.heuristics.items():
            lines.append(f"{name:>8}: {_figures(row)}")
        lines.append(f"{'search':>8}: {_figures(self.best)} (trial {self.best['number']}, "
                     f"{self.best['family']})")
        return lines


def _figures(row: dict) -> str:
    parts = []
    if row.get("metric") is not None:
        parts.append(f"metric {row['metric']:.4f}")
    parts.append(f"rel. error {row['rel_error']:.4f}, cosine {row['cosine']:.4f}")
    parts.append(f"params {row['params_ratio']:.3f}")
    if row.get("latency_ms") is not None:
        parts.append(f"latency {row['latency_ms']:.3f} ms")
    return ", ".join(parts)


def _row(t) -> dict:
    a = {**t.user_attrs.get("result", {}), "family": t.user_attrs.get("plan", {}).get("family"),
         "heuristic": t.user_attrs.get("heuristic")}
    return {"number": t.number, "family": a.get("family"), "heuristic": a.get("heuristic"),
            "values": list(t.values), "rel_error": a.get("rel_error"), "cosine": a.get("cosine"),
            "metric": a.get("metric"), "params_ratio": a.get("params_ratio"), "latency_ms": a.get("latency_ms"),
            "params": t.params}


def _front(rows: list[dict], directions: list[str]) -> list[dict]:
    """Non-dominated rows over the objectives and the cost (latency if measured, else params)."""
    def key(r):
        vals = [v if d == "minimize" else -v for v, d in zip(r["values"], directions)]
        cost = r["latency_ms"] if r.get("latency_ms") is not None else r["params_ratio"]
        return vals + ([cost] if len(vals) == 1 else [])

    keys = [key(r) for r in rows]
    front = [r for r, k in zip(rows, keys)
             if not any(all(o <= s for o, s in zip(other, k)) and other != k for other in keys)]
    return sorted(front, key=lambda r: key(r))


def write_outputs(study, prepared: Prepared, progress) -> SearchResult:
    """best_plan.json, pareto.json and pareto.png (or a note without matplotlib)."""
    from optuna.trial import TrialState

    from spa.io import atomic_write_bytes

    settings = prepared.settings
    folder = Path(settings.folder)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not done:
        raise ArgumentError(f"no trial of the study in {folder} completed; see the failed trials' 'error' "
                            "attributes (optuna) or rerun with -v")
    rows = [_row(t) for t in done]
    sign = 1 if settings.directions[0] == "minimize" else -1
    best = min(rows, key=lambda r: (sign * r["values"][0], r["values"][1:], r["number"]))
    plan = prepared.space.plan(best["params"])
    plan = Plan(plan.groups, {**plan.meta, "search": {"trial": best["number"], "objective": settings.objective,
                                                     "criterion": settings.criterion}})
    plan.to_json(folder / "best_plan.json")
    heur = {}
    for name, _ in sp.HEURISTICS:
        mine = [r for r in rows if r["heuristic"] == name]
        if mine:
            heur[name] = mine[0]
    front = _front(rows, settings.directions)
    doc = {"objective": settings.objective, "directions": settings.directions, "target": settings.target,
           "criterion": settings.criterion, "best": best["number"], "heuristics": {k: v["number"] for k, v in heur.items()},
           "front": front, "trials": rows}
    atomic_write_bytes(folder / "pareto.json", json.dumps(doc, indent=1, default=float).encode())
    notes = []
    note = plot(rows, front, settings, folder / "pareto.png")
    if note:
        notes.append(note)
    return SearchResult(plan, best, heur, front, rows, folder, study, notes, prepared.space)


def plot(rows, front, settings: Settings, path: Path) -> str | None:
    """The trials and their front: fidelity (or the metric) against the cost."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"{path.name} not drawn: matplotlib is not installed (pip install matplotlib); pareto.json has the figures"
    import io

    from spa.io import atomic_write_bytes

    ykey = "metric" if settings.metric else "rel_error"
    xkey = "latency_ms" if all(r.get("latency_ms") is not None for r in rows) else "params_ratio"
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r[xkey] for r in rows], [r[ykey] for r in rows], s=12, c="0.6", label="trials")
    ax.plot([r[xkey] for r in front], [r[ykey] for r in front], "o-", c="C3", ms=4, label="front")
    for r in rows:
        if r["heuristic"]:
            ax.annotate(r["heuristic"], (r[xkey], r[ykey]), fontsize=8)
    ax.set_xlabel({"latency_ms": "latency (ms)", "params_ratio": "parameters (share of dense)"}[xkey])
    ax.set_ylabel({"metric": "metric", "rel_error": "relative output error"}[ykey])
    ax.set_title(f"allocation search, {settings.target}")
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return None

"""Allocation search: which per-layer allocation keeps the most of the model under a budget.

    result = spa.search("model.onnx", target="params=0.5", trials=50, out="study/")
    result.plan          # the best plan (also study/best_plan.json, for `spa apply`)

Built on Optuna (samplers, storages); see ``spa.search.space`` for the space and the target,
``spa.search.workers`` for where trials run. Uniform, global, OWL and AlphaPruning allocations
are enqueued as the first trials, so the best plan is never worse than the best of them.
The folder gets ``best_plan.json``, ``pareto.json``, ``pareto.png`` and ``study.log`` (the
Optuna journal: the same call again resumes the study).
"""

from __future__ import annotations

import os
import shutil
import sys
import types
from pathlib import Path

from spa.errors import ArgumentError
from spa.progress import SILENT, Progress
from spa.search.driver import SAMPLERS, STUDY, SearchResult, Settings
from spa.search.evaluate import OBJECTIVES


def _optuna():
    try:
        import optuna
    except ImportError as exc:
        raise ArgumentError('the allocation search needs Optuna: pip install "spa-prune[search]"') from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def search(model, target="params=0.5", trials: int = 50, *, out, objective: str = "fidelity",
           sampler: str = "tpe", criterion: str = "l1", calibration=None, calibration_batches: int = 4,
           storage: str | None = None, study: str = STUDY, workers: str = "local:1", seed: int = 0,
           metric=None, protect=(), kinds=None, round_to: int = 1, input_shapes: dict | None = None,
           shard_calibration: bool = False, max_depth: int | None = None,
           progress: Progress = SILENT) -> SearchResult:
    """Search the per-layer allocation of ``model`` (an ONNX path; a ModelProto or onnx_ir.Model
    is written into ``out`` first) for ``target`` (``params=0.5``: keep half the parameters;
    ``macs=0.4``, ``bytes=40MB``, ``params=3.5M``: any counted kind of ``spa.targets.parse``).

    ``trials`` counts the study's trials (those of an earlier run of the same study included);
    ``objective``: ``fidelity`` (relative output error against the dense model on the
    calibration inputs, minimized), ``latency`` (onnxruntime, minimized) or ``both`` (a Pareto
    front); ``metric(session) -> float`` (an onnxruntime session of the pruned model; higher is
    better) replaces fidelity, and must pickle for process or Ray workers. ``sampler``: tpe,
    cmaes or nsga2. ``storage``: an Optuna RDB URL or journal path (default ``out/study.log``).
    ``workers``: ``local:N`` (N processes; 1 runs in this process), ``ray`` or ``ray:ADDRESS``.
    Scores use ``criterion`` on ``calibration`` inputs, computed once and cached in ``out``;
    ``shard_calibration`` spreads the activations' batches over the workers
    (``spa.calibration.sharded``: the same statistics within float tolerance).
    ``max_depth``: residual units (``spa.depth``, whole layers) a trial may remove besides
    channels, the lowest block influence first (None: up to all but one of the removable units;
    0: width only).
    """
    optuna = _optuna()
    from spa.criteria.registry import check_choice
    from spa.search import cache, driver, workers as wk
    from spa.search.space import parse_target

    check_choice("objective", objective, OBJECTIVES)
    check_choice("sampler", sampler, SAMPLERS)
    wk.parse(workers)
    if sampler == "cmaes" and objective == "both":
        raise ArgumentError("--sampler cmaes optimizes one objective; --objective both needs tpe or nsga2")
    target = parse_target(target)
    if max_depth is not None and (not isinstance(max_depth, int) or max_depth < 0):
        raise ArgumentError(f"max_depth={max_depth!r} must be a count >= 0 (0: width only) or None")
    if not isinstance(trials, int) or trials < 1:
        raise ArgumentError(f"trials={trials!r} must be a positive integer")
    folder = Path(out)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:  # a model that does not load (or settings refused) leaves no folder behind
        model_path = _model_path(model, folder)
        if isinstance(calibration, (str, os.PathLike)) and Path(calibration).is_dir():
            calibration = str(Path(calibration).resolve())
        elif calibration is not None and not isinstance(calibration, str):
            raise ArgumentError("calibration for the search is a data-free name (gaussian, zipf, ...) or a directory "
                                "of .npy batches, so that workers can read it")
        settings = Settings(str(model_path), str(folder.resolve()), target.text, trials, objective, criterion, calibration,
                            calibration_batches, seed, tuple(protect), tuple(kinds) if kinds else None, round_to,
                            input_shapes, metric is not None, max_depth)
        settings.key = cache.settings_key(model_path, criterion=criterion, calibration=calibration,
                                          batches=calibration_batches, seed=seed, protect=list(protect),
                                          kinds=settings.kinds, input_shapes=input_shapes)
        st = driver.storage(storage, folder)
        found = _existing(optuna, st, study)
        if found is not None:
            if "settings" not in found.user_attrs:
                raise ArgumentError(f"the study '{study}' in {storage or folder / driver.JOURNAL} is not an SPA search "
                                    "study; pass another --study name or --storage")
            old = Settings.from_dict(found.user_attrs["settings"])
            if (old.key, old.objective, _same(old.target), old.metric, old.round_to, old.max_depth) != \
                    (settings.key, objective, _same(target), settings.metric, round_to, max_depth):
                raise ArgumentError(f"the study '{study}' in {storage or folder / driver.JOURNAL} was started with other "
                                    "settings (model, target, objective, criterion or calibration); pass another --out "
                                    "(or --study name) or remove it")
        prepared = driver.prepare(settings, progress, workers if shard_calibration else "local:1")
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    st_obj = optuna.create_study(study_name=study, storage=st, directions=settings.directions, load_if_exists=True,
                                 sampler=driver.sampler(sampler, seed, len(found.trials) if found else 0))
    st_obj.set_user_attr("settings", settings.as_dict())
    added = driver.enqueue_heuristics(st_obj)
    if added:
        progress.note(f"enqueued the heuristics: {', '.join(added)}")
    done = driver.counted(st_obj)
    if done:
        progress.note(f"resuming study '{study}': {done} of {trials} trials done")
    args = (str(model_path), settings.folder, None, objective in ("latency", "both"), metric)
    with progress.step(f"starting workers ({workers})"):
        pool = wk.pool(workers, args)
    try:
        with progress.step(f"running {max(trials - done, 0)} trials on {pool.size} worker(s)"):
            driver.run_trials(st_obj, prepared, pool, trials, progress, _reporter(progress))
    except KeyboardInterrupt:
        try:
            driver.write_outputs(st_obj, prepared, progress)
        except ArgumentError:
            pass
        raise
    finally:
        pool.close()
    return driver.write_outputs(st_obj, prepared, progress)


def _same(target) -> tuple:
    """What makes two targets the same budget (``params=0.5`` and ``params = 0.50`` are)."""
    from spa.search.space import parse_target

    t = parse_target(target)
    return t.kind, t.value, t.relative


def _reporter(progress: Progress):
    def report(trial) -> None:
        a = trial.user_attrs
        progress.note(f"trial {trial.number} ({a.get('heuristic') or a.get('plan', {}).get('family')}): "
                      f"{', '.join(f'{v:.5g}' for v in trial.values)}")

    return report if progress is not SILENT else None


def _existing(optuna, storage, name: str):
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def _model_path(model, folder: Path) -> Path:
    if isinstance(model, (str, os.PathLike)):
        path = Path(model).resolve()
        if not path.is_file():
            raise ArgumentError(f"model {model} is not a file")
        return path
    from spa.io import atomic_write_bytes, to_proto

    import onnx_ir as ir

    proto = to_proto(model) if isinstance(model, ir.Model) else model
    if not hasattr(proto, "SerializeToString"):
        raise ArgumentError("the search takes an ONNX model: a path, an onnx.ModelProto or an onnx_ir.Model")
    path = folder / "model.onnx"
    atomic_write_bytes(path, proto.SerializeToString())
    return path.resolve()


def join(storage: str, study: str = STUDY, trials: int | None = None, seed: int = 0,
         sampler: str = "tpe", metric=None, progress: Progress = SILENT) -> int:
    """Run trials of a running study from this process (``spa worker``) until it has its
    trials (or ``trials``); returns how many ran here. The study's folder and model must be
    readable here at the paths it was started with."""
    optuna = _optuna()
    from spa.search import driver, workers as wk

    st = driver.storage(storage, Path("."))
    found = _existing(optuna, st, study)
    if found is None or "settings" not in found.user_attrs:
        raise ArgumentError(f"no SPA search study '{study}' in {storage}; start one with `spa search`")
    settings = Settings.from_dict(found.user_attrs["settings"])
    if settings.metric and metric is None:
        raise ArgumentError(f"study '{study}' maximizes a Python metric, which `spa worker` cannot call; join it "
                            "from Python with spa.search.join(storage, study, metric=fn)")
    prepared = driver.prepare(settings, progress)
    st_obj = optuna.load_study(study_name=study, storage=st,
                               sampler=driver.sampler(sampler, seed + os.getpid(), len(found.trials)))
    pool = wk.InProcess((settings.model, settings.folder, wk.cpus(), settings.objective in ("latency", "both"),
                         metric))
    return driver.run_trials(st_obj, prepared, pool, trials or settings.trials, progress, _reporter(progress))


class _CallableModule(types.ModuleType):
    """``spa.search(...)`` calls :func:`search` while ``spa.search`` stays this package."""

    def __call__(self, *args, **kwargs):
        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["OBJECTIVES", "SAMPLERS", "SearchResult", "join", "search"]

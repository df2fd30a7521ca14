"""Public API: load -> dependency graph -> scores -> plan -> apply -> save; ``prune`` lives in
``spa.pipeline``.

Passes and frontends are imported inside the functions: ``import spa`` stays light and the
core never imports them at module import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import onnx_ir as ir

from spa.depgraph import CANONICAL_MARK, DependencyGraph
from spa.errors import ArgumentError, SpaError, ValidationError
from spa.plan import GroupPlan, Plan
from spa.progress import SILENT, Progress


def load(source) -> ir.Model:
    """Load an ONNX model (path, bytes, ModelProto or onnx_ir.Model) and canonicalize it.

    The source is never modified: an onnx_ir.Model is cloned first.
    """
    from spa.frontends.onnx import load as load_onnx
    from spa.passes.canonicalize import CanonicalizePass

    model = load_onnx(source)
    if isinstance(source, ir.Model):
        model = clone(model)
    CanonicalizePass()(model)
    return model


def is_loaded(model) -> bool:
    """Whether ``model`` is an onnx_ir.Model that went through :func:`load`."""
    return isinstance(model, ir.Model) and bool(model.meta.get(CANONICAL_MARK))


def loaded(model) -> ir.Model:
    """``model`` itself when it is already loaded, else ``load(model)`` (a canonical copy)."""
    return model if is_loaded(model) else load(model)


def clone(model: ir.Model) -> ir.Model:
    """A copy of a loaded model (tensors shared, so it is cheap) that stays marked loaded."""
    out = model.clone()
    out.meta.update(model.meta)
    return out


def dependency_graph(model) -> DependencyGraph:
    """Dims, couplings, groups and barriers of a model. A model that did not go through
    :func:`load` (a path, a ModelProto, a raw onnx_ir.Model) is loaded first; the graph's
    ``model`` is then that canonical copy."""
    return DependencyGraph(loaded(model))


def collect_stats(dg: DependencyGraph, calibration=None, batches: int = 8, input_shapes: dict | None = None,
                  seed: int = 0):
    """Activation statistics for wanda / flap / obspa and owl allocation: calibration data (see
    ``spa.calibration``) or data-free inputs (None: gaussian)."""
    from spa.calibration.activations import collect_stats as collect

    return collect(dg.model, dg, calibration, batches, input_shapes, seed)


def score(dg: DependencyGraph, criterion: str = "l1", reduction: str = "mean",
          normalization: str = "mean", seed: int = 0, arrays: dict | None = None, stats=None):
    """Channel scores of every group with a registered criterion (``spa.criteria``).

    ``arrays`` maps parameter names to per-element importances (gradient criteria; see
    ``spa.frontends.gradients``); ``stats`` are activation statistics (:func:`collect_stats`)
    for wanda / flap / obspa. A criterion whose needs are not given is refused
    (ArgumentError saying what is missing)."""
    from spa.criteria import score_groups

    return score_groups(dg, criterion, reduction, normalization, seed, arrays=arrays, stats=stats)


def make_plan(dg: DependencyGraph, scores, ratio: float, global_pruning: bool = False,
              round_to: int = 1, protect: Iterable[str] = (), kinds: Iterable[str] | None = None,
              gqa: str = "kv", ratios: dict | None = None) -> Plan:
    """Channels to keep per group (only groups of ``kinds`` when given: heads/channels/hidden;
    ``gqa``: kv / q / both, how GQA heads groups are pruned, see ``spa.allocation``;
    ``ratios``: a ratio per group key, from a layer-wise allocation)."""
    from spa.allocation import allocate

    return allocate(dg, scores, ratio, global_pruning, round_to, tuple(protect),
                    kinds=None if kinds is None else tuple(kinds), gqa=gqa, ratios=ratios)


def apply_in_place(model: ir.Model, plan: Plan, graph: DependencyGraph | None = None) -> ir.Model:
    """Prune a loaded model in place (``graph``: its dependency graph, when already built)."""
    from spa.errors import run_pass
    from spa.passes.apply_plan import ApplyPlanPass
    from spa.passes.cleanup import CleanupPass

    run_pass(ApplyPlanPass(plan, graph=graph), model, "applying the plan")
    run_pass(CleanupPass(), model, "cleaning up")
    return model


def pruned_copy(model: ir.Model, plan: Plan) -> ir.Model:
    """A pruned copy of a loaded model (the model is untouched)."""
    return apply_in_place(clone(model), plan)


def apply_plan(model, plan: Plan, verify: bool = True, input_shapes: dict | None = None,
               progress: Progress = SILENT, example_inputs=None, check_equivalence: bool | None = None,
               device: str = "auto", provider: str | None = None):
    """A pruned copy of ``model``; verified unless ``verify=False`` (raises ValidationError).

    ``model`` is an ONNX model (loaded, or anything :func:`load` takes), or an ``nn.Module``
    (then ``example_inputs`` are needed to trace it, and a pruned module of the same classes is
    returned): one plan prunes both. A plan with ``blocks`` removes those residual blocks first
    (``spa.depth``), then prunes the channels of the shallower model. Verification includes the equivalence check of
    ``spa.equivalence`` (None: on where the model is small enough to run twice), run on
    ``device`` / ``provider`` (see ``spa.runtime.select_device``).
    """
    from spa import runtime

    with runtime.use_device(device, provider):
        return _apply_plan(model, plan, verify, input_shapes, progress, example_inputs, check_equivalence)


def _apply_plan(model, plan, verify, input_shapes, progress, example_inputs, check_equivalence):
    from spa.frontends.torch import is_module

    if is_module(model):
        return _apply_to_module(model, plan, example_inputs, verify, progress)
    model = deep = loaded(model)
    renamed: dict = {}
    if plan.blocks:  # depth first: the plan's groups describe the shallower model
        from spa import depth

        renamed = depth.cache_changes(deep, plan.blocks)[1]
        with progress.step(f"removing {len(plan.blocks)} residual blocks"):
            model = depth.remove(clone(deep), plan.blocks)
        if verify and check_equivalence is not False:
            from spa.pipeline import _check_feeds

            depth.check_removal(deep, model, plan.blocks, _check_feeds(deep, input_shapes))
    with progress.step(f"applying plan ({len(plan.pruned_groups)} groups pruned)"):
        out = clone(model)
        dg = DependencyGraph(out)  # built once: its groups and dim facts still describe the input
        apply_in_place(out, plan, graph=dg)
    if verify:
        from spa.pipeline import check_output

        check_output(out, model, deep, dg, plan, input_shapes, True, check_equivalence, progress, renamed=renamed)
    return out


def _apply_to_module(module, plan: Plan, example_inputs, verify: bool, progress: Progress):
    from spa.frontends import torch as tf

    with progress.step("exporting the module (torch dynamo exporter)"):
        proto = tf.export(module, example_inputs)
    with progress.step("loading and discovering groups"):
        model = load(proto)
        dg = DependencyGraph(model)
    if plan.blocks:
        from spa import depth
        from spa.pipeline import _torch_depth

        remove_blocks = _torch_depth()
        model = depth.remove(model, plan.blocks)
        dg = DependencyGraph(model)
    with progress.step("slicing the module"):
        pruned = tf.slice_module(module, dg, plan, {i.name for i in proto.graph.initializer})
    if plan.blocks:
        pruned = remove_blocks(pruned, plan.blocks, {i.name for i in proto.graph.initializer})
    if verify:
        with progress.step("verifying the module against the pruned ONNX model"):
            tf.check_module(pruned, pruned_copy(model, plan), example_inputs)
    return pruned


def blame_invalid(reference: ir.Model, plan: Plan, input_shapes, run: bool, exc: ValidationError):
    """The ValidationError naming the first group whose pruning alone makes the model invalid."""
    from spa.passes.verify import verify

    for gp in plan.pruned_groups:
        single = Plan(tuple(g if g.key == gp.key else GroupPlan(g.key, g.size, tuple(range(g.size)))
                            for g in plan.groups))
        try:
            verify(pruned_copy(reference, single), reference, input_shapes, run=run)
        except (ValidationError, SpaError) as one:
            return ValidationError(
                f"pruning group '{gp.key}' makes the model invalid ({one}); nothing was written. "
                f"Keep it whole with --protect '{gp.key.rsplit(':', 1)[0]}' and report the model")
    return exc


def export_plan(plan: Plan, path: str | os.PathLike) -> Path:
    """Write ``plan`` as JSON (atomically): ``spa apply`` / ``spa.apply_plan`` read it back for
    the ONNX file or the module."""
    plan.to_json(path)
    return Path(path)


def save(model: ir.Model, path: str | os.PathLike) -> Path:
    """Write a model atomically."""
    from spa.io import save as save_model

    return save_model(model, path)


def save_module(module, path: str | os.PathLike, plan: Plan | None = None) -> Path:
    """Write a pruned ``nn.Module`` (or the result of ``spa.prune`` on one) as its sizes, its
    weights and its plan: :func:`load_module` rebuilds it from the original class, so the
    module is never pickled."""
    from spa.frontends.hf import save_module as save_sizes

    return save_sizes(module, path, plan)


def load_module(path: str | os.PathLike, build, example_inputs=None, **kwargs):
    """The module saved by :func:`save_module`, rebuilt from ``build(**kwargs)`` (the original
    class, or any callable making the dense module) shrunk to the saved sizes; with
    ``example_inputs``, the saved plan is applied again instead (``spa.apply_plan``)."""
    from spa.frontends.hf import load_module as load_sizes

    return load_sizes(path, build, example_inputs, **kwargs)


def from_pretrained(directory: str | os.PathLike, auto_class=None, **config_kwargs):
    """A pruned `transformers` model saved with ``save_pretrained``, layers of any sizes:
    built from the class the config names (or ``auto_class``), shrunk to the sizes SPA stored
    in the config, weights loaded."""
    from spa.frontends.hf import from_pretrained as load_pretrained

    return load_pretrained(directory, auto_class, **config_kwargs)


def check_output_path(model, output) -> None:
    if (output is not None and isinstance(model, (str, os.PathLike))
            and Path(output).resolve() == Path(model).resolve()):
        raise ArgumentError("the output path is the input model; SPA never overwrites its input")

"""Public API: load -> dependency graph -> scores -> plan -> apply -> save, and ``prune``.

Passes and frontends are imported inside the functions: ``import spa`` stays light and the
core never imports them at module import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import onnx
import onnx_ir as ir

from spa.depgraph import DependencyGraph
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
        model = model.clone()
    CanonicalizePass()(model)
    return model


def dependency_graph(model: ir.Model) -> DependencyGraph:
    """Dims, couplings, groups and barriers of a loaded model."""
    return DependencyGraph(model)


def score(dg: DependencyGraph, criterion: str = "l1", reduction: str = "mean",
          normalization: str = "mean", seed: int = 0, arrays: dict | None = None):
    """Channel scores of every group (see ``spa.importance``). ``arrays`` maps parameter names
    to per-element importance (gradient criteria; see ``spa.frontends.gradients``)."""
    from spa.passes.score import score_groups

    return score_groups(dg, criterion, reduction, normalization, seed, arrays=arrays)


def make_plan(dg: DependencyGraph, scores, ratio: float, global_pruning: bool = False,
              round_to: int = 1, protect: Iterable[str] = (), kinds: Iterable[str] | None = None,
              gqa: str = "kv", ratios: dict | None = None) -> Plan:
    """Channels to keep per group (only groups of ``kinds`` when given: heads/channels/hidden;
    ``gqa``: kv / q / both, how GQA heads groups are pruned, see ``spa.passes.allocate``)."""
    from spa.passes.allocate import allocate

    return allocate(dg, scores, ratio, global_pruning, round_to, tuple(protect),
                    kinds=None if kinds is None else tuple(kinds), gqa=gqa, ratios=ratios)


def _apply(model: ir.Model, plan: Plan) -> ir.Model:
    from spa.passes.apply_plan import ApplyPlanPass
    from spa.passes.cleanup import CleanupPass

    out = model.clone()
    ApplyPlanPass(plan)(out)
    CleanupPass()(out)
    return out


def apply_plan(model, plan: Plan, verify: bool = True, input_shapes: dict | None = None,
               progress: Progress = SILENT, example_inputs=None):
    """A pruned copy of ``model``; verified unless ``verify=False`` (raises ValidationError).

    ``model`` is a loaded ONNX model, or an ``nn.Module`` (then ``example_inputs`` are needed
    to trace it, and a pruned module of the same classes is returned): one plan prunes both.
    """
    from spa.frontends.torch import is_module

    if is_module(model):
        return _apply_to_module(model, plan, example_inputs, verify, progress)
    with progress.step(f"applying plan ({len(plan.pruned_groups)} groups pruned)"):
        out = _apply(model, plan)
    if verify:
        with progress.step("verifying (checker, shape inference, onnxruntime run)"):
            _verify_or_blame(out, model, plan, input_shapes)
    return out


def _verify_or_blame(out: ir.Model, reference: ir.Model, plan: Plan, input_shapes, run: bool = True):
    from spa.passes.verify import verify

    try:
        return verify(out, reference, input_shapes, run=run)
    except ValidationError as exc:
        for gp in plan.pruned_groups:
            single = Plan(tuple(g if g.key == gp.key else GroupPlan(g.key, g.size, tuple(range(g.size)))
                                for g in plan.groups))
            try:
                verify(_apply(reference, single), reference, input_shapes, run=run)
            except (ValidationError, SpaError) as one:
                raise ValidationError(
                    f"pruning group '{gp.key}' makes the model invalid ({one}); nothing was written. "
                    f"Keep it whole with --protect '{gp.key.rsplit(':', 1)[0]}' and report the model"
                ) from exc
        raise


def _apply_to_module(module, plan: Plan, example_inputs, verify: bool, progress: Progress):
    from spa.frontends import torch as tf

    with progress.step("exporting the module (torch dynamo exporter)"):
        proto = tf.export(module, example_inputs)
    with progress.step("loading and discovering groups"):
        loaded = load(proto)
        dg = dependency_graph(loaded)
    with progress.step("slicing the module"):
        pruned = tf.slice_module(module, dg, plan, {i.name for i in proto.graph.initializer})
    if verify:
        with progress.step("verifying the module against the pruned ONNX model"):
            tf.check_module(pruned, apply_plan(loaded, plan, verify=False), example_inputs)
    return pruned


def _layerwise_ratios(dg, allocation: str, ratio: float, stats, kinds) -> dict:
    from spa.passes import layerwise

    groups = [g for g in dg.groups if kinds is None or g.kind in kinds]

    def weights(name):
        return dg.values[name].const_value.numpy()

    if allocation == "alpha":
        return layerwise.alpha_ratios(groups, weights, ratio)
    return layerwise.owl_ratios(groups, weights, *stats, ratio=ratio)


def _activation_scores(dg, criterion: str, stats, reduction: str, normalization: str):
    """Scores from activations (L1 where a group has no consumer layer to read), normalized."""
    from spa.importance import group_scores, normalize
    from spa.passes import obs
    from spa.passes.score import Scores

    def l1(g):
        return group_scores(g, lambda n: dg.values[n].const_value.numpy(), "l1", reduction, "none")

    raw = obs.activation_scores(dg, criterion, *stats, fallback=l1)
    return Scores({k: None if v is None else normalize(v, normalization) for k, v in raw.items()}, criterion)


def _with_initializers(model: ir.Model, updates: dict) -> ir.Model:
    """A copy of ``model`` with some initializers' values replaced (OBSPA's reconstruction)."""
    import numpy as np

    if not updates:
        return model
    out = model.clone()
    for name, arr in updates.items():
        v = out.graph.initializers[name]
        v.const_value = ir.tensor(np.ascontiguousarray(arr), name=name)
    return out


def export_plan(plan: Plan, path: str | os.PathLike) -> Path:
    """Write ``plan`` as JSON (atomically): ``spa apply`` / ``spa.apply_plan`` read it back for
    the ONNX file or the module."""
    plan.to_json(path)
    return Path(path)


def save(model: ir.Model, path: str | os.PathLike) -> Path:
    """Write a model atomically."""
    from spa.io import save as save_model

    return save_model(model, path)


@dataclass
class PruneResult:
    """The pruned model, the plan that made it and the analysis of the input."""

    model: ir.Model
    plan: Plan
    graph: DependencyGraph
    verify_report: object = None
    saved_to: Path | None = None
    notes: list = field(default_factory=list)
    module: object = None  # the pruned nn.Module when an nn.Module was pruned

    @property
    def proto(self) -> onnx.ModelProto:
        return ir.serde.serialize_model(self.model)

    def save(self, path: str | os.PathLike) -> Path:
        self.saved_to = save(self.model, path)
        return self.saved_to


def prune(
    model,
    example_inputs=None,
    ratio: float = 0.5,
    *,
    criterion: str = "l1",
    reduction: str = "mean",
    normalization: str = "mean",
    global_pruning: bool = False,
    round_to: int = 1,
    protect: Iterable[str] = (),
    kinds: Iterable[str] | None = None,
    gqa: str = "kv",
    seed: int = 0,
    output: str | os.PathLike | None = None,
    plan_out: str | os.PathLike | None = None,
    verify: bool = True,
    run: bool = True,
    input_shapes: dict | None = None,
    progress: Progress = SILENT,
    data=None,
    loss_fn=None,
    calibration=None,
    calibration_batches: int = 8,
    allocation: str = "uniform",
) -> PruneResult:
    """Prune ``model`` (a path, bytes, onnx.ModelProto, onnx_ir.Model or torch ``nn.Module``).

    A module is traced with ``example_inputs`` (a tensor or tuple) through the torch exporter;
    ``result.module`` is then the pruned module (same classes, sliced parameters and buffers,
    updated attributes), checked against the pruned ONNX model. For ONNX inputs the second
    argument may be the ratio (``spa.prune("m.onnx", 0.3)``).

    Gradient criteria (``taylor``, ``snip``, ``grasp``) need a module and ``data``: an iterable
    of batches; ``loss_fn(module, batch)`` gives the loss (default: cross-entropy of
    ``module(x)`` against ``y`` for ``(x, y)`` batches).

    ``ratio`` is the fraction of channels removed from every group (or from all groups
    together with ``global_pruning``). Returns a :class:`PruneResult`; with ``output`` the
    pruned model is also written (atomically, only once it verified). ``run=False`` keeps the
    checker and strict shape inference but skips the onnxruntime run. ``kinds`` prunes only
    groups of those kinds: ``heads`` (attention, whole KV groups), ``channels`` (FFN, conv) and
    ``hidden`` (the residual stream; valid but not exact, as norms over it change). ``gqa``
    (``kv``, ``q``, ``both``) says whether GQA heads groups lose whole K/V groups, query heads
    within every K/V group, or both.
    """
    from spa.frontends.torch import is_module
    from spa.importance import ACTIVATION_CRITERIA, GRADIENT_CRITERIA, check_choice
    from spa.passes.layerwise import ALLOCATIONS

    check_choice("allocation", allocation, ALLOCATIONS)
    global_pruning = global_pruning or allocation == "global"

    if isinstance(example_inputs, (int, float)) and not isinstance(example_inputs, bool):
        ratio, example_inputs = float(example_inputs), None
    if (output is not None and isinstance(model, (str, os.PathLike))
            and Path(output).resolve() == Path(model).resolve()):
        raise ArgumentError("the output path is the input model; SPA never overwrites its input")
    module = model if is_module(model) else None
    if criterion in GRADIENT_CRITERIA and module is None:
        raise ArgumentError(f"criterion '{criterion}' needs gradients: pass the nn.Module (and data), not an ONNX model")
    if module is not None:
        from spa.frontends import torch as tf

        with progress.step("exporting the module (torch dynamo exporter)"):
            model = tf.export(module, example_inputs)
    with progress.step("loading and canonicalizing"):
        loaded = load(model)
    with progress.step("discovering groups"):
        dg = dependency_graph(loaded)
        groups = dg.groups
    progress.note(f"{len(groups)} prunable groups, {len(dg.blocked_groups)} blocked")
    stats = None
    if criterion in ACTIVATION_CRITERIA or allocation == "owl":
        from spa.passes import obs

        what = calibration if isinstance(calibration, str) or calibration is None else "user data"
        if isinstance(calibration, str) and calibration == "bn" and module is not None:
            from spa.frontends.bn_inputs import bn_matched_inputs

            with progress.step("synthesizing inputs matched to BatchNorm statistics"):
                calibration = bn_matched_inputs(module, example_inputs, calibration_batches, seed=seed)
        with progress.step(f"collecting activations (calibration: {what or 'gaussian'})"):
            stats = obs.collect_stats(loaded, dg, calibration, calibration_batches, input_shapes, seed)
    with progress.step(f"scoring ({criterion})"):
        arrays = None
        if criterion in GRADIENT_CRITERIA:
            from spa.frontends.gradients import gradient_importance

            arrays = gradient_importance(module, criterion, data, loss_fn)
        if criterion in ACTIVATION_CRITERIA:
            scores = _activation_scores(dg, criterion, stats, reduction, normalization)
        else:
            scores = score(dg, criterion, reduction, normalization, seed, arrays=arrays)
    ratios = _layerwise_ratios(dg, allocation, ratio, stats, kinds) if allocation in ("alpha", "owl") else None
    plan = make_plan(dg, scores, ratio, global_pruning, round_to, protect, kinds, gqa, ratios)
    plan = Plan(plan.groups, {**plan.meta, "reduction": reduction, "normalization": normalization, "seed": seed})
    updates = {}
    source_model = loaded
    if criterion == "obspa":
        with progress.step("OBSPA: greedy removal with weight reconstruction"):
            plan, updates = obs.reconstruct(dg, plan, *stats)
    elif criterion == "flap":
        updates = obs.flap_compensate(dg, plan, *stats)
    source_model = _with_initializers(loaded, updates)
    pruned = apply_plan(source_model, plan, verify=False, progress=progress)
    result = PruneResult(pruned, plan, dg)
    if verify:
        what = "checker, shape inference" + (", onnxruntime run" if run else "")
        with progress.step(f"verifying ({what})"):
            result.verify_report = _verify_or_blame(pruned, source_model, plan, input_shapes, run)
            result.notes.extend(result.verify_report.notes)
    if module is not None:
        exported = {i.name for i in model.graph.initializer}
        with progress.step("slicing the module"):
            result.module = tf.slice_module(module, dg, plan, exported, updates)
        if verify:
            with progress.step("verifying the module against the pruned ONNX model"):
                try:
                    tf.check_module(result.module, pruned, example_inputs)
                except ValidationError as exc:
                    raise tf.blame_module_group(module, source_model, dg, plan, example_inputs, exported, exc,
                                               _apply) from exc
    if plan_out is not None:
        plan.to_json(plan_out)
    if output is not None:
        with progress.step(f"writing {output}"):
            result.save(output)
    return result

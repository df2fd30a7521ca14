"""``spa.prune``: a short list of named stages over one job record.

    load -> depth -> graph -> statistics -> score -> allocate -> compensate -> apply -> target -> noop -> convert
         -> check -> module -> write

Depth pruning (``depth``) removes whole residual blocks first (``spa.depth``); the graph and
every later stage then see the shallower model, and the plan holds both.

No stage names a criterion: what a criterion needs (activations, gradients) and its optional
compensation come from its registration (``spa.criteria``). The dependency graph is built
once, on the loaded model, which is then pruned in place; the dense model is kept as a copy
that shares its tensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
import onnx_ir as ir

from spa.depgraph import DependencyGraph
from spa.errors import ArgumentError, EquivalenceError, NoopError, PlanError, ValidationError
from spa.plan import Plan
from spa.progress import SILENT, Progress

ALLOCATIONS = ("uniform", "global", "alpha", "owl", "obs", "sensitivity")


@dataclass
class PruneResult:
    """The pruned model, the plan that made it, the analysis of the input and the checks."""

    model: ir.Model
    plan: Plan
    graph: DependencyGraph  # the analysis of the input (groups, barriers); its model was pruned in place
    verify_report: object = None
    saved_to: Path | None = None
    notes: list = field(default_factory=list)
    module: object = None  # the pruned nn.Module when an nn.Module was pruned
    dense: ir.Model | None = None  # the loaded input model, unpruned
    equivalence: object = None  # spa.equivalence.EquivalenceReport
    device: str | None = None  # where SPA ran the models ("cpu", "cuda:0", a provider)
    noop: str | None = None  # why the prune removed (almost) nothing, when it did
    source: Path | None = None  # the input model's path, when it was read from one
    folder: list = field(default_factory=list)  # spa.deploy.FolderFile: what was written beside the model
    target: object = None  # spa.targets.Outcome: the target, the dense and the achieved figure
    renamed: dict = field(default_factory=dict)  # graph inputs/outputs renamed (depth's renumbered caches): old -> new
    scores: object = None  # spa.criteria.Scores the plan was allocated from (per group key)

    def signature_changes(self) -> list[dict]:
        """Graph inputs and outputs the prune changed (``spa.report.signature_changes``)."""
        from spa.report import signature_changes

        return [] if self.dense is None else signature_changes(self.dense, self.model, self.renamed)

    @property
    def proto(self) -> onnx.ModelProto:
        return ir.serde.serialize_model(self.model)

    @property
    def fidelity(self):
        return getattr(self.equivalence, "fidelity", None)

    def save(self, path: str | os.PathLike, folder: bool = True) -> Path:
        """Write the pruned model; with ``folder``, when the input model has a genai_config.json
        or config.json beside it, also the runtime's files (``spa.deploy``): the configs with
        the pruned sizes, the tokenizer files copied. A config that cannot describe the pruned
        model refuses before anything is written."""
        from spa.api import save
        from spa import deploy

        files = []
        if folder and self.source is not None and deploy.has_config(self.source):
            if deploy.same_folder(self.source, path):
                self.notes.append(f"{deploy.has_config(self.source)} and the tokenizer were not written: the output "
                                  "is in the input's folder, whose files describe the input")
            else:
                files = deploy.plan_folder(self.source, path, self.model, self.dense)
                if not files:
                    self.notes.append(f"{deploy.has_config(self.source)} was not rewritten: the model has no "
                                      "attention op or past-key input SPA reads layers and heads from")
        self.saved_to = save(self.model, path)
        try:
            deploy.write_folder(files, Path(path).parent)
        except BaseException:
            Path(path).unlink(missing_ok=True)
            Path(str(path) + ".data").unlink(missing_ok=True)
            raise
        self.folder = files
        return self.saved_to

    def folder_paths(self) -> list[Path]:
        """The files written beside the model by :meth:`save`."""
        return [] if self.saved_to is None else [self.saved_to.parent / f.name for f in self.folder]

    def form(self) -> dict:
        """Opset and IR version in and out."""
        from spa.io import output_form

        source = (self.dense.meta.get("spa.source_form") if self.dense is not None else None) or {}
        out = output_form(self.model)
        return {"opset": {"in": source.get("opset"), "out": out.opset_imports.get("", out.opset_imports.get("ai.onnx"))},
                "ir_version": {"in": source.get("ir_version"), "out": int(out.ir_version)}}

    def report(self) -> dict:
        """A JSON-ready summary: plan counts, the changed graph inputs/outputs (``signature``, and
        ``signature_lines`` as the CLI prints them), the equivalence check, fidelity, notes."""
        from spa.report import signature_lines

        groups = {g.key: g for g in self.graph.groups}
        return {
            "criterion": self.plan.meta.get("criterion"),
            "ratio": self.plan.meta.get("ratio"),
            "groups": len(self.plan.groups),
            "pruned_groups": [{"key": gp.key, "kind": groups[gp.key].kind if gp.key in groups else None,
                               "exact": groups[gp.key].exact if gp.key in groups else None,
                               "size": gp.size, "kept": len(gp.keep)} for gp in self.plan.pruned_groups],
            "blocks_removed": [{"key": b.key, "kind": b.kind, "layer": b.layer} for b in self.plan.blocks],
            "channels_removed": sum(g.removed for g in self.plan.groups),
            "channels_total": sum(g.size for g in self.plan.groups),
            "equivalence": None if self.equivalence is None else self.equivalence.as_dict(),
            "signature": self.signature_changes(),
            "signature_lines": [line.strip() for line in signature_lines(self.signature_changes())],
            "notes": list(self.notes),
            "device": self.device,
            "form": self.form(),
            "output": None if self.saved_to is None else str(self.saved_to),
            "target": None if self.target is None else self.target.as_dict(),
        }


@dataclass
class Job:
    """Arguments and intermediate results of one prune."""

    source: object
    ratio: float
    criterion: str
    reduction: str
    normalization: str
    global_pruning: bool
    round_to: int
    protect: tuple
    kinds: tuple | None
    gqa: str
    seed: int
    output: object
    plan_out: object
    report_out: object
    verify: bool
    run: bool
    check_equivalence: bool | None
    input_shapes: dict | None
    progress: Progress
    data: object
    loss_fn: object
    calibration: object
    calibration_batches: int
    allocation: str
    example_inputs: object = None
    module: object = None
    exported: set = field(default_factory=set)
    spec: object = None  # the registered criterion
    model: ir.Model | None = None
    dg: DependencyGraph | None = None
    stats: object = None
    arrays: dict | None = None
    scores: object = None
    ratios: dict | None = None
    plan: Plan | None = None
    updates: dict = field(default_factory=dict)
    dense: ir.Model | None = None
    reference: ir.Model | None = None  # dense with the compensation's weights: what the plan is applied to
    result: PruneResult | None = None
    notes: list = field(default_factory=list)
    target_opset: int | None = None
    allow_noop: bool = True
    depth: float = 0.0  # share (< 1) or count (>= 1) of residual units removed
    depth_unit: str = "layer"
    depth_score: str = "bi"
    folder: bool = True  # write the runtime's files beside the output (spa.deploy)
    deep: ir.Model | None = None  # the loaded model before depth pruning
    blocks: tuple = ()  # BlockPlans of the removed residual units
    target: object = None  # spa.targets.Target: the ratio is searched for
    threads: int | None = None  # onnxruntime intra-op threads of latency measurements
    outcome: object = None  # spa.targets.Outcome of the target search
    renamed: dict = field(default_factory=dict)  # K/V caches renumbered by depth pruning: old -> new name
    workers: str = "local:1"  # where the activation statistics' calibration batches run (spa.calibration.sharded)


# ---- stages -----------------------------------------------------------------------------
def load_stage(job: Job) -> None:
    from spa.api import load

    if job.module is not None:
        from spa.frontends import torch as tf

        with job.progress.step("exporting the module (torch dynamo exporter)"):
            proto = tf.export(job.module, job.example_inputs)
        job.exported = {i.name for i in proto.graph.initializer}
        job.source = proto
    with job.progress.step("loading and canonicalizing"):
        job.model = load(job.source)


def depth_stage(job: Job) -> None:
    """Residual units scored on calibration (or data-free) inputs and removed from the loaded
    model; the check: the shallower model equals the dense one with those branches zeroed."""
    if not job.depth:
        return
    from spa import depth as dp
    from spa.api import clone
    from spa.calibration import batches
    from spa.runtime import ModelInputs

    if job.module is not None:
        _torch_depth()
    with job.progress.step("finding residual blocks"):
        blocks = dp.find_blocks(job.model)
    with job.progress.step(f"scoring residual {job.depth_unit}s ({job.depth_score})"):
        feeds = batches(job.calibration, job.model, ModelInputs(job.model), job.calibration_batches,
                        job.input_shapes, job.seed)
        chosen = dp.select(job.model, job.depth, job.depth_unit, job.depth_score, feeds, blocks)
    job.deep = clone(job.model)
    gone, job.renamed = dp.cache_changes(job.model, chosen)
    with job.progress.step(f"removing {len(chosen)} residual {job.depth_unit}s"):
        dp.remove(job.model, chosen)
    job.blocks = dp.to_plans(chosen)
    removed = ", ".join(b.key for b in chosen)
    job.notes.append(f"depth: removed {len(chosen)} residual {job.depth_unit}s ({job.depth_score}): {removed}")
    if gone:
        job.notes.append(f"depth: {len(gone) // 2} K/V cache pairs went with their layers ({', '.join(sorted(gone))})"
                         + (f"; the {len(job.renamed)} cache inputs/outputs after them were renumbered"
                            if job.renamed else ""))
    if job.verify and job.run and job.check_equivalence is not False:
        from spa import equivalence as eq
        from spa.io import model_nbytes

        if job.check_equivalence or model_nbytes(job.deep) < eq.CHECK_LIMIT_BYTES:
            with job.progress.step("checking the shallower model against the dense one with those branches zeroed"):
                diff, tol = dp.check_removal(job.deep, job.model, chosen, _check_feeds(job.deep, job.input_shapes))
            job.notes.append(f"depth: the shallower model equals the dense model with the removed branches zeroed "
                             f"(max |diff| {diff:.2e}, tolerance {tol:.1e})")


def _torch_depth():
    """``spa.frontends.torch_depth.remove_blocks``: removes blocks from an nn.Module."""
    from spa.errors import UnsupportedModelError

    try:
        from spa.frontends.torch_depth import remove_blocks
    except ImportError as exc:
        raise UnsupportedModelError("depth pruning of an nn.Module needs spa.frontends.torch_depth, which this "
                                    "installation lacks; export the module to ONNX and prune the ONNX model with "
                                    "depth=... instead") from exc
    return remove_blocks


def graph_stage(job: Job) -> None:
    with job.progress.step("discovering groups"):
        job.dg = DependencyGraph(job.model)
        groups = job.dg.groups
    job.progress.note(f"{len(groups)} prunable groups, {len(job.dg.blocked_groups)} blocked")
    if not groups:
        blocked = job.dg.blocked_groups
        barriers = job.dg.relevant_barriers()
        if barriers:
            why = "; barriers: " + ", ".join(f"{(b.domain + '::') if b.domain else ''}{b.op} '{b.node}'"
                                              for b in barriers[:3]) + (" ..." if len(barriers) > 3 else "")
        else:
            why = f"; the first: {blocked[0].key}: {blocked[0].reason}" if blocked else ""
        job.notes.append(f"no prunable group: {len(blocked)} parameter axes are blocked{why}. "
                         "`spa inspect MODEL` lists every blocked axis and barrier")


def statistics_stage(job: Job) -> None:
    """Activations (criteria that need them, owl allocation) and gradients (those that need them)."""
    if "activations" in job.spec.needs or job.allocation == "owl":
        from spa.calibration import MODULE_SOURCES
        from spa.calibration.activations import collect_stats

        calibration = job.calibration
        what = calibration if isinstance(calibration, str) or calibration is None else "user data"
        if isinstance(calibration, str) and calibration in MODULE_SOURCES and job.module is not None:
            from spa.frontends import bn_inputs

            synth, what_to = MODULE_SOURCES[calibration]
            with job.progress.step(f"synthesizing inputs matched to {what_to}"):
                calibration = getattr(bn_inputs, synth)(job.module, job.example_inputs, job.calibration_batches,
                                                        seed=job.seed)
        if job.workers != "local:1":
            with job.progress.step(f"collecting activations (calibration: {what or 'gaussian'}, sharded over "
                                   f"{job.workers})"):
                job.stats = _sharded_stats(job, calibration)
        else:
            with job.progress.step(f"collecting activations (calibration: {what or 'gaussian'})"):
                job.stats = collect_stats(job.model, job.dg, calibration, job.calibration_batches, job.input_shapes,
                                          job.seed)
    elif job.workers != "local:1":
        job.notes.append(f"workers {job.workers}: unused, criterion '{job.criterion}' and allocation "
                         f"'{job.allocation}' collect no activation statistics (wanda, flap and obspa do)")
    if "gradients" in job.spec.needs:
        from spa.frontends.gradients import gradient_importance

        with job.progress.step(f"computing gradients ({job.criterion})"):
            job.arrays = gradient_importance(job.module, job.criterion, job.data, job.loss_fn)


def _sharded_stats(job: Job, calibration):
    """``spa.calibration.sharded.collect_stats`` of the loaded model: workers read it from a
    private file (written here: the loaded model may differ from the input, depth removed),
    run their shares of the batches and return raw sums, added up here."""
    import shutil
    import tempfile

    from spa.calibration import sharded
    from spa.io import atomic_write_bytes, to_proto

    tmp = tempfile.mkdtemp(prefix="spa-prune-")
    try:
        path = os.path.join(tmp, "model.onnx")
        atomic_write_bytes(path, to_proto(job.model).SerializeToString())
        return sharded.collect_stats(path, calibration, job.calibration_batches, job.input_shapes, job.seed,
                                     workers=job.workers, dg=job.dg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def score_stage(job: Job) -> None:
    from spa.criteria import score_groups

    with job.progress.step(f"scoring ({job.criterion})"):
        job.scores = score_groups(job.dg, job.criterion, job.reduction, job.normalization, job.seed,
                                  arrays=job.arrays, stats=job.stats, module=job.module is not None)


def allocate_stage(job: Job) -> None:
    """``obs`` (global OBS cost, ``spa.allocation.obs``) and ``sensitivity`` (masked-output probes,
    ``spa.allocation.sensitivity``) read the calibration inputs; they are collected here when the
    criterion did not need them. With a target (``spa.targets``) the ratio is searched for."""
    from spa.allocation import allocate

    layerwise = job.allocation in ("alpha", "owl", "obs", "sensitivity")
    if job.target is not None:
        plan = _target_plan(job)
    else:
        if layerwise:
            job.ratios = _layer_ratios(job, job.ratio)
        plan = allocate(job.dg, job.scores, job.ratio, job.global_pruning, job.round_to, job.protect,
                        kinds=job.kinds, gqa=job.gqa, ratios=job.ratios)
    meta = {**plan.meta, "reduction": job.reduction, "normalization": job.normalization, "seed": job.seed}
    if layerwise:
        meta["allocation"] = job.allocation
    if job.target is not None:
        meta.update({"global": job.global_pruning, "target": job.target.text})
    job.plan = Plan(plan.groups, meta)
    if job.spec.compensate is not None and "activations" in job.spec.needs:
        from spa.allocation.obs import reconstruction_note

        note = reconstruction_note(job.dg, job.plan, job.stats, job.criterion)
        if note:
            job.notes.append(note)


def _layer_ratios(job: Job, ratio: float) -> dict:
    """The per-group ratios of a layer-wise allocation at overall ``ratio``."""
    from spa.allocation import is_protected, layerwise

    groups = [g for g in job.dg.groups if job.kinds is None or g.kind in job.kinds]
    if job.allocation == "alpha":
        return layerwise.alpha_ratios(groups, job.dg.weights, ratio)
    if job.allocation == "owl":
        return layerwise.owl_ratios(groups, job.dg.weights, job.stats, ratio=ratio)
    groups = [g for g in groups if job.scores[g.key] is not None
              and not (job.protect and is_protected(g, job.protect))
              and not (g.heads is not None and g.heads.slots > 1 and job.gqa != "kv")]
    return _calibrated_ratios(job, groups, ratio)


def _target_plan(job: Job) -> Plan:
    """The plan meeting ``job.target`` (``spa.targets.search``); the overall ratio becomes the
    share of the candidate channels it removes."""
    from spa import targets

    layer = (lambda r: _layer_ratios(job, r)) if job.allocation in ("alpha", "owl", "obs") else None
    with job.progress.step(f"searching the plan for target {job.target.text}"):
        plan, job.outcome = targets.search(job, layer)
    job.notes.extend(job.outcome.notes)
    total = sum(g.size for g in plan.groups) or 1
    job.ratio = min(sum(g.removed for g in plan.groups) / total, 0.99)
    return plan


def _calibrated_ratios(job: Job, groups, ratio: float) -> dict:
    from spa import calibration as cal
    from spa import runtime
    from spa.io import to_proto

    if job.allocation == "obs":
        from spa.allocation.obs import obs_ratios
        from spa.calibration.activations import collect_stats

        if job.stats is None:
            with job.progress.step("collecting activations (obs allocation)"):
                job.stats = collect_stats(job.model, job.dg, job.calibration, job.calibration_batches,
                                          job.input_shapes, job.seed)
        with job.progress.step("allocating by global OBS cost"):
            return obs_ratios(groups, job.stats, job.dg.weights, ratio)
    from spa.allocation.sensitivity import LAST_COST, sensitivity_ratios

    with job.progress.step(f"probing the sensitivity of {len(groups)} groups"):
        sess = runtime.session(to_proto(job.model), optimize=False)
        feeds = cal.batches(job.calibration, job.model, sess, min(job.calibration_batches, 2), job.input_shapes,
                            job.seed)[:2]  # two batches: one probe run per group and batch
        ratios = sensitivity_ratios(job.model, groups, job.scores, feeds, ratio, weights=job.dg.weights)
    if LAST_COST:
        job.notes.append(f"sensitivity allocation: {LAST_COST['runs']} runs over {LAST_COST['groups']} groups "
                         f"in {LAST_COST['seconds']:.1f} s")
    return ratios


def compensate_stage(job: Job) -> None:
    """The criterion's compensation (OBSPA's reconstruction, FLAP's bias fold), if it has one.
    The dense model is kept first; the reconstructed weights go into the model to be pruned."""
    from spa.api import clone

    job.dense = clone(job.model)
    job.reference = job.dense
    if job.spec.compensate is None or not job.plan.pruned_groups:
        return
    with job.progress.step(f"compensating ({job.criterion})"):
        plan, updates = job.spec.compensate(job.dg, job.plan, job.stats)
    counts = {g.key: len(g.keep) for g in job.plan.groups}
    if any(counts.get(g.key) != len(g.keep) for g in plan.groups):
        raise PlanError(f"the {job.criterion} compensation changed the number of kept channels (a bug; "
                        "please report it)")
    inits = {name: v for g in job.model.graphs() for name, v in g.initializers.items()}  # bodies too
    quantized = sorted(n for n in updates if not inits[n].dtype.is_floating_point())
    if quantized:  # a quantized weight would be truncated to the integer grid: it stays as it is
        job.notes.append(f"{job.criterion} compensation left {len(quantized)} integer (quantized) weights "
                         f"as they are: {', '.join(quantized[:3])}{' ...' if len(quantized) > 3 else ''}")
        updates = {n: a for n, a in updates.items() if n not in quantized}
    job.plan, job.updates = plan, updates
    for name, arr in updates.items():
        v = inits[name]
        v.const_value = ir.tensor(np.ascontiguousarray(arr), name=name)
    job.reference = clone(job.model)


def apply_stage(job: Job) -> None:
    from spa.api import apply_in_place

    if job.blocks:
        from dataclasses import replace

        job.plan = replace(job.plan, blocks=job.blocks, meta={**job.plan.meta, "depth": job.depth,
                                                              "depth_unit": job.depth_unit,
                                                              "depth_score": job.depth_score})
    with job.progress.step(f"applying plan ({len(job.plan.pruned_groups)} groups pruned)"):
        apply_in_place(job.model, job.plan, graph=job.dg)
    job.result = PruneResult(job.model, job.plan, job.dg, dense=job.deep or job.dense, notes=list(job.notes),
                             scores=job.scores,
                             source=_source_path(job.source), renamed=dict(job.renamed))


def target_stage(job: Job) -> None:
    """The pruned model's real figure against the target (latency: the search timed this plan's
    model already; params / MACs / bytes are counted again on the output)."""
    if job.outcome is None:
        return
    from spa import targets

    out = job.outcome
    if out.target.kind != "latency":
        out.achieved = targets.count(out.target.kind, job.model, job.input_shapes)
    job.result.target = out


#: A prune removing less than this share of what the ratio asks for removed "almost nothing".
NOOP_SHARE = 0.1


def noop_stage(job: Job) -> None:
    """A prune that removed (almost) nothing says why: a note, or (``allow_noop=False``, the
    CLI's default) a :class:`NoopError` before anything is checked or written."""
    from spa.metrics import count_params
    from spa.report import coverage

    if job.ratio <= 0:
        return
    before, after = count_params(job.dense), count_params(job.model)
    if before == 0 or (before - after) >= NOOP_SHARE * job.ratio * before:
        return
    cov = coverage(job.dg, job.dense)
    removed = f"removed {100 * (before - after) / before:.1f}% of the parameters (ratio {job.ratio:g})"
    if cov.share < 0.5:
        why = f"only {100 * cov.share:.1f}% of the parameters are prunable"
        if cov.barriers:
            why += f"; the rest is blocked mostly by {cov.top(3)}"
    elif not job.plan.pruned_groups:
        why = "no group lost a channel (protect, kinds or round_to kept them all)"
    else:
        why = f"{100 * cov.share:.1f}% of the parameters are prunable, but the plan removed few channels"
    message = f"{removed}: {why}. `spa inspect MODEL` lists every barrier and blocked axis"
    if not job.allow_noop:
        raise NoopError(f"{message}; pass --allow-noop to write the model anyway. Nothing was written")
    job.result.noop = message
    job.result.notes.append(message)


def convert_stage(job: Job) -> None:
    """``target_opset``: the pruned model converted with onnx.version_converter (then checked
    like any output). Without it the output keeps the input's opset and IR form."""
    if job.target_opset is None:
        return
    from spa.frontends.onnx import convert_opset

    with job.progress.step(f"converting to opset {job.target_opset}"):
        job.model = convert_opset(job.model, job.target_opset)
    job.result.model = job.model


def check_stage(job: Job) -> None:
    if not job.verify:
        return
    verify, equivalence = check_output(job.model, job.reference, job.deep or job.dense, job.dg, job.plan,
                                       job.input_shapes,
                                       job.run, job.check_equivalence, job.progress, renamed=job.renamed)
    job.result.verify_report, job.result.equivalence = verify, equivalence
    job.result.notes.extend(verify.notes)
    if equivalence is not None and equivalence.skipped:
        job.result.notes.append(equivalence.summary())


def module_stage(job: Job) -> None:
    if job.module is None:
        return
    from spa.api import pruned_copy
    from spa.frontends import torch as tf

    with job.progress.step("slicing the module"):
        job.result.module = tf.slice_module(job.module, job.dg, job.plan, job.exported, job.updates)
    if job.plan.blocks:
        with job.progress.step(f"removing {len(job.plan.blocks)} residual blocks from the module"):
            job.result.module = _torch_depth()(job.result.module, job.plan.blocks, job.exported)
    if job.verify:
        with job.progress.step("verifying the module against the pruned ONNX model"):
            try:
                tf.check_module(job.result.module, job.model, job.example_inputs)
            except ValidationError as exc:
                raise tf.blame_module_group(job.module, job.reference, job.dg, job.plan, job.example_inputs,
                                            job.exported, exc, pruned_copy) from exc


def write_stage(job: Job) -> None:
    """The model, then the plan and the report; if one write fails, those already written are
    removed, so a failed prune leaves nothing behind."""
    from spa.io import atomic_write_bytes

    written: list[Path] = []
    try:
        if job.output is not None:
            with job.progress.step(f"writing {job.output}"):
                job.result.save(job.output, folder=job.folder)
            written.append(Path(job.output))
            written.extend(job.result.folder_paths())
        if job.plan_out is not None:
            job.plan.to_json(job.plan_out)
            written.append(Path(job.plan_out))
        if job.report_out is not None:
            atomic_write_bytes(Path(job.report_out), json.dumps(job.result.report(), indent=1).encode())
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
            if path.suffix == ".onnx":
                Path(str(path) + ".data").unlink(missing_ok=True)
        raise


STAGES: tuple[tuple[str, Callable[[Job], None]], ...] = (
    ("load", load_stage), ("depth", depth_stage), ("graph", graph_stage), ("statistics", statistics_stage), ("score", score_stage),
    ("allocate", allocate_stage), ("compensate", compensate_stage), ("apply", apply_stage),
    ("target", target_stage), ("noop", noop_stage), ("convert", convert_stage), ("check", check_stage),
    ("module", module_stage), ("write", write_stage),
)


# ---- the check, shared with spa.apply_plan ------------------------------------------------
def check_output(pruned: ir.Model, reference: ir.Model, dense: ir.Model, dg: DependencyGraph, plan: Plan,
                 input_shapes, run: bool, check_equivalence: bool | None, progress: Progress = SILENT,
                 renamed: dict | None = None):
    """Validity (checker, strict shape inference; blames a group when invalid), then, when
    ``run``: the equivalence check against the masked reference (``spa.equivalence``), or, when
    that is off or the model too large, one onnxruntime run that must keep the output shapes.
    ``renamed``: inputs/outputs of ``dense`` that ``reference`` holds under new names (depth's
    renumbered caches), for the fidelity run. Returns (VerifyReport, EquivalenceReport or None)."""
    from spa import equivalence as eq
    from spa.api import blame_invalid, pruned_copy
    from spa.io import model_nbytes
    from spa.passes.verify import VerifyPass, VerifyReport, verify

    with progress.step("verifying (checker, shape inference)"):
        try:
            VerifyPass()(pruned)
        except ValidationError as exc:
            try:
                VerifyPass()(reference)
            except ValidationError as dense_exc:  # not the pruning's fault: never blame a group
                raise ValidationError(
                    f"the input model itself does not pass onnx.checker with strict shape inference "
                    f"({str(dense_exc).removeprefix('the rewritten model is not valid ONNX: ')}); SPA cannot "
                    "vouch for a pruned copy of it, and nothing was written. Check the input with "
                    "onnx.checker.check_model(model, full_check=True)") from exc
            raise blame_invalid(reference, plan, input_shapes, False, exc) from exc
    report = VerifyReport(checker=True)
    if not run:
        return report, None
    size = model_nbytes(reference)
    on = check_equivalence if check_equivalence is not None else size < eq.CHECK_LIMIT_BYTES
    if not on:
        why = ("turned off" if check_equivalence is False else
               f"the model holds {size / 2**30:.1f} GiB of weights (over {eq.CHECK_LIMIT_BYTES / 2**30:.0f} GiB); "
               "pass --check-equivalence to run it anyway")
        if check_equivalence is None and size >= eq.RUN_LIMIT_BYTES:
            report.notes.append(f"not run in onnxruntime: the model holds {size / 2**30:.2f} GiB of weights (over "
                                f"{eq.RUN_LIMIT_BYTES / 2**30:.0f} GiB; checked by onnx.checker and strict shape "
                                "inference only); pass --check-equivalence to run the check anyway")
            return report, eq.EquivalenceReport(skipped=why)
        with progress.step("verifying (onnxruntime run, output shapes)"):
            try:
                report = verify(pruned, reference, input_shapes, run=True)
            except ValidationError as exc:
                raise blame_invalid(reference, plan, input_shapes, True, exc) from exc
        return report, eq.EquivalenceReport(skipped=why)
    with progress.step("checking equivalence with the masked dense model"):
        feeds = _check_feeds(reference, input_shapes)
        try:
            result = eq.check(reference, pruned, dg, plan, feeds, dense=dense, apply=pruned_copy, renamed=renamed)
        except EquivalenceError:
            raise
        except ValidationError as exc:
            raise blame_invalid(reference, plan, input_shapes, True, exc) from exc
    report.ran = result.skipped is None
    report.output_shapes = result.output_shapes
    if result.skipped:
        report.notes.append(result.skipped)
    progress.note(result.summary())
    return report, result


def _check_feeds(model: ir.Model, input_shapes) -> dict:
    """One data-free batch (batch 1, token ids over the vocabulary) for the check runs."""
    from spa.calibration import synthesize
    from spa.runtime import ModelInputs

    return next(synthesize(model, ModelInputs(model), 1, input_shapes, seed=0, batch=None))


def prune(
    model,
    example_inputs=None,
    ratio: float | None = None,
    *,
    target=None,
    threads: int | None = None,
    criterion: str = "l1",
    reduction: str = "mean",
    normalization: str = "mean",
    global_pruning: bool = False,
    round_to: int | None = None,
    protect: Iterable[str] = (),
    kinds: Iterable[str] | None = None,
    gqa: str = "kv",
    seed: int = 0,
    output: str | os.PathLike | None = None,
    plan_out: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    verify: bool = True,
    run: bool = True,
    check_equivalence: bool | None = None,
    input_shapes: dict | None = None,
    progress: Progress = SILENT,
    data=None,
    loss_fn=None,
    calibration=None,
    calibration_batches: int = 8,
    allocation: str = "uniform",
    device: str = "auto",
    provider: str | None = None,
    target_opset: int | None = None,
    allow_noop: bool = True,
    depth: float = 0.0,
    depth_unit: str = "layer",
    depth_score: str = "bi",
    folder: bool = True,
    workers: str = "local:1",
) -> PruneResult:
    """Prune ``model`` (a path, bytes, onnx.ModelProto, onnx_ir.Model or torch ``nn.Module``).

    A module is traced with ``example_inputs`` (a tensor, a tuple, or a dict of keyword inputs
    such as a tokenizer's ``BatchEncoding``) through the torch exporter, with caching off
    (``use_cache``) for the export only; ``result.module`` is then the pruned module (same
    classes, sliced parameters and buffers, updated attributes), called the same way and checked
    against the pruned ONNX model. For ONNX inputs the second
    argument may be the ratio (``spa.prune("m.onnx", 0.3)``).

    ``criterion`` is any registered criterion (``spa.criteria.names()``). Gradient criteria
    (``taylor``, ``snip``, ``grasp``) need a module and ``data``: an iterable of batches;
    ``loss_fn(module, batch)`` gives the loss (default: cross-entropy of ``module(x)`` against
    ``y`` for ``(x, y)`` batches). Activation criteria read ``calibration`` (see
    ``spa.calibration``; None: data-free gaussian inputs).
    ``workers`` (``local:N`` processes or ``ray`` / ``ray:ADDRESS``, as for ``spa.search``)
    shards the activation statistics' calibration batches (``spa.calibration.sharded``: per-shard
    sums, reduced here; the same statistics as one process within float tolerance).

    ``ratio`` is the fraction of channels removed from every group (default 0.5; 0 with
    ``depth``); ``allocation`` spreads it:
    ``uniform``, ``global`` (rank channels across groups; also ``global_pruning=True``),
    ``alpha`` / ``owl`` (a ratio per group, keeping the overall target; these cannot be combined
    with ``global_pruning``). ``kinds`` prunes only groups of those kinds (``heads``,
    ``channels``, ``hidden``); ``gqa`` (``kv``, ``q``, ``both``) says whether GQA heads groups
    lose whole K/V groups, query heads within every K/V group, or both.

    Checks: the output is valid (checker, strict shape inference), and with ``run`` it is run in
    onnxruntime against the dense model with the removed channels masked
    (``check_equivalence``: None = on below ``spa.equivalence.CHECK_LIMIT_BYTES`` of weights);
    a difference beyond tolerance names the group and nothing is written. ``result.equivalence``
    holds the figures (and fidelity against the dense model for inexact or compensated
    groups); ``report`` writes them as JSON. With ``output`` the pruned model is written
    (atomically, only once it verified).

    The output keeps the input's opset (7 and newer are read as they are) and IR form (IR 3:
    initializers listed as graph inputs); ``target_opset`` converts it with onnx's version
    converter, refusing with the op named where the converter cannot.

    A prune that removes less than a tenth of the parameters ``ratio`` asks for says why in
    ``result.notes`` (what blocks the model); with ``allow_noop=False`` it raises
    :class:`~spa.errors.NoopError` instead and writes nothing.

    ``depth`` removes whole residual units first (``spa.depth``): a share below 1 (0.25: a
    quarter of the removable units, at least one) or a count >= 1; ``depth_unit`` counts
    ``layer``s (an attention+FFN pair; the residual blocks of a model without layers) or
    ``sublayer``s; ``depth_score`` ranks them (``bi`` block influence, ``angular`` best
    contiguous span, ``greedy`` least output change, re-measured), on ``calibration`` inputs.
    Width pruning (``ratio``) then runs on the shallower model; ``result.plan.blocks`` lists
    the removed units. The check: the shallower model equals the dense model with those
    branches zeroed, and the width check runs on top of it.

    ``target`` replaces ``ratio`` with a budget (``spa.targets``): ``"params=0.5"``,
    ``"macs=0.4"``, ``"bytes=40MB"``, ``"latency=0.6"`` or ``"latency=12ms"`` (ratios to the
    dense model, or absolute figures). The plan meeting it is searched for (within 1% of the
    dense figure for params / MACs / bytes, 5% for latency; ``result.target`` says what was
    reached); with ``depth``, the removed units count toward it. Latency is measured with
    onnxruntime on ``device`` with ``threads`` intra-op threads and ``input_shapes``; its
    ``round_to`` defaults to 16 (kernels block channels; other ``round_to`` values give other
    counts, default 1 elsewhere). A target
    beyond what the prunable groups can reach raises ArgumentError saying what can be reached.

    ``folder``: when ``model`` is a path whose folder holds a ``genai_config.json`` (the
    onnxruntime-genai model builder) or ``config.json`` (Hugging Face / optimum), ``output``'s
    folder gets them rewritten with the pruned sizes and the tokenizer files copied
    (``spa.deploy``; ``result.folder`` lists them); ``False`` writes the model alone.

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) or ``provider`` (an installed
    onnxruntime execution provider) says where calibration, activations and the checks run;
    ``auto`` uses CUDA when a session can be created there, else the CPU (``result.device``).
    """
    from spa.api import check_output_path
    from spa.criteria import get
    from spa.criteria.registry import NORMALIZATIONS, REDUCTIONS, check_choice
    from spa.frontends.torch import is_module

    check_choice("allocation", allocation, ALLOCATIONS)
    target_note = None
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("normalization", normalization, NORMALIZATIONS)
    spec = get(criterion)
    if global_pruning and allocation in ("alpha", "owl"):
        raise ArgumentError(f"allocation='{allocation}' gives each group its own ratio; global pruning ranks "
                            "channels across groups instead. Choose one (drop --global, or use --allocation global)")
    global_pruning = global_pruning or allocation == "global"
    if isinstance(example_inputs, (int, float)) and not isinstance(example_inputs, bool):
        if ratio is not None:
            raise ArgumentError(f"two ratios given ({example_inputs} and ratio={ratio}); pass one")
        ratio, example_inputs = float(example_inputs), None
    if target is not None:
        from spa import targets

        if ratio is not None:
            raise ArgumentError(f"target={target!r} and ratio={ratio} are exclusive: a target chooses the ratio; "
                                "pass one of them")
        if allocation == "sensitivity":
            raise ArgumentError("allocation='sensitivity' probes every group once per ratio and cannot be searched "
                                "for a target; use uniform, global, alpha, owl or obs with a target")
        target = targets.parse(target)
        ratio = 0.0
        if round_to is None and target.kind == "latency":
            round_to = targets.LATENCY_ROUND_TO
            target_note = (f"latency target: kept channel counts are multiples of {round_to} (round_to={round_to}, "
                           "the default for latency targets: onnxruntime's fast CPU kernels block channels by 8 or "
                           "16, so other counts can run slower with fewer MACs); pass round_to to choose")
    elif ratio is None:
        ratio = 0.0 if depth else 0.5
    round_to = 1 if round_to is None else round_to
    from spa.search.workers import parse as parse_workers

    if parse_workers(workers) == ("local", 1):
        workers = "local:1"
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ArgumentError(f"threads={threads!r} must be a positive integer")
    check_output_path(model, output)
    module = model if is_module(model) else None
    if "gradients" in spec.needs and module is None:
        raise ArgumentError(f"criterion '{criterion}' needs gradients: pass the nn.Module (and data), not an ONNX model")
    if "module" in spec.needs and module is None:
        raise ArgumentError(f"criterion '{criterion}' needs an nn.Module, not an ONNX model")
    job = Job(model, ratio, criterion, reduction, normalization, global_pruning, round_to, tuple(protect),
              None if kinds is None else tuple(kinds), gqa, seed, output, plan_out, report, verify, run,
              check_equivalence, input_shapes, progress, data, loss_fn, calibration, calibration_batches,
              allocation, example_inputs=example_inputs, module=module, spec=spec, target_opset=target_opset,
              allow_noop=allow_noop, depth=depth or 0.0, depth_unit=depth_unit, depth_score=depth_score,
              folder=folder, target=target, threads=threads, workers=workers)
    if target_note:
        job.notes.append(target_note)
    from spa import depth as dp

    check_choice("depth_unit", depth_unit, dp.UNITS)
    check_choice("depth_score", depth_score, dp.SCORES)
    if depth and depth < 0:
        raise ArgumentError(f"depth {depth} is negative: pass a share in (0, 1) or a count >= 1")
    from spa import runtime

    with runtime.use_device(device, provider) as dev:
        job.progress.note(f"running models on {dev.name}" + (f": {dev.note}" if dev.note else ""))
        for _, stage in STAGES:
            stage(job)
    job.result.device = dev.name
    return job.result


def _source_path(source) -> Path | None:
    return Path(source) if isinstance(source, (str, os.PathLike)) else None


__all__ = ["ALLOCATIONS", "PruneResult", "STAGES", "check_output", "prune"]

"""The built-in equivalence check: SPA proves its own output on the user's model.

For the exact groups of a plan, the pruned model must give the outputs of the dense model with
the removed channels *masked* (their consumers' input slices zeroed). This module builds that
masked model, runs both on the same inputs and reports the largest difference; beyond tolerance
it bisects over the groups to name the guilty one. Inexact groups (a norm over the pruned axis)
and compensated criteria (OBSPA, FLAP) cannot be exact by construction: they are pruned in the
masked reference too, and a fidelity figure against the dense model (relative output error,
cosine) says how far the pruning moved the outputs.

One fidelity measure serves every caller: :func:`fidelity`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from spa.dims import Dim
from spa.errors import EquivalenceError, ValidationError
from spa.ops.quantized import output_step, real_zero

log = logging.getLogger("spa")

#: Above this many bytes of weights, ``spa prune`` skips the check by default (it runs the
#: model twice more); ``check_equivalence=True`` forces it.
CHECK_LIMIT_BYTES = 1 << 30
#: Above this many bytes of weights, the one onnxruntime run that checks output shapes is
#: skipped too (onnxruntime holds every weight in memory: a second copy of the model beside
#: SPA's streaming rewrite); the checker and strict shape inference still run, on a path.
RUN_LIMIT_BYTES = 2 << 30


@dataclass(frozen=True, slots=True)
class Fidelity:
    """Pruned vs dense outputs: relative L2 error and cosine over all float outputs."""

    rel_error: float
    cosine: float

    def as_dict(self) -> dict:
        return {"relative_error": self.rel_error, "cosine": self.cosine}


@dataclass(slots=True)
class EquivalenceReport:
    """What the check found. ``max_abs_diff`` is between the pruned model and the dense model
    with the exact groups' removed channels masked; ``fidelity`` against the dense model."""

    checked_groups: tuple[str, ...] = ()
    inexact_groups: tuple[str, ...] = ()
    unchecked: dict = field(default_factory=dict)  # group key -> why it could not be masked
    max_abs_diff: float = 0.0
    tolerance: float = 0.0
    fidelity: Fidelity | None = None
    output_shapes: dict = field(default_factory=dict)
    skipped: str | None = None

    @property
    def exact(self) -> bool:
        return self.skipped is None and self.max_abs_diff <= self.tolerance

    def as_dict(self) -> dict:
        return {
            "skipped": self.skipped,
            "checked_groups": list(self.checked_groups),
            "inexact_groups": list(self.inexact_groups),
            "unchecked_groups": dict(self.unchecked),
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "fidelity": None if self.fidelity is None else self.fidelity.as_dict(),
            "output_shapes": {k: list(v) for k, v in self.output_shapes.items()},
        }

    def summary(self) -> str:
        if self.skipped:
            return f"equivalence check skipped: {self.skipped}"
        parts = []
        if self.checked_groups:
            parts.append(f"{len(self.checked_groups)} exact groups equal the masked dense model "
                         f"(max |diff| {self.max_abs_diff:.2e}, tolerance {self.tolerance:.1e})")
        if self.fidelity is not None:
            parts.append(f"against the dense model: relative error {self.fidelity.rel_error:.4f}, "
                         f"cosine {self.fidelity.cosine:.4f}")
        if self.unchecked:
            parts.append(f"{len(self.unchecked)} groups not masked ({next(iter(self.unchecked.values()))})")
        return "; ".join(parts) or "no group pruned"


def fidelity(pruned: list[np.ndarray], dense: list[np.ndarray]) -> Fidelity:
    """Relative L2 error and cosine between two runs' float outputs (flattened together)."""
    p = np.concatenate([np.asarray(a, np.float64).ravel() for a in pruned if np.issubdtype(a.dtype, np.floating)]
                       or [np.zeros(1)])
    d = np.concatenate([np.asarray(a, np.float64).ravel() for a in dense if np.issubdtype(a.dtype, np.floating)]
                       or [np.zeros(1)])
    if p.shape != d.shape:
        return Fidelity(float("inf"), 0.0)
    nd, np_ = float(np.linalg.norm(d)), float(np.linalg.norm(p))
    rel = float(np.linalg.norm(p - d)) / nd if nd > 0 else float(np.linalg.norm(p - d))
    cos = float(p @ d) / (nd * np_) if nd > 0 and np_ > 0 else float(nd == np_)
    return Fidelity(rel, cos)


def _tolerance(outputs: list[np.ndarray]) -> tuple[float, float]:
    """(atol, rtol) for comparing a pruned run with the masked one: summation order differs."""
    half = any(a.dtype in (np.float16,) for a in outputs)
    return (1e-3, 1e-2) if half else (1e-5, 1e-4)


def _removed(member, gp) -> np.ndarray:
    keep = np.asarray(gp.keep, dtype=np.int64)
    slots = None if gp.slots is None else np.asarray(gp.slots, dtype=np.int64)
    kept = member.kept_indices(keep, slots)
    return np.setdiff1d(np.arange(member.size), kept)


def mask_groups(model: ir.Model, dg, plan, keys) -> tuple[ir.Model, dict]:
    """A copy of ``model`` with the removed channels of groups ``keys`` masked: their consumers'
    weight columns zeroed (``in`` members), or the consumed activation multiplied by a 0/1 mask
    where the consumer has no weight (a product of two activations). Returns (copy, {key:
    why it could not be masked}) for the groups left unmasked."""
    groups = {g.key: g for g in dg.groups}
    plans = {gp.key: gp for gp in plan.groups}
    out = model.clone()
    out.meta.update(model.meta)
    nodes = {n.name: n for n in ir.traversal.RecursiveGraphIterator(out.graph)}
    inits = {name: v for g in out.graphs() for name, v in g.initializers.items()}  # bodies too
    arrays: dict[str, np.ndarray] = {}
    masks: list[tuple[str, str, int, np.ndarray]] = []  # (node, value, axis, removed)
    unmasked: dict[str, str] = {}
    for key in keys:
        g, gp = groups[key], plans[key]
        consumed = [m for m in g.members if m.role == "in"]
        if not consumed:
            unmasked[key] = "no consumer reads its channels"
            continue
        for m in consumed:
            removed = _removed(m, gp)
            if removed.size == 0:
                continue
            if m.param is not None and m.param in inits:
                if m.param not in arrays:
                    arrays[m.param] = np.array(inits[m.param].const_value.numpy(), copy=True)
                idx = [slice(None)] * arrays[m.param].ndim
                idx[m.param_axis] = removed
                zero = real_zero(inits[m.param])  # an integer weight's real 0 is its zero point
                arrays[m.param][tuple(idx)] = 0 if zero is None else zero[tuple(idx)]
            elif dg.period(m.dim) is not None or m.node not in nodes:
                unmasked[key] = f"{m.dim} is a folded or unnamed axis"
            else:
                masks.append((m.node, m.dim.value, m.dim.axis, removed))
    for name, arr in arrays.items():
        inits[name].const_value = ir.tensor(arr, name=name)
    for k, (node_name, value, axis, removed) in enumerate(masks):
        node = nodes[node_name]
        for i, v in enumerate(node.inputs):
            if v is None or v.name != value or v.shape is None:
                continue
            rank, size = len(v.shape), dg.size(Dim(value, axis))
            shape = [1] * rank
            shape[axis] = int(size)
            mask = np.ones(shape, dtype=v.dtype.numpy() if v.dtype is not None else np.float32)
            idx = [slice(None)] * rank
            idx[axis] = removed
            mask[tuple(idx)] = 0
            name = f"spa_mask_{k}_{i}"
            mv = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.from_numpy(mask.dtype)),
                          const_value=ir.tensor(mask, name=name))
            node.graph.register_initializer(mv)  # the consumer may sit in a body
            mul = ir.Node("", "Mul", [v, mv], num_outputs=1, name=f"spa_mask_mul_{k}_{i}")
            mul.outputs[0].name = f"{v.name}_spa_masked_{k}_{i}"
            mul.outputs[0].shape, mul.outputs[0].type = v.shape, v.type
            node.graph.insert_before(node, mul)
            node.replace_input_with(i, mul.outputs[0])
    return out, unmasked


def _sub_plan(plan, keys):
    from spa.plan import GroupPlan, Plan

    keys = set(keys)
    return Plan(tuple(g if g.key in keys else GroupPlan(g.key, g.size, tuple(range(g.size))) for g in plan.groups),
                plan.meta)


class _Runner:
    """Runs models on fixed feeds, in onnxruntime, one session at a time."""

    def __init__(self, feeds: dict):
        self.feeds = feeds

    def run(self, model: ir.Model) -> tuple[list[str], list[np.ndarray]]:
        from spa import runtime

        return runtime.run_flat(runtime.session(model, lean=True), self.feeds)


def check(source: ir.Model, pruned: ir.Model, dg, plan, feeds: dict, dense: ir.Model | None = None,
          apply=None, renamed: dict | None = None) -> EquivalenceReport:
    """Compare ``pruned`` with ``source`` (the model the plan was applied to, compensation
    included) masked on the plan's exact groups; with ``dense`` (the unmodified input) also
    measure fidelity (``renamed``: dense inputs/outputs that ``source`` holds under new names,
    depth's renumbered caches). ``apply(model, plan)`` prunes a model (for inexact groups and bisection).
    Raises ValidationError naming the guilty group when the outputs differ."""
    from spa.runtime import ort_errors

    groups = {g.key: g for g in dg.groups}
    pruned_keys = [gp.key for gp in plan.pruned_groups if gp.key in groups]
    exact = [k for k in pruned_keys if groups[k].exact]
    inexact = [k for k in pruned_keys if not groups[k].exact]
    report = EquivalenceReport(tuple(exact), tuple(inexact))
    if not pruned_keys:
        return report
    cuts = state_cuts(dg, plan)
    runner, pruned_runner = _Runner(feeds), _Runner(_cut_feeds(feeds, dg, cuts))
    errors = ort_errors()
    reference, unmasked = _masked_reference(source, dg, plan, exact, inexact, apply)
    report.unchecked = unmasked
    report.checked_groups = tuple(k for k in exact if k not in unmasked)
    try:
        _, want = runner.run(reference)
    except errors as exc:
        report.skipped = (f"the input model does not run in onnxruntime with synthetic inputs ({exc}); "
                          "pass input shapes (--input-shape) to check the pruned model by running it")
        log.warning(report.skipped)
        return report
    del reference  # its masked and pruned weights go before the pruned model runs
    try:
        names, got = pruned_runner.run(pruned)
    except errors as exc:
        raise ValidationError(f"onnxruntime cannot run the rewritten model: {exc}") from exc
    report.output_shapes = {n: tuple(o.shape) for n, o in zip(names, got)}
    want = _cut_outputs(names, want, dg, cuts)
    _compare_shapes(names, got, want)
    atol, rtol = _tolerance(want)
    diff = max((float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)))) if g.size else 0.0
                for g, w in zip(got, want)), default=0.0)
    scale = max((float(np.max(np.abs(w))) for w in want if w.size and np.issubdtype(w.dtype, np.number)), default=0.0)
    # A requantized output may land one step off where a sum's rounding changed: allow one step.
    report.max_abs_diff, report.tolerance = diff, max(atol + rtol * scale, output_step(source.graph))
    if not diff <= report.tolerance:
        guilty = _bisect(source, dg, plan, report.checked_groups, runner, apply)
        raise EquivalenceError(
            f"the pruned model differs from the dense model with the same channels masked by {diff:.3g} "
            f"(tolerance {report.tolerance:.2g}); " + (
                f"pruning group '{guilty}' alone causes it. Nothing was written. Keep the group whole with "
                f"--protect '{guilty.rsplit(':', 1)[0]}' (protect=[...]) and report the model"
                if guilty else "no single group causes it. Nothing was written; report the model"))
    if dense is not None and (inexact or dense is not source):
        inputs = [v.name for v in dense.graph.inputs if v.name not in dense.graph.initializers]
        if renamed or not set(inputs) <= set(feeds):  # depth removed or renumbered caches
            dense_names, base = _Runner(_interface_feeds(dense, feeds, renamed or {})).run(dense)
            by_name = {(renamed or {}).get(n, n): a for n, a in zip(dense_names, base)}
            base = [by_name[n] for n in names]
        else:
            _, base = runner.run(dense)
        report.fidelity = fidelity(got, _cut_outputs(names, base, dg, cuts))
    return report


def _interface_feeds(dense: ir.Model, feeds: dict, renamed: dict) -> dict:
    """``feeds`` (for a model whose caches depth renumbered or removed) for ``dense``: a renamed
    input gets its new name's feed, a removed cache zeros shaped like a kept one."""
    out, missing = {}, []
    for v in dense.graph.inputs:
        if v.name in dense.graph.initializers:
            continue
        name = renamed.get(v.name, v.name)
        if name in feeds:
            out[v.name] = feeds[name]
        else:
            missing.append(v)
    for v in missing:
        like = next((out[u.name] for u in dense.graph.inputs if u.name in out and u.shape == v.shape), None)
        if like is None:
            raise ValidationError(f"no feed for input '{v.name}' of the dense model to measure fidelity against")
        out[v.name] = np.zeros_like(like)
    return out


def state_cuts(dg, plan) -> dict[str, np.ndarray]:
    """Kept head indices of every K/V cache (graph input or output) the plan shrinks."""
    pairs = getattr(dg, "state_pairs", ())
    axes = {Dim(n, s.axis) for s in pairs for n in (s.past, s.present)}
    groups = {g.key: g for g in dg.groups}
    cuts = {}
    for gp in plan.pruned_groups:
        g = groups.get(gp.key)
        for m in g.members if g is not None else ():
            if m.dim in axes:
                keep = np.asarray(gp.keep, dtype=np.int64)
                slots = None if gp.slots is None else np.asarray(gp.slots, dtype=np.int64)
                cuts[m.dim.value] = m.kept_indices(keep, slots)
    return cuts


def _cut(arr: np.ndarray, axis: int, kept: np.ndarray) -> np.ndarray:
    return np.take(arr, kept, axis=axis)


def _cut_feeds(feeds: dict, dg, cuts) -> dict:
    """The dense feeds with each shrunk cache input cut to its kept heads."""
    axis = {s.past: s.axis for s in getattr(dg, "state_pairs", ())}
    return {k: _cut(v, axis[k], cuts[k]) if k in cuts and k in axis else v for k, v in feeds.items()}


def _cut_outputs(names, outs, dg, cuts) -> list:
    """Reference outputs with each shrunk cache output cut to its kept heads."""
    axis = {s.present: s.axis for s in getattr(dg, "state_pairs", ())}
    return [_cut(o, axis[n], cuts[n]) if n in cuts and n in axis else o for n, o in zip(names, outs)]


def _compare_shapes(names, got, want) -> None:
    if len(got) != len(want):
        raise ValidationError(f"the rewritten model has {len(got)} outputs, the input model {len(want)}")
    for n, g, w in zip(names, got, want):
        if tuple(g.shape) != tuple(w.shape):
            raise ValidationError(f"graph output '{n}' changed shape: {tuple(w.shape)} -> {tuple(g.shape)}")


def _masked_reference(source, dg, plan, exact, inexact, apply):
    masked, unmasked = mask_groups(source, dg, plan, exact)
    if inexact:  # prune them for real in the reference: the exact groups are checked on top
        masked = apply(masked, _sub_plan(plan, inexact))
    return masked, unmasked


def _bisect(source, dg, plan, keys, runner, apply) -> str | None:
    """A group whose pruning alone breaks masked equivalence (binary search), else None."""
    def fails(subset) -> bool:
        sub = _sub_plan(plan, subset)
        try:
            pruned = apply(source, sub)
            _, got = runner.run(pruned)
        except Exception:  # noqa: BLE001 - any failure to build or run the subset counts
            return True
        ref, _ = mask_groups(source, dg, sub, subset)
        _, want = runner.run(ref)
        if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
            return True
        atol, rtol = _tolerance(want)
        scale = max((float(np.max(np.abs(w))) for w in want if w.size), default=0.0)
        return any(float(np.max(np.abs(g.astype(np.float64) - w))) > atol + rtol * scale
                   for g, w in zip(got, want) if g.size)

    keys = list(keys)
    while len(keys) > 1:
        half = keys[: len(keys) // 2]
        if fails(half):
            keys = half
        elif fails(keys[len(keys) // 2:]):
            keys = keys[len(keys) // 2:]
        else:
            return None
    return keys[0] if keys and fails(keys) else None

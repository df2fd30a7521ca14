"""Analysis: is a model valid? Checker, strict shape inference, one onnxruntime run, and
graph outputs with the same shapes as a reference model's."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from spa import runtime
from spa.errors import ValidationError
from spa.io import skeleton, skeleton_files

log = logging.getLogger("spa")


@dataclass(slots=True)
class VerifyReport:
    checker: bool = False
    ran: bool = False
    output_shapes: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


#: Ops onnxruntime registers in the default domain that onnx does not define: the checker
#: sees them in a domain of their own (skipped, like contrib ops); onnxruntime runs them.
ORT_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})
_ORT_DOMAIN = "spa.onnxruntime"


def _checkable(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` (a fresh serialization) with those ops moved to their own domain."""
    nodes = [n for n in proto.graph.node if n.domain in ("", "ai.onnx") and n.op_type in ORT_DEFAULT_DOMAIN_OPS
             and not onnx.defs.has(n.op_type)]
    for n in nodes:
        n.domain = _ORT_DOMAIN
    if nodes:
        proto.opset_import.add(domain=_ORT_DOMAIN, version=1)
    return proto


def check_structure(model: ir.Model) -> None:
    """onnx.checker with full (strict) shape inference, on a path: the model's skeleton (its
    large weights as references to a sparse placeholder file, ``spa.io.skeleton_files``), so
    that models of any size, with external data anywhere, are checked without copying their
    weights. Raises ValidationError."""
    proto, _, span = skeleton(model)
    try:
        with skeleton_files(model, _checkable(proto), span) as path:
            onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ValidationError(f"the rewritten model is not valid ONNX: {str(exc).strip()}") from exc


class VerifyPass(ir.passes.PassBase):
    """Analysis pass: raises ValidationError unless the model passes onnx.checker with strict
    shape inference. It changes nothing."""

    in_place = True
    changes_input = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        check_structure(model)
        return ir.passes.PassResult(model, False)


def _run(model: ir.Model, input_shapes, seed: int = 0):
    from spa.state import state_symbols

    sess = runtime.session(model, lean=True)
    feeds = runtime.random_feeds(sess, {**state_symbols(model), **(input_shapes or {})}, seed)
    names, out = runtime.run_flat(sess, feeds)
    return names, feeds, out


def _without(shape, axis: int) -> tuple:
    return tuple(d for a, d in enumerate(shape) if a != axis)


def verify(model: ir.Model, reference: ir.Model | None = None, input_shapes: dict | None = None,
           run: bool = True) -> VerifyReport:
    """Raise ValidationError unless ``model`` is valid and, when run, keeps ``reference``'s
    output shapes on the same inputs."""
    report = VerifyReport()
    VerifyPass()(model)
    report.checker = True
    if not run:
        return report
    errors = runtime.ort_errors()
    ref_shapes = None
    if reference is not None:
        try:
            _, _, ref_out = _run(reference, input_shapes)
            ref_shapes = [o.shape for o in ref_out]
        except errors as exc:
            report.notes.append(f"the input model does not run in onnxruntime with synthetic inputs ({exc}); "
                                "pass input shapes to check the pruned model by running it")
            log.warning(report.notes[-1])
            return report
    try:
        names, _, out = _run(model, input_shapes)
    except errors as exc:
        raise ValidationError(f"onnxruntime cannot run the rewritten model: {exc}") from exc
    report.ran = True
    report.output_shapes = {n: tuple(o.shape) for n, o in zip(names, out)}
    if ref_shapes is not None:
        if len(out) != len(ref_shapes):
            raise ValidationError(f"the rewritten model has {len(out)} outputs, the input model {len(ref_shapes)}")
        from spa.state import find_state_pairs

        state = {s.present: s.axis for s in find_state_pairs(model.graph)}  # heads may shrink
        for n, o, r in zip(names, out, ref_shapes):
            got, want = tuple(o.shape), tuple(r)
            if n in state and len(got) == len(want):
                got, want = _without(got, state[n]), _without(want, state[n])
            if got != want:
                raise ValidationError(f"graph output '{n}' changed shape: {tuple(r)} -> {tuple(o.shape)}")
    return report

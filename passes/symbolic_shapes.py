"""Pass: onnxruntime's symbolic shape inference where ONNX's leaves made-up symbols.

ONNX shape inference names every size it cannot derive ``unk__N``, and derives a fresh one at
each Reshape whose target is computed from ``Shape`` (the usual form of exports with dynamic
axes), so ``batch`` and ``seq`` on both sides of an attention block no longer match.
onnxruntime's symbolic inference (``onnxruntime.tools.symbolic_shape_infer``, written for
transformer graphs) keeps the graph's own symbols through such reshapes and writes folded
axes as products (``4*batch``). Its result replaces a shape only where it knows more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile

import onnx_ir as ir

log = logging.getLogger("spa")


def _entry(d):
    return d if isinstance(d, int) else getattr(d, "value", d)


#: onnxruntime names a size it derives at one op ``<node>_o<i>__d<axis>``.
_OP_MADE = re.compile(r"_o\d+__d\d+$")


def _known(entry) -> int:
    """How much an entry says: 2 for a static size or a graph symbol, 1 for a size named after
    the op that made it, 0 for nothing (None, or ONNX inference's ``unk__N``)."""
    if isinstance(entry, int):
        return 2
    if entry is None or entry.startswith("unk__"):
        return 0
    return 1 if _OP_MADE.search(entry) else 2


def _unknowns(shape) -> int:
    if shape is None:
        return 1 << 30
    return sum(_known(_entry(d)) == 0 for d in shape)


def _merged(old, new: list) -> list | None:
    """``old`` with each entry replaced by ``new``'s where that one says more: a static size or
    a graph symbol never gives way to a made-up one. None when nothing improves."""
    if old is None:
        return new
    out = [_entry(d) for d in old]
    changed = False
    for i, n in enumerate(new):
        if _known(n) > _known(out[i]):
            out[i] = n
            changed = True
    return out if changed else None


def _spatial_only(shape) -> bool:
    """The unknown entries are the batch axis or spatial axes of an image-like tensor (rank 4
    or 5, axes >= 2): resizes of an input with dynamic height and width. No rule sizes a
    channel group from them, and onnxruntime's inference, slow on Resize-heavy detectors, could
    only name them after the op."""
    entries = [_entry(d) for d in shape]
    unknown = [a for a, e in enumerate(entries) if _known(e) == 0]
    return len(entries) in (4, 5) and all(a == 0 or a >= 2 for a in unknown)


def needs_symbolic_inference(model: ir.Model) -> bool:
    """Whether a tensor (not integer shape arithmetic) still has an unknown size that matters."""
    for node in model.graph:
        for v in node.outputs:
            untyped = v.dtype is None and v.shape is None  # after an op ONNX inference does not know
            if v.dtype is not None and v.dtype.is_integer():
                continue
            if untyped or v.shape is None or (_unknowns(v.shape) and not _spatial_only(v.shape)):
                return True
    return False


def _symbolic_shape_inference():
    """onnxruntime's ``SymbolicShapeInference``, read from its file: importing it through
    ``onnxruntime.tools`` runs that package's ``__init__``, which imports torch when installed
    (seconds, and nothing of it is used here)."""
    import importlib.util
    import sys

    name = "onnxruntime.tools.symbolic_shape_infer"
    if name not in sys.modules:
        ort = importlib.util.find_spec("onnxruntime")
        path = os.path.join(os.path.dirname(ort.origin), "tools", "symbolic_shape_infer.py") if ort else ""
        private = "spa._ort_symbolic_shape_infer"
        if private not in sys.modules and os.path.isfile(path):
            spec = importlib.util.spec_from_file_location(private, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[private] = module
        if private in sys.modules:
            return sys.modules[private].SymbolicShapeInference
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    return SymbolicShapeInference


@contextlib.contextmanager
def _private_cwd(span: int = 0):
    """Run in a private temporary directory: when the tool falls back to ONNX inference for an op
    it does not know, it writes ``sym_shape_infer_temp.onnx`` (and its external data) into the
    working directory. SPA writes its outputs and nothing else, so that goes here and is removed.
    It also holds the sparse placeholder (``span`` bytes, no disk blocks) that the skeleton's
    weight references name (``spa.io.skeleton``)."""
    from spa.io import REFERENCE_FILE

    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="spa-symshape-") as tmp:
        with open(os.path.join(tmp, REFERENCE_FILE), "wb") as f:
            f.truncate(span)
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(old)


class SymbolicShapesPass(ir.passes.InPlacePass):
    """Merge onnxruntime's symbolic shapes into values whose shapes have unknown entries."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not needs_symbolic_inference(model):
            return ir.passes.PassResult(model, False)
        try:
            from spa.io import skeleton

            SymbolicShapeInference = _symbolic_shape_inference()
            # the float weights as references (the tool reads their dims, not their values): the
            # model is not copied into protobuf, twice, to learn its shapes
            proto, _, span = skeleton(model, floating_only=True)
            with _private_cwd(span):
                inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
        except Exception as exc:  # the tool raises on ops it does not know; ONNX's shapes stay
            log.debug("onnxruntime symbolic shape inference failed: %s", exc)
            return ir.passes.PassResult(model, False)
        if inferred is None:
            return ir.passes.PassResult(model, False)
        better, types = {}, {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in vi.type.tensor_type.shape.dim]
            better[vi.name] = dims
            types[vi.name] = vi.type.tensor_type.elem_type
        modified = False
        for node in model.graph:
            for v in node.outputs:
                dims = better.get(v.name)
                if dims is None:
                    continue
                if v.type is None and types[v.name]:
                    v.type = ir.TensorType(ir.DataType(types[v.name]))
                    modified = True
                if v.shape is not None and len(v.shape) != len(dims):
                    continue
                merged = _merged(v.shape, dims)
                if merged is not None:
                    v.shape = ir.Shape(merged)
                    modified = True
        return ir.passes.PassResult(model, modified)

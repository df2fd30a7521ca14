"""The one error hierarchy of SPA: every failure a user can meet is a SpaError."""

from __future__ import annotations


class SpaError(Exception):
    """Base class of every error SPA raises on purpose."""


class FrontendError(SpaError):
    """A model could not be read or lowered (malformed file, unsupported opset, ...)."""


class UnsupportedModelError(SpaError):
    """The model is readable but SPA cannot analyse or prune it as asked."""


class PlanError(SpaError):
    """A pruning plan is malformed or does not match the model it is applied to."""


class ValidationError(SpaError):
    """A rewritten model failed a validity check; nothing was written."""


class EquivalenceError(ValidationError):
    """The pruned model differs from the dense model with the same channels masked."""


class NoopError(SpaError):
    """A prune that would remove (almost) nothing: the message says what blocks the model."""


class ArgumentError(SpaError):
    """A user-supplied argument is invalid."""


class RuntimeMissingError(SpaError):
    """No onnxruntime build is installed (SPA's core requires neither the CPU nor the GPU one)."""


class CanonicalizationError(FrontendError):
    """A canonicalization pass (from onnx-ir or onnxscript) failed on the model."""


def run_pass(p, model, what: str):
    """Run an onnx-ir pass, turning upstream failures into a :class:`FrontendError` that
    names the pass. onnx-ir raises ``PassError`` (wrapping the real error: a cycle, a value
    output by two graphs) and its serializer ``SerdeError``; both reach users of valid-looking
    files, so they are reported here, in one place."""
    import onnx_ir as ir

    try:
        return p(model)
    except SpaError:
        raise
    except (ir.passes.PassError, ir.serde.SerdeError, ValueError, TypeError, KeyError, IndexError,
            RecursionError) as exc:
        inner = exc
        while inner.__cause__ is not None and not isinstance(inner.__cause__, SpaError):
            inner = inner.__cause__
        if isinstance(inner.__cause__, SpaError):
            raise inner.__cause__ from exc
        failed = type(p).__name__
        raise CanonicalizationError(
            f"{what} failed in {failed}: {type(inner).__name__}: {str(inner).strip() or inner!r}. The model "
            "may be malformed (a cycle, a value produced twice, a subgraph output shared between branches); "
            "check it with onnx.checker.check_model") from exc

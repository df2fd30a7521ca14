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


class ArgumentError(SpaError):
    """A user-supplied argument is invalid."""

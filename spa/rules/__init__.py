"""Op coupling rules, one table keyed by (domain, op_type). Importing this package fills it."""

from spa.rules import conv, elementwise, linear, norm, reduce, slicing, view  # noqa: F401
from spa.rules.registry import (
    Edge,
    Fixup,
    RuleContext,
    RuleOutput,
    RuleRefusal,
    lookup,
    register,
    register_family,
    registered_ops,
)

__all__ = [
    "Edge",
    "Fixup",
    "RuleContext",
    "RuleOutput",
    "RuleRefusal",
    "lookup",
    "register",
    "register_family",
    "registered_ops",
]

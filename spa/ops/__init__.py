"""The op table. Importing this package registers every op family; one file per family.

Adding an op is one registration in one file (see the README's "How it works")::

    from spa.ops import RuleContext, op

    @op("FusedConv", domain="com.microsoft", layer=conv_layer, macs=conv_macs)
    def fused_conv(ctx: RuleContext) -> None:
        ...
"""

from spa.ops import conv, elementwise, linear, norm, reduce, slicing, view  # noqa: F401
from spa.ops import contrib  # noqa: F401  (after the families it reuses)
from spa.ops.context import Edge, RuleContext, RuleOutput, RuleRefusal
from spa.ops.fixups import ApplyOps, Fixup
from spa.ops.layers import LayerView
from spa.ops.registry import (
    DuplicateOpError,
    OpSpec,
    lookup_spec,
    model_opsets,
    op,
    register_family,
    register_spec,
    registered_ops,
    spec_of,
)

__all__ = [
    "ApplyOps", "DuplicateOpError", "Edge", "Fixup", "LayerView", "OpSpec", "RuleContext", "RuleOutput",
    "RuleRefusal", "lookup_spec", "model_opsets", "op", "register_family", "register_spec",
    "registered_ops", "spec_of",
]

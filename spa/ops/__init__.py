"""The op table. Importing this package registers every op family; one file per family.

Every module of this package is imported, so adding an op is one registration in one file,
new or existing (see the README's "How it works")::

    from spa.ops import RuleContext, op

    @op("FusedConv", domain="com.microsoft", layer=conv_layer, macs=conv_macs)
    def fused_conv(ctx: RuleContext) -> None:
        ...
"""

import importlib
import pkgutil

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

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

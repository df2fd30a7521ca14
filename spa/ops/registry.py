"""The op table: everything SPA knows about an op, in one :class:`OpSpec` per key.

A spec is keyed by ``(domain, op_type)`` and an opset range of that domain. It holds

* ``rule``: the coupling rule (reads one node through a ``RuleContext``),
* ``shape``: shape completion where ONNX inference stops (output shapes from the node),
* ``layer``: how the op consumes a group's channels as a layer (weight and input-column
  layout, for OBSPA / Wanda / FLAP), see ``spa.ops.layers``,
* ``macs``: multiply-accumulates of one call, from concrete input and output shapes,
* ``weight_view``: the op only converts or lays out a weight (``"convert"``, ``"transpose"``
  or ``"reshape"``); analyses see through it to the parameter's name.

Registering a key whose opset range overlaps an existing one is an error, so an op has one
place. Families (unary elementwise, broadcasting, pooling, ...) are registered in bulk.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:  # pragma: no cover
    import onnx_ir as ir

    from spa.groups import Member
    from spa.ops.context import RuleContext
    from spa.ops.layers import LayerView

Rule = Callable[["RuleContext"], None]
ShapeFn = Callable[["ir.Node"], "list | None"]
LayerFn = Callable[["ir.Node", "Member"], "LayerView | None"]
MacsFn = Callable[["ir.Node", list, list], "int | None"]

#: Domain names as exporters spell them; the default domain has two spellings.
DEFAULT_DOMAINS = ("", "ai.onnx")
WEIGHT_VIEWS = ("convert", "transpose", "reshape")


def norm_domain(domain: str) -> str:
    return "" if domain in DEFAULT_DOMAINS else domain


@dataclass(frozen=True, slots=True)
class OpSpec:
    """What SPA knows about one op over an opset range ``[since, until]`` of its domain."""

    domain: str
    op_type: str
    rule: Rule | None = None
    since: int = 1
    until: int | None = None
    shape: ShapeFn | None = None
    layer: LayerFn | None = None
    macs: MacsFn | None = None
    weight_view: str | None = None

    def covers(self, opset: int) -> bool:
        return self.since <= opset and (self.until is None or opset <= self.until)

    def overlaps(self, other: OpSpec) -> bool:
        lo = max(self.since, other.since)
        hi = min(x for x in (self.until, other.until, 1 << 30) if x is not None)
        return lo <= hi


class DuplicateOpError(RuntimeError):
    """A second registration of an op key over an overlapping opset range (a bug in SPA or in
    an extension, raised at import time)."""


_SPECS: dict[tuple[str, str], list[OpSpec]] = {}


def register_spec(spec: OpSpec) -> OpSpec:
    if spec.weight_view is not None and spec.weight_view not in WEIGHT_VIEWS:
        raise ValueError(f"weight_view={spec.weight_view!r} is not one of {WEIGHT_VIEWS}")
    key = (norm_domain(spec.domain), spec.op_type)
    spec = replace(spec, domain=key[0])
    for other in _SPECS.get(key, []):
        if other.overlaps(spec):
            dom = f"{key[0]}::" if key[0] else ""
            raise DuplicateOpError(f"op {dom}{spec.op_type} is already registered for opsets "
                                   f"{other.since}..{other.until or 'latest'}")
    _SPECS.setdefault(key, []).append(spec)
    return spec


def op(*op_types: str, domain: str = "", since: int = 1, until: int | None = None,
       shape: ShapeFn | None = None, layer: LayerFn | None = None, macs: MacsFn | None = None,
       weight_view: str | None = None) -> Callable[[Rule], Rule]:
    """Decorator: register the decorated rule (and the other facts) for each op type given."""

    def deco(rule: Rule) -> Rule:
        for t in op_types:
            register_spec(OpSpec(domain, t, rule, since, until, shape, layer, macs, weight_view))
        return rule

    return deco


def register_family(op_types: Iterable[str], rule: Rule, domain: str = "", **facts) -> None:
    """Register one rule (and the same facts) for a family of ops."""
    for t in sorted(op_types):
        register_spec(OpSpec(domain, t, rule, **facts))


def lookup_spec(domain: str, op_type: str, opset: int | None = None) -> OpSpec | None:
    """The spec for ``(domain, op_type)`` at ``opset`` (the latest range when None)."""
    specs = _SPECS.get((norm_domain(domain), op_type))
    if not specs:
        return None
    if opset is None:
        return max(specs, key=lambda s: s.since)
    return next((s for s in specs if s.covers(opset)), None)


def spec_of(node: ir.Node, opsets: dict[str, int] | None = None) -> OpSpec | None:
    """The spec of ``node`` under the model's opset imports (``model_opsets``)."""
    domain = norm_domain(node.domain)
    opset = (opsets or {}).get(domain)
    return lookup_spec(domain, node.op_type, opset)


def model_opsets(model: ir.Model) -> dict[str, int]:
    """Opset per domain, the default domain read however it is spelled ("" or "ai.onnx")."""
    out = {}
    for domain, version in model.opset_imports.items():
        out.setdefault(norm_domain(domain), int(version))
    return out


def registered_ops() -> list[tuple[str, str]]:
    return sorted(_SPECS)


def weight_view_ops() -> frozenset[str]:
    """Default-domain op types that only view a weight."""
    return frozenset(t for (d, t), specs in _SPECS.items() if not d and any(s.weight_view for s in specs))

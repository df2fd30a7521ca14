"""The fix-up protocol: what a rule's rewrite may ask and do once the kept channels are known.

A rule declares a fix-up with ``ctx.fixup(what, fn)``; the apply-plan pass calls ``fn`` with an
object implementing :class:`ApplyOps` (``spa.passes.apply_plan.ApplyContext``). Fix-ups only
rewrite attributes and shape constants; slicing weights and value shapes is the pass's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import onnx_ir as ir

    from spa.dims import Dim


class ApplyOps(Protocol):
    """Queries and edits available to a fix-up."""

    def is_pruned(self, d: Dim) -> bool:
        """Whether dim ``d`` loses indices under the plan."""

    def kept(self, d: Dim) -> np.ndarray | None:
        """Kept indices of ``d`` (None when not pruned)."""

    def old_size(self, d: Dim) -> int:
        """Length of ``d`` before pruning (a periodic axis: its full length)."""

    def new_size(self, d: Dim) -> int:
        """Length of ``d`` after pruning."""

    def set_attr(self, node: ir.Node, name: str, value: Any) -> None:
        """Set attribute ``name`` of ``node``."""

    def remove_attr(self, node: ir.Node, name: str) -> None:
        """Drop attribute ``name`` of ``node`` if present."""

    def set_input_const(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        """Point input ``index`` of ``node`` at a new initializer holding ``array``."""

    def private_producer(self, node: ir.Node, index: int) -> ir.Node | None:
        """The producer of input ``index``, copied first when others read its output too."""


@dataclass(slots=True)
class Fixup:
    """A rewrite a rule asks for once kept channels are known (attribute or shape constant)."""

    node: str
    what: str
    apply: Callable[[ApplyOps], None]

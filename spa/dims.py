"""Dims (one axis of one tensor) and the index maps that tie them together."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True, order=True)
class Dim:
    """Axis ``axis`` of the tensor named ``value``.

    Virtual dims (``virtual=True``) stand for quantities that are not a tensor axis,
    such as the number of groups of a grouped Conv; rules use them to tie axes that
    move together in blocks.
    """

    value: str
    axis: int
    virtual: bool = False

    def __str__(self) -> str:
        return f"{self.value}[{self.axis}]" if not self.virtual else f"<{self.value}>"


@dataclass(frozen=True, slots=True)
class IndexMap:
    """Maps an index of a source dim to the index of a target dim it is tied to.

    identity: ``j = i``; offset: ``j = i + k`` (Concat/Split/Slice);
    block: ``j = i // k`` (a fine axis folded from a coarse one: Flatten, heads, groups);
    mod: ``j = i % k`` (an axis folded under an index axis that is not a channel, such as
    ``[directions, hidden] -> [directions*hidden]``).
    """

    kind: str = "identity"
    k: int = 0

    def apply(self, idx: np.ndarray) -> np.ndarray:
        if self.kind == "identity":
            return idx
        if self.kind == "offset":
            return idx + self.k
        if self.kind == "block":
            return idx // self.k
        if self.kind == "mod":
            return idx % self.k
        raise ValueError(f"unknown index map kind {self.kind!r}")

    def __str__(self) -> str:
        if self.kind == "identity":
            return "i"
        if self.kind == "offset":
            return f"i{'+' if self.k >= 0 else '-'}{abs(self.k)}"
        if self.kind == "mod":
            return f"i%{self.k}"
        return f"i//{self.k}"


IDENTITY = IndexMap()


def offset(k: int) -> IndexMap:
    """Index i of a part is index k + i of the whole (kept even for k == 0: sizes differ)."""
    return IndexMap("offset", int(k))


def block(k: int) -> IndexMap:
    return IDENTITY if k == 1 else IndexMap("block", int(k))


def mod(k: int) -> IndexMap:
    return IndexMap("mod", int(k))

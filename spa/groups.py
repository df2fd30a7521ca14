"""Groups: sets of coupled dims that must lose the same channels together."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spa.dims import Dim

#: Roles of parameter dims that magnitude criteria read (set by the op rules).
MAGNITUDE_ROLES = frozenset({"out", "in", "scale"})
#: Group kinds: attention heads, a stream normalized over (hidden size), other channels.
GROUP_KINDS = frozenset({"heads", "hidden", "channels"})


@dataclass(frozen=True, slots=True, eq=False)
class Member:
    """One dim of a group and the group channel each of its indices belongs to."""

    dim: Dim
    channel: np.ndarray  # channel[i] = group channel of index i of this dim
    role: str | None = None  # role of a parameter dim, else None
    node: str | None = None  # node that gave the role
    param: str | None = None  # initializer holding the values of this dim, if any
    param_axis: int | None = None  # axis of ``param`` this dim indexes (differs behind a Transpose)
    slot: np.ndarray | None = None  # GQA: query-head position in its K/V group per index, -1 on K/V side

    @property
    def size(self) -> int:
        return int(self.channel.shape[0])

    def kept_indices(self, keep: np.ndarray, slots=None) -> np.ndarray:
        """Indices of this dim that survive when the group keeps channels ``keep`` (and, under
        GQA, query-head positions ``slots`` within every kept K/V group)."""
        mask = np.isin(self.channel, keep)
        if slots is not None and self.slot is not None:
            mask &= (self.slot < 0) | np.isin(self.slot, slots)
        return np.flatnonzero(mask)


@dataclass(frozen=True, slots=True)
class HeadInfo:
    """Attention heads of a group. One channel is one KV group: its K and V heads and the
    ``q_heads // kv_groups`` query heads that read them (one head when they are equal)."""

    q_heads: int
    kv_groups: int
    head_dim: int
    slots: int = 0  # query heads per K/V group that can be pruned within the groups (GQA), else 0

    @property
    def q_per_group(self) -> int:
        return self.q_heads // self.kv_groups if self.kv_groups else 0

    def describe(self) -> str:
        dim = f", head_dim {self.head_dim}" if self.head_dim else ""
        if self.q_heads == self.kv_groups:
            return f"{self.q_heads} heads{dim}"
        within = "; q heads prunable within groups" if self.slots else ""
        return f"{self.q_heads} q heads in {self.kv_groups} KV groups ({self.q_per_group} q per KV head){dim}{within}"


@dataclass(frozen=True, slots=True, eq=False)
class Group:
    """A prunable unit: ``size`` channels; removing channel c removes, in every member,
    the indices whose ``channel`` is c."""

    id: int
    key: str
    size: int
    members: tuple[Member, ...]
    exact: bool = True  # False when a normalization over the pruned axis changes outputs
    kind: str = "channels"  # "heads" (attention), "hidden" (a normalized stream), "channels"
    heads: HeadInfo | None = None

    @property
    def params(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.param is not None and m.role is not None)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.node for m in self.params if m.node))

    def member(self, dim: Dim) -> Member | None:
        for m in self.members:
            if m.dim == dim:
                return m
        return None

    def describe(self) -> str:
        outs = [m for m in self.params if m.role == "out"]
        ins = [m for m in self.params if m.role == "in"]
        prod = ", ".join(dict.fromkeys(m.node for m in outs)) or "-"
        cons = ", ".join(dict.fromkeys(m.node for m in ins)) or "-"
        return f"{self.size} ch; produced by {prod}; consumed by {cons}"


@dataclass(frozen=True, slots=True)
class BlockedGroup:
    """A parameter axis that cannot be pruned, and why."""

    key: str
    size: int | str | None
    reason: str
    nodes: tuple[str, ...]

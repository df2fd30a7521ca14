"""The dependency graph over dims: built from the op rules, grouped into connected components.

Node count is linear in the ONNX graph (one node per axis of each value); channel-level
equivalences are computed per component with vectorised union-find over index slots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import cached_property

import networkx as nx
import numpy as np
import onnx_ir as ir

from spa.dims import Dim
from spa.groups import BlockedGroup, Group, HeadInfo, Member
from spa.rules import Edge, Fixup, RuleContext, RuleOutput, RuleRefusal, lookup
from spa.rules.registry import static_size

log = logging.getLogger("spa")

_PASSTHROUGH_PARAM_OPS = frozenset({"Identity", "Cast", "Dropout", "Transpose", "Unsqueeze", "Squeeze",
                                    "Reshape", "Flatten"})
_VIEW_PARAM_OPS = frozenset({"Unsqueeze", "Squeeze", "Reshape", "Flatten"})
_GRAPH_ATTRS = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


@dataclass(frozen=True, slots=True)
class Barrier:
    """A node SPA cannot see through; the dims it touches are blocked."""

    node: str
    op: str
    domain: str
    reason: str


def _view_source_axis(src, dst, axis: int) -> int | None:
    """Axis of ``src`` that axis ``axis`` of the view ``dst`` indexes, when both have the same
    non-1 axes in the same order (a weight unsqueezed, squeezed or reshaped to broadcast)."""
    if src.shape is None or dst.shape is None:
        return None
    s = [(a, static_size(d)) for a, d in enumerate(src.shape) if static_size(d) != 1]
    t = [(a, static_size(d)) for a, d in enumerate(dst.shape) if static_size(d) != 1]
    if len(s) != len(t) or any(not isinstance(x[1], int) or x[1] != y[1] for x, y in zip(s, t)):
        return None
    for (sa, _), (ta, _) in zip(s, t):
        if ta == axis:
            return sa
    return None


def _label_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component labels of a graph with ``n`` nodes and edges (a[i], b[i])."""
    labels = np.arange(n)
    if a.size == 0:
        return labels
    while True:
        la, lb = labels[a], labels[b]
        m = np.minimum(la, lb)
        new = labels.copy()
        np.minimum.at(new, la, m)
        np.minimum.at(new, lb, m)
        new = new[new]
        if np.array_equal(new, labels):
            break
        labels = new
    while not np.array_equal(labels[labels], labels):
        labels = labels[labels]
    return labels


class DependencyGraph:
    """Dims, couplings, blocks and groups of one ``onnx_ir.Model``."""

    def __init__(self, model):
        self.model = model
        self.graph = nx.Graph()
        self.sizes: dict[Dim, int | str | None] = {}
        self.blocked: dict[Dim, str] = {}
        self.roles: dict[Dim, tuple[str, str]] = {}
        self.fixups: list[Fixup] = []
        self.barriers: list[Barrier] = []
        self.edges: list[Edge] = []
        self.inexact: set[Dim] = set()
        self.periodic: dict[Dim, int] = {}
        self.full_sizes: dict[Dim, int | str | None] = {}  # shape entries of periodic dims
        self.tags: dict[Dim, str] = {}
        self._barrier_dims: list[tuple[Barrier, list[Dim]]] = []
        self.order: dict[str, int] = {}
        self.values = {}
        self._build()

    # ---- construction --------------------------------------------------------------------
    def _touched(self, node) -> list[Dim]:
        dims = []
        for v in list(node.inputs) + list(node.outputs):
            if v is not None and v.name and v.shape is not None:
                for a, s in enumerate(v.shape):
                    d = Dim(v.name, a)
                    self.sizes.setdefault(d, static_size(s))
                    dims.append(d)
        return dims

    def _build(self) -> None:
        graph = self.model.graph
        opset = self.model.opset_imports.get("", 13)
        for i, v in enumerate(graph.inputs):
            self.values[v.name] = v
            self.order[v.name] = i
        base = len(graph.inputs)
        for k, node in enumerate(graph):
            for v in node.inputs:
                if v is not None and v.name and v.name not in self.order:
                    self.order[v.name] = base + 2 * k
                    self.values[v.name] = v
            for v in node.outputs:
                self.order[v.name] = base + 2 * k + 1
                self.values[v.name] = v
            self._apply_rule(node, opset, base + 2 * k + 1)
        for v in graph.inputs:
            self._block_value(v, f"graph input '{v.name}'")
        for v in graph.outputs:
            self._block_value(v, f"graph output '{v.name}'")
        self._spread_periods()
        self.graph.add_nodes_from(self.sizes)
        for e in self.edges:
            self.graph.add_edge(e.src, e.dst, edge=e)

    def _spread_periods(self) -> None:
        """A periodic dim's period passes along identity ties to dims of the same symbolic size
        (Transpose, MatMul batch axes); each is then sized by its period."""
        full = {d: self.sizes.get(d) for d in self.periodic}
        changed = True
        while changed:
            changed = False
            for e in self.edges:
                if e.map.kind != "identity":
                    continue
                for a, b in ((e.src, e.dst), (e.dst, e.src)):
                    if a in self.periodic and b not in self.periodic and full[a] is not None \
                            and self.sizes.get(b) == full[a]:
                        self.periodic[b] = self.periodic[a]
                        full[b] = full[a]
                        changed = True
        self.full_sizes = full
        for d, p in self.periodic.items():
            self.sizes[d] = p

    def _block_value(self, v, reason: str) -> None:
        if v.shape is None:
            return
        for a, s in enumerate(v.shape):
            d = Dim(v.name, a)
            self.sizes.setdefault(d, static_size(s))
            self.blocked.setdefault(d, reason)

    def _apply_rule(self, node, opset: int, order: int) -> None:
        touched = self._touched(node)
        out = RuleOutput()
        ctx = RuleContext(node, opset, out)
        reason = None
        if any(a.type in _GRAPH_ATTRS for a in node.attributes.values()):
            reason = "control flow with subgraphs is not analysed"
            self._block_captured(node)
        else:
            rule = lookup(node.domain, node.op_type)
            if rule is None:
                dom = f"{node.domain}::" if node.domain else ""
                reason = f"no rule for op {dom}{node.op_type}; unknown ops are never assumed elementwise"
            else:
                try:
                    rule(ctx)
                except RuleRefusal as exc:
                    reason = str(exc)
                except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                    reason = f"rule error ({type(exc).__name__}: {exc})"
                    log.debug("rule for %s '%s' failed", node.op_type, ctx.name, exc_info=True)
        if reason is not None:
            barrier = Barrier(ctx.name, node.op_type, node.domain, reason)
            self.barriers.append(barrier)
            self._barrier_dims.append((barrier, touched))
            for d in touched:
                self.blocked.setdefault(d, f"{node.op_type} '{ctx.name}': {reason}")
            return
        for d in touched:
            if d not in out.mentioned:
                self.blocked.setdefault(d, f"axis {d.axis} of '{d.value}' is not carried through {node.op_type} '{ctx.name}'")
        for d, s in out.sizes.items():
            self.sizes.setdefault(d, s)
            if d.virtual:
                self.order[d.value] = order
        self.edges.extend(out.edges)
        for d, reason in out.blocked.items():
            self.blocked.setdefault(d, reason)
        for d, role in out.roles.items():
            self.roles.setdefault(d, role)
        self.fixups.extend(out.fixups)
        self.inexact |= out.inexact
        for d, p in out.periods.items():
            self.periodic.setdefault(d, p)
        for d, t in out.tags.items():
            self.tags.setdefault(d, t)

    def _block_captured(self, node) -> None:
        """Values of the outer graph read inside a subgraph cannot change shape."""
        for attr in node.attributes.values():
            if attr.type not in _GRAPH_ATTRS:
                continue
            for sub in attr.value if isinstance(attr.value, (list, tuple)) else [attr.value]:
                self._block_captured_in(node, sub)

    def _block_captured_in(self, node, sub) -> None:
        local = {v.name for v in sub.inputs} | {v.name for v in sub.initializers.values()}
        for n in ir.traversal.RecursiveGraphIterator(sub):
            local |= {o.name for o in n.outputs}
        for n in ir.traversal.RecursiveGraphIterator(sub):
            for v in n.inputs:
                if v is not None and v.name and v.name not in local:
                    self._block_value(v, f"read inside a subgraph of {node.op_type} '{node.name}'")

    # ---- queries ----------------------------------------------------------------------------
    def param_source(self, d: Dim) -> str | None:
        """Initializer whose values this dim indexes (through Identity/Cast/Transpose), if any."""
        ref = self.param_ref(d)
        return ref[0] if ref else None

    def param_ref(self, d: Dim) -> tuple[str, int] | None:
        """(initializer, axis of it) that dim ``d`` indexes, seen through Identity, Cast,
        Dropout and Transpose (exporters transpose Linear weights at run time)."""
        if d.virtual:
            return None
        v, axis = self.values.get(d.value), d.axis
        while v is not None:
            if v.const_value is not None:
                return v.name, axis
            prod = v.producer()
            if prod is None or prod.op_type not in _PASSTHROUGH_PARAM_OPS or not prod.inputs:
                return None
            if prod.op_type in _VIEW_PARAM_OPS:
                axis = _view_source_axis(prod.inputs[0], v, axis)
                if axis is None:
                    return None
            elif prod.op_type == "Transpose":
                perm = prod.attributes.get("perm")
                src = prod.inputs[0]
                rank = len(src.shape) if src.shape is not None else None
                if perm is None and rank is None:
                    return None
                perm = list(perm.value) if perm is not None else list(range(rank))[::-1]
                axis = int(perm[axis])
            v = prod.inputs[0]
        return None

    def _sort_key(self, d: Dim):
        return (self.order.get(d.value, 1 << 60), d.value, d.axis)

    @cached_property
    def _components(self) -> list[list[Dim]]:
        comps = [sorted(c, key=self._sort_key) for c in nx.connected_components(self.graph)]
        comps.sort(key=lambda c: self._sort_key(c[0]))
        return comps

    @cached_property
    def _analysis(self) -> tuple[tuple[Group, ...], tuple[BlockedGroup, ...]]:
        comp_of = {}
        for ci, comp in enumerate(self._components):
            for d in comp:
                comp_of[d] = ci
        edges_of: dict[int, list[Edge]] = {}
        for e in self.edges:
            edges_of.setdefault(comp_of[e.src], []).append(e)
        groups: list[Group] = []
        blocked: list[BlockedGroup] = []
        for ci, comp in enumerate(self._components):
            params = [d for d in comp if d in self.roles and self.param_source(d)]
            if not params:
                continue
            anchor = next((d for d in params if self.roles[d][0] == "out"), params[0])
            # Keyed by the initializer (Identity/Cast keep axes): names the real parameter.
            name, axis = self.param_ref(anchor)
            key = f"{name}:{axis}"
            nodes = tuple(dict.fromkeys(self.roles[d][1] for d in params))
            reason = next((f"{d}: {self.blocked[d]}" for d in comp if d in self.blocked), None)
            if reason is None:
                unsized = next((d for d in comp if not isinstance(self.sizes.get(d), int)), None)
                if unsized is not None:
                    reason = f"{unsized}: size cannot be resolved statically"
            if reason is None:
                group, reason = self._make_group(len(groups), key, comp, edges_of.get(ci, []))
                if group is not None:
                    if group.size > 1:
                        groups.append(group)
                    continue
            blocked.append(BlockedGroup(key, self.sizes.get(anchor), reason, nodes))
        return tuple(groups), tuple(blocked)

    def _make_group(self, gid: int, key: str, comp: list[Dim], edges: list[Edge]):
        base: dict[Dim, int] = {}
        n = 0
        for d in comp:
            base[d] = n
            n += int(self.sizes[d])
        src, dst = [], []
        for e in edges:
            ns, nd = int(self.sizes[e.src]), int(self.sizes[e.dst])
            idx = np.arange(ns)
            j = e.map.apply(idx)
            ok = ns == 0 or (j.min() >= 0 and j.max() < nd)
            if e.map.kind == "identity":
                ok = ok and ns == nd
            elif e.map.kind == "block":
                ok = ok and ns == nd * e.map.k
            if not ok:
                return None, f"{e.op} '{e.node}' ties {e.src} ({ns}) to {e.dst} ({nd}) inconsistently"
            src.append(base[e.src] + idx)
            dst.append(base[e.dst] + j)
        a = np.concatenate(src) if src else np.zeros(0, np.int64)
        b = np.concatenate(dst) if dst else np.zeros(0, np.int64)
        labels = _label_components(n, a, b)
        _, first = np.unique(labels, return_index=True)
        channel_of_label = np.full(n, -1, dtype=np.int64)
        uniq = labels[np.sort(first)]
        channel_of_label[uniq] = np.arange(uniq.size)
        slots = self._slots(n, base, edges, src, dst)
        members = []
        for d in comp:
            role = self.roles.get(d)
            members.append(
                Member(
                    dim=d,
                    channel=channel_of_label[labels[base[d] : base[d] + int(self.sizes[d])]],
                    role=role[0] if role else None,
                    node=role[1] if role else None,
                    param=self.param_source(d) if role else None,
                    param_axis=self.param_ref(d)[1] if role and self.param_ref(d) else None,
                    slot=None if slots is None else slots[base[d]: base[d] + int(self.sizes[d])],
                )
            )
        exact = not any(d in self.inexact for d in comp)
        group = Group(gid, key, int(uniq.size), tuple(members), exact)
        return replace(group, kind=self._kind(group), heads=self._heads(group, edges, slots is not None)), None

    @staticmethod
    def _slots(n: int, base: dict, edges: list[Edge], src: list, dst: list) -> np.ndarray | None:
        """Under GQA, the position (0..rep-1) of each query-head index within its K/V group,
        -1 for K/V-side indices: labels computed without the K/V repeat edges tell query heads
        apart. None when there is no repeat, or the repeats do not agree on one numbering."""
        rep_edges = [k for k, e in enumerate(edges) if e.repeat]
        if not rep_edges:
            return None
        reps = {edges[k].map.k for k in rep_edges}
        if len(reps) != 1:
            return None
        rep = reps.pop()
        keep = [k for k in range(len(edges)) if not edges[k].repeat]
        a = np.concatenate([src[k] for k in keep]) if keep else np.zeros(0, np.int64)
        b = np.concatenate([dst[k] for k in keep]) if keep else np.zeros(0, np.int64)
        fine = _label_components(n, a, b)
        first = edges[rep_edges[0]]
        q_labels = fine[src[rep_edges[0]]]  # label of query head h, h = 0..n_q-1
        kv_labels = fine[base[first.dst] + np.arange(len(q_labels) // rep)]
        if np.unique(q_labels).size != q_labels.size or np.isin(kv_labels, q_labels).any():
            return None
        if any(not np.array_equal(fine[src[k]], q_labels) for k in rep_edges[1:]):
            return None
        slot_of = np.full(n, -1, dtype=np.int64)
        slot_of[q_labels] = np.arange(q_labels.size) % rep
        return slot_of[fine]

    def _heads(self, group: Group, edges: list[Edge], slots: bool = False) -> HeadInfo | None:
        """Heads of an attention group: query heads (the widest heads axis), KV groups (the
        group's channels) and head_dim (the block size of the reshape that split a projection
        into heads; the block size of GQA's K/V repeat is told apart by its heads-sized source)."""
        sizes = {m.size for m in group.members if self.tags.get(m.dim) == "heads"}
        if not sizes:
            return None
        head_sizes = sizes | {group.size}
        splits = [e.map.k for e in edges if e.map.kind == "block"
                  and self.sizes.get(e.src) not in head_sizes and self.sizes.get(e.dst) in head_sizes]
        q_heads = max(sizes)
        return HeadInfo(q_heads=q_heads, kv_groups=group.size, head_dim=min(splits) if splits else 0,
                        slots=q_heads // group.size if slots else 0)

    def _kind(self, group: Group) -> str:
        if any(self.tags.get(m.dim) == "heads" for m in group.members):
            return "heads"
        if not group.exact:  # a normalization (LayerNorm, RMSNorm's mean) runs over it
            return "hidden"
        return "channels"

    @property
    def groups(self) -> tuple[Group, ...]:
        """Prunable groups, in graph order."""
        return self._analysis[0]

    @property
    def blocked_groups(self) -> tuple[BlockedGroup, ...]:
        """Parameter axes that cannot be pruned, with the reason."""
        return self._analysis[1]

    def group(self, key: str) -> Group:
        for g in self.groups:
            if g.key == key:
                return g
        raise KeyError(key)

    def group_of(self, d: Dim) -> Group | None:
        for g in self.groups:
            if g.member(d) is not None:
                return g
        return None

    def relevant_barriers(self) -> list[Barrier]:
        """Barriers that touch a component holding a parameter axis (not only shape math)."""
        param_dims = {d for comp in self._components
                      if any(x in self.roles and self.param_source(x) for x in comp) for d in comp}
        return [b for b, dims in self._barrier_dims if any(d in param_dims for d in dims)]

    def explain(self, a: Dim, b: Dim) -> list[str]:
        """Why ``a`` and ``b`` are coupled: the chain of rule edges between them."""
        try:
            path = nx.shortest_path(self.graph, a, b)
        except (nx.NetworkXNoPath, nx.NodeNotFound):
            return []
        steps = []
        for u, v in zip(path, path[1:]):
            e: Edge = self.graph.edges[u, v]["edge"]
            m = e.map if e.src == u or e.map.kind == "identity" else f"inverse of {e.map}"
            steps.append(f"{u} -> {v}  [{e.op} '{e.node}', index map {m}]")
        return steps



"""The dependency graph over dims: built from the op rules, grouped into connected components.

Node count is linear in the ONNX graph (one node per axis of each value); channel-level
equivalences are computed per component with vectorised union-find over index slots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import onnx_ir as ir

from spa.dims import Dim
from spa.errors import UnsupportedModelError
from spa.groups import BlockedGroup, Group, HeadInfo, Member
from spa.ops import Edge, Fixup, RuleContext, RuleOutput, RuleRefusal, model_opsets, spec_of
from spa.ops.context import static_size

log = logging.getLogger("spa")

#: Set on ``model.meta`` by ``CanonicalizePass``: analyses refuse models without it.
CANONICAL_MARK = "spa.canonical"


@dataclass(slots=True)
class DimFacts:
    """Everything the rules said about one dim."""

    size: int | str | None = None
    blocked: str | None = None  # why it cannot be pruned
    role: tuple[str, str] | None = None  # (role, node) of a parameter dim
    inexact: bool = False  # pruning it changes outputs beyond masking
    period: int | None = None  # a folded ``batch*heads`` axis: channel i is i % period
    full_size: int | str | None = None  # shape entry of a periodic dim (its size is the period)
    tag: str | None = None  # "heads", "hidden": what the dim is, for reports


@dataclass(frozen=True, slots=True)
class Barrier:
    """A node SPA cannot see through; the dims it touches are blocked."""

    node: str
    op: str
    domain: str
    reason: str


def subgraphs(node) -> list:
    """The graphs held by ``node``'s attributes (If branches, Loop and Scan bodies)."""
    out = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            out.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            out.extend(attr.value)
    return out


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
    """Dims, couplings, blocks and groups of one canonicalized ``onnx_ir.Model``.

    Per-dim facts live in one record per dim (:class:`DimFacts`, ``dg.facts``); the rule edges
    are the edges of ``dg.graph`` (networkx). Build it with ``spa.dependency_graph``.
    """

    def __init__(self, model):
        if not model.meta.get(CANONICAL_MARK):
            raise UnsupportedModelError(
                "the dependency graph needs a canonicalized model: load it with spa.load(...) (or pass "
                "the path to spa.dependency_graph), which inlines functions, folds constants and infers shapes")
        self.model = model
        self.opsets = model_opsets(model)
        self.facts: dict[Dim, DimFacts] = {}
        self.fixups: list[Fixup] = []
        self.barriers: list[Barrier] = []
        self.edges: list[Edge] = []
        self.rule_errors: list[Barrier] = []  # rules that raised: a bug in SPA, reported loudly
        self._barrier_dims: list[tuple[Barrier, list[Dim]]] = []
        self.order: dict[str, int] = {}
        self.values: dict[str, ir.Value] = {}
        self._build()

    # ---- per-dim facts -------------------------------------------------------------------
    def _f(self, d: Dim) -> DimFacts:
        f = self.facts.get(d)
        if f is None:
            f = self.facts[d] = DimFacts()
        return f

    def size(self, d: Dim) -> int | str | None:
        """Size of ``d`` in its group (a periodic dim: its period)."""
        f = self.facts.get(d)
        return f.size if f is not None else None

    def blocked_reason(self, d: Dim) -> str | None:
        f = self.facts.get(d)
        return f.blocked if f is not None else None

    def role(self, d: Dim) -> tuple[str, str] | None:
        f = self.facts.get(d)
        return f.role if f is not None else None

    def period(self, d: Dim) -> int | None:
        f = self.facts.get(d)
        return f.period if f is not None else None

    def full_size(self, d: Dim) -> int | str | None:
        """Shape entry of ``d`` (differs from ``size`` for a periodic dim)."""
        f = self.facts.get(d)
        if f is None:
            return None
        return f.full_size if f.period is not None else f.size

    def weights(self, name: str):
        """The numpy value of initializer ``name``."""
        return self.values[name].const_value.numpy()

    def _set_size(self, d: Dim, size) -> None:
        f = self._f(d)
        if f.size is None and size is not None:
            f.size = size

    def _block(self, d: Dim, reason: str) -> None:
        f = self._f(d)
        if f.blocked is None:
            f.blocked = reason

    # ---- construction --------------------------------------------------------------------
    def _touched(self, node) -> list[Dim]:
        dims = []
        for v in list(node.inputs) + list(node.outputs):
            if v is not None and v.name and v.shape is not None:
                for a, s in enumerate(v.shape):
                    d = Dim(v.name, a)
                    self._set_size(d, static_size(s))
                    dims.append(d)
        return dims

    def _build(self) -> None:
        graph = self.model.graph
        for i, v in enumerate(graph.inputs):
            self.values[v.name] = v
            self.order[v.name] = i
        self._visited = 0
        self._walk(graph, len(graph.inputs))
        from spa.state import find_state_pairs

        self.state_pairs = find_state_pairs(graph)  # K/V caches: head axis free, rest pinned
        free = {(n, s.axis) for s in self.state_pairs for n in (s.past, s.present)}
        for v in graph.inputs:
            self._block_value(v, f"graph input '{v.name}'", free)
        for v in graph.outputs:
            self._block_value(v, f"graph output '{v.name}'", free)
        self._spread_periods()

    @cached_property
    def graph(self):
        """The dims as nodes and the rule edges (``edge`` attribute) of a networkx graph, built
        when first asked for: the analysis itself finds components by union-find."""
        import networkx as nx

        g = nx.Graph()
        g.add_nodes_from(self.facts)
        for e in self.edges:
            g.add_edge(e.src, e.dst, edge=e)
        return g

    def _walk(self, graph, base: int) -> None:
        """Apply the rules to the nodes of ``graph``; a node's subgraphs first, so values inside
        bodies get dims like outer ones (the subgraph op's rule then ties them to its own)."""
        for node in graph:
            for sub in subgraphs(node):
                for v in list(sub.inputs) + list(sub.initializers.values()):
                    self.values.setdefault(v.name, v)
                    self.order.setdefault(v.name, base + 2 * self._visited)
                self._walk(sub, base)
            k = self._visited
            self._visited += 1
            for v in node.inputs:
                if v is not None and v.name and v.name not in self.order:
                    self.order[v.name] = base + 2 * k
                    self.values[v.name] = v
            for v in node.outputs:
                if self.values.get(v.name, v) is not v:  # dims are keyed by name
                    raise UnsupportedModelError(f"two values are named '{v.name}' (one made by {node.op_type} "
                                                f"'{node.name}'); load the model with spa.load, which renames them")
                self.order[v.name] = base + 2 * k + 1
                self.values[v.name] = v
            self._apply_rule(node, base + 2 * k + 1)

    def _spread_periods(self) -> None:
        """A periodic dim's period passes along identity ties to dims of the same symbolic size
        (Transpose, MatMul batch axes); each is then sized by its period."""
        periodic = {d: f for d, f in self.facts.items() if f.period is not None}
        for f in periodic.values():
            f.full_size = f.size
        changed = True
        while changed:
            changed = False
            for e in self.edges:
                if e.map.kind != "identity":
                    continue
                for a, b in ((e.src, e.dst), (e.dst, e.src)):
                    fa, fb = self.facts.get(a), self._f(b)
                    if fa is not None and fa.period is not None and fb.period is None \
                            and fa.full_size is not None and fb.size == fa.full_size:
                        fb.period, fb.full_size = fa.period, fa.full_size
                        periodic[b] = fb
                        changed = True
        for f in periodic.values():
            f.size = f.period

    def _block_value(self, v, reason: str, free=frozenset()) -> None:
        if v.shape is None:
            return
        for a, s in enumerate(v.shape):
            d = Dim(v.name, a)
            self._set_size(d, static_size(s))
            if (v.name, a) not in free:
                self._block(d, reason)

    def _apply_rule(self, node, order: int) -> None:
        touched = self._touched(node)
        out = RuleOutput()
        spec = spec_of(node, self.opsets)
        opset = self.opsets.get(node.domain if node.domain not in ("", "ai.onnx") else "", 1)
        ctx = RuleContext(node, opset, out)
        reason = None
        dom = f"{node.domain}::" if node.domain not in ("", "ai.onnx") else ""
        if spec is None or spec.rule is None:
            reason = f"no rule for op {dom}{node.op_type} (opset {opset}); unknown ops are never assumed elementwise"
        else:
            try:
                spec.rule(ctx)
            except RuleRefusal as exc:
                reason = str(exc)
            except (KeyError, IndexError, TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
                # A rule that raises is a bug in SPA: the node becomes a barrier (so nothing
                # wrong is pruned) and the user hears of it, not only at debug level.
                reason = f"rule error ({type(exc).__name__}: {exc}); please report this model"
                log.warning("the rule for %s%s '%s' failed (%s: %s); its axes are blocked",
                            dom, node.op_type, ctx.name, type(exc).__name__, exc)
                log.debug("rule traceback", exc_info=True)
                self.rule_errors.append(Barrier(ctx.name, node.op_type, node.domain, reason))
        if reason is not None:
            if subgraphs(node):
                self._block_captured(node)
            barrier = Barrier(ctx.name, node.op_type, node.domain, reason)
            self.barriers.append(barrier)
            self._barrier_dims.append((barrier, touched))
            for d in touched:
                self._block(d, f"{node.op_type} '{ctx.name}': {reason}")
            return
        for d in touched:
            if d not in out.mentioned:
                self._block(d, f"axis {d.axis} of '{d.value}' is not carried through {node.op_type} '{ctx.name}'")
        for d, s in out.sizes.items():
            self._set_size(d, s)
            if d.virtual:
                self.order[d.value] = order
        self.edges.extend(out.edges)
        for d, why in out.blocked.items():
            self._block(d, why)
        for d, role in out.roles.items():
            f = self._f(d)
            f.role = f.role or role
        self.fixups.extend(out.fixups)
        for d in out.inexact:
            self._f(d).inexact = True
        for d, p in out.periods.items():
            f = self._f(d)
            f.period = f.period or p
        for d, t in out.tags.items():
            f = self._f(d)
            f.tag = f.tag or t

    def _block_captured(self, node) -> None:
        """A subgraph op SPA cannot see through: its bodies' inputs and outputs, and the outer
        values read inside them, cannot change shape."""
        for sub in subgraphs(node):
            why = f"read inside a subgraph of {node.op_type} '{node.name}'"
            for v in list(sub.inputs) + list(sub.outputs):
                self._block_value(v, f"a subgraph boundary of {node.op_type} '{node.name}'")
            local = {v.name for v in sub.inputs} | set(sub.initializers)
            for n in ir.traversal.RecursiveGraphIterator(sub):
                local |= {o.name for o in n.outputs}
            for n in ir.traversal.RecursiveGraphIterator(sub):
                for v in n.inputs:
                    if v is not None and v.name and v.name not in local:
                        self._block_value(v, why)

    # ---- queries ----------------------------------------------------------------------------
    def param_source(self, d: Dim) -> str | None:
        """Initializer whose values this dim indexes (through weight views), if any."""
        ref = self.param_ref(d)
        return ref[0] if ref else None

    def param_ref(self, d: Dim) -> tuple[str, int] | None:
        """(initializer, axis of it) that dim ``d`` indexes, seen through the ops whose spec
        says they only view a weight (Identity, Cast, Dropout, Transpose, Reshape, ...)."""
        if d.virtual:
            return None
        v, axis = self.values.get(d.value), d.axis
        while v is not None:
            if v.const_value is not None:
                return v.name, axis
            prod = v.producer()
            spec = spec_of(prod, self.opsets) if prod is not None else None
            if spec is None or spec.weight_view is None or not prod.inputs:
                return None
            if spec.weight_view == "reshape":
                axis = _view_source_axis(prod.inputs[0], v, axis)
                if axis is None:
                    return None
            elif spec.weight_view == "transpose":
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
        parent = {d: d for d in self.facts}

        def root(d):
            while parent[d] is not d:
                parent[d] = parent[parent[d]]
                d = parent[d]
            return d

        for e in self.edges:
            parent.setdefault(e.src, e.src)
            parent.setdefault(e.dst, e.dst)
            a, b = root(e.src), root(e.dst)
            if a is not b:
                parent[a] = b
        members: dict = {}
        for d in parent:
            members.setdefault(root(d), []).append(d)
        comps = [sorted(c, key=self._sort_key) for c in members.values()]
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
            params = [d for d in comp if self.role(d) and self.param_source(d)]
            if not params:
                continue
            anchor = next((d for d in params if self.role(d)[0] == "out"), params[0])
            # Keyed by the initializer (Identity/Cast keep axes): names the real parameter.
            name, axis = self.param_ref(anchor)
            key = f"{name}:{axis}"
            nodes = tuple(dict.fromkeys(self.role(d)[1] for d in params))
            reason = next((f"{d}: {self.blocked_reason(d)}" for d in comp if self.blocked_reason(d)), None)
            if reason is None:
                unsized = next((d for d in comp if not isinstance(self.size(d), int)), None)
                if unsized is not None:
                    reason = f"{unsized}: size cannot be resolved statically"
            if reason is None:
                group, reason = self._make_group(len(groups), key, comp, edges_of.get(ci, []))
                if group is not None:
                    if group.size > 1:
                        groups.append(group)
                    continue
            blocked.append(BlockedGroup(key, self.size(anchor), reason, nodes))
        return tuple(groups), tuple(blocked)

    def _make_group(self, gid: int, key: str, comp: list[Dim], edges: list[Edge]):
        base: dict[Dim, int] = {}
        n = 0
        for d in comp:
            base[d] = n
            n += int(self.size(d))
        src, dst = [], []
        for e in edges:
            ns, nd = int(self.size(e.src)), int(self.size(e.dst))
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
            role = self.role(d)
            members.append(
                Member(
                    dim=d,
                    channel=channel_of_label[labels[base[d] : base[d] + int(self.size(d))]],
                    role=role[0] if role else None,
                    node=role[1] if role else None,
                    param=self.param_source(d) if role else None,
                    param_axis=self.param_ref(d)[1] if role and self.param_ref(d) else None,
                    slot=None if slots is None else slots[base[d]: base[d] + int(self.size(d))],
                )
            )
        exact = not any(self.facts[d].inexact for d in comp)
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
        sizes = {m.size for m in group.members if self._tag(m.dim) == "heads"}
        if not sizes:
            return None
        head_sizes = sizes | {group.size}
        splits = [e.map.k for e in edges if e.map.kind == "block"
                  and self.size(e.src) not in head_sizes and self.size(e.dst) in head_sizes]
        q_heads = max(sizes)
        return HeadInfo(q_heads=q_heads, kv_groups=group.size, head_dim=min(splits) if splits else 0,
                        slots=q_heads // group.size if slots else 0)

    def _tag(self, d: Dim) -> str | None:
        f = self.facts.get(d)
        return f.tag if f is not None else None

    def _kind(self, group: Group) -> str:
        tags = {self._tag(m.dim) for m in group.members}
        if "heads" in tags:
            return "heads"
        if "hidden" in tags:  # a normalization over the stream (LayerNorm, RMSNorm's mean)
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

    def lint(self) -> list[str]:
        """Invariants of the graph and its groups; the problems found (empty when sound)."""
        problems = []
        for e in self.edges:
            ns, nd = self.size(e.src), self.size(e.dst)
            if e.src not in self.facts or e.dst not in self.facts:
                problems.append(f"edge {e.src} -> {e.dst} ({e.op} '{e.node}') has a dim without facts")
            elif isinstance(ns, int) and isinstance(nd, int):
                if e.map.kind == "identity" and ns != nd and not self.blocked_reason(e.src):
                    problems.append(f"identity edge {e.src} ({ns}) -> {e.dst} ({nd}) of {e.op} '{e.node}'")
        seen: dict[Dim, str] = {}
        keys = set()
        for g in self.groups:
            if g.key in keys:
                problems.append(f"group key '{g.key}' is not unique")
            keys.add(g.key)
            covered = np.zeros(g.size, dtype=bool)
            for m in g.members:
                if m.dim in seen:
                    problems.append(f"{m.dim} is in groups '{seen[m.dim]}' and '{g.key}'")
                seen[m.dim] = g.key
                if self.blocked_reason(m.dim):
                    problems.append(f"group '{g.key}' holds blocked dim {m.dim}")
                if m.size != self.size(m.dim):
                    problems.append(f"member {m.dim} of '{g.key}' has {m.size} indices, its dim {self.size(m.dim)}")
                if m.size and (m.channel.min() < 0 or m.channel.max() >= g.size):
                    problems.append(f"member {m.dim} of '{g.key}' maps outside 0..{g.size - 1}")
                covered[m.channel] = True
                if m.param is not None:
                    w = self.values.get(m.param)
                    shape = None if w is None or w.const_value is None else tuple(w.const_value.shape.numpy())
                    if shape is None or not 0 <= (m.param_axis or 0) < len(shape):
                        problems.append(f"member {m.dim} of '{g.key}' names parameter '{m.param}' it cannot read")
                    elif self.period(m.dim) is None and shape[m.param_axis] != m.size:
                        problems.append(f"member {m.dim} of '{g.key}': '{m.param}' axis {m.param_axis} has "
                                        f"{shape[m.param_axis]} entries, the member {m.size}")
            if not covered.all():
                problems.append(f"group '{g.key}' has channels no member holds")
        return problems

    def components(self) -> list[list[Dim]]:
        """The connected components of the dim graph (groups and blocked groups among them)."""
        return self._components

    def barrier_dims(self) -> list[tuple[Barrier, list[Dim]]]:
        """Each barrier with the dims of the node's inputs and outputs it blocked."""
        return list(self._barrier_dims)

    def relevant_barriers(self) -> list[Barrier]:
        """Barriers that touch a component holding a parameter axis (not only shape math)."""
        param_dims = {d for comp in self._components
                      if any(self.role(x) and self.param_source(x) for x in comp) for d in comp}
        return [b for b, dims in self._barrier_dims if any(d in param_dims for d in dims)]

    def explain(self, a: Dim, b: Dim) -> list[str]:
        """Why ``a`` and ``b`` are coupled: the chain of rule edges between them."""
        import networkx as nx

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



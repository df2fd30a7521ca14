"""Pass: apply a Plan in place. Generic: it slices what the groups hold and runs the fix-ups
the rules declared; it never special-cases an op."""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from spa.depgraph import DependencyGraph
from spa.dims import Dim
from spa.errors import PlanError, UnsupportedModelError
from spa.plan import Plan

log = logging.getLogger("spa")


class ApplyContext:
    """What a rule's fix-up may ask and do while a plan is applied (``spa.ops.ApplyOps``)."""

    def __init__(self, model: ir.Model, dg: DependencyGraph, kept: dict[Dim, np.ndarray]):
        self.model = model
        self.dg = dg
        self._kept = kept
        self._counter = 0

    def is_pruned(self, d: Dim) -> bool:
        return d in self._kept

    def kept(self, d: Dim) -> np.ndarray | None:
        """Kept indices of ``d``, or None when ``d`` is not pruned."""
        return self._kept.get(d)

    def old_size(self, d: Dim) -> int:
        full = self.dg.full_size(d)
        return full if isinstance(full, int) else int(self.dg.size(d))

    def new_size(self, d: Dim) -> int:
        """New length of ``d``; a periodic axis (``batch*heads``) is its batch times the kept."""
        k = self._kept.get(d)
        if k is None:
            return self.old_size(d)
        full = self.dg.full_size(d)
        period = self.dg.period(d)
        if period is not None and isinstance(full, int):
            return full // period * int(k.size)
        return int(k.size)

    def set_attr(self, node: ir.Node, name: str, value) -> None:
        node.attributes[name] = ir.convenience.convert_attribute(name, value)

    def remove_attr(self, node: ir.Node, name: str) -> None:
        node.attributes.pop(name, None)

    def set_input_const(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        """Point input ``index`` of ``node`` at a new initializer holding ``array``."""
        self._counter += 1
        name = f"{node.name}_spa_in{index}_{self._counter}"
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(_dtype(array)),
                         const_value=ir.tensor(array, name=name))
        (node.graph or self.model.graph).register_initializer(value)  # a body node: its own graph
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        node.replace_input_with(index, value)

    def private_producer(self, node: ir.Node, index: int) -> ir.Node | None:
        """The node computing input ``index`` of ``node``, copied first when other nodes read
        its output too (exporters share one shape computation among layers), so a rewrite
        for ``node`` never changes what the others see."""
        v = node.inputs[index] if index < len(node.inputs) else None
        prod = v.producer() if v is not None else None
        if prod is None or len(v.uses()) <= 1:
            return prod
        self._counter += 1
        copy = ir.Node(prod.domain, prod.op_type, list(prod.inputs),
                       attributes=list(prod.attributes.values()), num_outputs=len(prod.outputs),
                       name=f"{prod.name}_spa_copy{self._counter}", version=prod.version)
        for old, new in zip(prod.outputs, copy.outputs):
            new.name = f"{old.name}_spa_copy{self._counter}"
            new.shape, new.type = old.shape, old.type
        node.graph.insert_before(node, copy)
        node.replace_input_with(index, copy.outputs[list(prod.outputs).index(v)])
        return copy


def _rescaled(entry, old_period: int, period: int):
    """A periodic axis ``4*batch`` that keeps ``period`` channels becomes ``period*batch``
    (a static ``8`` = 2 x 4 becomes ``2*period``)."""
    from spa.ops.view import _factor

    text = getattr(entry, "value", entry)
    if isinstance(text, int):
        return text // old_period * period
    if not isinstance(text, str):
        return None
    syms = _factor(text).syms
    return ir.SymbolicDim("*".join(([str(period)] if period != 1 else []) + list(syms))) if syms else None


def _take(tensor: ir.TensorProtocol, cuts, name: str) -> ir.Tensor:
    arr = tensor.numpy()
    for axis, idx in cuts:
        arr = np.take(arr, idx, axis=axis)
    return ir.Tensor(np.ascontiguousarray(arr), dtype=tensor.dtype, name=name)


def _sliced(tensor: ir.TensorProtocol, cuts, name: str) -> ir.TensorProtocol:
    """``tensor`` with the kept indices of each (axis, kept) cut, in its dtype. A tensor read
    from external data (or already lazy) is sliced lazily: the slice is taken from the file
    whenever it is read (by a session, by the writer, one tensor at a time), so the apply pass
    holds no weights in memory. An in-memory tensor is sliced now."""
    if not isinstance(tensor, (ir.ExternalTensor, ir.LazyTensor)):
        return _take(tensor, cuts, name)
    dims = list(tensor.shape.numpy())
    for axis, idx in cuts:
        dims[axis] = int(idx.size)
    return ir.LazyTensor(lambda: _take(tensor, cuts, name), dtype=tensor.dtype, shape=ir.Shape(dims), name=name)


def _dtype(array: np.ndarray) -> ir.DataType:
    return ir.DataType.from_numpy(array.dtype)


class ApplyPlanPass(ir.passes.InPlacePass):
    """Slice initializers, shrink value shapes and run fix-ups for every pruned group."""

    def __init__(self, plan: Plan, strict: bool = True, graph: DependencyGraph | None = None):
        super().__init__()
        self.plan = plan
        self.strict = strict
        self.graph = graph  # the model's dependency graph, when the caller built it already
        self.pruned_keys: list[str] = []

    def requires(self, model: ir.Model) -> None:
        from spa.depgraph import CANONICAL_MARK

        if not model.meta.get(CANONICAL_MARK):
            raise UnsupportedModelError("a plan applies to a model loaded with spa.load (canonicalized); "
                                        "load it first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        dg = self.graph if self.graph is not None and self.graph.model is model else DependencyGraph(model)
        groups = {g.key: g for g in dg.groups}
        kept: dict[Dim, np.ndarray] = {}
        for gp in self.plan.groups:
            group = groups.get(gp.key)
            if group is None:
                if self.strict:
                    raise PlanError(
                        f"plan group '{gp.key}' is not a prunable group of this model; was the plan made "
                        "for another model? Run `spa inspect` to list this model's groups"
                    )
                continue
            if group.size != gp.size:
                raise PlanError(f"plan group '{gp.key}' has {gp.size} channels, the model's has {group.size}")
            if not gp.changes:
                continue
            slots = None
            if gp.slots is not None:
                n_slots = group.heads.slots if group.heads is not None else 0
                if not n_slots:
                    raise PlanError(f"plan group '{gp.key}' prunes query heads within K/V groups, but this "
                                    "group has no K/V repeat (GQA) to do it in")
                if gp.slots[-1] >= n_slots:
                    raise PlanError(f"plan group '{gp.key}': slots must lie in 0..{n_slots - 1}")
                slots = np.asarray(gp.slots, dtype=np.int64)
            keep = np.asarray(gp.keep, dtype=np.int64)
            for m in group.members:
                kept[m.dim] = m.kept_indices(keep, slots)
                if kept[m.dim].size == 0:
                    raise PlanError(f"plan group '{gp.key}' would leave {m.dim} with no channel; keep at "
                                    f"least one of channels {np.unique(m.channel).tolist()}")
            self.pruned_keys.append(gp.key)
        if not kept:
            return ir.passes.PassResult(model, False)
        self._slice(dg, kept)
        ctx = ApplyContext(model, dg, kept)
        for fx in dg.fixups:
            try:
                fx.apply(ctx)
            except (ValueError, IndexError, TypeError) as exc:
                raise UnsupportedModelError(f"rewriting {fx.what} of node '{fx.node}' failed: {exc}") from exc
        return ir.passes.PassResult(model, True)

    @staticmethod
    def _keep_for_other_readers(dg: DependencyGraph, v: ir.Value, coupled: set[str]) -> None:
        """A constant is sliced for the nodes that tie its axes to the group; a node that reads
        it without such a tie (exporters share equal constants: Gather indices that are also
        Split sizes) keeps the original values, through a copy."""
        others = [(node, i) for node, i in v.uses() if (node.name or f"<{node.op_type}>") not in coupled]
        if not others:
            return
        t = v.const_value
        name = f"{v.name}_spa_kept"
        if not isinstance(t, (ir.ExternalTensor, ir.LazyTensor)):  # read lazily: shared, never modified
            t = ir.tensor(t.numpy().copy(), name=name)
        copy = ir.Value(name=name, shape=ir.Shape(t.shape), type=v.type, const_value=t)
        (v.graph or dg.model.graph).register_initializer(copy)
        for node, i in others:
            node.replace_input_with(i, copy)

    @staticmethod
    def _slice(dg: DependencyGraph, kept: dict[Dim, np.ndarray]) -> None:
        by_value: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
        for d, idx in kept.items():
            if not d.virtual:
                by_value[d.value].append((d.axis, idx))
        coupled_by: dict[str, set[str]] = defaultdict(set)
        for e in dg.edges:
            coupled_by[e.src.value].add(e.node)
            coupled_by[e.dst.value].add(e.node)
        for name, cuts in by_value.items():
            v = dg.values.get(name)
            if v is None:
                continue
            if v.const_value is not None:
                ApplyPlanPass._keep_for_other_readers(dg, v, coupled_by[name])
                v.const_value = _sliced(v.const_value, cuts, v.name)
                v.shape = ir.Shape(v.const_value.shape)
            elif v.shape is not None:
                dims = list(v.shape)
                for axis, idx in cuts:
                    d = Dim(name, axis)
                    period = dg.period(d)
                    dims[axis] = _rescaled(dims[axis], period, int(idx.size)) if period is not None \
                        else int(idx.size)
                v.shape = ir.Shape(dims)

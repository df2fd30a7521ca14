"""Analysis: input second moments H = XᵀX of every consumer layer, collected with onnxruntime.

A *consumer* is a MatMul/Gemm with a constant weight, or an ungrouped Conv, that reads a
group's channels on its input axis. Its H is over the columns its weight multiplies: the input
features (MatMul/Gemm) or the unfolded patches ``C·kh·kw`` (Conv). Intermediate tensors are
requested from onnxruntime a few at a time and reduced to H at once, so a large model's
activations are never all held together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from spa.depgraph import DependencyGraph
from spa.groups import Group, Member

log = logging.getLogger("spa")


@dataclass(slots=True)
class Consumer:
    """One layer reading a group's channels: its weight as a [out, in-columns] matrix view."""

    node: object
    member: Member
    x: str  # name of the activation it multiplies
    kernel: tuple[int, ...]  # conv kernel (empty for MatMul/Gemm)

    @property
    def key(self) -> tuple:
        n = self.node
        attrs = tuple(sorted((k, str(a.value)) for k, a in n.attributes.items())) if self.kernel else ()
        return (self.x, self.kernel, attrs)

    def column_channels(self) -> np.ndarray:
        """Input index (of the member dim) of every weight column."""
        per = int(np.prod(self.kernel)) if self.kernel else 1
        return np.repeat(np.arange(self.member.size), per)

    def matrix(self, array: np.ndarray) -> np.ndarray:
        """The weight array as [out, columns], columns ordered like the unfolded input."""
        if self.kernel:  # Conv [O, C, kh, kw]
            return array.reshape(array.shape[0], -1)
        w = np.moveaxis(array, self.member.param_axis, -1)
        return w.reshape(-1, w.shape[-1])

    def unmatrix(self, mat: np.ndarray, like: np.ndarray) -> np.ndarray:
        if self.kernel:
            return mat.reshape(like.shape)
        moved = np.moveaxis(like, self.member.param_axis, -1)
        return np.moveaxis(mat.reshape(moved.shape), -1, self.member.param_axis)


def consumers(dg: DependencyGraph, group: Group) -> list[Consumer]:
    nodes = {n.name: n for n in dg.model.graph}
    out = []
    for m in group.params:
        if m.role != "in" or m.node not in nodes:
            continue
        node = nodes[m.node]
        x = node.inputs[0]
        if x is None or x.const_value is not None:
            continue
        if node.op_type == "MatMul" or (node.op_type == "Gemm" and not _attr(node, "transA", 0)):
            out.append(Consumer(node, m, x.name, ()))
        elif node.op_type == "Conv" and _attr(node, "group", 1) == 1 and m.param_axis == 1:
            w = node.inputs[1]
            out.append(Consumer(node, m, x.name, tuple(int(s) for s in w.shape[2:])))
    return out


def _attr(node, name, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _unfold(x: np.ndarray, node, kernel: tuple[int, ...]) -> np.ndarray:
    """im2col of an NCHW(…) input: [N·L, C·prod(kernel)], columns C-major like the weight."""
    r = len(kernel)
    strides = list(_attr(node, "strides", [1] * r))
    dil = list(_attr(node, "dilations", [1] * r))
    pads = list(_attr(node, "pads", [0] * 2 * r))
    if str(_attr(node, "auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        total = [max(0, (int(np.ceil(x.shape[2 + i] / strides[i])) - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1
                     - x.shape[2 + i]) for i in range(r)]
        pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + r]) for i in range(r)])
    win = [(kernel[i] - 1) * dil[i] + 1 for i in range(r)]
    view = np.lib.stride_tricks.sliding_window_view(x, win, axis=tuple(range(2, 2 + r)))
    view = view[(slice(None), slice(None)) + tuple(slice(None, None, strides[i]) for i in range(r))
                + tuple(slice(None, None, dil[i]) for i in range(r))]
    # view: [N, C, L1..Lr, k1..kr] -> [N, L1..Lr, C, k1..kr] -> [N·L, C·k]
    n, c = view.shape[:2]
    order = [0] + list(range(2, 2 + r)) + [1] + list(range(2 + r, 2 + 2 * r))
    return view.transpose(order).reshape(-1, c * int(np.prod(kernel)))


def _columns(x: np.ndarray, c: Consumer) -> np.ndarray:
    if c.kernel:
        return _unfold(x, c.node, c.kernel)
    return x.reshape(-1, x.shape[-1])


def collect(model, consumers_: list[Consumer], feeds: list[dict], chunk: int = 8,
            means: dict | None = None) -> dict[tuple, np.ndarray]:
    """Mean XᵀX per distinct consumer input (keyed by ``Consumer.key``), over all batches;
    the column means go into ``means`` when given (FLAP's bias compensation)."""
    from spa import runtime

    by_key: dict[tuple, Consumer] = {}
    for c in consumers_:
        by_key.setdefault(c.key, c)
    names = sorted({c.x for c in by_key.values()})
    sess = runtime.session_exposing(model, names)
    sums: dict[tuple, np.ndarray] = {}
    counts: dict[tuple, int] = {}
    for start in range(0, len(names), chunk):
        part = names[start:start + chunk]
        for batch in feeds:
            values = dict(zip(part, sess.run(part, batch)))
            for key, c in by_key.items():
                if c.x not in values:
                    continue
                cols = _columns(values[c.x].astype(np.float32), c)
                h = (cols.T @ cols).astype(np.float64)  # float32 product, float64 running sum
                sums[key] = sums.get(key, 0) + h
                counts[key] = counts.get(key, 0) + cols.shape[0]
                if means is not None:
                    means[key] = means.get(key, 0) + cols.sum(axis=0, dtype=np.float64)
            del values
    if means is not None:
        for k in list(means):
            means[k] = means[k] / max(counts[k], 1)
    return {k: sums[k] / max(counts[k], 1) for k in sums}

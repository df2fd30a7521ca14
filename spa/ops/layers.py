"""Layer views: how an op consumes a group's channels as a layer ``y = W · columns(x)``.

OBSPA, Wanda, FLAP and OWL read a consumer layer through this view: the activation it
multiplies, its weight as an ``[out, columns]`` matrix, and the input columns (features of a
MatMul/Gemm, unfolded ``C·kh·kw`` patches of a Conv). An op spec's ``layer`` returns one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def attr(node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


@dataclass(frozen=True, slots=True)
class LayerView:
    """A consumer of ``x`` whose weight member indexes the input columns along ``param_axis``;
    ``kernel`` is the spatial kernel of a convolution (empty for a matrix product)."""

    x: str
    param_axis: int
    kernel: tuple[int, ...] = ()
    attrs: tuple = ()  # conv attributes (strides, pads, dilations, auto_pad)

    @property
    def key(self) -> tuple:
        """Consumers with equal keys read the same columns (one H serves them all)."""
        return (self.x, self.kernel, self.attrs)

    @property
    def per_channel(self) -> int:
        return int(np.prod(self.kernel)) if self.kernel else 1

    def matrix(self, array: np.ndarray) -> np.ndarray:
        """The weight array as [out, columns], columns ordered like :meth:`columns`."""
        if self.kernel:  # Conv [O, C, k...]
            return array.reshape(array.shape[0], -1)
        w = np.moveaxis(array, self.param_axis, -1)
        return w.reshape(-1, w.shape[-1])

    def unmatrix(self, mat: np.ndarray, like: np.ndarray) -> np.ndarray:
        if self.kernel:
            return mat.reshape(like.shape)
        moved = np.moveaxis(like, self.param_axis, -1)
        return np.moveaxis(mat.reshape(moved.shape), -1, self.param_axis)

    def columns(self, x: np.ndarray) -> np.ndarray:
        """The input as rows of columns: ``[samples, columns]``."""
        if self.kernel:
            return unfold(x, dict(self.attrs), self.kernel)
        return x.reshape(-1, x.shape[-1])


def matmul_layer(node, member) -> LayerView | None:
    """A MatMul or Gemm (no transA) whose constant weight reads the input's last axis."""
    x = node.inputs[0]
    if x is None or x.const_value is not None:
        return None
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        return None
    return LayerView(x.name, member.param_axis)


def conv_layer(node, member) -> LayerView | None:
    """An ungrouped convolution whose weight axis 1 reads the input channels."""
    x, w = node.inputs[0], node.inputs[1]
    if x is None or x.const_value is not None or attr(node, "group", 1) != 1 or member.param_axis != 1:
        return None
    if w.shape is None or not all(isinstance(s, int) for s in w.shape[2:]):
        return None
    attrs = tuple(sorted((k, _plain(a.value)) for k, a in node.attributes.items()
                         if k in ("strides", "pads", "dilations", "auto_pad")))
    return LayerView(x.name, 1, tuple(int(s) for s in w.shape[2:]), attrs)


def _plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def unfold(x: np.ndarray, attrs: dict, kernel: tuple[int, ...]) -> np.ndarray:
    """im2col of an NCHW(…) input: [N·L, C·prod(kernel)], columns C-major like the weight."""
    r = len(kernel)
    strides = list(attrs.get("strides", [1] * r))
    dil = list(attrs.get("dilations", [1] * r))
    pads = list(attrs.get("pads", [0] * 2 * r))
    if str(attrs.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
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


def einsum_layer(node, member) -> LayerView | None:
    """A two-operand Einsum ``x·W`` whose constant ``W`` shares one subscript with ``x``: the last
    of ``x``, contracted (``bsd,df->bsf``, ``...d,hdk->...hk``, ``bsd,fd->bsf``)."""
    eq = str(attr(node, "equation", "")).replace(" ", "")
    inputs = list(node.inputs)
    if "->" not in eq or len(inputs) != 2 or any(v is None for v in inputs):
        return None
    terms, rhs = eq.split("->")[0].split(","), eq.split("->")[1]
    w_at = [i for i, v in enumerate(inputs) if v.name == member.param and v.const_value is not None]
    if len(terms) != 2 or len(w_at) != 1 or inputs[1 - w_at[0]].const_value is not None:
        return None
    wt, xt = terms[w_at[0]], terms[1 - w_at[0]].replace("...", "")
    shared = set(wt) & set(xt)
    if ("." in wt or len(set(wt)) != len(wt) or len(set(xt)) != len(xt) or len(shared) != 1
            or not xt or xt[-1] not in shared or xt[-1] in rhs or wt.index(xt[-1]) != member.param_axis
            or any(c not in rhs for c in (wt + xt).replace(xt[-1], ""))):
        return None  # a second shared or a summed-away subscript: not one layer x·W
    return LayerView(inputs[1 - w_at[0]].name, member.param_axis)

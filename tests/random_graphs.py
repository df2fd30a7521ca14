"""Random well-formed ONNX graphs over SPA's op vocabulary, for property-based tests.

:func:`graphs` is a hypothesis strategy of :class:`GraphCase` (an ``onnx.ModelProto`` plus the
feeds to run it on). A graph starts from an image ``[N, C, H, W]``, a sequence ``[N, T, D]`` or
a vector ``[N, F]`` input and chains random blocks:

* image: Conv (kernel 1/3, padding, stride, optional bias), grouped and depthwise Conv,
  BatchNormalization, unary activations, per-channel Mul/Add/Sub/PRelu constants, residual
  ``x + f(x)`` (identity or 1x1 projection shortcut), Concat and Split on the channel axis,
  squeeze-excitation (GlobalAveragePool -> Conv 1x1 -> Relu -> Conv 1x1 -> Sigmoid -> Mul),
  MaxPool / AveragePool / GlobalAveragePool;
* image -> sequence (Reshape + Transpose), image -> vector (GlobalAveragePool + Flatten or
  Reshape, Flatten of the whole map, ReduceMean over H, W);
* sequence: MatMul MLPs with Add biases, attention (Q/K/V MatMul, Reshape to heads, Transpose,
  Q·Kᵀ, optional scale, Softmax, ·V, Transpose back, Reshape, output projection), residuals,
  LayerNormalization (an inexact group), ReduceMean / Flatten to a vector;
* vector: Gemm (transB, bias, alpha) and MatMul + Add layers.

Every graph ends in a layer (Conv / MatMul / Gemm) whose output is a graph output; sometimes a
side head or an intermediate tensor is a second graph output. Weights come from a seeded numpy
generator (non-uniform, scaled by fan-in); integer tensors (shapes, axes, split sizes) are
Constant nodes or initializers. ``GraphCase.text()`` is the graph in ONNX text with the float
weights as graph inputs, so ``tests.helpers.build(text)`` rebuilds it (regression tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

BATCH = "N"  # placeholder of the batch axis in tracked shapes
#: Reuse equal integer constants between nodes (shape targets, axes, split sizes).
SHARE_CONSTANTS = True

#: Unary ops usable on any float tensor, by the opset they appeared in.
UNARY = {"Relu": 1, "Sigmoid": 1, "Tanh": 1, "LeakyRelu": 1, "Elu": 1, "Softplus": 1, "Abs": 1, "Neg": 1,
         "Identity": 1, "Softsign": 1, "HardSigmoid": 1, "Selu": 1, "Erf": 9, "Celu": 12, "Clip": 11,
         "HardSwish": 14, "Mish": 18, "Gelu": 20}


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple  # shape[0] is BATCH

    @property
    def kind(self) -> str:
        return {4: "img", 3: "seq", 2: "vec"}[len(self.shape)]

    @property
    def ch(self) -> int:  # channels of an image, features of a sequence or vector
        return self.shape[1] if len(self.shape) == 4 else self.shape[-1]


@dataclass
class GraphCase:
    model: onnx.ModelProto
    feeds: dict
    output_shapes: dict  # output name -> concrete shape
    blocks: list = field(default_factory=list)
    vocab: int | None = None  # token-id input: ids lie in 0..vocab-1

    def feeds_for(self, batch: int, seed: int = 0) -> dict:
        """Inputs like ``feeds`` with another batch size (a dynamic batch axis)."""
        rng = np.random.default_rng(seed)
        shape = lambda v: (batch,) + v.shape[1:]  # noqa: E731
        if self.vocab:
            return {k: rng.integers(0, self.vocab, shape(v)).astype(np.int64) for k, v in self.feeds.items()}
        return {k: rng.standard_normal(shape(v)).astype(np.float32) for k, v in self.feeds.items()}

    def text(self) -> str:
        return to_text(self.model)

    def __repr__(self) -> str:
        return f"GraphCase(blocks={self.blocks}, batch={next(iter(self.feeds.values())).shape[0]})\n{self.text()}"

    def _repr_pretty_(self, p, cycle) -> None:  # hypothesis prints falsifying examples with this
        p.text(repr(self))


class Builder:
    """Accumulates nodes and initializers; tracks shapes with the batch as ``BATCH``."""

    def __init__(self, draw, seed: int, opset: int, dynamic: bool, batch: int, naming: str):
        self.draw = draw
        self.rng = np.random.default_rng(seed)
        self.opset, self.dynamic, self.batch, self.naming = opset, dynamic, batch, naming
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0
        self.blocks: list[str] = []
        self.int_cache: dict[tuple, str] = {}
        self.dynamic_spatial = False  # an image input declared [N, C, "H", "W"]
        self.vocab: int | None = None  # the graph starts from token ids
        self.table: str | None = None  # their embedding table [vocab, D]
        self.float_cache: dict[tuple, str] = {}

    # ---- drawing helpers --------------------------------------------------------------
    def int(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def bool(self) -> bool:
        return self.draw(st.booleans())

    def choice(self, seq):
        return self.draw(st.sampled_from(list(seq)))

    def fresh(self, prefix: str) -> str:
        """A new name; ``torch`` naming looks like the torch exporters' (slashes, dots, colons),
        float weights' names still start with their kind letter (``tests.helpers.build``)."""
        self.n += 1
        if self.naming != "torch":
            return f"{prefix}{self.n}"
        if prefix == "t":
            return f"/blocks.{self.n}/Op_output_0"
        if prefix == "k":
            return f"onnx::Constant_{self.n}"
        if prefix in "wbcs":
            return f"{prefix}{self.n}::layers.{self.n}.weight"
        return f"/{prefix}{self.n}"

    # ---- tensors -----------------------------------------------------------------------
    def weight(self, shape, fan_in: int = 1, kind: str = "w") -> str:
        """A float initializer; ``kind`` w (weights), b (biases), c (constants, mean), s (positive)."""
        key = (kind, tuple(shape))
        if kind in "bc" and key in self.float_cache and self.int(0, 3) == 3:
            return self.float_cache[key]  # a bias / constant shared with an earlier layer
        name = self.float_cache[key] = self.fresh(kind)
        arr = self.rng.standard_normal(shape)
        if kind == "s":
            arr = np.abs(arr) + 0.5
        elif kind == "w":
            arr = arr / math.sqrt(max(1, fan_in))
        elif kind == "b":
            arr = arr * 0.5
        self.inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    def ints(self, values, share: bool = True) -> str:
        """An int64 1-D tensor: a Constant node or an initializer; sometimes one made before with
        the same values (exporters share shape constants between unrelated nodes)."""
        arr = np.asarray(values, dtype=np.int64)
        key = tuple(arr.tolist())
        if share and SHARE_CONSTANTS and key in self.int_cache and self.int(0, 2) == 2:
            return self.int_cache[key]
        name = self.int_cache[key] = self.fresh("k")
        if self.bool():
            self.inits.append(numpy_helper.from_array(arr, name))
        else:
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.node_name("Constant"),
                                               value=numpy_helper.from_array(arr, name)))
        return name

    def floats(self, values) -> str:
        name = self.fresh("f")  # float constants of the graph (Resize scales): not weights
        self.nodes.append(helper.make_node("Constant", [], [name], name=self.node_name("Constant"),
                                           value=numpy_helper.from_array(np.asarray(values, np.float32), name)))
        return name

    def scalar(self, value: float) -> str:
        name = self.fresh("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node_name(self, op: str) -> str:
        if self.naming == "unnamed":
            return ""
        return self.fresh(op.lower() + "_")

    def op(self, op: str, inputs, shapes, **attrs):
        """Add a node; ``shapes`` is one output shape or a list of them. Returns Tensor(s)."""
        many = isinstance(shapes, list)
        shapes = shapes if many else [shapes]
        outs = [Tensor(self.fresh("t"), tuple(s)) for s in shapes]
        names = [i.name if isinstance(i, Tensor) else i for i in inputs]
        self.nodes.append(helper.make_node(op, names, [o.name for o in outs], name=self.node_name(op), **attrs))
        return outs if many else outs[0]

    def dims_of_table(self) -> int:
        return next(list(i.dims) for i in self.inits if i.name == self.table)[1]

    def batch_dim(self):
        return 0 if self.dynamic else self.batch

    # ---- layers ------------------------------------------------------------------------
    def conv(self, x: Tensor, co: int, k: int = 1, pad: int = 0, stride: int = 1, group: int = 1,
             bias: bool | None = None) -> Tensor:
        c, h, w = x.shape[1:]
        wt = self.weight([co, c // group, k, k], fan_in=c // group * k * k)
        bias = self.bool() if bias is None else bias
        ins = [x, wt] + ([self.weight([co], kind="b")] if bias else [])
        ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        attrs = {"kernel_shape": [k, k]}
        if pad:
            attrs["pads"] = [pad] * 4
        if stride != 1:
            attrs["strides"] = [stride, stride]
        if group != 1:
            attrs["group"] = group
        return self.op("Conv", ins, (BATCH, co, ho, wo), **attrs)

    def unary(self, x: Tensor) -> Tensor:
        op = self.choice([o for o, since in UNARY.items() if since <= self.opset])
        if op == "Clip":
            lo, hi = self.scalar(-1.0), self.scalar(1.5)
            return self.op("Clip", [x, lo, hi], x.shape)
        if op == "LeakyRelu":
            return self.op(op, [x], x.shape, alpha=0.1)
        return self.op(op, [x], x.shape)

    def batchnorm(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        ins = [x, self.weight([c], kind="s"), self.weight([c], kind="b"), self.weight([c], kind="c"),
               self.weight([c], kind="s")]
        return self.op("BatchNormalization", ins, x.shape, epsilon=1e-5)

    def reduce_mean(self, x: Tensor, axes, keepdims: int) -> Tensor:
        shape = [d for a, d in enumerate(x.shape) if a not in axes] if not keepdims else \
            [1 if a in axes else d for a, d in enumerate(x.shape)]
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.ints(axes)], tuple(shape), keepdims=keepdims)
        return self.op("ReduceMean", [x], tuple(shape), axes=list(axes), keepdims=keepdims)

    def linear(self, x: Tensor, fo: int, bias: bool | None = None) -> Tensor:
        """MatMul by a [F, fo] weight (+ Add bias) on a sequence or vector."""
        f = x.shape[-1]
        if self.int(0, 5) == 4:  # the weight stored [fo, f] and transposed in the graph (a weight view)
            wt = self.op("Transpose", [self.weight([fo, f], fan_in=f)], (f, fo), perm=[1, 0])
        else:
            wt = self.weight([f, fo], fan_in=f)
        y = self.op("MatMul", [x, wt], x.shape[:-1] + (fo,))
        if self.bool() if bias is None else bias:
            b = self.weight([fo], kind="b")
            y = self.op("Add", [y, b] if self.bool() else [b, y], y.shape)
        return y

    def gemm(self, x: Tensor, fo: int) -> Tensor:
        f = x.shape[1]
        trans_b = self.int(0, 1)
        wt = self.weight([fo, f] if trans_b else [f, fo], fan_in=f)
        ins = [x, wt] + ([self.weight([fo], kind="b")] if self.bool() else [])
        attrs = {"transB": 1} if trans_b else {}
        if self.int(0, 3) == 0:
            attrs["alpha"] = 0.5
        return self.op("Gemm", ins, (BATCH, fo), **attrs)


def channels(b: Builder) -> int:
    return b.int(2, 12)


# ---- image blocks ----------------------------------------------------------------------
def img_block(b: Builder, x: Tensor, depth: int, keep_spatial: bool) -> Tensor:
    kinds = ["conv", "unary", "bn", "chan_const", "grouped", "depthwise", "instnorm", "spatial", "residual",
             "concat", "split", "se", "pool", "shared", "nhwc_linear", "channel_reduce", "channel_softmax",
             "groupnorm", "convtranspose", "shuffle", "channel_slice", "channel_gather", "gating", "channel_norm",
             "spatial_reduce"]
    if depth <= 0:
        kinds = kinds[:8]
    kind = b.choice(kinds)
    b.blocks.append(kind)
    c, h, w = x.shape[1:]
    if kind == "conv":
        k = b.choice([1, 3])
        pad, stride = (k // 2, 1)
        if not keep_spatial and k == 3 and min(h, w) >= 5 and b.int(0, 3) == 0:
            pad = 0
        if not keep_spatial and min(h, w) >= 4 and b.int(0, 4) == 0:
            stride = 2
        y = b.conv(x, channels(b), k, pad, stride)
        return b.unary(y) if b.bool() else y
    if kind == "unary":
        return b.unary(x)
    if kind == "bn":
        return b.batchnorm(x)
    if kind == "chan_const":
        op = b.choice(["Mul", "Add", "Sub", "PRelu"])
        shape = b.choice([[1, c, 1, 1], [c, 1, 1]])
        cst = b.weight(shape, kind="c")
        ins = [x, cst] if op == "PRelu" or b.bool() else [cst, x]
        return b.op(op, ins, x.shape)
    if kind == "grouped":
        divisors = [g for g in range(2, c) if c % g == 0]
        if not divisors:
            return b.conv(x, channels(b), 1)
        g = b.choice(divisors)
        co = g * b.int(1, max(1, 12 // g))
        k = b.choice([1, 3])
        return b.conv(x, co, k, k // 2, 1, group=g)
    if kind == "depthwise":
        co = c * b.choice([1, 2])
        k = b.choice([3, 1])
        return b.conv(x, co, k, k // 2, 1, group=c)
    if kind == "residual":
        y = img_chain(b, x, depth - 1, True, b.int(1, 2))
        if y.shape != x.shape:
            y = b.conv(y, c, 1)
        short = b.conv(x, c, 1) if b.int(0, 3) == 0 else x
        op = b.choice(["Add", "Add", "Sum", "Max", "Mul"])
        ins = [short, y] if b.bool() else [y, short]
        if op == "Sum" and b.bool():
            ins.append(img_chain(b, x, 0, True, 1) if depth > 0 else x)
            if ins[-1].shape != x.shape:
                ins[-1] = b.conv(ins[-1], c, 1)
        out = b.op(op, ins, x.shape)
        return b.unary(out) if b.bool() else out
    if kind == "concat":
        branches = [x] * b.int(0, 2)
        while len(branches) < 2 or (len(branches) < 3 and b.int(0, 3) == 0):
            branches.append(img_chain(b, x, depth - 1, True, 1))
        order = b.draw(st.permutations(range(len(branches))))
        branches = [branches[i] for i in order]
        axis = b.choice([1, -3])
        return b.op("Concat", branches, (BATCH, sum(t.shape[1] for t in branches), h, w), axis=axis)
    if kind == "split":
        if c < 2:
            return b.unary(x)
        n = b.int(2, min(3, c))
        cuts = sorted(b.draw(st.lists(st.integers(1, c - 1), min_size=n - 1, max_size=n - 1, unique=True)))
        sizes = [e - s for s, e in zip([0] + cuts, cuts + [c])]
        how = b.choice(["sizes", "equal"])
        if how == "equal" and c % n == 0:  # no split input: equal parts (num_outputs from opset 18)
            sizes = [c // n] * n
            attrs = {"num_outputs": n} if b.opset >= 18 else {}
            parts = b.op("Split", [x], [(BATCH, s, h, w) for s in sizes], axis=b.choice([1, -3]), **attrs)
        else:
            parts = b.op("Split", [x, b.ints(sizes)], [(BATCH, s, h, w) for s in sizes], axis=b.choice([1, -3]))
        parts = [img_chain(b, p, depth - 1, True, 1) if b.bool() else p for p in parts]
        if len({p.shape for p in parts}) == 1 and b.bool():
            out = parts[0]
            for p in parts[1:]:
                out = b.op("Add", [out, p], out.shape)
            return out
        order = b.draw(st.permutations(range(len(parts))))
        parts = [parts[i] for i in order]
        return b.op("Concat", parts, (BATCH, sum(p.shape[1] for p in parts), h, w), axis=1)
    if kind == "se":
        p = b.op("GlobalAveragePool", [x], (BATCH, c, 1, 1))
        r = b.int(1, max(1, c // 2))
        s = b.op("Relu", [b.conv(p, r, 1)], (BATCH, r, 1, 1))
        s = b.op("Sigmoid", [b.conv(s, c, 1)], (BATCH, c, 1, 1))
        return b.op("Mul", [x, s] if b.bool() else [s, x], x.shape)
    if kind == "instnorm":
        return b.op("InstanceNormalization", [x, b.weight([c], kind="s"), b.weight([c], kind="b")], x.shape)
    if kind == "spatial":  # ops on the spatial axes only: channels pass through
        how = b.choice(["pad", "slice", "resize", "transpose_hw"] if not keep_spatial else ["transpose_sq"])
        if how == "pad":
            p = b.int(1, 2)
            return b.op("Pad", [x, b.ints([0, 0, p, p, 0, 0, p, p])], (BATCH, c, h + 2 * p, w + 2 * p))
        if how == "slice" and h >= 3:
            return b.op("Slice", [x, b.ints([1]), b.ints([h - 1]), b.ints([2])], (BATCH, c, h - 2, w))
        if how == "resize" and max(h, w) <= 8:
            return b.op("Resize", [x, "", b.floats([1, 1, 2, 2])], (BATCH, c, 2 * h, 2 * w), mode="nearest")
        if how == "transpose_hw":
            return b.op("Transpose", [x], (BATCH, c, w, h), perm=[0, 1, 3, 2])
        t = b.op("Transpose", [x], (BATCH, c, w, h), perm=[0, 1, 3, 2])  # and back: shape kept
        return b.op("Transpose", [b.unary(t)], x.shape, perm=[0, 1, 3, 2])
    if kind == "nhwc_linear":  # a pointwise linear on channels-last, then back to NCHW
        co = channels(b)
        t = b.op("Transpose", [x], (BATCH, h, w, c), perm=[0, 2, 3, 1])
        y = b.linear(t, co)
        return b.op("Transpose", [y], (BATCH, co, h, w), perm=[0, 3, 1, 2])
    if kind == "channel_reduce":  # CBAM-like spatial attention: x * sigmoid(reduce_c(x)), exact only for sums
        op = b.choice(["ReduceSum", "ReduceMean", "ReduceMax"])
        if op == "ReduceSum" or b.opset >= 18:
            r = b.op(op, [x, b.ints([1])], (BATCH, 1, h, w), keepdims=1)
        else:
            r = b.op(op, [x], (BATCH, 1, h, w), axes=[1], keepdims=1)
        s = b.op("Sigmoid", [r], r.shape)
        return b.op("Mul", [x, s] if b.bool() else [s, x], x.shape)
    if kind == "channel_norm":  # norms across channels: inexact or blocked
        if b.bool():
            return b.op("LRN", [x], x.shape, size=b.choice([1, 3]), alpha=0.01)
        return b.op("LpNormalization", [x], x.shape, axis=1, p=b.choice([1, 2]))
    if kind == "spatial_reduce":  # per channel over H, W, kept as [N, C, 1, 1] and broadcast back
        op = b.choice(["ReduceMax", "ReduceL2", "ReduceSumSquare", "ReduceMean", "GlobalLpPool", "GlobalMaxPool"])
        if op.startswith("Global"):
            r = b.op(op, [x], (BATCH, c, 1, 1))
        elif b.opset >= 18 or op == "ReduceSum":
            r = b.op(op, [x, b.ints([2, 3])], (BATCH, c, 1, 1), keepdims=1)
        else:
            r = b.op(op, [x], (BATCH, c, 1, 1), axes=[2, 3], keepdims=1)
        how = b.choice(["Sub", "Add", "Div", "gate"])
        if how == "gate":
            return b.op("Mul", [x, b.op("Sigmoid", [r], r.shape)], x.shape)
        if how == "Div":  # by a positive denominator
            r = b.op("Add", [b.op("Abs", [r], r.shape), b.scalar(1.0)], r.shape)
        return b.op(how, [x, r], x.shape)
    if kind == "channel_softmax":
        return b.op(b.choice(["Softmax", "LogSoftmax"]), [x], x.shape, axis=1)
    if kind == "groupnorm":
        divisors = [g for g in range(1, c + 1) if c % g == 0]
        g = b.choice(divisors)
        if b.opset < 21:  # GroupNormalization-18 (per-group scale) is deprecated
            return b.batchnorm(x)
        n = c
        return b.op("GroupNormalization", [x, b.weight([n], kind="s"), b.weight([n], kind="b")], x.shape,
                    num_groups=g, epsilon=1e-5)
    if kind == "convtranspose":
        co = channels(b)
        g = b.choice([1] + ([c] if co % c == 0 else []))
        k, stride = b.choice([(2, 2), (3, 1)])
        if keep_spatial:
            k, stride = 3, 1
        pad = 1 if k == 3 else 0
        wt = b.weight([c, co // g, k, k], fan_in=c * k * k)
        ins = [x, wt] + ([b.weight([co], kind="b")] if b.bool() else [])
        ho, wo = (h - 1) * stride - 2 * pad + k, (w - 1) * stride - 2 * pad + k
        attrs = {"kernel_shape": [k, k], "strides": [stride, stride], "pads": [pad] * 4}
        if g != 1:
            attrs["group"] = g
        return b.op("ConvTranspose", ins, (BATCH, co, ho, wo), **attrs)
    if kind == "shuffle":  # ShuffleNet channel shuffle: Reshape [N, g, C/g, H, W], Transpose, Reshape back
        divisors = [g for g in range(2, c) if c % g == 0]
        if not divisors:
            return b.unary(x)
        g = b.choice(divisors)
        r = b.op("Reshape", [x, b.ints([b.batch_dim(), g, c // g, h, w])], (BATCH, g, c // g, h, w))
        t = b.op("Transpose", [r], (BATCH, c // g, g, h, w), perm=[0, 2, 1, 3, 4])
        target = b.choice([[b.batch_dim(), c, h, w], [b.batch_dim(), -1, h, w], [b.batch_dim(), c, h, -1]])
        return b.op("Reshape", [t, b.ints(target)], x.shape)
    if kind == "channel_slice":
        if c < 3:
            return b.unary(x)
        start = b.int(0, c - 2)
        end = b.int(start + 1, c)
        step = b.choice([1, 2])
        n = len(range(start, end, step))
        ins = [x, b.ints([start]), b.ints([end]), b.ints([b.choice([1, -3])])] + ([b.ints([step])] if step != 1 else [])
        return b.op("Slice", ins, (BATCH, n, h, w))
    if kind == "channel_gather":
        idx = b.draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=c, unique=b.bool()))
        # indices may be shared with Split sizes, Slice starts, ... (test_gather_indices_shared_with_split_sizes)
        return b.op("Gather", [x, b.ints(idx)], (BATCH, len(idx), h, w), axis=1)
    if kind == "gating":  # a product of two conv branches
        co = channels(b)
        a, g = b.conv(x, co, 1), b.op("Sigmoid", [b.conv(x, co, 1)], (BATCH, co, h, w))
        return b.op("Mul", [a, g], a.shape)
    if kind == "shared":  # one weight used by two convs: couples the input and output channels
        k = b.choice([1, 3])
        wt = b.weight([c, c, k, k], fan_in=c * k * k)
        y = b.op("Conv", [x, wt], x.shape, kernel_shape=[k, k], pads=[k // 2] * 4)
        y = b.unary(y)
        return b.op("Conv", [y, wt], x.shape, kernel_shape=[k, k], pads=[k // 2] * 4)
    if kind == "pool":
        if keep_spatial or min(h, w) < 4 or b.bool():
            op = b.choice(["MaxPool", "AveragePool"])
            return b.op(op, [x], x.shape, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
        op = b.choice(["MaxPool", "AveragePool", "GlobalAveragePool"])
        if op == "GlobalAveragePool":
            return b.op(op, [x], (BATCH, c, 1, 1))
        return b.op(op, [x], (BATCH, c, h // 2, w // 2), kernel_shape=[2, 2], strides=[2, 2])
    raise AssertionError(kind)


def img_chain(b: Builder, x: Tensor, depth: int, keep_spatial: bool, n: int) -> Tensor:
    for _ in range(n):
        x = img_block(b, x, depth, keep_spatial)
    return x


def img_to_seq(b: Builder, x: Tensor) -> Tensor:
    c, h, w = x.shape[1:]
    b.blocks.append("img_to_seq")
    if b.bool():  # [N, C, HW] -> [N, HW, C]
        target = b.choice([[b.batch_dim(), c, -1], [b.batch_dim(), c, h * w], [b.batch_dim(), -1, h * w]])
        r = b.op("Reshape", [x, b.ints(target)], (BATCH, c, h * w))
        return b.op("Transpose", [r], (BATCH, h * w, c), perm=[0, 2, 1])
    t = b.op("Transpose", [x], (BATCH, h, w, c), perm=[0, 2, 3, 1])  # [N, H, W, C] -> [N, HW, C]
    target = b.choice([[b.batch_dim(), -1, c], [b.batch_dim(), h * w, c]])
    return b.op("Reshape", [t, b.ints(target)], (BATCH, h * w, c))


def img_to_vec(b: Builder, x: Tensor) -> Tensor:
    c, h, w = x.shape[1:]
    how = b.choice(["gap_flatten", "gap_reshape", "gap_squeeze", "flatten", "reduce"] if c * h * w <= 256 else
                   ["gap_flatten", "gap_reshape", "gap_squeeze", "reduce"])
    b.blocks.append(how)
    if how.startswith("gap"):
        x = b.op(b.choice(["GlobalAveragePool", "GlobalMaxPool"]), [x], (BATCH, c, 1, 1))
        if how == "gap_flatten":
            return b.op("Flatten", [x], (BATCH, c), axis=1)
        if how == "gap_squeeze":
            return b.op("Squeeze", [x, b.ints([2, 3])], (BATCH, c))
        return b.op("Reshape", [x, b.ints([b.batch_dim(), -1])], (BATCH, c))
    if how == "flatten":
        if b.bool():
            return b.op("Flatten", [x], (BATCH, c * h * w), axis=1)
        return b.op("Reshape", [x, b.ints([b.batch_dim(), c * h * w] if b.bool() else [b.batch_dim(), -1])],
                    (BATCH, c * h * w))
    return b.reduce_mean(x, [2, 3], keepdims=0)


# ---- sequence blocks -------------------------------------------------------------------
def attention(b: Builder, x: Tensor) -> Tensor:
    _, t, d = x.shape
    heads = b.int(1, 3)
    hd = b.int(1, max(1, min(4, 12 // heads)))
    inner = heads * hd
    if b.int(0, 3) == 3:  # fused QKV projection split on the feature axis
        qkv = b.linear(x, 3 * inner)
        q, k, v = b.op("Split", [qkv, b.ints([inner] * 3)], [(BATCH, t, inner)] * 3, axis=b.choice([2, -1]))
    else:
        q, k, v = (b.linear(x, inner) for _ in range(3))
    static = not b.dynamic
    style = b.choice(["zeros", "literal", "shape"] if static or b.opset >= 15 else ["zeros"])
    if style == "literal" and not static:
        style = "zeros"
    if style == "shape" and b.opset < 15:
        style = "zeros"

    def split_heads(z: Tensor) -> Tensor:
        if style == "literal":
            target = b.ints([b.batch, t, heads, hd])
        elif style == "zeros":
            target = b.ints(b.choice([[0, 0, heads, hd], [0, -1, heads, hd], [0, t, -1, hd]]))
        else:
            s0 = b.op("Shape", [x], (2,), start=0, end=2)
            target = b.op("Concat", [s0, b.ints([heads, hd])], (4,), axis=0).name
        return b.op("Reshape", [z, target], (BATCH, t, heads, hd))

    q4, k4, v4 = split_heads(q), split_heads(k), split_heads(v)
    qt = b.op("Transpose", [q4], (BATCH, heads, t, hd), perm=[0, 2, 1, 3])
    if b.bool():
        kt = b.op("Transpose", [k4], (BATCH, heads, hd, t), perm=[0, 2, 3, 1])
    else:
        k3 = b.op("Transpose", [k4], (BATCH, heads, t, hd), perm=[0, 2, 1, 3])
        kt = b.op("Transpose", [k3], (BATCH, heads, hd, t), perm=[0, 1, 3, 2])
    vt = b.op("Transpose", [v4], (BATCH, heads, t, hd), perm=[0, 2, 1, 3])
    sc = b.op("MatMul", [qt, kt], (BATCH, heads, t, t))
    scale = b.choice(["none", "mul", "div"])
    if scale != "none":
        sc = b.op("Mul" if scale == "mul" else "Div", [sc, b.scalar(1 / math.sqrt(hd) if scale == "mul"
                                                                     else math.sqrt(hd))], sc.shape)
    if b.int(0, 3) == 3:  # an additive mask
        sc = b.op("Add", [sc, b.weight([t, t], kind="c")], sc.shape)
    p = b.op("Softmax", [sc], sc.shape, axis=b.choice([-1, 3]))
    o = b.op("MatMul", [p, vt], (BATCH, heads, t, hd))
    ot = b.op("Transpose", [o], (BATCH, t, heads, hd), perm=[0, 2, 1, 3])
    if style == "literal":
        merged = b.ints([b.batch, t, inner])
    elif style == "zeros":
        merged = b.ints(b.choice([[0, 0, -1], [0, 0, inner], [0, -1, inner]]))
    else:
        s0 = b.op("Shape", [x], (2,), start=0, end=2)
        merged = b.op("Concat", [s0, b.ints([-1])], (3,), axis=0).name
    om = b.op("Reshape", [ot, merged], (BATCH, t, inner))
    return b.linear(om, d if b.int(0, 3) else channels(b))


def mlp(b: Builder, x: Tensor) -> Tensor:
    hidden = b.linear(x, channels(b), bias=True if b.int(0, 2) else None)
    hidden = b.unary(hidden)
    return b.linear(hidden, x.shape[-1] if b.int(0, 2) else channels(b))


def seq_block(b: Builder, x: Tensor) -> Tensor:
    kinds = ["linear", "mlp", "attention", "unary", "scale", "glu", "token_mix", "unsqueeze", "seq_concat",
             "cls_token", "pos_embedding"] + \
        (["layernorm"] if b.opset >= 17 else [])
    kind = b.choice(kinds)
    b.blocks.append(kind)
    if kind == "linear":
        return b.linear(x, channels(b))
    if kind == "unary":
        return b.unary(x)
    if kind == "scale":  # LayerScale: a per-feature constant
        cst = b.weight([x.shape[-1]], kind="c")
        return b.op(b.choice(["Mul", "Add"]), [x, cst] if b.bool() else [cst, x], x.shape)
    if kind == "glu":  # gated MLP: a product of two activations
        f = channels(b)
        gate = b.op("Sigmoid", [b.linear(x, f)], x.shape[:-1] + (f,))
        up = b.linear(x, f)
        y = b.linear(b.op("Mul", [gate, up] if b.bool() else [up, gate], up.shape), x.shape[-1])
        if b.bool():
            b.blocks.append("residual")
            y = b.op("Add", [x, y], x.shape)
        return y
    if kind == "cls_token":  # ViT: a learned [1, 1, D] token expanded over the batch, prepended
        _, t, d = x.shape
        cls = b.weight([1, 1, d], kind="c")
        if not b.dynamic:
            target = b.ints([b.batch, 1, d])
        elif b.opset >= 15:
            target = b.op("Concat", [b.op("Shape", [x], (1,), start=0, end=1), b.ints([1, d])], (3,), axis=0)
        else:
            target = b.op("Concat", [b.op("Slice", [b.op("Shape", [x], (3,)), b.ints([0]), b.ints([1])], (1,)),
                                     b.ints([1, d])], (3,), axis=0)
        e = b.op("Expand", [cls, target], (BATCH, 1, d))
        return b.op("Concat", [e, x], (BATCH, t + 1, d), axis=1)
    if kind == "pos_embedding":
        pos = b.weight([1] + list(x.shape[1:]) if b.bool() else list(x.shape[1:]), kind="c")
        return b.op("Add", [x, pos], x.shape)
    if kind == "token_mix":  # MLP-Mixer: a weight mixing the token axis; features ride along
        _, t, d = x.shape
        to = b.int(1, 6)
        if b.bool():
            return b.op("MatMul", [b.weight([to, t], fan_in=t), x], (BATCH, to, d))
        xt = b.op("Transpose", [x], (BATCH, d, t), perm=[0, 2, 1])
        y = b.op("MatMul", [xt, b.weight([t, to], fan_in=t)], (BATCH, d, to))
        return b.op("Transpose", [y], (BATCH, to, d), perm=[0, 2, 1])
    if kind == "unsqueeze":
        u = b.op("Unsqueeze", [x, b.ints([1])], (BATCH, 1) + x.shape[1:])
        return b.op("Squeeze", [b.unary(u), b.ints([1])], x.shape)
    if kind == "seq_concat":
        parts = [x, b.linear(x, channels(b))] if b.bool() else [b.linear(x, channels(b)), x]
        return b.op("Concat", parts, x.shape[:-1] + (sum(p.shape[-1] for p in parts),), axis=b.choice([-1, 2]))
    if kind == "layernorm":
        d = x.shape[-1]
        return b.op("LayerNormalization", [x, b.weight([d], kind="s"), b.weight([d], kind="b")], x.shape, axis=-1)
    y = attention(b, x) if kind == "attention" else mlp(b, x)
    if y.shape == x.shape and b.bool():
        b.blocks.append("residual")
        y = b.op("Add", [x, y] if b.bool() else [y, x], x.shape)
    return y


def seq_to_vec(b: Builder, x: Tensor) -> Tensor:
    _, t, d = x.shape
    how = b.choice(["reduce", "flatten"])
    b.blocks.append("seq_" + how)
    if how == "reduce":
        return b.reduce_mean(x, [1], keepdims=0)
    if b.bool():
        return b.op("Flatten", [x], (BATCH, t * d), axis=1)
    return b.op("Reshape", [x, b.ints([b.batch_dim(), -1])], (BATCH, t * d))


def vec_block(b: Builder, x: Tensor) -> Tensor:
    kind = b.choice(["gemm", "linear", "unary", "bn"])
    b.blocks.append("vec_" + kind)
    if kind == "bn":
        return b.batchnorm(x)
    if kind == "gemm":
        y = b.gemm(x, channels(b))
    elif kind == "linear":
        y = b.linear(x, channels(b))
    else:
        return b.unary(x)
    return b.unary(y) if b.bool() else y


def head(b: Builder, x: Tensor) -> Tensor:
    """The last layer: its output is a graph output."""
    co = b.int(1, 6)
    if x.kind == "img":
        k = b.choice([1, 3])
        return b.conv(x, co, k, k // 2)
    if x.kind == "seq":
        if b.table is not None and x.shape[-1] == b.dims_of_table() and b.bool():  # tied LM head
            b.blocks.append("tied_head")
            wt = b.op("Transpose", [b.table], (b.dims_of_table(), b.vocab), perm=[1, 0])
            return b.op("MatMul", [x, wt], x.shape[:-1] + (b.vocab,))
        return b.linear(x, co)
    return b.gemm(x, co) if b.bool() else b.linear(x, co)


# ---- the strategy ----------------------------------------------------------------------
@st.composite
def graphs(draw, max_blocks: int = 7) -> GraphCase:
    opset = draw(st.sampled_from([17, 17, 17, 13, 18, 18, 21]))
    seed = draw(st.integers(0, 2**16))
    dynamic = draw(st.booleans())
    batch = draw(st.sampled_from([1, 2]))
    b = Builder(draw, seed, opset, dynamic, batch, draw(st.sampled_from(["plain", "plain", "torch", "unnamed"])))
    start = b.choice(["img", "img", "img", "seq", "seq", "tokens", "vec"])
    if start == "tokens":  # token ids [N, T] -> embedding table Gather -> [N, T, D]
        b.vocab, t, d = b.int(3, 16), b.int(2, 6), channels(b)
        b.table = b.weight([b.vocab, d], kind="w")
        b.blocks.append("embedding")
        inp = Tensor("x", (BATCH, t))
        x = b.op("Gather", [b.table, inp], (BATCH, t, d), axis=0)
        shape = inp.shape
    elif start == "img":
        s = b.int(4, 8)
        shape = (BATCH, b.int(1, 6), s, s if b.int(0, 3) else b.int(4, 8))
        b.dynamic_spatial = b.int(0, 5) == 5
    elif start == "seq":
        shape = (BATCH, b.int(2, 6), channels(b))
    else:
        shape = (BATCH, channels(b))
    if start != "tokens":
        x = inp = Tensor("x", shape)
    extra_outputs: list[Tensor] = []
    if b.int(0, 5) != 3:  # mostly a stem layer first (else the input's channels block the first blocks)
        b.blocks.append("stem")
        x = b.conv(x, channels(b), 3, 1) if x.kind == "img" else b.linear(x, channels(b))
    def stage(x: Tensor, n: int) -> Tensor:
        for _ in range(n):
            x = img_block(b, x, 2, False) if x.kind == "img" else seq_block(b, x) if x.kind == "seq" \
                else vec_block(b, x)
            side = b.int(0, 19)  # rarely a side output: a head, or the tensor itself
            if side in (7, 8):
                extra_outputs.append(head(b, x) if side == 7 else x)
        return x

    # blocks of the input's kind, then maybe a few after a move to sequences / vectors
    x = stage(x, b.int(1, max_blocks) if x.kind != "vec" else b.int(1, 3))
    if x.kind == "img":
        then = b.choice(["head", "head", "seq", "vec"])
        if then == "seq":
            x = stage(img_to_seq(b, x), b.int(0, 3))
        elif then == "vec":
            x = stage(img_to_vec(b, x), b.int(0, 2))
    if x.kind == "seq" and b.int(0, 2) == 2:
        x = stage(seq_to_vec(b, x), b.int(0, 2))
    out = head(b, x)
    post = b.int(0, 9)  # sometimes the last layer's output reaches the graph output through an op
    if post == 8:
        out = b.op("Identity", [out], out.shape)
    elif post == 9:
        out = b.op(b.choice(["Sigmoid", "Softmax", "Relu"]), [out], out.shape)
    outputs = [out] + [t for t in extra_outputs if t.name != out.name]
    model = make_model(b, inp, outputs)
    if b.vocab:
        feeds = {"x": np.random.default_rng(seed + 1).integers(0, b.vocab, concrete(shape, batch)).astype(np.int64)}
    else:
        feeds = {"x": np.random.default_rng(seed + 1).standard_normal(concrete(shape, batch)).astype(np.float32)}
    return GraphCase(model, feeds, {t.name: concrete(t.shape, batch) for t in outputs}, b.blocks, b.vocab)


def concrete(shape, batch: int) -> tuple:
    return tuple(batch if d == BATCH else d for d in shape)


def value_info(t: Tensor, b: Builder, elem=TensorProto.FLOAT, is_input: bool = False):
    dims = [BATCH if d == BATCH and b.dynamic else b.batch if d == BATCH else d for d in t.shape]
    if b.dynamic_spatial:
        if is_input:  # [N, C, "H", "W"]: the graph is only run at the sizes it was made for
            dims[2:] = ["H", "W"]
        else:  # outputs: declared by rank only
            dims = [None] * len(dims)
    return helper.make_tensor_value_info(t.name, elem, dims)


def make_model(b: Builder, inp: Tensor, outputs: list[Tensor]) -> onnx.ModelProto:
    elem = TensorProto.INT64 if b.vocab else TensorProto.FLOAT
    graph = helper.make_graph(b.nodes, "random", [value_info(inp, b, elem, True)], [value_info(t, b) for t in outputs],
                              initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.opset)], producer_name="random_graphs")
    model.ir_version = 8 if b.opset <= 18 else 10
    return model


def to_text(model: onnx.ModelProto) -> str:
    """ONNX text with float initializers as graph inputs (``tests.helpers.build`` gives them
    random values again) and integer initializers as Constant nodes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    consts, inputs = [], []
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT:
            inputs.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT, list(init.dims)))
        else:
            consts.append(helper.make_node("Constant", [], [init.name], value=init))
    del g.initializer[:]
    g.input.extend(inputs)
    nodes = consts + list(g.node)
    for n in nodes:
        n.name = ""
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                a.t.name = ""  # the parser takes no quoted names there
    del g.node[:]
    g.node.extend(nodes)
    return onnx.printer.to_text(m)

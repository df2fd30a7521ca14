"""Quantized graphs: QDQ (QuantizeLinear / DequantizeLinear), QOperator (QLinearConv,
QLinearMatMul, com.microsoft QLinear* and QGemm), dynamic quantization (DynamicQuantizeLinear,
ConvInteger, MatMulInteger) and com.microsoft MatMulNBits (weight-only, blocked 4-bit).

Integer weights are parameters like float ones: a per-channel scale or zero point follows its
weight's channel axis, an int32 bias follows the output channels. Activation scales and zero
points must be per tensor (a constant scalar), so pruning channels leaves them exact; a scale
computed at run time over the whole tensor (DynamicQuantizeLinear) is not, and its dims are
marked inexact. The table :data:`QUANT_WEIGHTS` says where each op reads its quantized weight,
scale and zero point; the metrics, the magnitude criteria and the masked check read it through
:func:`integer_params`, :func:`real_weight` and :func:`real_zero`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from spa.dims import block, offset
from spa.ops.context import RuleContext
from spa.ops.conv import couple_conv
from spa.ops.elementwise import couple_broadcast
from spa.ops.linear import couple_gemm, couple_matmul
from spa.ops.reduce import softmax, softmax_legacy
from spa.ops.registry import norm_domain, op
from spa.ops.shapes import prod, same_shape

MS = "com.microsoft"


@dataclass(frozen=True, slots=True)
class QuantWeight:
    """Input ``weight`` of the op is a quantized tensor, dequantized as
    ``(q - input[zero]) * input[scale]`` with per-channel entries along ``axis(node, rank)``."""

    weight: int
    scale: int | None
    zero: int | None
    axis: Callable[[object, int], int]
    biases: tuple[int, ...] = ()  # int32 biases (counted as parameters, never masked)


def _attr(node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _dq_axis(node, rank: int) -> int:
    return int(_attr(node, "axis", 1)) % max(rank, 1)


QUANT_WEIGHTS: dict[tuple[str, str], QuantWeight] = {
    ("", "DequantizeLinear"): QuantWeight(0, 1, 2, _dq_axis),
    ("", "QLinearConv"): QuantWeight(3, 4, 5, lambda n, r: 0, (8,)),
    ("", "QLinearMatMul"): QuantWeight(3, 4, 5, lambda n, r: r - 1),
    (MS, "QGemm"): QuantWeight(3, 4, 5, lambda n, r: 0 if _attr(n, "transB", 0) else 1, (6,)),
    ("", "ConvInteger"): QuantWeight(1, None, 3, lambda n, r: 0),
    ("", "MatMulInteger"): QuantWeight(1, None, 3, lambda n, r: r - 1),
    (MS, "QLinearAdd"): QuantWeight(3, 4, 5, lambda n, r: r - 1, (0,)),  # a constant operand: a bias
    (MS, "QLinearMul"): QuantWeight(3, 4, 5, lambda n, r: r - 1, (0,)),
}


# ---- shared coupling helpers ------------------------------------------------------------------
def _per_tensor(ctx: RuleContext, *indices: int) -> None:
    """Activation scales / zero points: one value for the whole tensor (their axes are free)."""
    for i in indices:
        v = ctx.inp(i)
        if v is None or not v.name:
            continue
        if v.shape is None or any(s != 1 for s in ctx.shape(v)):
            ctx.refuse(f"input {i} ('{v.name}') is not a per-tensor scale or zero point")
        for d in ctx.dims(v):
            ctx.free(d)


def _per_channel(ctx: RuleContext, w, axis: int, *indices: int) -> None:
    """Weight scales / zero points: a scalar, or one entry per channel of ``w`` along ``axis``."""
    for i in indices:
        v = ctx.inp(i)
        if v is None or not v.name:
            continue
        shape = ctx.shape(v)
        if all(s == 1 for s in shape):
            for d in ctx.dims(v):
                ctx.free(d)
        elif len(shape) == 1 and shape[0] == ctx.size(w, axis):
            ctx.couple(ctx.dim(v, 0), ctx.dim(w, axis))
        else:
            ctx.refuse(f"input {i} ('{v.name}') of shape {list(shape)} is neither per tensor nor per channel "
                       f"along axis {axis} of '{w.name}'")


def _identity_all(ctx: RuleContext, x, y) -> None:
    for dx, dy in zip(ctx.dims(x), ctx.dims(y)):
        ctx.couple(dx, dy)


def _conv_macs_at(w_index: int):
    def macs(node, ins, outs):
        """out elements × (Cin/g · k) per output element."""
        return prod(outs[0]) * prod(ins[w_index][1:]) if outs[0] and ins[w_index] else None
    return macs


def _matmul_macs(node, ins, outs):
    """out elements × K."""
    return prod(outs[0]) * ins[0][-1] if ins[0] and outs[0] else None


# ---- QDQ --------------------------------------------------------------------------------------
@op("QuantizeLinear", "DequantizeLinear", since=10, shape=same_shape, weight_view="convert")
def quantize_linear(ctx: RuleContext) -> None:
    """y[a] ~ x[a] (elementwise); scale[0] ~ zero_point[0] ~ x[axis] when per channel."""
    x, y = ctx.inp(0), ctx.out(0)
    if int(ctx.attr("block_size", 0) or 0):
        ctx.refuse("blocked quantization (block_size) is not supported")
    if x.dtype is not None and x.dtype.name in ("INT4", "UINT4", "INT2", "UINT2"):
        ctx.refuse(f"sub-byte tensor '{x.name}' ({x.dtype.name}) is not sliced")
    _identity_all(ctx, x, y)
    rank = ctx.rank(x)
    _per_channel(ctx, x, _dq_axis(ctx.node, rank) if rank else 0, 1, 2)


# ---- QOperator --------------------------------------------------------------------------------
@op("QLinearConv", since=10, macs=_conv_macs_at(3))
def qlinear_conv(ctx: RuleContext) -> None:
    """Conv(x, w, B): y[1] ~ w[0] ~ w_scale[0] ~ w_zero_point[0] ~ B[0]; x[1] ~ w[1]."""
    x, w, b, y = ctx.inp(0), ctx.inp(3), ctx.inp(8), ctx.out(0)
    _per_tensor(ctx, 1, 2, 6, 7)
    _per_channel(ctx, w, 0, 4, 5)
    couple_conv(ctx, x, w, b, y)


@op("ConvInteger", since=10, macs=_conv_macs_at(1))
def conv_integer(ctx: RuleContext) -> None:
    """Conv(x - x_zp, w - w_zp): y[1] ~ w[0] ~ w_zero_point[0]; x[1] ~ w[1]."""
    x, w, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    _per_tensor(ctx, 2)
    _per_channel(ctx, w, 0, 3)
    couple_conv(ctx, x, w, None, y)


@op("QLinearMatMul", since=10, macs=_matmul_macs)
def qlinear_matmul(ctx: RuleContext) -> None:
    """MatMul(a, b): A[-1] ~ B[-2]; Y[-1] ~ B[-1] ~ b_scale[0] ~ b_zero_point[0]; batch axes."""
    a, b, y = ctx.inp(0), ctx.inp(3), ctx.out(0)
    _per_tensor(ctx, 1, 2, 6, 7)
    _per_channel(ctx, b, ctx.rank(b) - 1, 4, 5)
    couple_matmul(ctx, a, b, y)


@op("MatMulInteger", since=10, macs=_matmul_macs)
def matmul_integer(ctx: RuleContext) -> None:
    """MatMul(A - a_zp, B - b_zp): A[-1] ~ B[-2]; Y[-1] ~ B[-1] ~ b_zero_point[0]; batch axes."""
    a, b, y = ctx.inp(0), ctx.inp(1), ctx.out(0)
    _per_tensor(ctx, 2)
    _per_channel(ctx, b, ctx.rank(b) - 1, 3)
    couple_matmul(ctx, a, b, y)


def _qgemm_shape(node):
    a, b = node.inputs[0], node.inputs[3]
    if a is None or b is None or a.shape is None or b.shape is None or len(node.inputs) < 8:
        return None  # without y_scale the output is float: its type is not the input's
    m = a.shape[1] if _attr(node, "transA", 0) else a.shape[0]
    n = b.shape[0] if _attr(node, "transB", 0) else b.shape[1]
    return [[m, n]]


def _qgemm_macs(node, ins, outs):
    """M × N × K."""
    if not (ins[0] and outs[0]):
        return None
    return prod(outs[0]) * (ins[0][0] if _attr(node, "transA", 0) else ins[0][1])


@op("QGemm", domain=MS, shape=_qgemm_shape, macs=_qgemm_macs)
def qgemm(ctx: RuleContext) -> None:
    """Gemm: A[K] ~ B[K] (in); Y[1] ~ B[N] (out) ~ b_scale ~ b_zero_point ~ C[0]; Y[0] ~ A[M]."""
    b = ctx.inp(3)
    _per_tensor(ctx, 1, 2, 7, 8)
    _per_channel(ctx, b, 0 if int(ctx.attr("transB", 0)) else 1, 4, 5)
    couple_gemm(ctx, ctx.inp(0), b, ctx.inp(6), ctx.out(0))


def _broadcast_shape(node):
    a, b = node.inputs[0], node.inputs[3]
    if a is None or b is None or a.shape is None or b.shape is None:
        return None
    ra, rb = list(a.shape), list(b.shape)
    n = max(len(ra), len(rb))
    ra, rb = [1] * (n - len(ra)) + ra, [1] * (n - len(rb)) + rb
    return [[x if y == 1 else y for x, y in zip(ra, rb)]]


@op("QLinearAdd", "QLinearMul", domain=MS, shape=_broadcast_shape)
def qlinear_binary(ctx: RuleContext) -> None:
    """C[a] ~ A[a] ~ B[a] (numpy broadcasting; size-1 axes are free)."""
    _per_tensor(ctx, 1, 2, 4, 5, 6, 7)
    couple_broadcast(ctx, [ctx.inp(0), ctx.inp(3)], ctx.out(0), "param")


@op("QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftsign", domain=MS, shape=same_shape)
def qlinear_unary(ctx: RuleContext) -> None:
    """Y[a] ~ X[a] on every axis."""
    _per_tensor(ctx, 1, 2, 3, 4)
    _identity_all(ctx, ctx.inp(0), ctx.out(0))


@op("QLinearSoftmax", domain=MS, shape=same_shape)
def qlinear_softmax(ctx: RuleContext) -> None:
    """Softmax of the ``opset`` it names: axes other than the normalized one(s) are carried."""
    _per_tensor(ctx, 1, 2, 3, 4)
    (softmax if int(ctx.attr("opset", 13)) >= 13 else softmax_legacy)(ctx)


def _pooled(size, k: int, stride: int, pad: int, ceil: bool):
    if not isinstance(size, int):
        return None
    span = size + pad - k
    return (-(-span // stride) if ceil else span // stride) + 1


def _pool_shape(node):
    """[N, C, spatial...] (channels first; channels_last keeps C last)."""
    x = node.inputs[0]
    if x is None or x.shape is None:
        return None
    dims = [getattr(d, "value", d) for d in x.shape]
    last = bool(_attr(node, "channels_last", 0))
    c = len(dims) - 1 if last else 1
    spatial = [k for k in range(1, len(dims)) if k != c]
    if node.op_type == "QLinearGlobalAveragePool":
        return [[d if k in (0, c) else 1 for k, d in enumerate(dims)]]
    if str(_attr(node, "auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        return None
    kernel = list(_attr(node, "kernel_shape"))
    r = len(kernel)
    strides = list(_attr(node, "strides", [1] * r))
    pads = list(_attr(node, "pads", [0] * 2 * r))
    ceil = bool(_attr(node, "ceil_mode", 0))
    out = list(dims)
    for i, k in enumerate(spatial):
        out[k] = _pooled(dims[k], kernel[i], strides[i], pads[i] + pads[i + r], ceil)
    return [out]


def _concat_shape(node):
    """Inputs' shape with the concatenated axis summed."""
    xs = [node.inputs[k] for k in range(2, len(node.inputs), 3)]
    if not xs or any(x is None or x.shape is None for x in xs):
        return None
    out = [getattr(d, "value", d) for d in xs[0].shape]
    axis = int(_attr(node, "axis")) % len(out)
    sizes = [getattr(x.shape[axis], "value", x.shape[axis]) for x in xs]
    out[axis] = sum(sizes) if all(isinstance(s, int) for s in sizes) else None
    y = node.outputs[0]
    if y.type is None:  # the element type is the inputs' (input 0 is the float Y_scale)
        y.type = xs[0].type
    return [out]


@op("QLinearGlobalAveragePool", "QLinearAveragePool", domain=MS, shape=_pool_shape)
def qlinear_pool(ctx: RuleContext) -> None:
    """Per-channel pooling: y[0] ~ x[0], y[c] ~ x[c] (c = 1, or the last axis if channels_last)."""
    x, y = ctx.inp(0), ctx.out(0)
    _per_tensor(ctx, 1, 2, 3, 4)
    c = ctx.rank(x) - 1 if int(ctx.attr("channels_last", 0)) else 1
    ctx.couple(ctx.dim(x, 0), ctx.dim(y, 0))
    ctx.couple(ctx.dim(x, c), ctx.dim(y, c))


@op("QLinearConcat", domain=MS, shape=_concat_shape)
def qlinear_concat(ctx: RuleContext) -> None:
    """Y[axis] index off_k + i ~ X_k[axis] index i (inputs are (X, scale, zero point) triples)."""
    y = ctx.out(0)
    r = ctx.rank(y)
    axis = int(ctx.attr("axis")) % r
    _per_tensor(ctx, 0, 1)
    off = 0
    for k in range(2, len(ctx.node.inputs), 3):
        x = ctx.inp(k)
        _per_tensor(ctx, k + 1, k + 2)
        for a in range(r):
            if a != axis:
                ctx.couple(ctx.dim(x, a), ctx.dim(y, a))
        ctx.couple(ctx.dim(x, axis), ctx.dim(y, axis), offset(off))
        off += ctx.int_size(x, axis)


# ---- dynamic quantization ---------------------------------------------------------------------
@op("DynamicQuantizeLinear", since=11)
def dynamic_quantize_linear(ctx: RuleContext) -> None:
    """y[a] ~ x[a]; inexact: the scale is the range of the whole tensor, removed channels included."""
    x, y = ctx.inp(0), ctx.out(0)
    _identity_all(ctx, x, y)
    for d in ctx.dims(x):
        ctx.inexact(d)


# ---- MatMulNBits ------------------------------------------------------------------------------
def _nbits_shape(node):
    a = node.inputs[0]
    if a is None or a.shape is None:
        return None
    return [list(a.shape)[:-1] + [int(_attr(node, "N"))]]


def _nbits_macs(node, ins, outs):
    """out elements × K."""
    return prod(outs[0]) * int(_attr(node, "K")) if outs[0] else None


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Sub-byte values of the last axis of ``packed`` (low bits first), ``count`` of them."""
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * bits
    vals = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return vals.reshape(*packed.shape[:-1], -1)[..., :count].astype(np.uint8)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    n = values.shape[-1]
    pad = (-n) % per
    v = np.concatenate([values, np.zeros((*values.shape[:-1], pad), np.uint8)], axis=-1).astype(np.uint8)
    v = v.reshape(*values.shape[:-1], -1, per)
    shifts = np.arange(per, dtype=np.uint8) * bits
    return np.bitwise_or.reduce(v << shifts, axis=-1).astype(np.uint8)


def _nbits_zero_fixup(ctx: RuleContext, blocks, n_blocks: int, bits: int) -> None:
    """Packed zero points [N, ceil(n_blocks·bits/8)] lose the removed blocks, repacked."""
    node = ctx.node

    def fix(apply) -> None:
        if not apply.is_pruned(blocks):
            return
        zp = node.inputs[3].const_value.numpy()
        vals = _unpack(zp, bits, n_blocks)[:, apply.kept(blocks)]
        apply.set_input_const(node, 3, _pack(vals, bits))

    ctx.fixup("MatMulNBits zero points", fix)


def _nbits_attr_fixup(ctx: RuleContext, name: str, d, per: int) -> None:
    node = ctx.node

    def fix(apply) -> None:
        if apply.is_pruned(d):
            apply.set_attr(node, name, apply.new_size(d) * per)

    ctx.fixup(f"MatMulNBits {name}", fix)


@op("MatMulNBits", domain=MS, shape=_nbits_shape, macs=_nbits_macs)
def matmul_nbits(ctx: RuleContext) -> None:
    """Y[-1] ~ B[0] ~ scales[0] ~ zero_points[0] ~ bias[0] (N); A[-1] // block_size ~ B[1] ~
    scales[1] (whole K blocks, zero points repacked); A's leading axes ~ Y's."""
    a, b, scales, zp, y = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.inp(3), ctx.out(0)
    bits, bs = int(ctx.attr("bits", 4)), int(ctx.attr("block_size"))
    k, n = int(ctx.attr("K")), int(ctx.attr("N"))
    if bits not in (2, 4, 8):
        ctx.refuse(f"bits={bits} is not supported")
    if ctx.inp(4) is not None and ctx.inp(4).name:
        ctx.refuse("g_idx (act-order) reorders K: not supported")
    if ctx.const(b) is None or ctx.rank(b) != 3:
        ctx.refuse(f"B ('{b.name}') is not a constant [N, n_blocks, blob] tensor")
    n_blocks = ctx.int_size(b, 1)
    bias = ctx.inp(5)
    for i in range(ctx.rank(a) - 1):
        ctx.couple(ctx.dim(a, i), ctx.dim(y, i))
    out = ctx.dim(b, 0)
    ctx.couple(ctx.dim(y, -1), out)
    ctx.role(out, "out")
    ctx.free(ctx.dim(b, 2))
    _nbits_attr_fixup(ctx, "N", out, 1)
    if bias is not None and bias.name:
        ctx.couple(ctx.dim(bias, 0), out)
        ctx.role(ctx.dim(bias, 0), "bias")
    side = [v for v in (scales, zp) if v is not None and v.name]
    two_d = all(ctx.rank(v) == 2 for v in side)
    for v in side:
        if ctx.rank(v) == 2:
            ctx.couple(ctx.dim(v, 0), out)
        else:  # [N * per_row]: row n holds entries n*per_row ..
            ctx.couple(ctx.dim(v, 0), out, block(ctx.int_size(v, 0) // n))
    x_k = ctx.dim(a, -1)
    if not two_d or k != n_blocks * bs:
        ctx.block(x_k, f"K of MatMulNBits '{ctx.name}' is blocked (block_size {bs}); only whole blocks of "
                       "2-D scales / zero points can be pruned")
        for v in side:
            if ctx.rank(v) == 2:
                ctx.free(ctx.dim(v, 1))
        ctx.free(ctx.dim(b, 1))
        return
    blocks = ctx.virtual("blocks", n_blocks)
    ctx.couple(x_k, blocks, block(bs))
    ctx.role(x_k, "in")  # masked on the float activation: a packed weight has no plain zero
    ctx.couple(ctx.dim(b, 1), blocks)
    ctx.couple(ctx.dim(scales, 1), blocks)
    if zp is not None and zp.name:
        if zp.dtype is not None and zp.dtype.is_floating_point():
            ctx.couple(ctx.dim(zp, 1), blocks)
        else:
            ctx.free(ctx.dim(zp, 1))
            _nbits_zero_fixup(ctx, blocks, n_blocks, bits)
    _nbits_attr_fixup(ctx, "K", blocks, bs)


# ---- what other analyses read ----------------------------------------------------------------
def _uses_as_weight(value):
    """(node, QuantWeight) for each node reading ``value`` as its quantized weight."""
    for node, index in value.uses():
        spec = QUANT_WEIGHTS.get((norm_domain(node.domain), node.op_type))
        if spec is not None and spec.weight == index:
            yield node, spec


def _operand(node, index: int | None):
    if index is None or index >= len(node.inputs) or node.inputs[index] is None:
        return None
    v = node.inputs[index]
    return None if v.const_value is None else v.const_value.numpy()


def _along(arr: np.ndarray | None, axis: int, shape: tuple) -> np.ndarray | None:
    """A scalar or per-channel [C] array broadcast to ``shape`` along ``axis``."""
    if arr is None:
        return None
    if arr.size == 1:
        return np.broadcast_to(arr.reshape(()), shape)
    view = [1] * len(shape)
    view[axis] = arr.size
    return np.broadcast_to(arr.reshape(view), shape)


def real_zero(value) -> np.ndarray | None:
    """The quantized value that stands for a real 0 in each entry of the integer weight
    ``value`` (its zero point, broadcast to its shape), or None when it is no quantized weight."""
    arr = value.const_value.numpy() if value.const_value is not None else None
    if arr is None or not np.issubdtype(arr.dtype, np.integer):
        return None
    for node, spec in _uses_as_weight(value):
        zp = _operand(node, spec.zero)
        zp = np.zeros((), arr.dtype) if zp is None else zp
        return _along(zp, spec.axis(node, arr.ndim), arr.shape).astype(arr.dtype)
    return None


def _nbits_real(node, q: np.ndarray) -> np.ndarray:
    """[N, n_blocks, block_size] dequantized values of a MatMulNBits B."""
    bits, bs = int(_attr(node, "bits", 4)), int(_attr(node, "block_size"))
    n, nb = q.shape[0], q.shape[1]
    vals = _unpack(q, bits, bs).astype(np.float64)
    scales = _operand(node, 2).astype(np.float64).reshape(n, nb, 1)
    zp = _operand(node, 3)
    if zp is None:
        zero = np.full((n, nb, 1), float(1 << (bits - 1)))
    elif np.issubdtype(zp.dtype, np.floating):
        zero = zp.astype(np.float64).reshape(n, nb, 1)
    else:
        zero = _unpack(zp.reshape(n, -1), bits, nb).astype(np.float64).reshape(n, nb, 1)
    return (vals - zero) * scales


def real_weight(value) -> np.ndarray | None:
    """Real values of the integer weight ``value`` ((q - zero point) × scale, per channel where
    the scale is a constant), or None when it is no quantized weight."""
    arr = value.const_value.numpy() if value.const_value is not None else None
    if arr is None or not np.issubdtype(arr.dtype, np.integer):
        return None
    for node, index in value.uses():
        if (norm_domain(node.domain), node.op_type) == (MS, "MatMulNBits") and index == 1:
            return _nbits_real(node, arr)
    for node, spec in _uses_as_weight(value):
        axis = spec.axis(node, arr.ndim)
        zp = _along(_operand(node, spec.zero), axis, arr.shape)
        scale = _along(_operand(node, spec.scale), axis, arr.shape)
        real = arr.astype(np.float64) - (0.0 if zp is None else zp.astype(np.float64))
        return real if scale is None else real * scale
    return None


def integer_params(graph) -> int:
    """Elements of the integer weights and biases quantized ops read (``integer_param_sizes``)."""
    return sum(integer_param_sizes(graph).values())


def integer_param_sizes(graph) -> dict[str, int]:
    """Elements of each integer weight and bias quantized ops read (a packed MatMulNBits B
    counts its N × K weights)."""
    counted: dict[str, int] = {}
    for node in graph:
        key = (norm_domain(node.domain), node.op_type)
        if key == (MS, "MatMulNBits"):
            if _operand(node, 1) is not None:
                counted[node.inputs[1].name] = int(_attr(node, "N")) * int(_attr(node, "K"))
            continue
        spec = QUANT_WEIGHTS.get(key)
        for i in (spec.weight, *spec.biases) if spec is not None else ():
            arr = _operand(node, i)
            if arr is not None and np.issubdtype(arr.dtype, np.integer):
                counted[node.inputs[i].name] = int(arr.size)
    return counted


def output_step(graph) -> float:
    """One quantization step of the graph's outputs: the largest constant scale of a
    DequantizeLinear that computes one, 1 for a quantized (8- or 16-bit integer) output, 0 when
    none is quantized (indices, int64, are compared exactly)."""
    step = 0.0
    for v in graph.outputs:
        prod = v.producer()
        if v.dtype is not None and v.dtype.name in ("INT8", "UINT8", "INT16", "UINT16"):
            step = max(step, 1.0)
        elif prod is not None and (norm_domain(prod.domain), prod.op_type) == ("", "DequantizeLinear"):
            scale = _operand(prod, 1)
            if scale is not None and scale.size:
                step = max(step, float(np.max(np.abs(scale))))
    return step

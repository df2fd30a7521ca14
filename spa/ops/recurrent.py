"""Recurrent layers: LSTM, GRU, RNN and onnxruntime's DynamicQuantizeLSTM.

The hidden size H is one group: channel ``h`` is row ``g*H + h`` of every gate block ``g`` of
W, R and B, column ``h`` of R (the state read back), entry ``h`` of each peephole block and of
the initial states, and the last axis of Y, Y_h and Y_c. Removing unit ``h`` equals zeroing
what reads it (R's column ``h`` and the consumers' inputs): no other unit sees its gates. The
directions axis is never pruned; views after the layer fold it over H with ``i % H``.
"""

from __future__ import annotations

import numpy as np

from spa.dims import offset
from spa.ops.context import RuleContext
from spa.ops.layers import attr
from spa.ops.registry import op
from spa.ops.shapes import prod
from spa.ops.view import mark_index_axes

#: Gate blocks per op: rows of W and R are ``gates * H``, B holds ``2 * gates * H``.
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1, "DynamicQuantizeLSTM": 4}
_INITIAL_STATES = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,), "DynamicQuantizeLSTM": (5, 6)}
_PEEPHOLES = 7  # LSTM's P: [D, 3H]


def _given(v) -> bool:
    return v is not None and bool(v.name)


def _rnn_macs(node, ins, outs):
    """time x batch x (|W| + |R|): every step multiplies the input and the state by all gates."""
    if not (ins[0] and ins[1] and len(ins) > 2 and ins[2]):
        return None
    return prod(ins[0][:2]) * (prod(ins[1]) + prod(ins[2]))


def _dq_lstm_shape(node):
    """Y [T, D, B, H], Y_h and Y_c [D, B, H] from X [T, B, I] and R [D, H, 4H]."""
    x, r = node.inputs[0], node.inputs[2]
    if x is None or r is None or x.shape is None or r.shape is None:
        return None
    t, b, d, h = x.shape[0], x.shape[1], r.shape[0], r.shape[1]
    return [[t, d, b, h], [d, b, h], [d, b, h]]


def _blocks(ctx: RuleContext, v, axis: int, n: int, size: int, hidden, tag: str) -> None:
    """v[axis] index ``k*H + h`` ~ hidden[h] for each of ``n`` blocks (a virtual dim per block,
    tied by offset into the whole axis and by identity to the hidden units)."""
    if ctx.int_size(v, axis) != n * size:
        ctx.refuse(f"axis {axis} of '{v.name}' has {ctx.size(v, axis)} entries, expected {n} x {size}")
    whole = ctx.dim(v, axis)
    for k in range(n):
        part = ctx.virtual(f"{tag}{k}", size)
        ctx.couple(part, whole, offset(k * size))
        ctx.couple(part, hidden)


def _sources(ctx: RuleContext, v, axis: int, depth: int = 8) -> list:
    """(constant, axis) pairs that ``v[axis]`` is assembled from by Concat / Slice / Unsqueeze
    (exporters reorder the gates of framework parameters so), ``[(v, axis)]`` for a constant."""
    if v is None or v.const_value is not None:
        return [] if v is None else [(v, axis)]
    node = v.producer()
    if node is None or depth == 0 or node.domain not in ("", "ai.onnx"):
        return []
    if node.op_type == "Concat":
        return [s for x in node.inputs for s in _sources(ctx, x, axis, depth - 1)]
    if node.op_type == "Slice":
        return _sources(ctx, node.inputs[0], axis, depth - 1)
    if node.op_type == "Unsqueeze":
        axes = ctx.const(node.inputs[1]) if len(node.inputs) > 1 else attr(node, "axes")
        if axes is None:
            return []
        axes = {int(a) % ctx.rank(v) for a in np.atleast_1d(axes)}
        if axis in axes:
            return []
        return _sources(ctx, node.inputs[0], axis - sum(a < axis for a in axes), depth - 1)
    return []


def _param_role(ctx: RuleContext, v, axis: int, role: str) -> None:
    """Role of ``v[axis]`` and of the parameters it is assembled from."""
    ctx.role(ctx.dim(v, axis), role)
    for src, a in _sources(ctx, v, axis):
        if src is not v:
            ctx.role(ctx.dim(src, a), role)


def _directions(ctx: RuleContext, v, axis: int) -> None:
    ctx.block(ctx.dim(v, axis), f"axis {axis} of '{v.name}' counts the directions of {ctx.op} '{ctx.name}'")


def _per_direction(ctx: RuleContext, v, n: int, size: int, hidden, tag: str, role: str) -> None:
    """A [D, n*H] parameter (B, P, per-channel scales): blocks of H along axis 1."""
    _directions(ctx, v, 0)
    _blocks(ctx, v, 1, n, size, hidden, tag)
    _param_role(ctx, v, 1, role)


def _state(ctx: RuleContext, v, layout: int, batch, hidden, role: str | None = None) -> None:
    """[D, B, H] (layout 0) or [B, D, H] (layout 1): H ~ hidden, B ~ batch, D never pruned."""
    d_axis, b_axis = (0, 1) if layout == 0 else (1, 0)
    _directions(ctx, v, d_axis)
    ctx.couple(ctx.dim(v, b_axis), batch)
    ctx.couple(ctx.dim(v, 2), hidden)
    if role is not None:
        ctx.role(ctx.dim(v, 2), role)


def _outputs(ctx: RuleContext, x, layout: int, batch, hidden) -> None:
    """Y [T, D, B, H] (layout 1: [B, T, D, H]); Y_h, Y_c as the states."""
    y = ctx.out(0)
    t_x = 0 if layout == 0 else 1
    if _given(y):
        t_y, d_y, b_y = (0, 1, 2) if layout == 0 else (1, 2, 0)
        ctx.couple(ctx.dim(y, t_y), ctx.dim(x, t_x))
        ctx.couple(ctx.dim(y, b_y), batch)
        _directions(ctx, y, d_y)
        ctx.couple(ctx.dim(y, 3), hidden)
        mark_index_axes(y, [d_y])
    for v in ctx.node.outputs[1:]:
        if _given(v):
            _state(ctx, v, layout, batch, hidden)
            mark_index_axes(v, [0 if layout == 0 else 1])


def _hidden_size(ctx: RuleContext, r, r_in: int) -> int:
    size = ctx.int_size(r, r_in)
    declared = ctx.attr("hidden_size")
    if declared is not None and int(declared) != size:
        ctx.refuse(f"hidden_size={declared} but R '{r.name}' has {size} state columns")
    return size


def _hidden_size_fixup(ctx: RuleContext, hidden) -> None:
    node = ctx.node

    def fix(apply) -> None:
        if apply.is_pruned(hidden):
            apply.set_attr(node, "hidden_size", apply.new_size(hidden))

    ctx.fixup("hidden_size", fix)


def _recurrent(ctx: RuleContext, w_in: int, w_out: int, r_in: int, r_out: int, layout: int):
    """Couplings shared by every recurrent op; returns (hidden, hidden size)."""
    x, w, r = ctx.inp(0), ctx.inp(1), ctx.inp(2)
    gates = GATES[ctx.op]
    size = _hidden_size(ctx, r, r_in)
    hidden = ctx.virtual("hidden", size)
    batch = ctx.dim(x, 1 if layout == 0 else 0)
    ctx.couple(ctx.dim(x, 2), ctx.dim(w, w_in))
    _param_role(ctx, w, w_in, "in")
    for v, out_axis, tag in ((w, w_out, "W"), (r, r_out, "R")):
        _directions(ctx, v, 0)
        _blocks(ctx, v, out_axis, gates, size, hidden, f"{tag}_gate")
        _param_role(ctx, v, out_axis, "out")
    ctx.couple(ctx.dim(r, r_in), hidden)
    _param_role(ctx, r, r_in, "in")
    b = ctx.inp(3)
    if _given(b):
        _per_direction(ctx, b, 2 * gates, size, hidden, "B_gate", "bias")
    seq = ctx.inp(4)
    if _given(seq):
        ctx.couple(ctx.dim(seq, 0), batch)
    for i in _INITIAL_STATES[ctx.op]:
        v = ctx.inp(i)
        if _given(v):
            _state(ctx, v, layout, batch, hidden, "param")
    if ctx.op in ("LSTM", "DynamicQuantizeLSTM") and _given(ctx.inp(_PEEPHOLES)):
        _per_direction(ctx, ctx.inp(_PEEPHOLES), 3, size, hidden, "P_gate", "param")
    _outputs(ctx, x, layout, batch, hidden)
    _hidden_size_fixup(ctx, hidden)
    return hidden, size


@op("LSTM", "GRU", "RNN", since=7, macs=_rnn_macs)
def recurrent(ctx: RuleContext) -> None:
    """W[1], R[1] gate blocks g*H+h ~ B[1] blocks ~ P[1] ~ R[2] ~ initial states[-1] ~ Y[-1] ~
    Y_h[-1] ~ Y_c[-1] ~ hidden[h]; X[2] ~ W[2]; batch axes tied; directions never pruned."""
    layout = int(ctx.attr("layout", 0)) if ctx.opset >= 14 else 0
    _recurrent(ctx, w_in=2, w_out=1, r_in=2, r_out=1, layout=layout)


def _zero_points_are_zero(ctx: RuleContext, index: int) -> None:
    zp = ctx.inp(index)
    if not _given(zp):
        return
    values = ctx.const(zp)
    if values is None or np.any(values != 0):
        # The masked reference zeroes removed weights, which dequantizes to 0 only when zp == 0.
        ctx.refuse(f"zero point '{zp.name}' is not a constant 0 (quantize the weights symmetrically)")


@op("DynamicQuantizeLSTM", domain="com.microsoft", shape=_dq_lstm_shape, macs=_rnn_macs)
def dynamic_quantize_lstm(ctx: RuleContext) -> None:
    """LSTM with W [D, I, 4H] and R [D, H, 4H] (transposed): W[2], R[2] gate blocks ~ hidden;
    W[1] ~ X[2]; R[1] ~ hidden; per-channel scales / zero points [D, 4H] follow the gate rows.
    X and the state are quantized per tensor at run time, over every unit: pruning either
    changes the scale, so both groups are inexact."""
    hidden, size = _recurrent(ctx, w_in=1, w_out=2, r_in=1, r_out=2, layout=0)
    ctx.inexact(hidden)
    ctx.inexact(ctx.dim(ctx.inp(0), 2))
    for index in (9, 11):
        _zero_points_are_zero(ctx, index)
    for index in (8, 9, 10, 11):  # W_scale, W_zero_point, R_scale, R_zero_point
        v = ctx.inp(index)
        if not _given(v):
            continue
        if ctx.rank(v) == 2:
            _per_direction(ctx, v, GATES[ctx.op], size, hidden, f"q{index}_gate", "param")
        elif ctx.rank(v) == 1:
            _directions(ctx, v, 0)
        else:
            ctx.refuse(f"quantization parameter '{v.name}' has rank {ctx.rank(v)}, expected [D] or [D, 4H]")

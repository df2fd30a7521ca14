"""Recurrent layers (LSTM, GRU, RNN, com.microsoft DynamicQuantizeLSTM): the hidden size is one
group across the gate blocks of W, R, B, P, the initial states and the outputs' consumers."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.dims import Dim
from spa.io import to_proto
from spa.metrics import count_params
from helpers import check_masked_equivalence, export_torch, feeds_for, groups_of, masked_model, run, \
    single_group_plan

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
T, B, I0, I, H, C = 5, 2, 6, 5, 4, 3


def rnn_model(op="LSTM", direction="forward", layout=0, opset=14, seq=False, states=False, peepholes=False,
              linear_before_reset=None, squeeze=False, hidden_attr=H, seed=0) -> onnx.ModelProto:
    """x -> MatMul (projection, I channels) -> op -> consumers of Y, Y_h (and Y_c): each a view to
    [.., D*H] and a MatMul. Small sizes; random weights."""
    rng = np.random.default_rng(seed)
    d = 2 if direction == "bidirectional" else 1
    g = GATES[op]

    def init(name, shape, dtype=np.float32, scale=0.5):
        arr = (rng.standard_normal(shape) * scale).astype(dtype)
        inits.append(numpy_helper.from_array(arr, name))
        return name

    inits: list = []
    batch_first = layout == 1
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, T, I0] if batch_first else [T, B, I0])
    nodes = [helper.make_node("MatMul", ["x", init("wp", [I0, I])], ["xr"], name="proj")]
    state_shape = [B, d, H] if batch_first else [d, B, H]
    ins = ["xr", init("W", [d, g * H, I]), init("R", [d, g * H, H]), init("B", [d, 2 * g * H], scale=0.1)]
    ins.append("")
    if seq:
        inits.append(numpy_helper.from_array(np.array([T, T - 2][:B], np.int32), "seq"))
        ins[-1] = "seq"
    ins += [init("h0", state_shape) if states else ""]
    if op == "LSTM":
        ins += [init("c0", state_shape) if states else "", init("P", [d, 3 * H]) if peepholes else ""]
    while ins[-1] == "":
        ins.pop()
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    attrs = {"direction": direction}
    if hidden_attr is not None:
        attrs["hidden_size"] = hidden_attr
    if opset >= 14:
        attrs["layout"] = layout
    if linear_before_reset is not None:
        attrs["linear_before_reset"] = linear_before_reset
    nodes.append(helper.make_node(op, ins, outs, name="rnn", **attrs))
    flat3 = numpy_helper.from_array(np.array([0, 0, -1], np.int64), "flat3")
    flat2 = numpy_helper.from_array(np.array([0, -1], np.int64), "flat2")
    inits += [flat3, flat2]
    if squeeze:  # unidirectional: Squeeze the directions axis away
        assert d == 1 and not batch_first
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "ax1"))
        nodes.append(helper.make_node("Squeeze", ["Y", "ax1"], ["Yv"]))
    elif batch_first:
        nodes.append(helper.make_node("Reshape", ["Y", "flat3"], ["Yv"]))
    else:
        nodes.append(helper.make_node("Transpose", ["Y"], ["Yt"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", ["Yt", "flat3"], ["Yv"]))
    nodes.append(helper.make_node("MatMul", ["Yv", init("wo", [d * H, C])], ["out_y"], name="head_y"))
    outputs = [helper.make_tensor_value_info("out_y", TensorProto.FLOAT, [B, T, C] if batch_first else [T, B, C])]
    for s in outs[1:]:
        if batch_first:
            nodes.append(helper.make_node("Reshape", [s, "flat2"], [s + "v"]))
        else:
            nodes.append(helper.make_node("Transpose", [s], [s + "t"], perm=[1, 0, 2]))
            nodes.append(helper.make_node("Reshape", [s + "t", "flat2"], [s + "v"]))
        nodes.append(helper.make_node("MatMul", [s + "v", init("w" + s, [d * H, C])], ["out_" + s], name="head_" + s))
        outputs.append(helper.make_tensor_value_info("out_" + s, TensorProto.FLOAT, [B, C]))
    graph = helper.make_graph(nodes, "rnn", [x], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 15 else 8
    onnx.checker.check_model(model)
    return model


def rnn_node(model):
    return next(n for n in model.graph if n.op_type in ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"))


def hidden_group(dg):
    return next(g for g in dg.groups if any(m.dim == Dim("rnn#hidden", 0, virtual=True) for m in g.members)
                or any(m.dim.value.endswith("#hidden") for m in g.members))


def check_valid(pruned: onnx.ModelProto) -> None:
    onnx.checker.check_model(pruned, full_check=True)
    onnx.shape_inference.infer_shapes(pruned, strict_mode=True)


# ---- groups -------------------------------------------------------------------------------

def test_lstm_hidden_group_members_and_gate_blocks():
    dg, groups = groups_of(rnn_model("LSTM", seq=True, states=True, peepholes=True))
    assert set(groups) == {"wp:1", "R:1"}
    assert groups["wp:1"].size == I
    hid = groups["R:1"]
    assert hid.size == H and hid.exact
    members = {str(m.dim): m for m in hid.members if not m.dim.virtual}
    for name in ("W[1]", "R[1]", "R[2]", "B[1]", "P[1]", "h0[2]", "c0[2]", "Y[3]", "Y_h[2]", "Y_c[2]", "wo[0]",
                 "wY_h[0]", "wY_c[0]"):
        assert name in members, name
    # gate blocks: row g*H + h of W and R, and of each of B's 8 blocks, is unit h
    np.testing.assert_array_equal(members["W[1]"].channel, np.tile(np.arange(H), 4))
    np.testing.assert_array_equal(members["B[1]"].channel, np.tile(np.arange(H), 8))
    np.testing.assert_array_equal(members["P[1]"].channel, np.tile(np.arange(H), 3))
    roles = {k: m.role for k, m in members.items()}
    assert roles["W[1]"] == roles["R[1]"] == "out" and roles["R[2]"] == "in" and roles["B[1]"] == "bias"
    assert {str(m.dim) for m in groups["wp:1"].members} >= {"W[2]", "xr[2]"}
    assert dg.lint() == []


def test_bidirectional_directions_never_pruned_and_folded_with_mod():
    dg, groups = groups_of(rnn_model("LSTM", direction="bidirectional"))
    hid = groups["R:1"]
    assert hid.size == H  # one group for both directions: W is [2, 4H, I]
    wo = hid.member(Dim("wo", 0))
    np.testing.assert_array_equal(wo.channel, np.tile(np.arange(H), 2))  # [D*H]: row d*H + h is unit h
    assert "directions" in dg.blocked_reason(Dim("Y", 1))
    assert "directions" in dg.blocked_reason(Dim("W", 0))
    assert not any(m.dim == Dim("Y", 1) for g in dg.groups for m in g.members)


def test_hidden_size_mismatch_is_refused():
    dg, groups = groups_of(rnn_model("GRU", hidden_attr=H + 1))
    assert "R:1" not in groups
    assert any(b.node == "rnn" and "hidden_size" in b.reason for b in dg.barriers)


# ---- masked equivalence (onnxruntime) -----------------------------------------------------

CONFIGS = {
    "lstm_forward": dict(op="LSTM"),
    "lstm_reverse": dict(op="LSTM", direction="reverse"),
    "lstm_bidir_seq_states_peepholes": dict(op="LSTM", direction="bidirectional", seq=True, states=True,
                                            peepholes=True),
    "lstm_opset7": dict(op="LSTM", opset=7, states=True),
    "lstm_squeeze": dict(op="LSTM", squeeze=True, peepholes=True),
    "gru_lbr0": dict(op="GRU", linear_before_reset=0, states=True),
    "gru_lbr1_bidir": dict(op="GRU", direction="bidirectional", linear_before_reset=1, seq=True),
    "rnn_bidir": dict(op="RNN", direction="bidirectional", states=True),
    "rnn_reverse_opset7": dict(op="RNN", direction="reverse", opset=7),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_masked_equivalence(name):
    model = rnn_model(**CONFIGS[name])
    groups = check_masked_equivalence(model, ratio=0.5, min_groups=2)
    assert {g.key for g in groups} == {"wp:1", "R:1"}
    result = spa.prune(model, ratio=0.5)
    assert "R:1" in result.equivalence.checked_groups and result.equivalence.exact
    pruned = to_proto(result.model)
    check_valid(pruned)
    node = rnn_node(result.model)
    new_h = H - H // 2
    assert node.attributes["hidden_size"].value == new_h
    d = 2 if CONFIGS[name].get("direction") == "bidirectional" else 1
    shapes = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    g = GATES[CONFIGS[name]["op"]]
    assert shapes["W"] == (d, g * new_h, I - I // 2) and shapes["R"] == (d, g * new_h, new_h)
    assert shapes["wo"] == (d * new_h, C)
    assert count_params(result.model) < count_params(spa.load(model))
    # the masked reference is not the dense model: something was really removed
    feeds = feeds_for(model)
    assert not np.allclose(run(model, feeds)[0], run(pruned, feeds)[0])


# ---- layout = 1 (batch first): onnxruntime refuses it, onnx.reference runs it ---------------

@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_layout1_masked_equivalence_with_reference_evaluator(op):
    from onnx.reference import ReferenceEvaluator

    model = rnn_model(op, direction="bidirectional", layout=1, states=True)
    loaded = spa.load(model)
    dg = spa.dependency_graph(loaded)
    assert {g.key for g in dg.groups} == {"wp:1", "R:1"}
    hid = dg.group("R:1")
    assert hid.member(Dim("Y", 3)) is not None and hid.member(Dim("h0", 2)) is not None
    assert "directions" in dg.blocked_reason(Dim("Y", 2))
    x = np.random.default_rng(1).standard_normal((B, T, I0)).astype(np.float32)
    for g in dg.groups:
        keep = [0, 2, 3][: g.size - 1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned = spa.apply_plan(loaded, single_group_plan(dg, g, keep))
        proto = to_proto(pruned)
        check_valid(proto)
        got = ReferenceEvaluator(proto).run(None, {"x": x})
        want = ReferenceEvaluator(to_proto(masked_model(loaded, g, keep))).run(None, {"x": x})
        for o, w in zip(got, want):
            np.testing.assert_allclose(o, w, atol=1e-5, rtol=1e-4, err_msg=g.key)
        assert rnn_node(pruned).attributes["hidden_size"].value == (len(keep) if g.key == "R:1" else H)


# ---- com.microsoft DynamicQuantizeLSTM ------------------------------------------------------

def _quantized_lstm(tmp_path, per_channel: bool) -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    from onnxruntime.quantization import quantize_dynamic

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(6, 16, bidirectional=True)
            self.fc = torch.nn.Linear(32, 7)

        def forward(self, x):
            return self.fc(self.lstm(x)[0])

    torch.manual_seed(0)
    dense = tmp_path / "lstm.onnx"
    onnx.save(export_torch(Tagger(), (torch.randn(5, 2, 6),), dynamo=False), dense)
    out = tmp_path / "lstm_q.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(dense), str(out), per_channel=per_channel, op_types_to_quantize=["LSTM"])
    return onnx.load(out)


@pytest.mark.parametrize("per_channel", [False, True])
def test_dynamic_quantize_lstm(tmp_path, per_channel):
    model = _quantized_lstm(tmp_path, per_channel)
    node = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    assert node.domain == "com.microsoft"  # onnxruntime's dynamic quantization emits it
    w_name, w_scale = node.input[1], node.input[8]
    dg, groups = groups_of(model)
    hid = groups[f"{w_name}:2"]
    assert hid.size == 16 and not hid.exact  # X and h are quantized per tensor at run time
    members = {str(m.dim) for m in hid.members}
    assert {f"{w_name}[2]", f"{node.input[2]}[1]", f"{node.input[2]}[2]"} <= members
    assert (f"{w_scale}[1]" in members) == per_channel
    result = spa.prune(model, ratio=0.3)
    pruned = to_proto(result.model)
    onnx.checker.check_model(pruned)
    shapes = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    kept = 16 - int(16 * 0.3)
    assert shapes[w_name] == (2, 6, 4 * kept) and shapes[node.input[2]] == (2, kept, 4 * kept)
    assert shapes[w_scale] == ((2, 4 * kept) if per_channel else (2,))
    q = next(n for n in result.model.graph if n.op_type == "DynamicQuantizeLSTM")
    assert q.attributes["hidden_size"].value == kept
    assert result.equivalence.inexact_groups == (f"{w_name}:2",)
    assert result.equivalence.fidelity.cosine > 0.9
    assert result.verify_report.ran


def test_dynamic_quantize_lstm_nonzero_zero_point_is_refused(tmp_path):
    model = _quantized_lstm(tmp_path, per_channel=False)
    node = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    for init in model.graph.initializer:
        if init.name == node.input[11]:
            init.CopyFrom(numpy_helper.from_array(np.ones(numpy_helper.to_array(init).shape, np.int8), init.name))
    dg, groups = groups_of(model)
    assert not any(k.startswith(node.input[1]) for k in groups)
    assert any("zero point" in b.reason for b in dg.barriers)


# ---- real exports ---------------------------------------------------------------------------

def ocr_model(torch, classes=500):
    """CNN + 2-layer BiLSTM + Linear to ``classes`` (a CRNN-like text recognizer)."""

    class CRNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cnn = torch.nn.Sequential(
                torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                torch.nn.MaxPool2d((2, 1)))
            self.rnn = torch.nn.LSTM(32 * 4, 48, num_layers=2, bidirectional=True)
            self.fc = torch.nn.Linear(96, classes)

        def forward(self, x):
            f = self.cnn(x)  # [B, 32, 4, W/2]
            b, c, h, w = f.shape
            seq = f.permute(3, 0, 1, 2).reshape(w, b, c * h)
            return self.fc(self.rnn(seq)[0]).log_softmax(-1)

    torch.manual_seed(0)
    return CRNN().eval(), (torch.randn(2, 1, 16, 24),)


def vad_model(torch):
    """Voice-activity-like: frame features -> Linear -> 2-layer GRU (batch first) -> Linear -> 1."""

    class VAD(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(20, 32)
            self.gru = torch.nn.GRU(32, 40, num_layers=2, batch_first=True)
            self.out = torch.nn.Linear(40, 1)

        def forward(self, x):
            return torch.sigmoid(self.out(self.gru(torch.relu(self.inp(x)))[0]))

    torch.manual_seed(0)
    return VAD().eval(), (torch.randn(2, 10, 20),)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("which", ["ocr_bilstm", "vad_gru"])
def test_real_export_prunes(which, dynamo):
    torch = pytest.importorskip("torch")
    module, args = (ocr_model if which == "ocr_bilstm" else vad_model)(torch)
    proto = export_torch(module, args, dynamo=dynamo)
    ops = {n.op_type for n in proto.graph.node}
    assert ("LSTM" if which == "ocr_bilstm" else "GRU") in ops  # both exporters emit the ONNX op
    dense = spa.load(proto)
    dg = spa.dependency_graph(dense)
    hidden = [g for g in dg.groups if any(m.dim.value.endswith("#hidden") for m in g.members)]
    assert len(hidden) == 2 and {g.size for g in hidden} == ({48} if which == "ocr_bilstm" else {40})
    result = spa.prune(proto, ratio=0.3)
    assert result.equivalence.exact and set(result.equivalence.checked_groups) >= {g.key for g in hidden}
    check_valid(to_proto(result.model))
    sizes = [n.attributes["hidden_size"].value for n in result.model.graph if n.op_type in ("LSTM", "GRU")]
    assert sizes == ([48 - int(48 * 0.3)] * 2 if which == "ocr_bilstm" else [40 - int(40 * 0.3)] * 2)
    before, after = count_params(dense), count_params(result.model)
    assert after < 0.75 * before


@pytest.mark.parametrize("which,dynamo", [("ocr_bilstm", False), ("vad_gru", True)])
def test_dynamic_batch_export_zero_state_follows(which, dynamo):
    """With a dynamic batch the zero initial state is built at run time (ConstantOfShape /
    Expand of a shape with a literal hidden size): its hidden axis is free and the literal follows.
    One state tensor shared by both layers ties their hidden groups into one."""
    torch = pytest.importorskip("torch")
    module, args = (ocr_model if which == "ocr_bilstm" else vad_model)(torch)
    proto = export_torch(module, args, dynamo=dynamo, dynamic_batch=True)
    assert {"ConstantOfShape", "Expand"} & {n.op_type for n in proto.graph.node}
    dg = spa.dependency_graph(spa.load(proto))
    hidden = [g for g in dg.groups if any(m.dim.value.endswith("#hidden") for m in g.members)]
    assert len(hidden) == 1 and hidden[0].size == (48 if which == "ocr_bilstm" else 40)
    assert sum(m.dim.value.endswith("#hidden") for m in hidden[0].members) == 2  # both layers
    result = spa.prune(proto, ratio=0.3, input_shapes={"x0": [3] + list(args[0].shape[1:])})
    assert result.equivalence.exact and hidden[0].key in result.equivalence.checked_groups
    assert result.verify_report.ran
    check_valid(to_proto(result.model))


@pytest.mark.parametrize("which", ["ocr_bilstm", "vad_gru"])
def test_torch_module_keeps_its_recurrent_class(which):
    torch = pytest.importorskip("torch")
    module, args = (ocr_model if which == "ocr_bilstm" else vad_model)(torch)
    result = spa.prune(module, args, ratio=0.3)  # checks the module against the pruned ONNX model
    rnn = result.module.rnn if which == "ocr_bilstm" else result.module.gru
    assert type(rnn) is type(module.rnn if which == "ocr_bilstm" else module.gru)
    hidden = 48 if which == "ocr_bilstm" else 40
    assert rnn.hidden_size == hidden - int(hidden * 0.3)
    assert rnn.weight_hh_l1.shape == (rnn.weight_hh_l1.shape[0], rnn.hidden_size)
    with torch.no_grad():
        out = result.module(*args)
    assert out.shape == module(*args).shape
    assert sum(p.numel() for p in result.module.parameters()) < 0.75 * sum(p.numel() for p in module.parameters())

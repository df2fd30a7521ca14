"""If / Loop / Scan: rules run inside bodies, body values couple with the outer graph, weights
inside branches are pruned, and what disagrees across a boundary stays blocked."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.equivalence import mask_groups
from spa.metrics import count_params
from spa.plan import GroupPlan, Plan

from helpers import run

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _init(name, *shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _half_plan(dg, keys=None) -> Plan:
    """Keep the even channels of each group in ``keys`` (all groups when None)."""
    return Plan(tuple(GroupPlan(g.key, g.size, tuple(range(0, g.size, 2)) if keys is None or g.key in keys
                                else tuple(range(g.size))) for g in dg.groups))


def _check_pruned(source, feeds_list, keys=None):
    """Prune half the channels of the groups; the pruned model is valid, smaller, and equals the
    dense model with the same channels masked on every feed (each takes other branches)."""
    model = spa.load(source)
    dg = spa.dependency_graph(model)
    plan = _half_plan(dg, keys)
    pruned = spa.apply_plan(model, plan, check_equivalence=False)
    proto = ir.serde.serialize_model(pruned)
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    assert count_params(pruned) < count_params(model)
    masked, unmasked = mask_groups(model, dg, plan, [gp.key for gp in plan.pruned_groups])
    assert not unmasked
    for feeds in feeds_list:
        for got, want in zip(run(pruned, feeds), run(masked, feeds)):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    return dg, pruned


# ---- exporter patterns ------------------------------------------------------------------------

def _stack_cls():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Stack(nn.Module):
        def __init__(self, hidden):
            super().__init__()
            self.conv1 = nn.Conv1d(4, hidden, 3, padding=1)
            self.conv2 = nn.Conv1d(hidden, hidden, 3, padding=1)
            self.fc1 = nn.Linear(hidden, hidden)
            self.fc2 = nn.Linear(hidden, 2)

        def forward(self, x):
            h = torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=2)
            return self.fc2(torch.relu(self.fc1(h)))

    return torch, Stack


def _torchscript_vad() -> onnx.ModelProto:
    """A voice-activity model switching on the sample rate, exported by TorchScript: nested If,
    weights only read inside branches, and branches passing an outer value through (Identity)."""
    torch, Stack = _stack_cls()

    class Vad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = Stack(16), Stack(24), Stack(8)

        def forward(self, x, sr):
            x = x * 0.5
            if bool(sr == 16000):
                h = x
                y = self.a(x)
            else:
                if bool(sr == 8000):
                    h = x * 2.0
                    y = self.b(h)
                else:
                    h = x
                    y = self.c(x)
            return y, h

    torch.manual_seed(0)
    return _script_export(Vad(), (torch.randn(1, 4, 10), torch.tensor(16000)), ["x", "sr"])


def _script_export(module, args, names) -> onnx.ModelProto:
    """TorchScript export of ``torch.jit.script(module)``: data-dependent control flow stays."""
    import torch

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.script(module.eval()), args, f, dynamo=False, input_names=names,
                          opset_version=17)
    return onnx.load_from_string(f.getvalue())


def _sr_feeds(rates):
    x = RNG.standard_normal((1, 4, 10)).astype(np.float32)
    return [{"x": x, "sr": np.array(r, dtype=np.int64)} for r in rates]


def test_torchscript_nested_if_loads_and_prunes(tmp_path):
    proto = _torchscript_vad()
    ifs = [n for n in proto.graph.node if n.op_type == "If"]
    assert ifs and any(a.g.node and any(m.op_type == "If" for m in a.g.node) for a in ifs[0].attribute)
    dg = spa.dependency_graph(spa.load(proto))  # onnx-ir's Identity elimination used to fail here
    sizes = {g.key: g.size for g in dg.groups}
    assert sizes == {f"{s}.{l}.weight:0": n for s, n in (("a", 16), ("b", 24), ("c", 8))
                     for l in ("conv1", "conv2", "fc1")}
    assert all(g.exact for g in dg.groups)
    _check_pruned(proto, _sr_feeds([16000, 8000, 44100]))
    res = spa.prune(proto, ratio=0.3, output=tmp_path / "small.onnx")
    assert res.equivalence.checked_groups and res.equivalence.exact
    small = spa.load(tmp_path / "small.onnx")
    assert count_params(small) < 0.6 * count_params(spa.load(proto))
    for feeds in _sr_feeds([16000, 8000, 44100]):
        (y, h), = [run(small, feeds)]
        assert y.shape == (1, 2) and h.shape == (1, 4, 10)


def cond_vad_export():
    """A voice-activity model switching on the sample rate with ``torch.cond``, exported with
    the dynamo exporter (one If, every weight inside its branches)."""
    torch, Stack = _stack_cls()

    class Vad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Stack(16), Stack(24)

        def forward(self, x, sr):
            return torch.cond(sr.sum() == 16000, lambda x: self.a(x), lambda x: self.b(x), (x,))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(Vad().eval(), (torch.randn(1, 4, 10), torch.tensor(16000)), dynamo=True,
                                 input_names=["x", "sr"], verbose=False).model_proto


def test_dynamo_cond_if_prunes():
    try:
        proto = cond_vad_export()
    except Exception as exc:  # noqa: BLE001 - an exporter without torch.cond support
        pytest.skip(f"the dynamo exporter cannot export torch.cond here: {exc}")
    assert any(n.op_type == "If" for n in proto.graph.node)
    dg, _ = _check_pruned(proto, _sr_feeds([16000, 8000]))
    assert {g.key: g.size for g in dg.groups} == {
        f"{s}.{l}.weight:0": n for s, n in (("a", 16), ("b", 24)) for l in ("conv1", "conv2", "fc1")}


# ---- hand-built If ----------------------------------------------------------------------------

def _branch(name, out, nodes, inits, shape):
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, F, shape)], inits)


def _if_model(else_channels=8, else_from_input=False):
    """cond ? Conv(x, Wa) : Conv(x, Wb) (weights are branch initializers, a Reshape with a literal
    shape follows in the then branch), then an outer Conv reading the If's output."""
    then = _branch("then", "ya", [
        helper.make_node("Conv", ["x", "Wa"], ["ca"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["ca"], ["ra"], name="relu_a"),
        helper.make_node("Reshape", ["ra", "shape_a"], ["ya"], name="reshape_a"),
    ], [_init("Wa", 8, 3, 3, 3), numpy_helper.from_array(np.array([1, 8, 5, 5], np.int64), "shape_a")],
        [1, 8, 5, 5])
    if else_from_input:
        other = _branch("else", "yb", [helper.make_node("Relu", ["z"], ["yb"], name="relu_z")], [], [1, 8, 5, 5])
    else:
        other = _branch("else", "yb", [helper.make_node("Conv", ["x", "Wb"], ["yb"], name="conv_b", pads=[1, 1, 1, 1])],
                        [_init("Wb", else_channels, 3, 3, 3)], [1, else_channels, 5, 5])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other),
             helper.make_node("Conv", ["y", "Wc"], ["out"], name="conv_c")]
    inputs = [helper.make_tensor_value_info("x", F, [1, 3, 5, 5]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    if else_from_input:
        inputs.append(helper.make_tensor_value_info("z", F, [1, 8, 5, 5]))
    return _model(nodes, inputs, [helper.make_tensor_value_info("out", F, [1, 4, 5, 5])], [_init("Wc", 4, 8, 1, 1)])


def _if_feeds(extra=None):
    x = RNG.standard_normal((1, 3, 5, 5)).astype(np.float32)
    return [dict({"x": x, "cond": np.array(c)}, **(extra or {})) for c in (True, False)]


def test_if_branches_agree_one_group_across_branches():
    dg, pruned = _check_pruned(_if_model(), _if_feeds())
    assert len(dg.groups) == 1
    g = dg.groups[0]
    assert g.key in ("Wa:0", "Wb:0") and g.size == 8
    assert {(m.param, m.param_axis) for m in g.params} == {("Wa", 0), ("Wb", 0), ("Wc", 1)}
    branch_inits = {n for graph in pruned.graphs() if graph is not pruned.graph for n in graph.initializers}
    assert {"Wa", "Wb"} <= branch_inits  # sliced where they live
    assert [v.shape for graph in pruned.graphs() for v in graph.outputs if v.name == "ya"] == [ir.Shape([1, 4, 5, 5])]


@pytest.mark.parametrize("kind", ["sizes", "input"])
def test_if_branches_disagree_block(kind):
    model = _if_model(else_channels=6) if kind == "sizes" else _if_model(else_from_input=True)
    dg = spa.dependency_graph(model)
    assert "Wa:0" not in {g.key for g in dg.groups}
    blocked = {b.key: b.reason for b in dg.blocked_groups}
    assert "Wa:0" in blocked
    want = "disagree" if kind == "sizes" else "graph input 'z'"
    assert want in blocked["Wa:0"], blocked["Wa:0"]


def test_unknown_subgraph_op_stays_a_barrier():
    body = _branch("body", "yb", [helper.make_node("Conv", ["x", "Wb"], ["yb"], name="conv_b", pads=[1, 1, 1, 1])],
                   [_init("Wb", 8, 3, 3, 3)], [1, 8, 5, 5])
    node = helper.make_node("Custom", ["x"], ["y"], name="custom", domain="ext", body=body)
    graph = helper.make_graph([node, helper.make_node("Conv", ["y", "Wc"], ["out"], name="conv_c")], "g",
                              [helper.make_tensor_value_info("x", F, [1, 3, 5, 5])],
                              [helper.make_tensor_value_info("out", F, [1, 4, 5, 5])], [_init("Wc", 4, 8, 1, 1)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ext", 1)])
    dg = spa.dependency_graph(proto)
    assert not dg.groups
    assert any(b.op == "Custom" for b in dg.barriers)


# ---- Loop -------------------------------------------------------------------------------------

def _loop_model():
    """h0 = x·W0; three iterations of h = tanh(h·Wr + br) (Wr, br inside the body), each h also
    a scan output; out = h_final·Wo, seq = scan·Ws."""
    body = helper.make_graph([
        helper.make_node("MatMul", ["h_in", "Wr"], ["hm"], name="mm_r"),
        helper.make_node("Add", ["hm", "br"], ["ha"], name="add_r"),
        helper.make_node("Tanh", ["ha"], ["h_out"], name="tanh_r"),
        helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond_id"),
        helper.make_node("Relu", ["h_out"], ["scan_out"], name="relu_s"),
    ], "body", [helper.make_tensor_value_info("it", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("h_in", F, [1, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", F, [1, 8]),
         helper.make_tensor_value_info("scan_out", F, [1, 8])],
        [_init("Wr", 8, 8), _init("br", 8)])
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["h0"], name="mm_0"),
        helper.make_node("Loop", ["trip", "cond"], [], name="loop"),
        helper.make_node("MatMul", ["h_fin", "Wo"], ["out"], name="mm_o"),
        helper.make_node("MatMul", ["seq", "Ws"], ["seq_out"], name="mm_s"),
    ]
    nodes[1] = helper.make_node("Loop", ["trip", "cond", "h0"], ["h_fin", "seq"], name="loop", body=body)
    inits = [_init("W0", 4, 8), _init("Wo", 8, 3), _init("Ws", 8, 2),
             numpy_helper.from_array(np.array(3, np.int64), "trip"), numpy_helper.from_array(np.array(True), "cond")]
    return _model(nodes, [helper.make_tensor_value_info("x", F, [1, 4])],
                  [helper.make_tensor_value_info("out", F, [1, 3]), helper.make_tensor_value_info("seq_out", F, [3, 1, 2])],
                  inits)


def test_loop_carried_hidden_with_body_weight():
    feeds = [{"x": RNG.standard_normal((1, 4)).astype(np.float32)}]
    dg, pruned = _check_pruned(_loop_model(), feeds)
    assert [(g.key, g.size) for g in dg.groups] == [("W0:1", 8)]
    g = dg.groups[0]
    assert {(m.param, m.param_axis) for m in g.params} == {
        ("W0", 1), ("Wr", 0), ("Wr", 1), ("br", 0), ("Wo", 0), ("Ws", 0)}
    assert {str(m.dim) for m in g.members} >= {"h_in[1]", "h_out[1]", "h_fin[1]", "seq[2]", "scan_out[1]"}
    assert "seq[0]" not in {str(m.dim) for m in g.members}  # the iteration axis is no channel
    body = next(gr for gr in pruned.graphs() if gr is not pruned.graph)
    assert body.initializers["Wr"].const_value.shape == ir.Shape([4, 4])
    assert [tuple(o.shape) for o in run(pruned, feeds[0])] == [(1, 3), (3, 1, 2)]


# ---- Scan -------------------------------------------------------------------------------------

def test_scan_state_and_scan_axes():
    """s = tanh(x_t·Wx + s·Ws) over axis 1 of X [1, 5, 4]; outputs stacked on axis 1."""
    body = helper.make_graph([
        helper.make_node("MatMul", ["x_t", "Wx"], ["a"], name="mm_x"),
        helper.make_node("MatMul", ["s_in", "Wss"], ["b"], name="mm_s"),
        helper.make_node("Add", ["a", "b"], ["c"], name="add"),
        helper.make_node("Tanh", ["c"], ["s_out"], name="tanh"),
        helper.make_node("Relu", ["s_out"], ["y_t"], name="relu"),
    ], "body", [helper.make_tensor_value_info("s_in", F, [1, 8]), helper.make_tensor_value_info("x_t", F, [1, 4])],
        [helper.make_tensor_value_info("s_out", F, [1, 8]), helper.make_tensor_value_info("y_t", F, [1, 8])],
        [_init("Wx", 4, 8), _init("Wss", 8, 8)])
    nodes = [helper.make_node("Scan", ["s0", "X"], ["s_fin", "Y"], name="scan", body=body, num_scan_inputs=1,
                              scan_input_axes=[1], scan_output_axes=[-2], scan_output_directions=[1]),
             helper.make_node("MatMul", ["Y", "Wo"], ["out"], name="mm_o"),
             helper.make_node("MatMul", ["s_fin", "Wf"], ["fin"], name="mm_f")]
    model = _model(nodes, [helper.make_tensor_value_info("X", F, [1, 5, 4])],
                   [helper.make_tensor_value_info("out", F, [1, 5, 2]), helper.make_tensor_value_info("fin", F, [1, 3])],
                   [numpy_helper.from_array(np.zeros((1, 8), np.float32), "s0"), _init("Wo", 8, 2), _init("Wf", 8, 3)])
    feeds = [{"X": RNG.standard_normal((1, 5, 4)).astype(np.float32)}]
    dg, pruned = _check_pruned(model, feeds)
    assert [(g.key, g.size) for g in dg.groups] == [("Wss:1", 8)]
    members = {str(m.dim) for m in dg.groups[0].members}
    assert {"Y[2]", "s_fin[1]", "s_in[1]", "y_t[1]", "s0[1]"} <= members
    assert not {"Y[1]", "X[1]"} & members
    assert [tuple(o.shape) for o in run(pruned, feeds[0])] == [(1, 5, 2), (1, 3)]


def test_sibling_branches_reusing_names_and_constant_weights():
    """Both branches name their weight ``W`` (a Constant node) and their nodes alike: renamed
    apart on load, each branch's weight is sliced where it lives."""
    def branch(tag, seed):
        w = np.random.default_rng(seed).standard_normal((8, 3, 3, 3)).astype(np.float32)
        return _branch(tag, f"y_{tag}", [
            helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W")),
            helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], [f"y_{tag}"], name="relu")], [], [1, 8, 5, 5])

    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("t", 1), else_branch=branch("e", 2)),
             helper.make_node("Conv", ["y", "Wc"], ["out"], name="conv_c")]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [1, 3, 5, 5]),
                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                   [helper.make_tensor_value_info("out", F, [1, 4, 5, 5])], [_init("Wc", 4, 8, 1, 1)])
    dg, pruned = _check_pruned(model, _if_feeds())
    (g,) = dg.groups
    assert {(m.param, m.param_axis) for m in g.params} == {("W", 0), ("W_1", 0), ("Wc", 1)}
    shapes = {n: v.const_value.shape for gr in pruned.graphs() if gr is not pruned.graph
              for n, v in gr.initializers.items()}
    assert shapes == {"W": ir.Shape([4, 3, 3, 3]), "W_1": ir.Shape([4, 3, 3, 3])}


def test_fixup_inside_a_branch_writes_its_constant_there():
    model = spa.load(_if_model())
    dg = spa.dependency_graph(model)
    pruned = spa.apply_plan(model, _half_plan(dg), check_equivalence=False)
    then = next(gr for gr in pruned.graphs() if any(n.op_type == "Reshape" for n in gr))
    reshape = next(n for n in then if n.op_type == "Reshape")
    target = reshape.inputs[1]
    assert target.name in then.initializers  # created in the branch, not the main graph
    assert target.const_value.numpy().tolist() == [1, 4, 5, 5]
    assert set(then.initializers) == {"Wa", target.name}  # the replaced constant is gone


def _strip_body_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    body = next(a.g for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
    for v in list(body.input[2:]) + list(body.output[1:]):  # trip count and condition keep theirs
        v.type.tensor_type.ClearField("shape")
    return model


def test_loop_body_without_shapes_takes_them_from_the_initial_values():
    """Exporters leave body inputs unshaped; they take the shape of the initial values."""
    feeds = [{"x": RNG.standard_normal((1, 4)).astype(np.float32)}]
    dg, _ = _check_pruned(_strip_body_shapes(_loop_model()), feeds)
    assert [(g.key, g.size) for g in dg.groups] == [("W0:1", 8)]


def test_loop_carried_value_that_grows_stays_blocked():
    """h = Concat(h, x·W) over the iterations: the carried shape changes, nothing is pruned
    through it, and the model still loads and validates."""
    body = helper.make_graph([
        helper.make_node("MatMul", ["x", "Wb"], ["p"], name="mm_b"),
        helper.make_node("Concat", ["h_in", "p"], ["h_out"], name="cat", axis=1),
        helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond_id"),
    ], "body", [helper.make_tensor_value_info("it", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("h_in", F, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", F, None)], [_init("Wb", 4, 8)])
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h0"], name="mm_0"),
             helper.make_node("Loop", ["trip", "cond", "h0"], ["h_fin"], name="loop", body=body),
             helper.make_node("ReduceSum", ["h_fin"], ["out"], name="sum", keepdims=0)]
    inits = [_init("W0", 4, 8), numpy_helper.from_array(np.array(2, np.int64), "trip"),
             numpy_helper.from_array(np.array(True), "cond")]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [1, 4])],
                   [helper.make_tensor_value_info("out", F, [])], inits)
    loaded = spa.load(model)
    h_in = next(gr for gr in loaded.graphs() if gr is not loaded.graph).inputs[2]
    assert h_in.shape is None  # no shape claimed for a value that grows
    dg = spa.dependency_graph(loaded)
    assert not dg.groups and "W0:1" in {b.key for b in dg.blocked_groups}
    (out,) = run(loaded, {"x": RNG.standard_normal((1, 4)).astype(np.float32)})
    assert out.shape == ()


def test_torchscript_loop_with_a_hidden_state():
    """A recurrence written as a Python for-loop, scripted: a Loop whose body reads the outer
    Linear weights and carries ``h`` (initial zeros, a constant sliced with the group)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.rec, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.zeros(1, 8)
            for t in range(x.size(0)):
                h = torch.tanh(self.inp(x[t]) + self.rec(h))
            return self.out(h)

    torch.manual_seed(0)
    proto = _script_export(Recurrent(), (torch.randn(5, 1, 4),), ["x"])
    assert any(n.op_type == "Loop" for n in proto.graph.node)
    dg, _ = _check_pruned(proto, [{"x": RNG.standard_normal((5, 1, 4)).astype(np.float32)}])
    (g,) = dg.groups
    assert g.key == "inp.weight:0" and g.size == 8
    assert {(m.param, m.param_axis) for m in g.params} >= {
        ("inp.weight", 0), ("rec.weight", 0), ("rec.weight", 1), ("out.weight", 1)}

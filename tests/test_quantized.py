"""Quantized graphs, quantized in the tests with onnxruntime's quantizer: QDQ (per tensor and per
channel), QOperator (QLinearConv / QLinearMatMul / com.microsoft QLinear* and QGemm), dynamic
quantization (DynamicQuantizeLinear, ConvInteger, MatMulInteger) and MatMulNBits. Each prunes
at ratio 0.3 to a valid, running, smaller model in the same scheme; exact groups equal the dense
model with the removed channels masked (at the zero point, for integer weights)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from helpers import build, feeds_for, run, single_group_plan
from onnx import TensorProto as T
from onnx import helper as oh
from onnx import numpy_helper as nh

import spa
from spa.equivalence import mask_groups
from spa.metrics import count_macs, count_params
from spa.ops.quantized import _pack, _unpack, integer_params, output_step, real_weight, real_zero

quant = pytest.importorskip("onnxruntime.quantization")

pytestmark = pytest.mark.filterwarnings("ignore")


# ---- float models and their quantized forms ---------------------------------------------------
def _init(name, arr):
    return nh.from_array(np.asarray(arr, np.float32), name)


def cnn() -> onnx.ModelProto:
    """Conv-Relu-Conv-Relu-GlobalAveragePool-Flatten-Gemm."""
    rng = np.random.default_rng(0)
    nodes = [oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             oh.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             oh.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             oh.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             oh.make_node("Flatten", ["p"], ["f"], name="flat"),
             oh.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc")]
    inits = [_init("w1", rng.standard_normal((16, 3, 3, 3)) * 0.3), _init("b1", rng.standard_normal(16) * 0.1),
             _init("w2", rng.standard_normal((32, 16, 3, 3)) * 0.1), _init("b2", rng.standard_normal(32) * 0.1),
             _init("wf", rng.standard_normal((10, 32)) * 0.2), _init("bf", rng.standard_normal(10) * 0.1)]
    g = oh.make_graph(nodes, "cnn", [oh.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                      [oh.make_tensor_value_info("y", T.FLOAT, [1, 10])], inits)
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])


def mlp() -> onnx.ModelProto:
    """MatMul-Add-Relu-MatMul-Add-Sigmoid-MatMul over [batch, seq, 32]."""
    rng = np.random.default_rng(1)
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"), oh.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             oh.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             oh.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"), oh.make_node("Add", ["m2", "b2"], ["a2"], name="add2"),
             oh.make_node("Sigmoid", ["a2"], ["s2"], name="sig"),
             oh.make_node("MatMul", ["s2", "w3"], ["y"], name="mm3")]
    inits = [_init("w1", rng.standard_normal((32, 64)) * 0.2), _init("b1", rng.standard_normal(64) * 0.1),
             _init("w2", rng.standard_normal((64, 48)) * 0.2), _init("b2", rng.standard_normal(48) * 0.1),
             _init("w3", rng.standard_normal((48, 16)) * 0.2)]
    g = oh.make_graph(nodes, "mlp", [oh.make_tensor_value_info("x", T.FLOAT, [2, 5, 32])],
                      [oh.make_tensor_value_info("y", T.FLOAT, [2, 5, 16])], inits)
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])


def branchy() -> onnx.ModelProto:
    """Conv-LeakyRelu, two Convs concatenated, x·sigmoid(x), AveragePool, Conv: QOperator gives
    QLinearLeakyRelu, QLinearConcat, QLinearSigmoid, QLinearMul and QLinearAveragePool."""
    rng = np.random.default_rng(2)
    nodes = [oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             oh.make_node("LeakyRelu", ["c1"], ["l1"], alpha=0.1),
             oh.make_node("Conv", ["l1", "w2a", "b2a"], ["c2a"], pads=[1, 1, 1, 1]),
             oh.make_node("Conv", ["l1", "w2b", "b2b"], ["c2b"], pads=[1, 1, 1, 1]),
             oh.make_node("Concat", ["c2a", "c2b"], ["cat"], axis=1),
             oh.make_node("Sigmoid", ["cat"], ["sg"]),
             oh.make_node("Mul", ["cat", "sg"], ["sw"]),
             oh.make_node("AveragePool", ["sw"], ["ap"], kernel_shape=[2, 2], strides=[2, 2]),
             oh.make_node("Conv", ["ap", "w3", "b3"], ["y"])]
    inits = [_init("w1", rng.standard_normal((8, 3, 3, 3)) * 0.3), _init("b1", rng.standard_normal(8) * 0.1),
             _init("w2a", rng.standard_normal((6, 8, 3, 3)) * 0.2), _init("b2a", rng.standard_normal(6) * 0.1),
             _init("w2b", rng.standard_normal((10, 8, 3, 3)) * 0.2), _init("b2b", rng.standard_normal(10) * 0.1),
             _init("w3", rng.standard_normal((4, 16, 1, 1)) * 0.2), _init("b3", rng.standard_normal(4) * 0.1)]
    g = oh.make_graph(nodes, "branchy", [oh.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                      [oh.make_tensor_value_info("y", T.FLOAT, [1, 4, 4, 4])], inits)
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])


def attention() -> onnx.ModelProto:
    """A pre-LN-free transformer block (4 heads, MLP 64) exported from torch."""
    torch = pytest.importorskip("torch")
    from helpers import export_torch

    class Block(torch.nn.Module):
        def __init__(self, d=32, h=4):
            super().__init__()
            self.h = h
            self.qkv, self.o = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
            self.f1, self.f2, self.ln = torch.nn.Linear(d, 64), torch.nn.Linear(64, d), torch.nn.LayerNorm(d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = (z.view(b, t, self.h, -1).transpose(1, 2) for z in self.qkv(x).split(d, -1))
            a = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
            x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
            return x + self.f2(torch.relu(self.f1(self.ln(x))))

    torch.manual_seed(0)
    return export_torch(Block(), (torch.randn(2, 5, 32),), dynamo=False, input_names=["x"])


FLOAT_MODELS = {"cnn": cnn, "mlp": mlp, "branchy": branchy, "attention": attention}
INPUT_SHAPES = {"cnn": (1, 3, 8, 8), "mlp": (2, 5, 32), "branchy": (1, 3, 8, 8), "attention": (2, 5, 32)}


class _Reader(quant.CalibrationDataReader):
    def __init__(self, shape):
        rng = np.random.default_rng(3)
        self._batches = iter([{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(4)])

    def get_next(self):
        return next(self._batches, None)


SCHEMES = {
    "qdq": dict(quant_format=quant.QuantFormat.QDQ),
    "qdq_pc": dict(quant_format=quant.QuantFormat.QDQ, per_channel=True),
    "qop": dict(quant_format=quant.QuantFormat.QOperator),
    "qop_pc": dict(quant_format=quant.QuantFormat.QOperator, per_channel=True),
    "qdq_u8": dict(quant_format=quant.QuantFormat.QDQ, activation_type=quant.QuantType.QUInt8,
                   weight_type=quant.QuantType.QUInt8),
    "qop_u8": dict(quant_format=quant.QuantFormat.QOperator, activation_type=quant.QuantType.QUInt8,
                   weight_type=quant.QuantType.QUInt8),
    "qdq_u8_pc": dict(quant_format=quant.QuantFormat.QDQ, per_channel=True, activation_type=quant.QuantType.QUInt8,
                      weight_type=quant.QuantType.QUInt8),
}


@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
    return tmp_path_factory.mktemp("quantized")


def quantized(qdir, model: str, scheme: str) -> onnx.ModelProto:
    """``model`` quantized with onnxruntime in ``scheme`` (static, dynamic or nbits)."""
    src, dst = qdir / f"{model}.onnx", qdir / f"{model}_{scheme}.onnx"
    if not dst.exists():
        onnx.save(FLOAT_MODELS[model](), src)
        if scheme.startswith("dynamic"):
            quant.quantize_dynamic(src, dst, per_channel=scheme == "dynamic_pc")
        elif scheme == "nbits":
            nbits = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
            q = nbits.MatMulNBitsQuantizer(onnx.load(src), block_size=16, is_symmetric=False)
            q.process()
            onnx.save(q.model.model, dst)
        else:
            quant.quantize_static(src, dst, _Reader(INPUT_SHAPES[model]), **SCHEMES[scheme])
    return onnx.load(dst)


def op_counts(model) -> collections.Counter:
    proto = model if isinstance(model, onnx.ModelProto) else spa.io.to_proto(model)
    return collections.Counter((n.domain, n.op_type) for n in proto.graph.node
                               if n.op_type != "Constant")  # loading lifts Constants to initializers


def integer_inits(model) -> dict[str, np.dtype]:
    return {n: v.const_value.numpy().dtype for n, v in model.graph.initializers.items()
            if v.const_value is not None and v.dtype is not None and v.dtype.is_integer()
            and n.rsplit("_", 1)[-1] in ("quantized", "Q4")}


def check_pruned(dense: onnx.ModelProto, result, model=None) -> None:
    """Valid (checker, strict shape inference), runs, same quantization scheme, smaller."""
    proto = spa.io.to_proto(result.model)
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    assert op_counts(proto) == op_counts(dense)
    loaded = spa.load(dense)
    before, after = integer_inits(loaded), integer_inits(result.model)
    assert before and before == {k: v for k, v in after.items() if k in before}, "integer weights changed dtype"
    feeds = feeds_for(loaded)
    outs = run(result.model, feeds)
    assert [o.shape for o in outs] == [o.shape for o in run(loaded, feeds)]
    assert count_params(result.model) < count_params(loaded)


# ---- static QDQ and QOperator -------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["qdq", "qdq_pc", "qop", "qop_pc"])
def test_static_cnn_groups_prune_and_stay_exact(qdir, scheme):
    dense = quantized(qdir, "cnn", scheme)
    dg = spa.dependency_graph(spa.load(dense))
    groups = {g.key: g for g in dg.groups}
    assert {k: g.size for k, g in groups.items()} == {"w1_quantized:0": 16, "w2_quantized:0": 32}
    assert all(g.exact for g in groups.values())
    members = {str(m.dim) for m in groups["w2_quantized:0"].members}
    if scheme.endswith("_pc"):  # per-channel scales and zero points follow the output channels
        assert {"w2_scale[0]", "w2_zero_point[0]"} <= members
    if scheme.startswith("qop"):  # the int32 bias and the next layer's weight
        assert {"b2_quantized[0]", "wf_quantized[1]"} <= members
    result = spa.prune(dense, 0.3)
    check_pruned(dense, result)
    eq = result.equivalence
    assert set(eq.checked_groups) == set(groups) and eq.max_abs_diff == 0.0
    inits = result.model.graph.initializers
    assert inits["w1_quantized"].const_value.shape.numpy() == (12, 3, 3, 3)
    assert inits["w2_quantized"].const_value.shape.numpy() == (23, 12, 3, 3)
    if scheme.endswith("_pc"):
        assert inits["w2_scale"].const_value.shape.numpy() == (23,)
        assert inits["w2_zero_point"].const_value.shape.numpy() == (23,)


@pytest.mark.parametrize("scheme", ["qdq", "qdq_pc", "qop", "qop_pc"])
def test_static_mlp_groups_prune_and_stay_exact(qdir, scheme):
    dense = quantized(qdir, "mlp", scheme)
    dg = spa.dependency_graph(spa.load(dense))
    assert {g.key: g.size for g in dg.groups} == {"w1_quantized:1": 64, "w2_quantized:1": 48}
    result = spa.prune(dense, 0.3)
    check_pruned(dense, result)
    assert result.equivalence.max_abs_diff == 0.0 and len(result.equivalence.checked_groups) == 2
    inits = result.model.graph.initializers
    assert inits["w2_quantized"].const_value.shape.numpy() == (45, 34)
    assert inits["b2_quantized"].const_value.shape.numpy() == (34,)  # QDQ's DQ'd / QOperator's QLinearAdd bias


@pytest.mark.parametrize("scheme", ["qop_pc", "qdq_pc"])
def test_qlinear_concat_mul_pool_leaky_relu(qdir, scheme):
    dense = quantized(qdir, "branchy", scheme)
    if scheme == "qop_pc":
        ops = {t for _, t in op_counts(dense)}
        assert {"QLinearConcat", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool"} <= ops
    dg = spa.dependency_graph(spa.load(dense))
    groups = {g.key: g for g in dg.groups}
    assert {k: g.size for k, g in groups.items()} == {"w1_quantized:0": 8, "w2a_quantized:0": 16}
    cat = {str(m.dim) for m in groups["w2a_quantized:0"].members if m.param}
    assert {"w2b_quantized[0]", "w3_quantized[1]"} <= {d.replace("_DequantizeLinear_Output", "_quantized")
                                                       for d in cat}
    result = spa.prune(dense, 0.3)
    check_pruned(dense, result)
    assert result.equivalence.max_abs_diff == 0.0 and len(result.equivalence.checked_groups) == 2


@pytest.mark.parametrize("scheme", ["qdq_u8", "qdq_u8_pc", "qop_u8"])
def test_uint8_weights_are_masked_at_their_zero_point(qdir, scheme):
    dense = quantized(qdir, "cnn", scheme)
    model = spa.load(dense)
    w2 = model.graph.initializers["w2_quantized"]
    zero = real_zero(w2)
    assert zero.dtype == np.uint8 and zero.shape == (32, 16, 3, 3) and zero.any()
    assert np.array_equal(zero[:, 0, 0, 0], np.broadcast_to(
        model.graph.initializers["w2_zero_point"].const_value.numpy(), (32,)))
    result = spa.prune(dense, 0.3)  # masking with 0 instead of the zero point would fail this check
    check_pruned(dense, result)
    assert result.equivalence.max_abs_diff == 0.0


def test_a_wrong_channel_is_caught(qdir):
    """The masked reference with other channels removed differs by far more than the tolerance."""
    dense = quantized(qdir, "cnn", "qop_pc")
    model = spa.load(dense)
    dg = spa.dependency_graph(model)
    g = dg.group("w1_quantized:0")
    plan = single_group_plan(dg, g, range(4, 16))
    pruned = spa.apply_plan(model, plan)
    feeds = feeds_for(model)
    got = run(pruned, feeds)[0]
    right, _ = mask_groups(model, dg, plan, [g.key])
    wrong, _ = mask_groups(model, dg, single_group_plan(dg, g, range(0, 12)), [g.key])
    np.testing.assert_array_equal(got, run(right, feeds)[0])
    step = float(model.graph.initializers["y_scale"].const_value.numpy())
    assert output_step(model.graph) == step  # the built-in check allows one step
    assert np.abs(got - run(wrong, feeds)[0]).max() > 2 * step


@pytest.mark.parametrize("scheme", ["qdq_pc", "qop", "dynamic"])
def test_attention_heads_and_mlp_of_a_quantized_transformer(qdir, scheme):
    """Q·Kᵀ and attention·V become QLinearMatMul of two activations (QOperator), the softmax
    QLinearSoftmax; the heads group and the MLP group are found in every scheme."""
    dense = quantized(qdir, "attention", scheme)
    loaded = spa.load(dense)
    dg = spa.dependency_graph(loaded)
    kinds = sorted((g.kind, g.size, g.exact) for g in dg.groups)
    # every product is counted, after com.microsoft QLinearAdd too: 4 projections + Q·Kᵀ + A·V
    assert count_macs(loaded) == 10 * 32 * (96 + 32 + 64 + 64) + 2 * (2 * 4 * 5 * 5 * 8)
    exact = scheme != "dynamic"
    assert kinds == [("channels", 64, exact), ("heads", 4, exact)]
    result = spa.prune(dense, 0.3)
    check_pruned(dense, result)
    eq = result.equivalence
    assert (len(eq.checked_groups), eq.max_abs_diff) == (2, 0.0) if exact else len(eq.inexact_groups) == 2


# ---- dynamic quantization ----------------------------------------------------------------------
@pytest.mark.parametrize("model, scheme", [("cnn", "dynamic"), ("mlp", "dynamic"), ("mlp", "dynamic_pc")])
def test_dynamic_quantization_prunes_inexact(qdir, model, scheme):
    dense = quantized(qdir, model, scheme)
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {t for _, t in op_counts(dense)}
    dg = spa.dependency_graph(spa.load(dense))
    sizes = {g.key: g.size for g in dg.groups}
    assert sizes == ({"w1_quantized:0": 16, "w2_quantized:0": 32} if model == "cnn"
                     else {"w1_quantized:1": 64, "w2_quantized:1": 48})
    assert not any(g.exact for g in dg.groups)  # the run-time scale spans the removed channels
    if scheme == "dynamic_pc":  # per-column weight scales multiply the output: they follow it
        assert "w2_scale[0]" in {str(m.dim) for m in dg.group("w2_quantized:1").members}
    result = spa.prune(dense, 0.3)
    check_pruned(dense, result)
    eq = result.equivalence
    assert set(eq.inexact_groups) == set(sizes) and eq.fidelity is not None and eq.fidelity.cosine > 0.5


# ---- MatMulNBits -------------------------------------------------------------------------------
def test_nibble_packing_round_trips():
    vals = np.random.default_rng(0).integers(0, 16, size=(3, 7)).astype(np.uint8)
    packed = _pack(vals, 4)
    assert packed.shape == (3, 4)
    np.testing.assert_array_equal(_unpack(packed, 4, 7), vals)


def test_matmul_nbits_prunes_whole_blocks(qdir):
    dense = quantized(qdir, "mlp", "nbits")
    model = spa.load(dense)
    dg = spa.dependency_graph(model)
    groups = {g.key: g for g in dg.groups}
    assert {k: g.size for k, g in groups.items()} == {"w1_Q4:0": 4, "w2_Q4:0": 3}  # blocks of 16
    assert {"w1_Q4[0]", "w1_scales[0]", "w1_zero_points[0]", "b1[0]", "r1[2]"} <= \
        {str(m.dim) for m in groups["w1_Q4:0"].members}
    result = spa.prune(dense, 0.5)
    check_pruned(dense, result)
    assert result.equivalence.max_abs_diff == 0.0 and len(result.equivalence.checked_groups) == 2
    nodes = {n.name: n for n in result.model.graph}
    attrs = [(n.attributes["N"].value, n.attributes["K"].value) for n in result.model.graph
             if n.op_type == "MatMulNBits"]
    assert attrs == [(32, 32), (32, 32), (16, 32)]  # 2 of 4 and 2 of 3 blocks of 16 kept
    zp = nodes["mm2_Q4"].inputs[3].const_value.numpy()  # [N, 2 blocks packed in one byte]
    assert zp.shape == (32, 1) and nodes["mm2_Q4"].inputs[1].const_value.shape.numpy() == (32, 2, 8)


def test_matmul_nbits_partial_block_keeps_k_blocked():
    m = build('<ir_version: 9, opset_import: ["" : 17, "com.microsoft" : 1]>\n'
              """g (float[2,20] x, uint8[8,2,8] wq, float[8,2] ws, float[20,4] w2) => (float[2,4] y)
              { h = com.microsoft.MatMulNBits <K=20, N=8, bits=4, block_size=16> (x, wq, ws)
                r = Relu(h)  z = com.microsoft.MatMulNBits <K=8, N=4, bits=4, block_size=16> (r, wq2, ws2)
                y = MatMul(x, w2) }""".replace("float[20,4] w2", "uint8[4,1,8] wq2, float[4,1] ws2, float[20,4] w2")
              .replace("=> (float[2,4] y)", "=> (float[2,4] y, float[2,4] z)"))
    dg = spa.dependency_graph(spa.load(m))
    blocked = {b.key: b.reason for b in dg.blocked_groups}
    assert "wq:0" in blocked and "only whole blocks" in blocked["wq:0"]


# ---- refusals, counts and scores -------------------------------------------------------------------
def test_blocked_quantization_is_refused():
    m = build('<ir_version: 10, opset_import: ["" : 21]>\n'
              """g (float[1,8] x, int8[8,4] wq, float[2,4] ws, float[4,3] w2) => (float[1,3] y)
              { w = DequantizeLinear <axis=0, block_size=4> (wq, ws)  h = MatMul(x, w)  y = MatMul(h, w2) }""")
    dg = spa.dependency_graph(spa.load(m))
    assert any(b.op == "DequantizeLinear" and "block_size" in b.reason for b in dg.barriers)
    assert "wq:1" not in {g.key for g in dg.groups}


def test_per_channel_activation_scale_follows_the_channels():
    m = build('<ir_version: 9, opset_import: ["" : 17]>\n'
              """g (float[1,4,2,2] x, float[4,4,1,1] w1, float[4] sa, float[4,4,1,1] w2) => (float[1,4,2,2] y)
              { h = Conv(x, w1)  q = QuantizeLinear <axis=1> (h, sa)  d = DequantizeLinear <axis=1> (q, sa)
                y = Conv(d, w2) }""")
    dg = spa.dependency_graph(spa.load(m))
    # a constant per-channel activation scale is sliced with the channels and stays exact
    g = dg.group("w1:0")
    assert g.exact and "sa[0]" in {str(x.dim) for x in g.members}
    result = spa.prune(m, 0.5)
    assert result.model.graph.initializers["sa"].const_value.shape.numpy() == (2,)
    assert result.equivalence.checked_groups == ("w1:0",)


def test_qlinear_op_with_a_per_channel_activation_scale_is_a_barrier():
    m = build('<ir_version: 9, opset_import: ["" : 17, "com.microsoft" : 1]>\n'
              """g (uint8[1,4] x, float xs, uint8 xz, uint8[4,6] wq, float ws, uint8 wz, float hs, uint8 hz,
                   float[6] s6, uint8[6] bq) => (uint8[1,6] y)
              { h = QLinearMatMul(x, xs, xz, wq, ws, wz, hs, hz)
                y = com.microsoft.QLinearAdd(h, s6, hz, bq, hs, hz, hs, hz) }""", weights="wbsh")
    dg = spa.dependency_graph(spa.load(m))
    assert any(b.op == "QLinearAdd" and "not a per-tensor scale" in b.reason for b in dg.barriers)
    assert not dg.groups


@pytest.mark.parametrize("scheme", ["qdq_pc", "qop", "dynamic", "nbits"])
def test_params_and_macs_count_integer_weights(qdir, scheme):
    model = "mlp"
    dense = spa.load(quantized(qdir, model, scheme))
    fp = spa.load(FLOAT_MODELS[model]())
    true_count = count_params(fp)
    assert integer_params(dense.graph) >= true_count - 112  # float biases may stay float
    assert true_count <= count_params(dense) <= true_count * 1.1  # + scales / zero points
    assert count_macs(dense) == count_macs(fp) == 2 * 5 * (32 * 64 + 64 * 48 + 48 * 16)


def test_magnitude_reads_dequantized_weights_without_overflow():
    m = build('<ir_version: 9, opset_import: ["" : 17]>\n'
              """g (float[1,2] x, float[3] ws, int8[3] wz, float[3,2] w2) => (float[1,2] y)
              { w = DequantizeLinear <axis=1> (wq, ws, wz)  h = MatMul(x, w)  y = MatMul(h, w2) }"""
              .replace("(float[1,2] x,", "(float[1,2] x, int8[2,3] wq,"), weights="bcs")
    proto = m
    wq = np.array([[-128, 0, 5], [-128, 1, 5]], np.int8)
    ws = np.array([1.0, 100.0, 0.5], np.float32)
    wz = np.array([0, 0, 5], np.int8)
    proto.graph.initializer.extend([nh.from_array(wq, "wq"), nh.from_array(ws, "ws"), nh.from_array(wz, "wz")])
    proto.graph.initializer.append(nh.from_array(np.zeros((3, 2), np.float32), "w2"))
    del proto.graph.input[1:]
    model = spa.load(proto)
    real = real_weight(model.graph.initializers["wq"])
    np.testing.assert_allclose(real, [[-128, 0, 0], [-128, 100, 0]])
    dg = spa.dependency_graph(model)
    scores = spa.score(dg, "l1", normalization="none")
    s = np.asarray(scores[dg.groups[0].key])
    # mean over the DQ'd weight (out) and the zero w2 (in): -128 is not wrapped, channel 2 is its zero point
    np.testing.assert_allclose(s, [128.0, 50.0, 0.0])


def test_compensation_leaves_integer_weights_on_their_grid(qdir):
    """OBSPA's reconstruction would truncate real-valued updates into int8: those stay as they are."""
    dense = quantized(qdir, "cnn", "qdq_pc")
    result = spa.prune(dense, 0.3, criterion="obspa")
    check_pruned(dense, result)
    assert any("integer (quantized) weights" in n and "w2_quantized" in n for n in result.notes)
    before = spa.load(dense).graph.initializers["wf_quantized"].const_value.numpy()
    after = result.model.graph.initializers["wf_quantized"].const_value.numpy()
    kept = [np.flatnonzero((before == col[:, None]).all(axis=0)).size > 0 for col in after.T]
    assert all(kept)  # every kept column is an original column


def test_wanda_reads_a_dequantized_consumer_weight():
    """|W|·‖X‖ of an int8 consumer: the all -128 row is the heaviest, not a negative score."""
    proto = build('<ir_version: 9, opset_import: ["" : 17]>\n'
                  """g (float[1,4] x, float[4,3] w1, int8[3,2] wq, float ws) => (float[1,2] y)
                  { h = MatMul(x, w1)  w = DequantizeLinear(wq, ws)  y = MatMul(h, w) }""")
    inits = {i.name: i for i in proto.graph.initializer}
    inits["wq"].CopyFrom(nh.from_array(np.array([[-128, -128], [3, 3], [0, 1]], np.int8), "wq"))
    inits["ws"].CopyFrom(nh.from_array(np.array(0.5, np.float32), "ws"))
    dg = spa.dependency_graph(spa.load(proto))
    stats = spa.collect_stats(dg)
    s = np.asarray(spa.score(dg, "wanda", normalization="none", stats=stats)["w1:1"])
    assert s.argmax() == 0 and (s > 0).all()


@pytest.mark.parametrize("opset, axis", [(10, None), (13, 0), (19, 0), (21, 0)])
def test_dequantize_linear_across_opsets(opset, axis):
    """A hand-written QDQ Conv pair: per tensor (opset 10) or per channel, random (non-zero)
    zero points."""
    side, attr = ("float ws, int8 wz", "") if axis is None else ("float[8] ws, int8[8] wz", f"<axis={axis}>")
    m = build(f'<ir_version: {10 if opset >= 21 else 8}, opset_import: ["" : {opset}]>\n'
              f"""g (float[1,3,6,6] x, int8[8,3,3,3] wq, {side}, float[8] b1, float[4,8,1,1] w2)
                  => (float[1,4,6,6] y)
              {{ w = DequantizeLinear {attr} (wq, ws, wz)  h = Conv <pads=[1,1,1,1]> (x, w, b1)
                 r = Relu(h)  y = Conv(r, w2) }}""")
    dg = spa.dependency_graph(spa.load(m))
    g = dg.group("wq:0")
    members = {str(x.dim) for x in g.members}
    assert g.size == 8 and {"wq[0]", "b1[0]", "w2[1]"} <= members
    assert ({"ws[0]", "wz[0]"} <= members) == (axis is not None)
    result = spa.prune(m, 0.3)
    onnx.checker.check_model(spa.io.to_proto(result.model))
    wq = result.model.graph.initializers["wq"].const_value
    assert wq.numpy().dtype == np.int8 and wq.shape.numpy() == (6, 3, 3, 3)
    assert result.equivalence.checked_groups == ("wq:0",)
    assert result.equivalence.max_abs_diff <= result.equivalence.tolerance


def test_output_step_of_quantized_and_index_outputs():
    m = build('<ir_version: 9, opset_import: ["" : 17]>\n'
              """g (float[1,4] x, float[4,4] w, float s, uint8 z) => (int64[1] i, uint8[1,4] q)
              { h = MatMul(x, w)  i = ArgMax <axis=1, keepdims=0> (h)  q = QuantizeLinear(h, s, z) }""")
    model = spa.load(m)
    assert output_step(model.graph) == 1.0  # the uint8 output; ArgMax's int64 indices allow no step
    model.graph.outputs.pop()
    assert output_step(model.graph) == 0.0

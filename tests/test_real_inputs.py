"""Files as exporters write them: map-typed outputs (scikit-learn's ZipMap), stale value_info,
integer inputs that are not token ids, models where almost nothing can be pruned."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import build
from onnx import TensorProto, helper

import spa
from spa.calibration import synthesize
from spa.errors import NoopError
from spa.report import coverage, inspect_text
from spa.runtime import ModelInputs


def _zipmap_classifier() -> onnx.ModelProto:
    """x[N,6] -> MatMul/Add/Relu -> MatMul -> Softmax -> probs (tensor) -> ZipMap (seq(map)),
    with the label (ArgMax) as the first output, as skl2onnx lays it out."""
    m = build('''<ir_version: 8, opset_import: ["" : 17, "ai.onnx.ml" : 1]>
    g (float[N,6] x, float[6,12] w1, float[12] b1, float[12,3] w2) => (int64[N] label)
    { h = MatMul(x, w1)  a = Add(h, b1)  r = Relu(a)  z = MatMul(r, w2)  p = Softmax <axis=1> (z)
      label = ArgMax <axis=1, keepdims=0> (p) }''')
    seq_of_maps = helper.make_sequence_type_proto(helper.make_map_type_proto(
        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    m.graph.node.append(helper.make_node("ZipMap", ["p"], ["probability"], name="zipmap", domain="ai.onnx.ml",
                                         classlabels_int64s=[10, 20, 30]))
    m.graph.output.append(helper.make_value_info("probability", seq_of_maps))
    onnx.checker.check_model(m)
    return m


def _run(path_or_proto, feeds):
    data = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return [o.name for o in sess.get_outputs()], sess.run(None, feeds)


def test_map_typed_tail_is_set_aside_and_put_back(tmp_path):
    proto = _zipmap_classifier()
    original = proto.SerializeToString()
    result = spa.prune(proto, 0.5, output=tmp_path / "p.onnx")
    assert proto.SerializeToString() == original  # the input is never modified
    assert [g.key for g in result.graph.groups] == ["w1:1"]
    assert result.equivalence.checked_groups == ("w1:1",) and result.equivalence.exact
    written = onnx.load(tmp_path / "p.onnx")
    onnx.checker.check_model(written, full_check=True)
    assert [o.name for o in written.graph.output] == ["label", "probability"]  # order and names kept
    assert [n.op_type for n in written.graph.node][-1] == "ZipMap"
    w1 = {t.name: t for t in written.graph.initializer}["w1"]
    assert list(w1.dims) == [6, 6]
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)}
    names, (label, probability) = _run(str(tmp_path / "p.onnx"), feeds)
    assert names == ["label", "probability"]
    assert len(probability) == 4 and all(set(row) == {10, 20, 30} for row in probability)
    assert np.allclose([sum(row.values()) for row in probability], 1.0, atol=1e-5)
    assert label.shape == (4,)


def test_map_typed_input_is_refused_clearly():
    proto = _zipmap_classifier()
    feats = helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    proto.graph.input.append(helper.make_value_info("feats", feats))
    with pytest.raises(spa.SpaError, match="graph input 'feats' is map-typed"):
        spa.load(proto)


def test_scikit_learn_pipeline_with_zipmap(tmp_path):
    """skl2onnx's default classifier export: Scaler (ai.onnx.ml), an MLP, ZipMap."""
    pytest.importorskip("skl2onnx")
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 10)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 1)
    with _no_warning_check():
        clf = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=30,
                                                            random_state=0)).fit(x, y)
    src = tmp_path / "clf.onnx"
    src.write_bytes(to_onnx(clf, x[:1]).SerializeToString())
    dg = spa.dependency_graph(spa.load(src))
    assert sorted(g.size for g in dg.groups) == [16, 32]
    result = spa.prune(str(src), 0.3, output=tmp_path / "p.onnx")
    assert result.equivalence.exact and len(result.equivalence.checked_groups) == 2
    names, (label, probability) = _run(str(tmp_path / "p.onnx"), {"X": x[:5]})
    dense_names, (dense_label, _) = _run(str(src), {"X": x[:5]})
    assert names == dense_names == ["output_label", "output_probability"]
    assert label.shape == dense_label.shape and set(probability[0]) == {0, 1, 2}
    assert spa.metrics.count_params(result.model) < spa.metrics.count_params(result.dense)


class _no_warning_check:  # sklearn warns that 30 iterations did not converge; that is fine here
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def test_stale_value_info_is_discarded():
    """An exporter that writes NHWC shapes for NCHW values: the ops' shapes win, and the dense
    model is not failed (nor a group blamed) for the file's mistake."""
    proto = build('''<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,8,8] x, float[8,3,3,3] w1, float[4,8,1,1] w2) => (float[1,4,8,8] y)
    { h = Conv <pads=[1,1,1,1]> (x, w1)  r = Relu(h)  y = Conv(r, w2) }''')
    for name in ("h", "r"):
        proto.graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 8, 8, 3]))
    model = spa.load(proto)
    assert [int(d) for d in spa.dependency_graph(model).values["h"].shape] == [1, 8, 8, 8]
    result = spa.prune(proto, 0.5)
    assert result.equivalence.exact and [g.key for g in result.graph.groups] == ["w1:0"]


CUSTOM = '''<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
g (float[1,3,8,8] x, float[32,3,3,3] w1, float[4,3,1,1] w2, float[6,4,1,1] w3) => (float[1,6,8,8] y, float[1,32,8,8] r)
{ h = Conv <pads=[1,1,1,1]> (x, w1)  r = com.example.Foo(h)  z = Conv(x, w2)  s = Relu(z)  y = Conv(s, w3) }'''


def test_inspect_opens_with_the_prunable_share_and_the_costliest_barriers():
    dg = spa.dependency_graph(spa.load(build(CUSTOM)))
    cov = coverage(dg)
    assert cov.total == 32 * 27 + 4 * 3 + 6 * 4
    assert cov.prunable == 4 * 3 + 6 * 4  # w2:0 ~ w3:1 is a group; w1 sits behind Foo
    assert [(b.op, params) for b, params in cov.barriers] == [("Foo", 864)]
    lines = inspect_text(dg).splitlines()
    assert lines[0].startswith("Prunable parameters: 4.0% (36 of 900")
    assert "com.example::Foo" in lines[1] and "(864 parameters)" in lines[1]


def test_a_prune_that_removes_almost_nothing_says_why():
    with pytest.raises(NoopError, match=r"removed 2\.0% of the parameters \(ratio 0\.5\): only 4\.0% of the "
                                        r"parameters are prunable; the rest is blocked mostly by com\.example::Foo"):
        spa.prune(build(CUSTOM), 0.5, allow_noop=False)
    result = spa.prune(build(CUSTOM), 0.5)
    assert result.noop is not None and result.noop in result.notes
    prunable = build(CUSTOM.replace("com.example.Foo(h)", "Relu(h)  q = Conv(r, w4)").replace(
        "float[1,32,8,8] r)", "float[1,2,8,8] q)").replace("float[6,4,1,1] w3)", "float[6,4,1,1] w3, float[2,32,1,1] w4)"))
    assert spa.prune(prunable, 0.5, allow_noop=False).noop is None


def test_data_free_integer_inputs_follow_their_role():
    proto = build('''<ir_version: 8, opset_import: ["" : 17]>
    g (int64[N,7] input_ids, int64[N,7] attention_mask, uint8[N,7] raw, int64[N,7] code,
       float[50,4] wtable) => (float[N,7,4] y, float[N,7] m, float[N,7,256] o)
    { c = Cast <to=6> (input_ids)  y = Gather(wtable, c)  m = Cast <to=1> (attention_mask)
      depth = Constant <value = int64[1] {256}> ()  vals = Constant <value = float[2] {0, 1}> ()
      o = OneHot(code, depth, vals)  r = Cast <to=1> (raw) }''', weights="w")
    proto.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    model = spa.load(proto)
    batches = list(synthesize(model, ModelInputs(model), 3, None, seed=0))
    assert len(batches) == 3
    for feeds in batches:
        assert feeds["input_ids"].shape == (16, 7) and feeds["input_ids"].max() < 50
        assert feeds["input_ids"].max() > 2  # the vocabulary, not 0/1
        mask = feeds["attention_mask"]
        assert (mask[0] == 1).all() and set(np.unique(mask)) <= {0, 1}
        assert (np.diff(mask, axis=1) <= 0).all()  # padding only at the end of a row
        assert feeds["code"].max() < 256 and feeds["code"].max() > 2
        assert feeds["raw"].dtype == np.uint8 and feeds["raw"].max() > 2


def test_a_static_batch_gets_as_many_samples_as_a_dynamic_one():
    static = spa.load(build('''<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,4,4] x, float[8,3,1,1] w1) => (float[1,8,4,4] y) { y = Conv(x, w1) }'''))
    dynamic = spa.load(build('''<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,4,4] x, float[8,3,1,1] w1) => (float[N,8,4,4] y) { y = Conv(x, w1) }'''))
    rows = [sum(f["x"].shape[0] for f in synthesize(m, ModelInputs(m), 8, None)) for m in (static, dynamic)]
    assert rows == [128, 128]


def _fpn_export() -> bytes:
    """A detector neck as the TorchScript exporter writes it with dynamic height and width:
    ``interpolate(p, size=feature.shape[-2:])`` becomes Resize with sizes
    ``Concat(Shape(p)[:2], hw)``."""
    import io

    import torch
    import torch.nn.functional as F
    from torch import nn

    class FPN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 16, 3, 2, 1), nn.Conv2d(16, 16, 3, 2, 1)
            self.l1, self.l2, self.l3 = nn.Conv2d(8, 12, 1), nn.Conv2d(16, 12, 1), nn.Conv2d(16, 12, 1)
            self.head = nn.Conv2d(12, 5, 3, 1, 1)

        def forward(self, x):
            a = F.relu(self.c1(x))
            b = F.relu(self.c2(a))
            c = F.relu(self.c3(b))
            p2 = self.l2(b) + F.interpolate(self.l3(c), size=b.shape[-2:], mode="nearest")
            p1 = self.l1(a) + F.interpolate(p2, size=a.shape[-2:], mode="nearest")
            return self.head(p1)

    torch.manual_seed(0)
    f = io.BytesIO()
    torch.onnx.export(FPN().eval(), torch.randn(1, 3, 32, 32), f, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}, opset_version=17)
    return f.getvalue()


def test_resize_to_another_feature_size_keeps_its_channels(monkeypatch):
    """The lateral convolutions of an FPN (tied by the Adds through the Resizes) are one group,
    and loading does not run onnxruntime's symbolic inference: the only unknown sizes are the
    batch and the spatial axes."""
    from onnxruntime.tools import symbolic_shape_infer

    def refuse(*args, **kwargs):
        raise AssertionError("symbolic inference ran")

    monkeypatch.setattr(symbolic_shape_infer.SymbolicShapeInference, "infer_shapes", refuse)
    data = _fpn_export()
    dg = spa.dependency_graph(spa.load(data))
    assert sorted(g.key for g in dg.groups) == ["c1.weight:0", "c2.weight:0", "c3.weight:0", "l2.weight:0"]
    lateral = dg.group("l2.weight:0")
    assert {m.param for m in lateral.params if m.role == "out"} == {"l1.weight", "l2.weight", "l3.weight"}
    result = spa.prune(data, 0.5, input_shapes={"x": [2, 3, 48, 80]})
    assert result.equivalence.exact and len(result.equivalence.checked_groups) == 4
    from spa.io import to_proto

    sess = ort.InferenceSession(to_proto(result.model).SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.zeros((1, 3, 96, 64), np.float32)})[0].shape == (1, 5, 48, 32)


# Exporter patterns, written by hand where the exporter itself is too heavy to install in CI
# (tensorflow for tf2onnx, paddlepaddle for paddle2onnx).
EXPORTER_PATTERNS = {
    # tf2onnx (Keras): NHWC input, Transposes around each NCHW Conv, pooling over axes 1, 2,
    # a Dense layer as MatMul + Add.
    "tf2onnx": ('''<ir_version: 8, opset_import: ["" : 13]>
    g (float[N,16,16,3] input_1, float[8,3,3,3] w1, float[8] b1, float[8,8,3,3] w2, float[8] b2, float[8,10] wd,
       float[10] bd) => (float[N,10] dense)
    { t = Transpose <perm=[0,3,1,2]> (input_1)
      c1 = Conv <pads=[1,1,1,1], kernel_shape=[3,3], strides=[1,1]> (t, w1, b1)  r1 = Relu(c1)
      u1 = Transpose <perm=[0,2,3,1]> (r1)  t2 = Transpose <perm=[0,3,1,2]> (u1)
      c2 = Conv <pads=[1,1,1,1], kernel_shape=[3,3]> (t2, w2, b2)  r2 = Relu(c2)
      u = Transpose <perm=[0,2,3,1]> (r2)  p = ReduceMean <axes=[1,2], keepdims=0> (u)
      mm = MatMul(p, wd)  d = Add(mm, bd)  dense = Softmax <axis=-1> (d) }''', {"input_1": [2, 16, 16, 3]}, 2),
    # paddle2onnx: Conv + BatchNormalization + Relu, pooling, Reshape to [0, -1], fc as MatMul + Add.
    "paddle2onnx": ('''<ir_version: 8, opset_import: ["" : 11]>
    g (float[N,3,16,16] x, float[8,3,3,3] w1, float[8] s1, float[8] b1, float[8] bm1, float[8] sv1,
       float[16,8,3,3] w2, float[16] s2, float[16] b2, float[16] bm2, float[16] sv2, float[64,10] wf, float[10] bf)
       => (float[N,10] save_infer_model)
    { c1 = Conv <pads=[1,1,1,1], kernel_shape=[3,3], strides=[2,2]> (x, w1)
      n1 = BatchNormalization <epsilon=1e-5> (c1, s1, b1, bm1, sv1)  r1 = Relu(n1)
      c2 = Conv <pads=[1,1,1,1], kernel_shape=[3,3], strides=[2,2]> (r1, w2)
      n2 = BatchNormalization <epsilon=1e-5> (c2, s2, b2, bm2, sv2)  r2 = Relu(n2)
      p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r2)
      shape = Constant <value = int64[2] {0, -1}> ()  f = Reshape(p, shape)
      mm = MatMul(f, wf)  save_infer_model = Add(mm, bf) }''', {"x": [2, 3, 16, 16]}, 2),
}


@pytest.mark.parametrize("exporter", sorted(EXPORTER_PATTERNS))
def test_exporter_patterns_prune_to_valid_smaller_models(exporter):
    text, shapes, n_groups = EXPORTER_PATTERNS[exporter]
    proto = build(text)
    result = spa.prune(proto, 0.3, input_shapes=shapes)
    assert len(result.graph.groups) == n_groups
    assert result.equivalence.exact and len(result.equivalence.checked_groups) == n_groups
    assert spa.metrics.count_params(result.model) < spa.metrics.count_params(result.dense)
    from spa.io import to_proto

    onnx.checker.check_model(to_proto(result.model), full_check=True)


def test_a_sequence_output_is_checked_element_by_element(tmp_path):
    """seq(tensor) outputs (SplitToSequence): the equivalence check compares each element."""
    proto = build('''<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,8,8] x, float[8,3,3,3] w1, float[4,8,1,1] w2) => (float[1,4,8,8] y)
    { h = Conv <pads=[1,1,1,1]> (x, w1)  r = Relu(h)  y = Conv(r, w2) }''')
    proto.graph.node.append(helper.make_node("SplitToSequence", ["y"], ["parts"], axis=1))
    proto.graph.output.append(helper.make_value_info("parts", helper.make_sequence_type_proto(
        helper.make_tensor_type_proto(TensorProto.FLOAT, None))))
    result = spa.prune(proto, 0.5, output=tmp_path / "p.onnx")
    assert result.equivalence.exact and result.equivalence.checked_groups == ("w1:0",)
    assert set(result.equivalence.output_shapes) == {"y", "parts[0]", "parts[1]", "parts[2]", "parts[3]"}
    _, (y, parts) = _run(str(tmp_path / "p.onnx"), {"x": np.ones((1, 3, 8, 8), np.float32)})
    assert len(parts) == 4 and np.allclose(np.concatenate(parts, axis=1), y)

"""Model-zoo forms: opsets 7-10, IR version 3 (initializers listed as graph inputs), fp16
conversions, weights from Constant nodes and from constant chains. Each prunes to a valid,
running model at the input's opset and IR version, equal to masking where exact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import feeds_for, run
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import spa
from spa import zoo


def ir3(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The Caffe2 zoo form: IR version 3, every initializer also a graph input."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    out.ir_version = 3
    listed = {i.name for i in out.graph.input}
    for init in out.graph.initializer:
        if init.name not in listed:
            out.graph.input.append(h.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return out


def resnet(opset: int) -> onnx.ModelProto:
    return zoo.resnet((1, 1), (16, 32), image=16, classes=5, opset=opset)


def legacy_ops(opset: int) -> onnx.ModelProto:
    """Clip, Split and Slice with attributes, Upsample, Dropout, a weight from a Constant node and
    a Gemm weight behind Reshape + Transpose of an initializer (opsets 9 and 10 forms)."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return nh.from_array(rng.standard_normal(shape).astype(np.float32), name)

    slice_node = (h.make_node("Slice", ["cc"], ["sl"], starts=[0], ends=[7], axes=[1]) if opset < 10 else
                  h.make_node("Slice", ["cc", "st", "en", "ax"], ["sl"]))
    clip = h.make_node("Clip", ["c"], ["cl"], min=0.0, max=6.0)
    nodes = [
        h.make_node("Constant", [], ["w"], value=nh.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32))),
        h.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), clip,
        h.make_node("Split", ["cl"], ["s1", "s2"], axis=1, split=[5, 3]),
        h.make_node("Concat", ["s2", "s1"], ["cc"], axis=1), slice_node,
        h.make_node("Upsample" if opset < 10 else "Resize", ["sl", "sc"], ["u"], mode="nearest"),
        h.make_node("Dropout", ["u"], ["d"]),
        h.make_node("Conv", ["d", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c2"], ["r2"]),
        h.make_node("GlobalAveragePool", ["r2"], ["g"]),
        h.make_node("Flatten", ["g"], ["f"]),
        h.make_node("Reshape", ["wf", "wshape"], ["wr"]),
        h.make_node("Transpose", ["wr"], ["wt"], perm=[1, 0]),
        h.make_node("Gemm", ["f", "wt", "bf"], ["y"]),
    ]
    inits = [init("b", 8), nh.from_array(np.array([1, 1, 2, 2], np.float32), "sc"), init("w2", 6, 7, 3, 3),
             init("wf", 4, 2, 6), nh.from_array(np.array([8, 6], np.int64), "wshape"), init("bf", 8)]
    if opset >= 10:
        inits += [nh.from_array(np.array(v, np.int64), n) for n, v in (("st", [0]), ("en", [7]), ("ax", [1]))]
    g = h.make_graph(nodes, "legacy", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 8])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 4 if opset == 9 else 5
    return m


CASES = {
    "resnet-9": lambda: resnet(9), "resnet-10": lambda: resnet(10), "resnet-7": lambda: resnet(7),
    "resnet-9-ir3": lambda: ir3(resnet(9)), "legacy-9": lambda: legacy_ops(9), "legacy-10": lambda: legacy_ops(10),
    "legacy-9-ir3": lambda: ir3(legacy_ops(9)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_prunes_at_the_input_opset_and_ir_version(case, tmp_path):
    proto = CASES[case]()
    onnx.checker.check_model(proto, full_check=True)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(proto, src)
    result = spa.prune(src, 0.3, output=out)
    assert result.plan.pruned_groups
    eqr = result.equivalence
    assert eqr.checked_groups and eqr.max_abs_diff <= eqr.tolerance
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    assert written.opset_import[0].version == proto.opset_import[0].version
    assert written.ir_version == proto.ir_version
    assert result.form() == {"opset": {"in": proto.opset_import[0].version, "out": proto.opset_import[0].version},
                             "ir_version": {"in": proto.ir_version, "out": proto.ir_version}}
    inputs = {i.name for i in written.graph.input}
    if proto.ir_version == 3:  # each kept initializer listed, with its new shape
        shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in written.graph.input}
        for init in written.graph.initializer:
            assert init.name in inputs and shapes[init.name] == list(init.dims)
    else:
        assert not inputs & {i.name for i in written.graph.initializer}
    feeds = {"input" if "input" in inputs else "x": feeds_for(proto)["input" if "input" in inputs else "x"]}
    assert run(written, feeds)[0].shape == run(proto, feeds)[0].shape
    from spa.metrics import count_params

    assert count_params(result.model) < count_params(result.dense)


@pytest.mark.parametrize("case", ["resnet-9-ir3", "legacy-9", "legacy-10"])
def test_nothing_pruned_gives_the_input_outputs(case, tmp_path):
    proto = CASES[case]()
    out = tmp_path / "out.onnx"
    spa.prune(proto, 0.0, output=out)
    written = onnx.load(out)
    assert written.opset_import[0].version == proto.opset_import[0].version and written.ir_version == proto.ir_version
    name = proto.graph.input[0].name
    feeds = {name: feeds_for(proto)[name]}
    np.testing.assert_allclose(run(written, feeds)[0], run(proto, feeds)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep_io_types", [True, False])
def test_fp16_conversions_prune_and_keep_their_dtype(keep_io_types, tmp_path):
    float16 = pytest.importorskip("onnxconverter_common.float16")
    proto = float16.convert_float_to_float16(resnet(13), keep_io_types=keep_io_types)
    out = tmp_path / "out.onnx"
    result = spa.prune(proto, 0.3, output=out)
    assert result.plan.pruned_groups and result.equivalence.max_abs_diff <= result.equivalence.tolerance
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    dtypes = {i.name: i.data_type for i in proto.graph.initializer}
    for init in written.graph.initializer:
        if init.name in dtypes:
            assert init.data_type == dtypes[init.name]
    assert sum(i.data_type == T.FLOAT16 for i in written.graph.initializer) > 10


def test_target_opset_converts_and_names_the_op_it_cannot_take(tmp_path):
    result = spa.prune(ir3(resnet(9)), 0.3, target_opset=13)
    assert result.form() == {"opset": {"in": 9, "out": 13}, "ir_version": {"in": 3, "out": 7}}
    assert result.equivalence.max_abs_diff <= result.equivalence.tolerance
    with pytest.raises(spa.FrontendError, match=r"BatchNormalization.*opset 15"):
        spa.prune(resnet(17), 0.3, target_opset=9)


def test_cli_summary_shows_the_form(tmp_path, capsys):
    from spa.cli import main

    src = tmp_path / "in.onnx"
    onnx.save(ir3(resnet(9)), src)
    assert main(["prune", str(src), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.3"]) == 0
    assert "form: opset 9 -> 9, IR version 3 -> 3" in capsys.readouterr().out


def test_a_dense_model_that_fails_the_checker_is_not_blamed_on_a_group(monkeypatch):
    from spa.errors import ValidationError
    from spa.passes import verify

    real = verify.check_structure
    monkeypatch.setattr(verify, "check_structure",
                        lambda m: (_ for _ in ()).throw(ValidationError("the rewritten model is not valid ONNX: x")))
    with pytest.raises(ValidationError, match="the input model itself") as err:
        spa.prune(resnet(13), 0.3)
    assert "--protect" not in str(err.value)
    monkeypatch.setattr(verify, "check_structure", real)

"""Models with external data: loaded from any folder, checked, pruned and written without
materializing their weights.

``SPA_SLOW=1`` adds a model over 2 GB (about 2.2 GB of disk in a temp folder, a minute or two).
"""

from __future__ import annotations

import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from spa import runtime
from spa.cli import main
from spa.errors import SpaError
from spa.io import OnDemandTensor, skeleton

SLOW = os.environ.get("SPA_SLOW") == "1"


def mlp(widths, dtype=np.float32, seed=0) -> onnx.ModelProto:
    """x -> MatMul -> Relu -> ... -> MatMul: one prunable group per hidden width."""
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits, x = [], [], "x"
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(dtype)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]))
        x = f"h{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", elem, ["batch", widths[0]])],
                          [helper.make_tensor_value_info(x, elem, ["batch", widths[-1]])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def save_external(proto: onnx.ModelProto, folder: Path, name="model.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=name + ".data", size_threshold=0)
    return path


def snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.read_bytes()) for p in sorted(folder.iterdir())}


def outputs(path: Path, x: np.ndarray) -> np.ndarray:
    return runtime.session(path).run(None, {"x": x})[0]


@pytest.fixture
def external_model(tmp_path, monkeypatch):
    """An MLP with external data in ``tmp_path/models``, the working directory elsewhere."""
    path = save_external(mlp([16, 32, 24, 8]), tmp_path / "models")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return path


@pytest.mark.parametrize("criterion", ["l1", "obspa"])
def test_cli_prunes_external_model_from_another_folder(external_model, tmp_path, criterion):
    before = snapshot(external_model.parent)
    out = tmp_path / "out" / "pruned.onnx"
    assert main(["prune", str(external_model), "-o", str(out), "--ratio", "0.5", "--criterion", criterion]) == 0
    assert snapshot(external_model.parent) == before  # the input is untouched
    onnx.checker.check_model(str(out), full_check=True)
    pruned = onnx.load(str(out))
    assert {t.name: tuple(t.dims) for t in pruned.graph.initializer} == {"w0": (16, 16), "w1": (16, 12), "w2": (12, 8)}
    y = outputs(out, np.ones((2, 16), np.float32))
    assert y.shape == (2, 8) and np.isfinite(y).all()


@pytest.mark.parametrize("criterion", ["l1", "obspa"])
def test_api_prunes_external_model_with_equivalence_check(external_model, tmp_path, criterion):
    out = tmp_path / "api" / "pruned.onnx"
    result = spa.prune(str(external_model), ratio=0.5, criterion=criterion, output=str(out))
    assert result.equivalence is not None and result.equivalence.skipped is None
    assert result.verify_report.ran
    assert spa.metrics.count_params(spa.load(str(out))) < spa.metrics.count_params(spa.load(str(external_model)))


def test_large_output_written_with_external_data_loads(external_model, tmp_path, monkeypatch):
    monkeypatch.setattr(spa.io, "EXTERNAL_DATA_THRESHOLD", 1)  # "large": weights go to a .data file
    out = tmp_path / "ext" / "pruned.onnx"
    spa.prune(str(external_model), ratio=0.5, output=str(out))
    data = out.parent / "pruned.onnx.data"
    assert data.is_file() and data.stat().st_size == 4 * (16 * 16 + 16 * 12 + 12 * 8)
    proto = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
    assert outputs(out, np.ones((1, 16), np.float32)).shape == (1, 8)


def test_escaping_external_data_is_refused(tmp_path):
    proto = mlp([4, 6, 2])
    folder = tmp_path / "models"
    save_external(proto, tmp_path / "elsewhere")
    folder.mkdir()
    p = onnx.load(str(tmp_path / "elsewhere" / "model.onnx"), load_external_data=False)
    for t in p.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../elsewhere/model.onnx.data"
    onnx.save(p, str(folder / "model.onnx"))
    with pytest.raises(SpaError, match="escapes|outside|folder"):
        spa.prune(str(folder / "model.onnx"), ratio=0.5)
    assert main(["prune", str(folder / "model.onnx"), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.5"]) == 1


def test_fp16_weights_keep_their_dtype(tmp_path, monkeypatch):
    path = save_external(mlp([16, 32, 8], dtype=np.float16), tmp_path / "m16")
    monkeypatch.chdir(tmp_path)
    for threshold in (1 << 30, 1):  # written inline, then with external data
        monkeypatch.setattr(spa.io, "EXTERNAL_DATA_THRESHOLD", threshold)
        out = tmp_path / f"o{threshold}" / "p.onnx"
        spa.prune(str(path), ratio=0.5, output=str(out))
        proto = onnx.load(str(out))
        assert {t.data_type for t in proto.graph.initializer} == {TensorProto.FLOAT16}
        assert outputs(out, np.ones((1, 16), np.float16)).dtype == np.float16


def test_session_and_checks_take_weights_by_reference(external_model):
    model = spa.load(str(external_model))
    proto, tensors, span = skeleton(model)
    assert sorted(tensors) == ["w0", "w1"] and span == 4 * (16 * 32 + 32 * 24)  # w2 is small: inline
    assert {t.name: t.data_location for t in proto.graph.initializer} == {
        "w0": TensorProto.EXTERNAL, "w1": TensorProto.EXTERNAL, "w2": TensorProto.DEFAULT}
    assert all(isinstance(v.const_value, OnDemandTensor) for v in model.graph.initializers.values())
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    ref = runtime.session(onnx.load(str(external_model))).run(None, {"x": x})[0]
    np.testing.assert_allclose(runtime.session(model).run(None, {"x": x})[0], ref, rtol=1e-5, atol=1e-6)
    sess = runtime.session_exposing(model, ["h0"])
    assert sess.run(["h0"], {"x": x})[0].shape == (3, 32)
    spa.passes.verify.check_structure(model)


def test_invalid_model_still_fails_the_checker(external_model):
    model = spa.load(str(external_model))
    model.graph.initializers["w1"].shape = ir.Shape([5, 24])  # disagrees with w0's output
    model.graph.initializers["w1"].const_value = ir.tensor(np.zeros((5, 24), np.float32), name="w1")
    with pytest.raises(SpaError, match="not valid ONNX"):
        spa.passes.verify.check_structure(model)


def test_apply_reads_nothing_untouched_and_streams_the_write(tmp_path, monkeypatch):
    """~100 MB of weights: apply + save keep untouched tensors external, slice lazily, and
    allocate a small share of the model while writing."""
    widths = [1024, 4096, 4096, 1024, 1024]  # w0 16 MB, w1 64 MB, w2 16 MB, w3 4 MB
    path = save_external(mlp(widths), tmp_path / "big")
    monkeypatch.setattr(spa.io, "EXTERNAL_DATA_THRESHOLD", 1)
    model = spa.load(str(path))
    dg = spa.dependency_graph(model)
    hidden = next(g for g in dg.groups if any(m.param == "w3" and m.role == "in" for m in g.params))
    plan = spa.Plan(tuple(spa.GroupPlan(g.key, g.size, tuple(range(0, g.size, 2)) if g is hidden
                                        else tuple(range(g.size))) for g in dg.groups))
    tracemalloc.start()
    spa.api.apply_in_place(model, plan, graph=dg)
    inits = model.graph.initializers
    assert isinstance(inits["w0"].const_value, OnDemandTensor)  # untouched: still read from the file
    assert isinstance(inits["w1"].const_value, OnDemandTensor)
    assert isinstance(inits["w2"].const_value, ir.LazyTensor)  # sliced lazily
    assert isinstance(inits["w3"].const_value, ir.LazyTensor)
    _, apply_peak = tracemalloc.get_traced_memory()
    out = spa.io.save(model, tmp_path / "out" / "p.onnx")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    total = sum(a * b * 4 for a, b in zip(widths, widths[1:]))
    assert apply_peak < total / 50
    assert peak < total / 4, f"peak {peak:,} of {total:,} bytes"
    got = onnx.load(str(out))
    assert {t.name: tuple(t.dims) for t in got.graph.initializer} == {
        "w0": (1024, 4096), "w1": (4096, 4096), "w2": (4096, 512), "w3": (512, 1024)}
    w2 = numpy_helper.to_array(next(t for t in got.graph.initializer if t.name == "w2"))
    src = numpy_helper.to_array(next(t for t in onnx.load(str(path)).graph.initializer if t.name == "w2"))
    np.testing.assert_array_equal(w2, src[:, ::2])


@pytest.mark.skipif(not SLOW, reason="SPA_SLOW=1: a model over 2 GB")
def test_model_over_2gb(tmp_path):
    if shutil.disk_usage(tmp_path).free < 8 << 30:
        pytest.skip("needs 8 GB of free disk")
    widths = [8192, 8192, 8192, 8192, 8192, 8192, 8192, 8192, 8192, 8192]  # 9 x 256 MB = 2.3 GB
    rng = np.random.default_rng(0)
    folder = tmp_path / "m"
    folder.mkdir()
    data = folder / "model.onnx.data"
    nodes, inits, x, offset = [], [], "x", 0
    with open(data, "wb") as f:
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            w = (rng.standard_normal((a, b), dtype=np.float32) / np.sqrt(a)).astype(np.float32)
            f.write(w.tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[a, b],
                            data_location=TensorProto.EXTERNAL)
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(w.nbytes))):
                t.external_data.add(key=k, value=v)
            offset += w.nbytes
            inits.append(t)
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]))
            x = f"h{i}"
            if i < len(widths) - 2:
                nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
                x = f"r{i}"
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, widths[0]])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, widths[-1]])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    out = tmp_path / "o" / "p.onnx"
    assert main(["prune", str(folder / "model.onnx"), "-o", str(out), "--ratio", "0.3"]) == 0
    onnx.checker.check_model(str(out), full_check=True)
    assert runtime.session(out).run(None, {"x": np.ones((1, 8192), np.float32)})[0].shape == (1, 8192)


def test_run_skipped_above_the_run_limit_with_a_note(external_model, tmp_path, monkeypatch):
    from spa import equivalence

    monkeypatch.setattr(equivalence, "CHECK_LIMIT_BYTES", 1)
    monkeypatch.setattr(equivalence, "RUN_LIMIT_BYTES", 1)
    monkeypatch.setattr(runtime, "session", None)  # no onnxruntime session may be created
    result = spa.prune(str(external_model), ratio=0.5, output=str(tmp_path / "o" / "p.onnx"))
    assert result.equivalence.skipped and not result.verify_report.ran
    assert any("not run in onnxruntime" in n and "--check-equivalence" in n for n in result.notes)
    assert (tmp_path / "o" / "p.onnx").is_file()


def test_bfloat16_external_tensor_reaches_onnxruntime_by_reference(tmp_path):
    import ml_dtypes

    w = np.arange(1024, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(32, 32)
    t = helper.make_tensor("w", TensorProto.BFLOAT16, [32, 32], w.view(np.uint16).tobytes(), raw=True)
    g = helper.make_graph([helper.make_node("Cast", ["w"], ["y"], to=TensorProto.FLOAT)], "bf16", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 32])], [t])
    path = save_external(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "bf")
    from spa.frontends.onnx import load

    model = load(str(path))
    tensor = model.graph.initializers["w"].const_value
    assert isinstance(tensor, OnDemandTensor) and tensor.numpy().dtype == ml_dtypes.bfloat16
    assert tensor.tobytes() == w.tobytes()
    _, by_ref, _ = skeleton(model)
    assert list(by_ref) == ["w"]
    y = runtime.session(model).run(None, {})[0]
    np.testing.assert_array_equal(y, w.astype(np.float32))

"""Device selection: auto falls back to the CPU and says why; an explicit device that cannot run
is an error naming what is missing. These run without a GPU (providers are simulated)."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest

import spa
from spa import runtime, zoo
from spa.errors import ArgumentError


@pytest.fixture()
def fake_cuda(monkeypatch):
    """A GPU build whose CUDA provider is listed; ``state["runs"]`` says whether a session works."""
    state = {"runs": False}
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "_runs_on", lambda options: state["runs"])
    monkeypatch.setattr(runtime, "_preload_cuda", lambda: "cannot load libcublasLt.so.13")
    return state


def test_auto_without_a_cuda_build_is_the_cpu_and_says_why():
    dev = runtime.select_device("auto")
    assert dev.name == "cpu" and dev.providers == ("CPUExecutionProvider",)
    assert "no CUDA execution provider" in dev.note and "spa-prune[gpu]" in dev.note


def test_explicit_cuda_without_one_is_an_error_naming_what_is_missing():
    with pytest.raises(ArgumentError, match="no CUDA execution provider"):
        runtime.select_device("cuda")
    with pytest.raises(ArgumentError, match="expected auto, cpu, cuda or cuda:N"):
        runtime.select_device("tpu")
    with pytest.raises(ArgumentError, match="TensorrtExecutionProvider.*not available"):
        runtime.select_device(provider="TensorrtExecutionProvider")


def test_a_listed_cuda_provider_that_cannot_run_falls_back_with_the_missing_libraries(fake_cuda):
    dev = runtime.select_device("auto")
    assert dev.name == "cpu" and "libcublasLt.so.13" in dev.note
    with pytest.raises(ArgumentError, match="cuda:1.*libcublasLt"):
        runtime.select_device("cuda:1")
    fake_cuda["runs"] = True
    dev = runtime.select_device("cuda:1")
    assert dev.name == "cuda:1" and dev.providers[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert runtime.select_device("auto").name == "cuda:0"


def test_sessions_follow_the_chosen_device(monkeypatch):
    seen = []
    real = ort.InferenceSession

    def spy(model, opts=None, providers=None, **kwargs):
        seen.append(providers)
        return real(model, opts, providers=providers, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    result = spa.prune(zoo.resnet((1, 1), (16, 32), image=16, classes=5), 0.3, device="cpu")
    assert result.device == "cpu" and seen and all(p == ["CPUExecutionProvider"] for p in seen)
    assert result.report()["device"] == "cpu"


def test_cli_device_errors_and_notes(tmp_path, capsys):
    from spa.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(zoo.resnet((1, 1), (16, 32), image=16, classes=5), src)
    assert main(["prune", str(src), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.3", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "spa: error: device='cuda' cannot be used" in err and not (tmp_path / "o.onnx").exists()
    assert main(["bench", str(src), "--runs", "2", "--device", "cpu"]) == 0
    assert "device: cpu" in capsys.readouterr().out
    assert main(["prune", str(src), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.3"]) == 0
    captured = capsys.readouterr()
    assert "running models on cpu" in captured.err and "ran on: cpu" in captured.out

"""The spa command line: output, files written, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

from spa import zoo
from spa.cli import main


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(zoo.resnet((1, 1), (16, 32), image=16, classes=5), path)
    return path


def test_inspect_prints_groups_and_blocked_axes(model_file, capsys, tmp_path):
    assert main(["inspect", str(model_file), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "Prunable groups: 5 (160 channels)" in out
    assert "graph output 'logits'" in out and "graph input 'input'" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert [g["channels"] for g in report["groups"]] == [64, 16, 16, 32, 32]
    assert all(m["dim"] for g in report["groups"] for m in g["members"])


def test_prune_then_apply_the_same_plan(model_file, tmp_path, capsys):
    out, plan = tmp_path / "a.onnx", tmp_path / "plan.json"
    assert main(["prune", str(model_file), "-o", str(out), "--ratio", "0.5", "--round-to", "4",
                 "--plan-out", str(plan), "--criterion", "l2"]) == 0
    assert "pruned 80/160 channels in 5 groups" in capsys.readouterr().out
    out2 = tmp_path / "b.onnx"
    assert main(["apply", str(model_file), str(plan), "-o", str(out2)]) == 0
    a, b = onnx.load(out), onnx.load(out2)
    assert [tuple(i.dims) for i in a.graph.initializer] == [tuple(i.dims) for i in b.graph.initializer]


def test_no_verify_skips_only_the_onnxruntime_run(model_file, tmp_path, capsys, monkeypatch):
    import spa.passes.verify as verify_mod

    calls = []
    monkeypatch.setattr(verify_mod, "_run", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    out = tmp_path / "nv.onnx"
    assert main(["prune", str(model_file), "-o", str(out), "--ratio", "0.5", "--no-verify"]) == 0
    assert not calls and out.exists()
    assert "verifying (checker, shape inference) ... done" in capsys.readouterr().err


def test_bench_compares_two_models(model_file, tmp_path, capsys):
    out = tmp_path / "small.onnx"
    assert main(["prune", str(model_file), "-o", str(out), "--ratio", "0.5"]) == 0
    capsys.readouterr()
    assert main(["bench", str(model_file), str(out), "--runs", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["metric", "net.onnx", "small.onnx", "ratio"]
    macs = next(line for line in lines if line.startswith("MACs")).split()
    assert float(macs[-1]) < 0.5


def test_errors_exit_non_zero_and_write_nothing(tmp_path, capsys, model_file):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    out = tmp_path / "out.onnx"
    assert main(["prune", str(bad), "-o", str(out), "--ratio", "0.5"]) == 1
    assert "spa: error:" in capsys.readouterr().err and not out.exists()
    assert main(["prune", str(model_file), "-o", str(out), "--ratio", "1.5"]) == 1
    assert "ratio=1.5" in capsys.readouterr().err and not out.exists()
    assert main(["prune", str(model_file), "-o", str(model_file), "--ratio", "0.5"]) == 1
    assert "never overwrites" in capsys.readouterr().err
    assert main(["prune", str(model_file), "-o", str(out), "--ratio", "0.5", "--input-shape", "input=a,b"]) == 1
    assert "--input-shape" in capsys.readouterr().err


def test_demo_runs(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "7 groups found; 7 pruned" in out and "latency (ms, median)" in out


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "spa.cli", "prune", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--round-to" in proc.stdout and "--protect" in proc.stdout


def test_import_spa_loads_neither_torch_nor_onnxruntime():
    code = "import sys, spa; spa.load; print('torch' in sys.modules, 'onnxruntime' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["False", "False"]


def test_prune_obspa_with_a_calibration_directory_and_layerwise_allocation(model_file, tmp_path, capsys):
    import numpy as np

    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        np.save(calib / f"batch{k}.npy", rng.standard_normal((1, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "small.onnx"
    assert main(["prune", str(model_file), "-o", str(out), "--ratio", "0.5", "--criterion", "obspa",
                 "--calibration", str(calib), "--allocation", "alpha"]) == 0
    assert out.exists() and "pruned" in capsys.readouterr().out
    assert main(["prune", str(model_file), "-o", str(out), "--ratio", "0.5", "--criterion", "obspa",
                 "--calibration", str(tmp_path / "missing")]) == 1
    assert "neither a directory" in capsys.readouterr().err
    assert main(["prune", str(model_file), "-o", str(out), "--ratio", "0.5", "--criterion", "taylor"]) == 1
    assert "needs gradients" in capsys.readouterr().err

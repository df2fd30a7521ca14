"""Fresh virtual environments: each extra leaves exactly one onnxruntime build.

Marked ``venv`` (deselected by default; ``python -m pytest -m venv`` runs them, as .ci/run does):
they install from the package registry and take minutes. They need no GPU: the GPU build lists
``CUDAExecutionProvider`` among its providers on any machine, and SPA falls back to the CPU
when a session cannot be created there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.venv


def _venv(path: Path, spec: str) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    python = path / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", spec],
                   check=True, timeout=1500)
    return python


def _builds(python: Path) -> list[str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                         check=True).stdout
    return sorted(p["name"].lower() for p in json.loads(out) if p["name"].lower().startswith("onnxruntime"))


def test_gpu_extra_installs_only_the_gpu_build(tmp_path):
    python = _venv(tmp_path / "gpu", f"{ROOT}[gpu]")
    assert _builds(python) == ["onnxruntime-gpu"]
    code = ("import onnxruntime as ort, spa.runtime as r; "
            "assert 'CUDAExecutionProvider' in ort.get_available_providers(), ort.get_available_providers(); "
            "d = r.select_device('auto'); print(d.name, '|', d.note)")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    name, note = out.stdout.strip().split(" | ", 1)
    # With a usable GPU, auto picks it; without one, it says why it fell back.
    assert name.startswith("cuda:") or (name == "cpu" and "CUDA" in note)


def test_core_needs_a_build_and_says_so_and_the_cpu_extra_runs(tmp_path):
    python = _venv(tmp_path / "core", str(ROOT))
    assert _builds(python) == []
    spa = python.parent / "spa"
    out = subprocess.run([str(spa), "demo"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "spa: error: onnxruntime is not installed" in out.stderr
    assert "Traceback" not in out.stderr
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", f"{ROOT}[cpu]"],
                   check=True, timeout=1500)
    assert _builds(python) == ["onnxruntime"]
    out = subprocess.run([str(spa), "demo"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "pruned" in out.stdout and "latency" in out.stdout


def test_this_environment_has_one_build():
    from spa import runtime

    assert len(runtime.installed_builds()) == 1, runtime.installed_builds()
    assert sys.modules.get("onnxruntime") is None or runtime.current_device().providers

"""Pruned versus dense latency on the CUDA execution provider, beside the MAC ratio.

ResNet-50 (224x224, batch 1), a BERT-base shape and a LLaMA shape (sequence 128), pruned 30% and
50%, with and without --round-to 8, in fp32 and fp16 (onnxconverter-common). Each pair is timed in
the same run, interleaved, with inputs and outputs bound on the GPU (IO binding), medians.

    pip uninstall -y onnxruntime && pip install -e ".[gpu,examples]" onnxconverter-common
    python examples/bench_gpu.py [--models resnet50,bert,llama] [--runs 50] [--rounds 3]

On a machine without a usable GPU it stops with the reason (spa.runtime.select_device).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import spa
from spa import runtime, zoo
from spa.io import to_proto
from spa.metrics import count_macs
from spa.report import table

SEQ = 128


def _source(name: str, workdir: str):
    if name == "resnet50":
        return zoo.resnet50()
    from bench_transformers import export

    path = str(Path(workdir) / f"{name}.onnx")
    export(name, path)
    return path


def _fp16(model):
    try:
        from onnxconverter_common import float16
    except ImportError:
        return None
    return float16.convert_float_to_float16(to_proto(model), keep_io_types=True)


def _shapes(name: str):
    return None if name == "resnet50" else {"input_ids": [1, SEQ]}


def _latencies(a, b, shapes, rounds: int, runs: int) -> tuple[float, float]:
    sa, sb = runtime.session(a), runtime.session(b)
    feeds = runtime.random_feeds(sa, shapes)
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(runtime.latency_ms(sa, feeds, runs=runs))
        tb.append(runtime.latency_ms(sb, feeds, runs=runs))
    return float(np.median(ta)), float(np.median(tb))


def main() -> None:
    try:
        _main()
    except spa.SpaError as exc:
        raise SystemExit(f"bench_gpu: {exc}") from None


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,bert,llama")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    device = runtime.select_device(args.device)
    rows = []
    with runtime.use_device(device), tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            source = _source(name, tmp)
            dense = spa.load(source)
            shapes = _shapes(name)
            macs = count_macs(dense, shapes)
            for ratio in (0.3, 0.5):
                for round_to in (1, 8):
                    kinds = None if name == "resnet50" else ["heads", "channels"]
                    pruned = spa.prune(dense, ratio, round_to=round_to, kinds=kinds, input_shapes=shapes).model
                    mac_ratio = count_macs(pruned, shapes) / macs
                    for precision in ("fp32", "fp16"):
                        a, b = (to_proto(dense), to_proto(pruned)) if precision == "fp32" else \
                            (_fp16(dense), _fp16(pruned))
                        if a is None:
                            rows.append([name, ratio, round_to, precision, f"{mac_ratio:.3f}", "-", "-",
                                         "onnxconverter-common not installed"])
                            continue
                        da, db = _latencies(a, b, shapes, args.rounds, args.runs)
                        rows.append([name, ratio, round_to, precision, f"{mac_ratio:.3f}", f"{da:.3f}",
                                     f"{db:.3f}", f"{db / da:.3f}"])
    print(f"device: {device.name}")
    print(table(["model", "ratio", "round_to", "precision", "MACs ratio", "dense ms", "pruned ms", "latency ratio"],
                [[str(c) for c in r] for r in rows], "lrrlrrrr"))


if __name__ == "__main__":
    main()

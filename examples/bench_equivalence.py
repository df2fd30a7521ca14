"""What the built-in equivalence check costs: `spa.prune` with the check (the default) against
the same prune with it off (one onnxruntime run that checks output shapes instead), on a
ResNet-50 shape (224x224, batch 1) and a BERT-base shape (12 layers, 768 hidden, 12 heads;
dynamo export, sequence 16). Both are timed in the same run, alternating, best of N.

    pip install -e ".[examples]"
    python examples/bench_equivalence.py [--models resnet50,bert] [--rounds 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import spa
from spa import zoo
from spa.report import table


def _source(name: str, workdir: str):
    if name == "resnet50":
        return zoo.resnet50()
    from bench_transformers import export  # the same BERT-base export as bench_transformers.py

    path = str(Path(workdir) / "bert.onnx")
    export("bert", path)
    return path


def _time(source, check: bool, ratio: float) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = spa.prune(source, ratio, check_equivalence=check)
    return time.perf_counter() - t0, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,bert")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            source = _source(name, tmp)
            best = {True: float("inf"), False: float("inf")}
            result = None
            for _ in range(args.rounds):
                for check in (False, True):
                    t, r = _time(source, check, args.ratio)
                    best[check] = min(best[check], t)
                    result = r if check else result
            eqr = result.equivalence
            fid = f"{eqr.fidelity.cosine:.4f}" if eqr.fidelity else "-"
            rows.append([name, f"{best[False]:.2f}", f"{best[True]:.2f}", f"{best[True] / best[False]:.2f}",
                         str(len(eqr.checked_groups)), str(len(eqr.inexact_groups)), f"{eqr.max_abs_diff:.1e}", fid])
    print(table(["model", "prune, check off (s)", "prune, check on (s)", "ratio", "exact groups checked",
                 "inexact", "max |diff|", "cosine (inexact)"], rows, "lrrrrrrr"))


if __name__ == "__main__":
    main()

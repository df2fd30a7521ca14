"""Cost of OBSPA on a BERT-base-shaped model (12 layers, hidden 768, 12 heads, FFN 3072,
random init, nothing downloaded): wall time per stage and peak memory on this machine, data-free
(random tokens) calibration, heads + FFN + hidden pruned 30%.

    python examples/bench_obspa_cost.py [--ratio 0.3] [--batches 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import warnings

import spa
from spa.progress import Progress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--batches", type=int, default=8, help="data-free batches of 16 sequences")
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()

    from bench_transformers import export  # the same BERT-base shape, exported with dynamic axes

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = f"{tmp}/bert.onnx"
        export("bert", path)
        t0 = time.perf_counter()
        result = spa.prune(path, args.ratio, criterion="obspa", calibration="gaussian",
                           calibration_batches=args.batches, input_shapes={"seq": args.seq},
                           progress=Progress(True))
        total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nOBSPA data-free on BERT-base shape, {args.batches} x 16 random sequences of {args.seq} tokens, "
          f"ratio {args.ratio}: {total:.0f} s in all, peak memory {peak:.1f} GiB "
          f"({len(result.plan.pruned_groups)} groups pruned, every consumer layer reconstructed)")


if __name__ == "__main__":
    main()

"""ResNet-50-shaped model (224x224, batch 1) pruned 50% with round_to=8: is the onnxruntime
latency ratio (pruned/dense) within 10% of the MAC ratio? Both models are timed in the same
run, interleaved, on the same inputs.

    python examples/bench_resnet50.py [--rounds 5] [--runs 20] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import spa
from spa import runtime, zoo
from spa.io import to_proto
from spa.metrics import count_macs, count_params
from spa.report import table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--runs", type=int, default=20, help="runs per round (median taken)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    dense_proto = zoo.resnet50()
    t0 = time.perf_counter()
    result = spa.prune(dense_proto, args.ratio, round_to=args.round_to)
    prune_s = time.perf_counter() - t0
    dense = spa.load(dense_proto)
    pruned = result.model

    s_dense = runtime.session(to_proto(dense), threads=args.threads)
    s_pruned = runtime.session(to_proto(pruned), threads=args.threads)
    feeds = runtime.random_feeds(s_dense)
    lat_d, lat_p = [], []
    for _ in range(args.rounds):
        lat_d.append(runtime.latency_ms(s_dense, feeds, runs=args.runs))
        lat_p.append(runtime.latency_ms(s_pruned, feeds, runs=args.runs))
    stats = {
        "params": (count_params(dense), count_params(pruned)),
        "MACs": (count_macs(dense), count_macs(pruned)),
        "latency (ms, median of rounds)": (float(np.median(lat_d)), float(np.median(lat_p))),
    }
    rows = [[k, f"{a:,.3f}" if isinstance(a, float) else f"{a:,}", f"{b:,.3f}" if isinstance(b, float) else f"{b:,}",
             f"{b / a:.3f}"] for k, (a, b) in stats.items()]
    print(f"ResNet-50 shape, 224x224, batch 1; ratio {args.ratio}, round_to {args.round_to}; "
          f"providers {runtime.providers()}; pruning took {prune_s:.1f}s")
    print(table(["metric", "dense", "pruned", "pruned/dense"], rows, "lrrr"))
    mac_ratio = stats["MACs"][1] / stats["MACs"][0]
    lat_ratio = stats["latency (ms, median of rounds)"][1] / stats["latency (ms, median of rounds)"][0]
    per_round = [p / d for d, p in zip(lat_d, lat_p)]
    print(f"latency ratio per round: {', '.join(f'{r:.3f}' for r in per_round)}")
    rel = abs(lat_ratio - mac_ratio) / mac_ratio
    verdict = "within" if rel <= 0.10 else "NOT within"
    print(f"latency ratio {lat_ratio:.3f} vs MAC ratio {mac_ratio:.3f}: {rel:.1%} apart, {verdict} 10%")


if __name__ == "__main__":
    main()

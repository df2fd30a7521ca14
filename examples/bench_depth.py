"""Depth pruning: a quarter of the residual layers removed; onnxruntime latency ratio against the
parameter ratio (both models timed in the same run, interleaved, batch 1).

  * LLaMA shape (hidden 1024, 8 layers, 16 query heads in 4 KV groups, sequence 128) and
    BERT-base shape (hidden 768, 12 layers, sequence 128): `transformers` models from config
    objects (random init, nothing downloaded), exported as in examples/bench_transformers.py;
    a unit is a whole layer (attention + FFN);
  * ResNet-50 shape (224x224, spa.zoo): a unit is a bottleneck block; those with a projection
    shortcut are not removable, so a quarter of the removable ones goes.

Blocks are chosen by ``--score`` (bi, angular, greedy) on data-free inputs; ``--ratio`` adds
width pruning on top (one plan). The expectation: latency falls at least as much as
parameters (a layer costs the same time at any width; embeddings cost parameters, little time).

    python examples/bench_depth.py [--models llama,bert,resnet50] [--depth 0.25] [--score bi]
                                   [--ratio 0] [--rounds 7] [--runs 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

import spa
from spa import depth as sd, runtime, zoo
from spa.io import to_proto
from spa.metrics import count_macs, count_params
from spa.report import table

SEQ = 128


def _source(name: str, workdir: str):
    if name == "resnet50":
        return zoo.resnet50(), None
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_transformers import export

    path = os.path.join(workdir, f"{name}.onnx")
    t0 = time.perf_counter()
    export(name, path)
    print(f"[{name}] exported in {time.perf_counter() - t0:.1f}s", flush=True)
    return path, {"batch": 1, "seq": SEQ}


def _feeds(model, shapes) -> dict:
    sess = runtime.session(to_proto(model))
    feeds = runtime.random_feeds(sess, shapes)
    for name, arr in feeds.items():
        if np.issubdtype(arr.dtype, np.integer):  # token ids over the vocabulary
            vocab = next(int(v.shape[0]) for k, v in model.graph.initializers.items() if "embed" in k)
            feeds[name] = np.random.default_rng(0).integers(0, vocab, size=arr.shape).astype(arr.dtype)
    return feeds


def bench(name: str, workdir: str, args) -> list[list]:
    source, shapes = _source(name, workdir)
    dense = spa.load(source)
    blocks = sd.find_blocks(dense)
    units = sd.units(blocks, "layer")
    print(f"[{name}] {len(units)} units, {sum(u.removable for u in units)} removable"
          + "".join(f"; {u.key}: {u.reason}" for u in units if not u.removable)[:400], flush=True)
    t0 = time.perf_counter()
    result = spa.prune(dense, args.ratio, depth=args.depth, depth_score=args.score, calibration_batches=2,
                       input_shapes=shapes, kinds=["heads", "channels"] if args.ratio else None)
    prune_s = time.perf_counter() - t0
    gone = [b.key for b in result.plan.blocks]
    print(f"[{name}] pruned in {prune_s:.1f}s; removed {', '.join(gone)}", flush=True)
    pruned = result.model
    s_dense = runtime.session(to_proto(dense), threads=args.threads)
    s_pruned = runtime.session(to_proto(pruned), threads=args.threads)
    feeds = _feeds(dense, shapes)
    lat_d, lat_p = [], []
    for _ in range(args.rounds):
        lat_d.append(runtime.latency_ms(s_dense, feeds, warmup=2, runs=args.runs))
        lat_p.append(runtime.latency_ms(s_pruned, feeds, warmup=2, runs=args.runs))
    p = (count_params(dense), count_params(pruned))
    m = (count_macs(dense, shapes), count_macs(pruned, shapes))
    lat = (float(np.median(lat_d)), float(np.median(lat_p)))
    per_round = [b / a for a, b in zip(lat_d, lat_p)]  # interleaved pairs: robust to a drifting load
    ratio = float(np.median(per_round))
    verdict = "yes" if ratio <= p[1] / p[0] else "no"
    print(f"[{name}] latency ratio per round: {', '.join(f'{r:.3f}' for r in per_round)} (median {ratio:.3f}); "
          f"latency fell at least as much as parameters ({p[1] / p[0]:.3f}): {verdict}", flush=True)
    return [
        [name, "params", f"{p[0]:,}", f"{p[1]:,}", f"{p[1] / p[0]:.3f}"],
        [name, "MACs", f"{m[0]:,}", f"{m[1]:,}", f"{m[1] / m[0]:.3f}"],
        [name, "latency ms (median)", f"{lat[0]:.1f}", f"{lat[1]:.1f}", f"{lat[1] / lat[0]:.3f}"],
        [name, "latency ratio (median of rounds)", "", "", f"{ratio:.3f}"],
        [name, "removed", f"{len(gone)} of {len(units)} units", ", ".join(gone)[:60], ""],
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama,bert,resnet50")
    ap.add_argument("--depth", type=float, default=0.25)
    ap.add_argument("--score", default="bi", choices=sd.SCORES)
    ap.add_argument("--ratio", type=float, default=0.0, help="width pruning on top (heads and FFN channels)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    ap.add_argument("--runs", type=int, default=5, help="runs per round (median taken)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            rows += bench(name.strip(), workdir, args)
    print(f"\nbatch 1 (sequence {SEQ} for the transformers); depth {args.depth} ({args.score}), width ratio "
          f"{args.ratio}; providers {runtime.providers()}")
    print(table(["model", "metric", "dense", "pruned", "pruned/dense"], rows, "llrrr"))


if __name__ == "__main__":
    main()

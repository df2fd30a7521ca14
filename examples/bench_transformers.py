"""Heads and FFN channels of two transformers pruned 50%: params, MACs and onnxruntime latency
before/after (timed in the same run, interleaved), and how long `spa inspect` takes on each.

  * BERT-base shape: hidden 768, 12 layers, 12 heads, FFN 3072, vocab 30522;
  * LLaMA shape: hidden 1024, 8 layers, 16 query heads in 4 KV groups (GQA), SwiGLU FFN 2816,
    vocab 32000.

Both are built with `transformers` from config objects (random init, nothing downloaded),
exported with the torch exporter (dynamo, SDPA attention, dynamic batch and sequence) and timed
at batch 1, sequence 128. The residual stream (hidden size) is left whole (``kinds``).

    python examples/bench_transformers.py [--models bert,llama] [--gqa kv|q|both] [--rounds 3] [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

import spa
from spa import runtime
from spa.io import to_proto
from spa.metrics import count_macs, count_params
from spa.report import table

SEQ = 128


def build(name: str):
    import torch
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "bert":
        cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                         vocab_size=30522, num_labels=2)
        return BertForSequenceClassification(cfg).eval(), cfg
    cfg = LlamaConfig(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                      intermediate_size=2816, vocab_size=32000, use_cache=False)
    return LlamaForCausalLM(cfg).eval(), cfg


def export(name: str, path: str) -> None:
    import torch

    model, cfg = build(name)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x).logits

    x = torch.randint(0, cfg.vocab_size, (2, 16))
    shapes = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=512)},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(Logits().eval(), (x,), dynamo=True, optimize=False, dynamic_shapes=shapes,
                                 input_names=["input_ids"], verbose=False)
    prog.save(path)


def bench(name: str, workdir: str, args) -> list[list]:
    path = os.path.join(workdir, f"{name}.onnx")
    t0 = time.perf_counter()
    export(name, path)
    print(f"[{name}] exported in {time.perf_counter() - t0:.1f}s ({os.path.getsize(path) / 2**20:.0f} MiB)",
          flush=True)

    t0 = time.perf_counter()
    cli = subprocess.run([sys.executable, "-m", "spa.cli", "inspect", path], capture_output=True, text=True,
                         check=True)
    inspect_cli = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense = spa.load(path)
    dg = spa.dependency_graph(dense)
    _ = dg.groups
    inspect_api = time.perf_counter() - t0
    attention = [line.strip() for line in cli.stdout.splitlines() if "attention:" in line]
    print(f"[{name}] {attention[0]} (x{len(attention)} layers)")

    t0 = time.perf_counter()
    result = spa.prune(dense, args.ratio, kinds=["heads", "channels"], gqa=args.gqa,
                       input_shapes={"batch": 1, "seq": SEQ})
    prune_s = time.perf_counter() - t0
    pruned = result.model
    after = [g for g in spa.dependency_graph(pruned).groups if g.heads is not None]
    print(f"[{name}] pruned in {prune_s:.1f}s; after: "
          f"{after[0].heads.describe() if after else 'one KV group per layer'}", flush=True)

    shapes = {"batch": 1, "seq": SEQ}
    s_dense = runtime.session(to_proto(dense), threads=args.threads)
    s_pruned = runtime.session(to_proto(pruned), threads=args.threads)
    vocab = int(dense.graph.initializers[next(k for k in dense.graph.initializers if "embed" in k)].shape[0])
    feeds = {"input_ids": np.random.default_rng(0).integers(0, vocab, size=(1, SEQ)).astype(np.int64)}
    lat_d, lat_p = [], []
    for _ in range(args.rounds):
        lat_d.append(runtime.latency_ms(s_dense, feeds, warmup=2, runs=args.runs))
        lat_p.append(runtime.latency_ms(s_pruned, feeds, warmup=2, runs=args.runs))
    p = (count_params(dense), count_params(pruned))
    m = (count_macs(dense, shapes), count_macs(pruned, shapes))
    lat = (float(np.median(lat_d)), float(np.median(lat_p)))
    return [
        [name, "params", f"{p[0]:,}", f"{p[1]:,}", f"{p[1] / p[0]:.3f}"],
        [name, "MACs", f"{m[0]:,}", f"{m[1]:,}", f"{m[1] / m[0]:.3f}"],
        [name, "latency ms", f"{lat[0]:.1f}", f"{lat[1]:.1f}", f"{lat[1] / lat[0]:.3f}"],
        [name, "spa inspect s (CLI, API)", f"{inspect_cli:.1f}, {inspect_api:.1f}", "", ""],
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bert,llama")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--gqa", default="kv", choices=("kv", "q", "both"), help="how GQA heads are pruned")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--runs", type=int, default=10, help="runs per round (median taken)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            rows += bench(name.strip(), workdir, args)
    print(f"\nbatch 1, sequence {SEQ}; heads (gqa={args.gqa}) and FFN channels {args.ratio:.0%} removed; "
          f"providers {runtime.providers()}")
    print(table(["model", "metric", "dense", "pruned", "pruned/dense"], rows, "llrrr"))


if __name__ == "__main__":
    main()

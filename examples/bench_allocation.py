"""Allocation quality without fine-tuning: uniform vs global OBS cost (relative error, and the raw
loss for comparison) vs sensitivity, all with OBSPA reconstruction, data-free and calibrated,
at 30% and 50%, on the models of bench_quality.py:

  * the small CNN trained on scikit-learn's digits (test accuracy);
  * the small transformer trained on digits (test accuracy);
  * the random-init LLaMA with GQA (cosine similarity of the logits to the dense model's).

Each model is exported to ONNX once and pruned as ONNX (``spa.prune`` with its built-in checks);
the pruned models run in onnxruntime. ``obs`` sets its target in parameters and ``uniform`` /
``sensitivity`` in channels, so the table also gives the share of parameters left.

    python examples/bench_allocation.py [--ratios 0.3,0.5] [--epochs 15] [--out docs/allocation.md]
                                        [--allocations uniform,obs,'obs raw loss',sensitivity]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from bench_quality import TinyTransformer
from digits_common import SmallCNN, data, train

import spa
from spa.allocation import obs as obs_alloc
from spa.frontends.torch import export
from spa.metrics import count_params
from spa.runtime import session
from spa.io import to_proto

ALLOCS = [("uniform", "uniform", None), ("obs", "obs", "relative"), ("obs raw loss", "obs", "none"),
          ("sensitivity", "sensitivity", None)]


def _run(model, x, batch=256):
    sess = session(to_proto(model))
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def _prune(proto, ratio, alloc, normalise, calibration, **kw):
    obs_alloc.NORMALISE = normalise or "relative"
    try:
        t0 = time.perf_counter()
        r = spa.prune(proto, ratio=ratio, criterion="obspa", allocation=alloc, calibration=calibration, **kw)
        return r, time.perf_counter() - t0
    finally:
        obs_alloc.NORMALISE = "relative"


def bench(name, proto, score, calibs, ratios, **kw):
    rows = []
    dense = count_params(spa.load(proto))
    for cal_label, cal in calibs:
        for label, alloc, normalise in ALLOCS:
            vals = []
            for r in ratios:
                res, secs = _prune(proto, r, alloc, normalise, cal, **kw)
                vals.append((score(res.model), count_params(res.model) / dense, secs))
            rows.append((name, cal_label, label, vals))
            print(f"[{name}] {cal_label:9s} {label:13s} " +
                  "  ".join(f"{v:.3f} ({p:.0%} params, {s:.1f}s)" for v, p, s in vals), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", default=None, help="also write the table as Markdown here")
    ap.add_argument("--allocations", default=",".join(a[0] for a in ALLOCS),
                    help="comma-separated labels to run (default: all)")
    ap.add_argument("--models", default="cnn,transformer,llama", help="comma-separated models to run")
    args = ap.parse_args()
    models = set(args.models.split(","))
    chosen = set(args.allocations.split(","))
    ALLOCS[:] = [a for a in ALLOCS if a[0] in chosen]
    ratios = [float(r) for r in args.ratios.split(",")]
    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = data()
    calib = [x_tr[i:i + 64].numpy() for i in range(0, 512, 64)]
    xt, yt = x_te.numpy(), y_te.numpy()

    def acc(model):
        return float((_run(model, xt).argmax(-1) == yt).mean())

    rows = []
    if "cnn" in models:
        torch.manual_seed(0)
        cnn = train(SmallCNN(), x_tr, y_tr, args.epochs)
        proto = export(cnn, x_tr[:2])
        print(f"[cnn] dense accuracy {acc(spa.load(proto)):.3f}")
        rows += bench("cnn", proto, acc, [("data-free", "gaussian"), ("calibrated", calib)], ratios)
    if "transformer" in models:
        torch.manual_seed(0)
        tfm = train(TinyTransformer(), x_tr, y_tr, 2 * args.epochs, lr=1e-3)
        proto = export(tfm, x_tr[:2])
        print(f"[transformer] dense accuracy {acc(spa.load(proto)):.3f}")
        rows += bench("transformer", proto, acc, [("data-free", "gaussian"), ("calibrated", calib)], ratios)
    if "llama" in models:
        rows += llama_rows(ratios)
    _table(rows, ratios, t0, args.out)


def llama_rows(ratios):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64, use_cache=False)
    llama = LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(0)
    seq = 16
    proto = export(llama, torch.randint(0, 256, (2, seq)))
    test = rng.integers(0, 256, (32, seq)).astype(np.int64)
    want = _run(spa.load(proto), test)
    tok_calib = [rng.integers(0, 256, (8, seq)).astype(np.int64) for _ in range(8)]

    def cosine(model):
        got = _run(model, test).reshape(len(test), -1)
        w = want.reshape(len(test), -1)
        return float(np.mean((got * w).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(w, axis=1))))

    rows = []
    for gqa in ("kv", "q"):
        rows += bench(f"llama gqa={gqa}", proto, cosine, [("data-free", "gaussian"), ("calibrated", tok_calib)],
                      ratios, kinds=["heads", "channels"], gqa=gqa)
    return rows


def _table(rows, ratios, t0, out):
    lines = [f"OBSPA, no fine-tuning; {time.perf_counter() - t0:.0f} s in all. Cells: score (params left).", "",
             "| model | inputs | allocation | " + " | ".join(f"{r:.0%}" for r in ratios) + " |",
             "|---|---|---|" + "---|" * len(ratios)]
    lines += [f"| {m} | {c} | {a} | " + " | ".join(f"{v:.3f} ({p:.0%})" for v, p, _ in vals) + " |"
              for m, c, a, vals in rows]
    text = "\n".join(lines)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()

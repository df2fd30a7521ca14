"""Depth against width on a trained causal LM: next-token accuracy and logit fidelity against the
onnxruntime latency, at matched parameter counts, no fine-tuning.

The model: a LLaMA-like causal LM (``text_common``, GQA, hidden 128) with ``--layers`` decoder
layers (default 8), trained here on the standard library's docstrings (cached under
``$SPA_BENCH_CACHE``), exported to ONNX (token ids -> logits; padding is on the right and the
attention causal, so the real tokens' logits need no attention mask). Every variant prunes that
ONNX model and is evaluated with onnxruntime:

  * depth: a quarter and a half of the layers removed (``depth_unit="layer"``, scores ``bi`` and
    ``greedy``, data-free ``zipf`` ids or calibration sentences), and the same shares of the
    sublayers (attention or FFN alone, ``depth_unit="sublayer"``);
  * width: heads and FFN channels (``kinds=["heads", "channels"]``), the ratio found by
    bisection so that the non-embedding parameter count matches the depth-pruned layer model's
    (criteria OBSPA data-free and L1);
  * both: half the parameter reduction by depth (layers, ``bi``), the other half by width.

Per variant: non-embedding and total parameters, the latency ratio to the dense model (batch 1,
sequence 32, CPU; both timed in the same run, interleaved rounds, median of the per-round
ratios), next-token accuracy and perplexity on held-out sentences, and the cosine similarity of
the logits to the dense model's. Writes ``--out``.md (table) and ``--out``.png (metric against
latency ratio; skipped with a message when matplotlib is missing).

    python examples/bench_depth_quality.py [--out docs/depth] [--layers 8] [--steps 800] [--shares 0.25,0.5]
        [--rounds 7] [--runs 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import text_common as tc  # noqa: E402

import spa  # noqa: E402
from spa import runtime  # noqa: E402
from spa.io import to_proto  # noqa: E402
from spa.metrics import count_params  # noqa: E402

SHAPES = {"batch": 16}
#: depth variants: (label, unit, score, calibration key)
DEPTH = [("depth bi, zipf", "layer", "bi", "zipf"), ("depth bi, calib", "layer", "bi", "calib"),
         ("depth greedy, zipf", "layer", "greedy", "zipf"), ("depth greedy, calib", "layer", "greedy", "calib"),
         ("depth sublayer bi, calib", "sublayer", "bi", "calib"),
         ("depth sublayer greedy, calib", "sublayer", "greedy", "calib")]
#: width criteria: (label, criterion, calibration key)
WIDTH = [("width OBSPA, zipf", "obspa", "zipf"), ("width L1", "l1", None)]


def export(model, path: str, seq: int) -> None:
    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = model

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids).logits

    x = torch.randint(5, 100, (2, seq))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(Logits().eval(), (x,), dynamo=True, optimize=False,
                                 dynamic_shapes=({0: torch.export.Dim("batch")},), input_names=["input_ids"],
                                 output_names=["logits"], verbose=False)
    prog.save(path)


def non_embedding(model) -> int:
    """Parameters outside the token embedding and the output projection (axes of the vocabulary)."""
    vocab = next(int(v.shape[0]) for k, v in model.graph.initializers.items() if "embed" in k)
    emb = sum(int(np.prod(v.shape)) for v in model.graph.initializers.values()
              if v.shape is not None and vocab in tuple(v.shape))
    return count_params(model) - emb


class Evaluator:
    def __init__(self, corpus, dense, threads):
        self.corpus, self.threads = corpus, threads
        self.ids = corpus.test
        self.keep = self.ids != tc.PAD
        self.dense_logits = self.logits(dense)
        self.feeds = {"input_ids": self.ids[:1]}
        self.dense_sess = runtime.session(to_proto(dense), threads=threads)

    def logits(self, model) -> np.ndarray:
        sess = runtime.session(to_proto(model), threads=self.threads)
        return np.concatenate([sess.run(None, {"input_ids": self.ids[i:i + 128]})[0]
                               for i in range(0, len(self.ids), 128)])

    def quality(self, model) -> tuple[float, float, float]:
        """(next-token accuracy, perplexity, logit cosine to the dense model) on held-out sentences."""
        got = self.logits(model)
        lg = torch.as_tensor(got[:, :-1])
        target = torch.as_tensor(self.ids[:, 1:])
        keep = target != tc.PAD
        nll = torch.nn.functional.cross_entropy(lg[keep], target[keep])
        acc = float((lg.argmax(-1)[keep] == target[keep]).float().mean())
        a, b = torch.as_tensor(got[self.keep]), torch.as_tensor(self.dense_logits[self.keep])
        cos = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
        return acc, float(torch.exp(nll)), cos

    def latency(self, model, rounds, runs) -> float:
        """Median over interleaved rounds of pruned/dense latency (batch 1)."""
        sess = runtime.session(to_proto(model), threads=self.threads)
        ratios = []
        for _ in range(rounds):
            d = runtime.latency_ms(self.dense_sess, self.feeds, warmup=3, runs=runs)
            p = runtime.latency_ms(sess, self.feeds, warmup=3, runs=runs)
            ratios.append(p / d)
        return float(np.median(ratios))


def prune(dense, calib, *, ratio=0.0, depth=0.0, unit="layer", score="bi", criterion="l1", cal=None,
          verify=True):
    kw = {"calibration": calib if cal == "calib" else cal} if cal else {}
    return spa.prune(dense, ratio=ratio, depth=depth, depth_unit=unit, depth_score=score, criterion=criterion,
                     kinds=["heads", "channels"], input_shapes=SHAPES, calibration_batches=4, verify=verify,
                     **kw).model


def match_ratio(dense, calib, target: int, depth: float, iters: int = 7) -> float:
    """Width ratio whose non-embedding count (after ``depth``) is closest to ``target`` (bisection;
    counts do not depend on the criterion, so L1 without verification is used)."""
    lo, hi, best = 0.0, 0.95, (None, 0.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        n = non_embedding(prune(dense, calib, ratio=mid, depth=depth, verify=False))
        if best[0] is None or abs(n - target) < abs(best[0] - target):
            best = (n, mid)
        if n > target:
            lo = mid
        else:
            hi = mid
    return best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/depth", help="output prefix for the .png and .md")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=800, help="training steps")
    ap.add_argument("--shares", default="0.25,0.5", help="shares of the layers removed")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    ap.add_argument("--runs", type=int, default=30, help="runs per round (median taken)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    shares = [float(s) for s in args.shares.split(",")]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    corpus = tc.Corpus()
    lm = tc.trained("clm", corpus, steps=args.steps, layers=args.layers)
    print(f"trained / loaded in {time.perf_counter() - t0:.0f}s", flush=True)
    calib = [{"input_ids": b["input_ids"]} for b in corpus.calibration(n_batches=4)]
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "clm.onnx")
        export(lm, path, corpus.seq)
        dense = spa.load(path)
    ev = Evaluator(corpus, dense, args.threads)
    d_acc, d_ppl, _ = ev.quality(dense)
    d_ne, d_all = non_embedding(dense), count_params(dense)
    print(f"dense: {args.layers} layers, next-token acc {d_acc:.3f}, ppl {d_ppl:.1f}, "
          f"{d_ne:,} non-embedding / {d_all:,} params", flush=True)
    rows = []  # (share, method family, label, model, note)

    def record(share, family, label, model, note=""):
        acc, ppl, cos = ev.quality(model)
        lat = ev.latency(model, args.rounds, args.runs)
        row = (share, family, label, non_embedding(model), count_params(model), lat, acc, ppl, cos, note)
        rows.append(row)
        print(f"[{share:.0%}] {label:32s} ne {row[3] / d_ne:.3f} lat {lat:.3f} acc {acc:.3f} ppl {ppl:.1f} "
              f"cos {cos:.3f} {note}", flush=True)

    for share in shares:
        n = max(1, round(share * args.layers))  # layers removed; as a count, so that half of it is exact
        for label, unit, score, cal in DEPTH:
            try:
                record(share, "depth" if unit == "layer" else "sublayer", label,
                       prune(dense, calib, depth=n if unit == "layer" else share, unit=unit, score=score, cal=cal))
            except spa.SpaError as exc:
                print(f"[{share:.0%}] {label}: refused: {exc}", flush=True)
        target = non_embedding(prune(dense, calib, depth=n, verify=False))
        r = match_ratio(dense, calib, target, 0.0)
        for label, crit, cal in WIDTH:
            record(share, "width", label, prune(dense, calib, ratio=r, criterion=crit, cal=cal), f"ratio {r:.3f}")
        half = max(1, n // 2)
        r2 = match_ratio(dense, calib, target, half)
        note = f"{half} layer(s), ratio {r2:.3f}"
        record(share, "both", "depth bi, zipf + width OBSPA, zipf",
               prune(dense, calib, depth=half, ratio=r2, criterion="obspa", cal="zipf"), note)
        record(share, "both", "depth bi, calib + width OBSPA, calib",
               prune(dense, calib, depth=half, ratio=r2, criterion="obspa", cal="calib"), note)

    lines = ["# Depth against width on a trained causal LM", "",
             f"A LLaMA-like causal LM ({args.layers} layers, hidden 128, 4 query heads in 2 KV groups, FFN 256, "
             f"vocabulary {len(corpus.tokenizer)}) trained on the standard library's docstrings "
             "(`examples/text_common.py`), exported to ONNX and pruned without fine-tuning. "
             f"Dense: next-token accuracy **{d_acc:.3f}**, perplexity **{d_ppl:.1f}** on {len(corpus.test)} "
             f"held-out sentences; {d_ne:,} non-embedding parameters ({d_all:,} in all).", "",
             "Parameters are non-embedding (the token embedding and the output projection are never pruned "
             "here; width prunes heads and FFN channels, not the hidden size). Width ratios were found by "
             "bisection so that the non-embedding count matches the layer-pruned model's; *both* removes "
             "half the share of layers (bi) and prunes the width to the same count. Latency: onnxruntime "
             f"CPU, batch 1, sequence {corpus.seq}, {args.threads} thread(s), pruned/dense, median of "
             f"{args.rounds} interleaved rounds of {args.runs} runs, dense timed in the same run.", "",
             "| removed | method | non-emb. params | all params | latency ratio | next-token acc | perplexity "
             "| logit cosine | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for share, _, label, ne, al, lat, acc, ppl, cos, note in rows:
        lines.append(f"| {share:.0%} | {label} | {ne / d_ne:.3f} | {al / d_all:.3f} | {lat:.3f} | {acc:.3f} "
                     f"| {ppl:.1f} | {cos:.3f} | {note} |")
    lines += ["", f"{time.perf_counter() - t0:.0f} s in all. Reproduce (the trained model is cached):", "",
              "    PYTHONPATH=. python examples/bench_depth_quality.py " + " ".join(sys.argv[1:]), ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    plot(args.out, rows, d_acc)


def plot(out, rows, dense_acc) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"depth": "o", "sublayer": "^", "width": "s", "both": "D"}
    labels = list(dict.fromkeys(r[2] for r in rows))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {k: cycle[i % len(cycle)] for i, k in enumerate(labels)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, col, name in ((axes[0], 6, "next-token accuracy"), (axes[1], 8, "logit cosine to dense")):
        for label in labels:
            pts = sorted((r[5], r[col], r[1]) for r in rows if r[2] == label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[pts[0][2]], color=colors[label],
                    label=label, linewidth=0.8)
        ax.plot([1.0], [dense_acc if col == 6 else 1.0], marker="*", markersize=12, color="black", label="dense")
        ax.set_xlabel("latency ratio to dense (onnxruntime CPU, batch 1, seq 32)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle("Depth vs width at matched non-embedding parameters (25% and 50% removed), no fine-tuning",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=110)
    print(f"wrote {out}.png and {out}.md")


if __name__ == "__main__":
    main()

"""Pruning quality without fine-tuning: accuracy (or output fidelity) against the ratio of
channels removed (10-70%), per criterion, on

  * a small CNN trained here on scikit-learn's digits (accuracy);
  * a small transformer trained here on digits, rows as tokens (accuracy; heads + FFN + hidden);
  * a random-init LLaMA-style model from a `transformers` config (fidelity: cosine similarity of
    the pruned model's logits to the dense model's, on held-out random tokens).

Criteria: L1 magnitude, Taylor (gradients on training batches; for the LLaMA the dense model's
own predictions are the labels), Wanda-style, FLAP (with bias compensation), OBSPA data-free
(Gaussian inputs / random tokens; for the CNN also inputs optimized to match its BatchNorm
statistics) and OBSPA with calibration data (training images; for the LLaMA, other random
tokens).
Writes a PNG plot and a Markdown table.

    python examples/bench_quality.py [--out docs/quality] [--ratios 0.1,0.2,...] [--epochs 15]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from digits_common import SmallCNN, accuracy, batches, data, train
from torch import nn

import spa

CRITERIA = [("L1", "l1", None), ("Taylor", "taylor", None), ("Wanda", "wanda", "calib"),
            ("FLAP", "flap", "calib"), ("OBSPA data-free", "obspa", "gaussian"),
            ("OBSPA data-free, BN-matched", "obspa", "bn"), ("OBSPA calibrated", "obspa", "calib")]


class TinyTransformer(nn.Module):
    """Rows of a digit image as 8 tokens; 2 pre-norm blocks, 4 heads, GELU FFN."""

    def __init__(self, d=48, heads=4, ffn=96, layers=2):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.randn(1, 8, d) * 0.02)
        self.blocks = nn.ModuleList(_Block(d, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.embed(x.reshape(x.shape[0], 8, 8)) + self.pos
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h).mean(dim=1))


class _Block(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, h):
        b, s, _ = h.shape
        x = self.n1(h)
        q, k, v = (p(x).view(b, s, -1, self.dh).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / self.dh ** 0.5, dim=-1) @ v
        h = h + self.o(a.transpose(1, 2).reshape(b, s, -1))
        return h + self.down(nn.functional.gelu(self.up(self.n2(h))))


def _prune(model, example, ratio, criterion, calibration, grad_data):
    kw = {}
    if criterion == "taylor":
        kw["data"] = grad_data
    if calibration is not None:
        kw["calibration"] = calibration
    return spa.prune(model, example, ratio=ratio, criterion=criterion, **kw).module


def classification(name, model, x_tr, y_tr, x_te, y_te, ratios):
    example = x_tr[:2]
    calib = [x_tr[i:i + 64].numpy() for i in range(0, 512, 64)]
    grad_data = batches(x_tr, y_tr)[:8]
    dense = accuracy(model, x_te, y_te)
    rows = {}
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for label, crit, cal in CRITERIA:
        if cal == "bn" and not has_bn:
            continue
        accs = []
        for r in ratios:
            small = _prune(model, example, r, crit, calib if cal == "calib" else cal, grad_data)
            accs.append(accuracy(small, x_te, y_te))
        rows[label] = accs
        print(f"[{name}] {label:18s} " + " ".join(f"{a:.3f}" for a in accs), flush=True)
    return dense, rows


def llama_fidelity(ratios, seq=16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64, use_cache=False)
    model = LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(0)
    example = torch.randint(0, 256, (2, seq))
    test = torch.as_tensor(rng.integers(0, 256, (32, seq)))
    calib = [rng.integers(0, 256, (8, seq)).astype(np.int64) for _ in range(8)]
    with torch.no_grad():
        want = model(test).logits

    def logits_loss(m, batch):
        ids = batch[0]
        with torch.no_grad():
            target = model(ids).logits.argmax(-1)
        return nn.functional.cross_entropy(m(ids).logits.flatten(0, 1), target.flatten())

    grad_data = [(torch.as_tensor(c),) for c in calib[:4]]
    rows = {}
    for label, crit, cal in CRITERIA:
        if cal == "bn":
            continue
        fid = []
        for r in ratios:
            kw = {"kinds": ["heads", "channels"]}
            if crit == "taylor":
                kw.update(data=grad_data, loss_fn=logits_loss)
            if cal is not None:
                kw["calibration"] = calib if cal == "calib" else cal
            small = spa.prune(model, example, ratio=r, criterion=crit, **kw).module
            with torch.no_grad():
                got = small(test).logits
            fid.append(float(nn.functional.cosine_similarity(got.flatten(1), want.flatten(1)).mean()))
        rows[label] = fid
        print(f"[llama] {label:18s} " + " ".join(f"{a:.3f}" for a in fid), flush=True)
    return 1.0, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/quality", help="output prefix for the .png and .md")
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    x_tr, y_tr, x_te, y_te = data()
    t0 = time.perf_counter()
    panels = []
    torch.manual_seed(0)
    cnn = train(SmallCNN(), x_tr, y_tr, args.epochs)
    panels.append(("CNN on digits: test accuracy", *classification("cnn", cnn, x_tr, y_tr, x_te, y_te, ratios)))
    torch.manual_seed(0)
    tfm = train(TinyTransformer(), x_tr, y_tr, 2 * args.epochs, lr=1e-3)
    panels.append(("Transformer on digits: test accuracy",
                   *classification("transformer", tfm, x_tr, y_tr, x_te, y_te, ratios)))
    panels.append(("Random-init LLaMA (GQA): logit cosine similarity", *llama_fidelity(ratios)))

    lines = [f"Pruning without fine-tuning; ratios {', '.join(f'{r:.0%}' for r in ratios)}; "
             f"{time.perf_counter() - t0:.0f} s in all.", ""]
    for title, dense, rows in panels:
        lines += [f"### {title} (dense: {dense:.3f})", "",
                  "| criterion | " + " | ".join(f"{r:.0%}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        lines += [f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + " |" for label, vals in rows.items()]
        lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text("\n".join(lines))
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    colors = dict(zip((c[0] for c in CRITERIA), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (title, dense, rows) in zip(axes, panels):
        for label, vals in rows.items():
            ax.plot([100 * r for r in ratios], vals, marker="o", label=label, color=colors[label])
        ax.axhline(dense, color="gray", linestyle="--", linewidth=1, label="dense")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("channels removed (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=110)
    print(f"wrote {args.out}.png and {args.out}.md")


if __name__ == "__main__":
    main()

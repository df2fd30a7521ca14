"""Pruning quality without fine-tuning: accuracy (or output fidelity) against the ratio of
channels removed (10-70%), per criterion, on

  * a small CNN trained here on scikit-learn's digits (accuracy);
  * a small transformer trained here on digits, rows as tokens (accuracy; heads + FFN + hidden);
  * a random-init LLaMA-style model from a `transformers` config (fidelity: cosine similarity of
    the pruned model's logits to the dense model's, on held-out random tokens);
  * text (``text_common``): a BERT-like masked LM and a LLaMA-like causal LM trained here on the
    standard library's docstrings (masked-token / next-token accuracy on held-out sentences, and
    the logit cosine to the dense model), with every data-free source (gaussian, zipf,
    lm-sample) against calibration on held-out training sentences.

Criteria: L1 magnitude, Taylor (gradients on training batches; for the LLaMA the dense model's
own predictions are the labels), Wanda-style, FLAP (with bias compensation), OBSPA data-free
(Gaussian inputs / random tokens; for the CNN also inputs optimized to match its BatchNorm
statistics) and OBSPA with calibration data (training images; for the LLaMA, other random
tokens).
Writes a PNG plot and a Markdown table.

    python examples/bench_quality.py [--out docs/quality] [--ratios 0.1,0.2,...] [--epochs 15]
        [--only cnn,transformer,llama,text] [--text-ratios 0.2,0.3,0.5] [--criteria L1,OBSPA]
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


TEXT_CRITERIA = [("L1", "l1", None), ("Taylor", "taylor", None), ("Wanda", "wanda", "calib"),
                 ("FLAP", "flap", "calib"), ("OBSPA data-free, gaussian", "obspa", "gaussian"),
                 ("OBSPA data-free, zipf", "obspa", "zipf"), ("OBSPA data-free, lm-sample", "obspa", "lm-sample"),
                 ("OBSPA calibrated", "obspa", "calib")]


def text_quality(kind, ratios, wanted=None):
    """One trained text model (``mlm`` or ``clm``) pruned by every criterion: rows of
    (task metric, logit cosine to the dense model) per ratio."""
    import text_common as tc

    corpus = tc.Corpus()
    model = tc.trained(kind, corpus)
    ids = corpus.test if kind == "clm" else tc.masked_test(corpus)[0]
    mask = tc.Corpus.mask_of(corpus.test)
    dense_logits = tc._logits(model, ids, mask)

    def metric(m):
        return tc.mlm_accuracy(m, corpus) if kind == "mlm" else tc.next_token(m, corpus)[0]

    calib = corpus.calibration()
    rng = torch.Generator().manual_seed(0)

    def loss_fn(m, batch):
        x, mask_ = batch
        if kind == "mlm":
            x, labels = tc._mlm_batch(x, rng)
        else:
            labels = torch.where(mask_.bool(), x, torch.full_like(x, -100))
        return m(input_ids=x, attention_mask=mask_, labels=labels).loss

    grad_data = [(torch.as_tensor(b["input_ids"]), torch.as_tensor(b["attention_mask"])) for b in calib[:4]]
    example = {"input_ids": torch.as_tensor(calib[0]["input_ids"][:2]),
               "attention_mask": torch.as_tensor(calib[0]["attention_mask"][:2])}
    rows = {}
    for label, crit, cal in TEXT_CRITERIA:
        if wanted and not any(w.lower() in label.lower() for w in wanted):
            continue
        vals = []
        for r in ratios:
            kw = {"kinds": ["heads", "channels"]}
            if crit == "taylor":
                kw.update(data=grad_data, loss_fn=loss_fn)
            if cal is not None:
                kw["calibration"] = calib if cal == "calib" else cal
            small = spa.prune(model, example, ratio=r, criterion=crit, **kw).module
            vals.append((metric(small), tc.logit_cosine(small, dense_logits, ids, mask)))
        rows[label] = vals
        print(f"[{kind}] {label:28s} " + " ".join(f"{a:.3f}/{c:.3f}" for a, c in vals), flush=True)
    return metric(model), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/quality", help="output prefix for the .png and .md")
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--only", default="cnn,transformer,llama,text", help="sections to run, comma-separated (text = mlm,clm)")
    ap.add_argument("--text-ratios", default="0.2,0.3,0.5", help="ratios of the text models")
    ap.add_argument("--criteria", default=None, help="text section: only criteria whose label contains one of these")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    only = set(args.only.split(","))
    wanted = args.criteria.split(",") if args.criteria else None
    x_tr, y_tr, x_te, y_te = data()
    t0 = time.perf_counter()
    panels = []
    if "cnn" in only:
        torch.manual_seed(0)
        cnn = train(SmallCNN(), x_tr, y_tr, args.epochs)
        panels.append(("CNN on digits: test accuracy", ratios,
                       *classification("cnn", cnn, x_tr, y_tr, x_te, y_te, ratios)))
    if "transformer" in only:
        torch.manual_seed(0)
        tfm = train(TinyTransformer(), x_tr, y_tr, 2 * args.epochs, lr=1e-3)
        panels.append(("Transformer on digits: test accuracy", ratios,
                       *classification("transformer", tfm, x_tr, y_tr, x_te, y_te, ratios)))
    if "llama" in only:
        panels.append(("Random-init LLaMA (GQA): logit cosine similarity", ratios, *llama_fidelity(ratios)))
    text_panels = []
    if only & {"text", "mlm", "clm"}:
        text_ratios = [float(r) for r in args.text_ratios.split(",")]
        for kind, title in (("mlm", "BERT-like masked LM on stdlib docstrings: masked-token accuracy"),
                            ("clm", "LLaMA-like causal LM on stdlib docstrings: next-token accuracy")):
            if not only & {"text", kind}:
                continue
            dense, rows = text_quality(kind, text_ratios, wanted)
            text_panels.append((title, text_ratios, dense, rows))
            panels.append((title, text_ratios, dense, {k: [a for a, _ in v] for k, v in rows.items()}))

    lines = [f"Pruning without fine-tuning; sections {', '.join(sorted(only))}; "
             f"{time.perf_counter() - t0:.0f} s in all.", ""]
    for title, rs, dense, rows in panels:
        lines += [f"### {title} (dense: {dense:.3f})", "",
                  "| criterion | " + " | ".join(f"{r:.0%}" for r in rs) + " |",
                  "|---|" + "---|" * len(rs)]
        lines += [f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + " |" for label, vals in rows.items()]
        lines.append("")
    for title, rs, dense, rows in text_panels:
        lines += [f"### {title.split(':')[0]}: logit cosine to the dense model", "",
                  "| criterion | " + " | ".join(f"{r:.0%}" for r in rs) + " |",
                  "|---|" + "---|" * len(rs)]
        lines += [f"| {label} | " + " | ".join(f"{c:.3f}" for _, c in vals) + " |" for label, vals in rows.items()]
        lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text("\n".join(lines))
    print("\n".join(lines))

    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    labels = list(dict.fromkeys([c[0] for c in CRITERIA] + [c[0] for c in TEXT_CRITERIA]))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {k: cycle[i % len(cycle)] for i, k in enumerate(labels)}
    for ax, (title, rs, dense, rows) in zip(np.atleast_1d(axes), panels):
        for label, vals in rows.items():
            ax.plot([100 * r for r in rs], vals, marker="o", label=label, color=colors[label])
        ax.axhline(dense, color="gray", linestyle="--", linewidth=1, label="dense")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("channels removed (%)")
        ax.grid(alpha=0.3)
    for ax in np.atleast_1d(axes):
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=110)
    print(f"wrote {args.out}.png and {args.out}.md")


if __name__ == "__main__":
    main()

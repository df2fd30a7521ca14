"""Pruning quality without fine-tuning: accuracy (or output fidelity) against the ratio of
channels removed (10-70%), per criterion, on

  * a small CNN trained here on scikit-learn's digits (accuracy), with and without BatchNorm
    (``cnn``, ``cnn-nobn``);
  * a small transformer trained here on digits, rows as tokens (accuracy; heads + FFN + hidden);
  * a random-init LLaMA-style model from a `transformers` config (fidelity: cosine similarity of
    the pruned model's logits to the dense model's, on held-out random tokens);
  * text (``text_common``): a BERT-like masked LM and a LLaMA-like causal LM trained here on the
    standard library's docstrings (masked-token / next-token accuracy on held-out sentences, and
    the logit cosine to the dense model), with every data-free source (gaussian, zipf,
    lm-sample) against calibration on held-out training sentences; ``lm`` is the wide causal LM
    (``text_common.WIDE_LM``).

Torch-Pruning's importances (``tp_peer.py``) run beside SPA's criteria on the CNNs (and, with
``--criteria TP``, on the wide LM), their pruning ratio bisected to SPA's parameter count.

Criteria: L1 magnitude, Taylor (gradients on training batches; for the LLaMA the dense model's
own predictions are the labels), Wanda-style, FLAP (with bias compensation), OBSPA data-free
(Gaussian inputs / random tokens; for the CNN also inputs optimized to match its BatchNorm
statistics, and ``filters``: inputs matched to its first layers' filters) and OBSPA with calibration data (training images; for the LLaMA, other random
tokens).
Writes a PNG plot and a Markdown table.

    python examples/bench_quality.py [--out docs/quality] [--ratios 0.1,0.2,...] [--epochs 15]
        [--only cnn,cnn-nobn,transformer,llama,mlm,clm,lm,text] [--text-ratios 0.2,0.3,0.5]
        [--criteria L1,OBSPA,TP] [--merge a.json,b.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from digits_common import SmallCNN, accuracy, batches, data, train
from torch import nn
from tp_peer import IMPORTANCES, LlamaHeads, ignore_last_linear, params, primed, tp_matched

import spa

CRITERIA = [("L1", "l1", None), ("Taylor", "taylor", None), ("Wanda", "wanda", "calib"),
            ("FLAP", "flap", "calib"), ("OBSPA data-free", "obspa", "gaussian"),
            ("OBSPA data-free, BN-matched", "obspa", "bn"), ("OBSPA data-free, filters", "obspa", "filters"),
            ("OBSPA calibrated", "obspa", "calib")]


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


class Section:
    """One benchmark section: per criterion its metric per ratio, seconds, and the parameter
    counts reached (SPA's plan; each Torch-Pruning importance's bisected match)."""

    def __init__(self, title, ratios, dense, dense_params):
        self.title, self.ratios, self.dense, self.dense_params = title, ratios, dense, dense_params
        self.rows, self.seconds, self.params, self.extra, self.notes = {}, {}, {}, {}, []

    def add(self, name, label, vals, seconds, counts=None, extra=None):
        self.rows[label], self.seconds[label] = vals, seconds
        if counts is not None:
            self.params[label] = counts
        if extra is not None:
            self.extra[label] = extra
        print(f"[{name}] {label:30s} " + " ".join(f"{a:.3f}" for a in vals) + f"  ({seconds:.0f} s)"
              + (f" params {counts}" if counts else "") + (f" cosine {extra}" if extra else ""), flush=True)


def tp_rows(section, name, model, example, targets, loss_fn, grad_data, configure, evaluate, wanted=None):
    """Torch-Pruning's importances on ``model``, each matched to SPA's parameter count per ratio."""
    for label in IMPORTANCES:
        if wanted and not any(w.lower() in label.lower() for w in wanted):
            continue
        t0, vals, counts = time.perf_counter(), [], []
        try:
            prime = primed(model, label, loss_fn, grad_data)
            for target in targets:
                small, n, _ = tp_matched(prime, example, target, configure)
                vals.append(evaluate(small))
                counts.append(n)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot prune this model is reported, not fatal
            section.notes.append(f"{label} failed on this model: {type(exc).__name__}: {str(exc)[:200]}")
            print(f"[{name}] {label}: {section.notes[-1]}", flush=True)
            continue
        section.add(name, label, vals, time.perf_counter() - t0, counts)


def classification(name, title, model, x_tr, y_tr, x_te, y_te, ratios, wanted=None):
    example = x_tr[:2]
    calib = [x_tr[i:i + 64].numpy() for i in range(0, 512, 64)]
    grad_data = batches(x_tr, y_tr)[:8]
    section = Section(title, ratios, accuracy(model, x_te, y_te), params(model))
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for label, crit, cal in CRITERIA:
        if (cal == "bn" and not has_bn) or (wanted and not any(w.lower() in label.lower() for w in wanted)):
            continue
        t0, accs, counts = time.perf_counter(), [], []
        for r in ratios:
            small = _prune(model, example, r, crit, calib if cal == "calib" else cal, grad_data)
            accs.append(accuracy(small, x_te, y_te))
            counts.append(params(small))
        section.add(name, label, accs, time.perf_counter() - t0, counts)
    spa_counts = next(iter(section.params.values()))

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    tp_rows(section, name, model, example, spa_counts, loss_fn, grad_data[:4], ignore_last_linear(model),
            lambda m: accuracy(m, x_te, y_te), wanted)
    return section


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
    section = Section("Random-init LLaMA (GQA): logit cosine similarity", ratios, 1.0, params(model))
    for label, crit, cal in CRITERIA:
        if cal in ("bn", "filters"):
            continue
        t0, fid = time.perf_counter(), []
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
        section.add("llama", label, fid, time.perf_counter() - t0)
    return section


TEXT_CRITERIA = [("L1", "l1", None), ("Taylor", "taylor", None), ("Wanda", "wanda", "calib"),
                 ("FLAP", "flap", "calib"), ("OBSPA data-free, gaussian", "obspa", "gaussian"),
                 ("OBSPA data-free, zipf", "obspa", "zipf"), ("OBSPA data-free, lm-sample", "obspa", "lm-sample"),
                 ("OBSPA calibrated", "obspa", "calib")]
TEXT_TITLES = {"mlm": "BERT-like masked LM on stdlib docstrings: masked-token accuracy",
               "clm": "LLaMA-like causal LM on stdlib docstrings: next-token accuracy",
               "lm": "Wide LLaMA-like causal LM (hidden 256, 4 layers, GQA 4/2, FFN 1024) on stdlib "
                     "docstrings: next-token accuracy"}


def text_quality(kind, ratios, wanted=None):
    """One trained text model (``mlm``, ``clm`` or the wide causal ``lm``) pruned by every
    criterion (and, for ``lm``, Torch-Pruning): the task metric per ratio, the logit cosine to the
    dense model in ``extra``."""
    import text_common as tc

    corpus = tc.Corpus()
    model = tc.trained(kind, corpus, log=True)
    ids = tc.masked_test(corpus)[0] if kind == "mlm" else corpus.test
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
    section = Section(TEXT_TITLES[kind], ratios, metric(model), params(model))
    for label, crit, cal in TEXT_CRITERIA:
        if wanted and not any(w.lower() in label.lower() for w in wanted):
            continue
        t0, accs, cosines, counts = time.perf_counter(), [], [], []
        for r in ratios:
            kw = {"kinds": ["heads", "channels"]}
            if crit == "taylor":
                kw.update(data=grad_data, loss_fn=loss_fn)
            if cal is not None:
                kw["calibration"] = calib if cal == "calib" else cal
            small = spa.prune(model, example, ratio=r, criterion=crit, **kw).module
            accs.append(metric(small))
            cosines.append(tc.logit_cosine(small, dense_logits, ids, mask))
            counts.append(params(small))
        section.add(kind, label, accs, time.perf_counter() - t0, counts, cosines)
    if kind == "lm" and section.params and (not wanted or any("tp" in w.lower() for w in wanted)):
        cos = {}

        def evaluate(m):
            cos[id(m)] = tc.logit_cosine(m, dense_logits, ids, mask)
            return metric(m)

        spa_counts = next(iter(section.params.values()))
        tp_rows(section, kind, model, example, spa_counts, loss_fn, grad_data[:2], LlamaHeads(), evaluate, wanted)
    return section


def _markdown(sections, command, seconds) -> list[str]:
    load = os.getloadavg()
    lines = [f"Pruning without fine-tuning. Command: `{command}`; {seconds:.0f} s in all; machine: "
             f"{os.cpu_count()} CPUs, load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
             "(1/5/15 min; the machine is shared, so times are indicative).", ""]
    for sec in sections:
        lines += [f"### {sec.title} (dense: {sec.dense:.3f}, {sec.dense_params:,} parameters)", "",
                  "| criterion | " + " | ".join(f"{r:.0%}" for r in sec.ratios) + " | seconds |",
                  "|---|" + "---|" * (len(sec.ratios) + 1)]
        lines += [f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {sec.seconds[label]:.0f} |"
                  for label, vals in sec.rows.items()]
        lines.append("")
        if sec.extra:
            lines += ["Logit cosine to the dense model:", "",
                      "| criterion | " + " | ".join(f"{r:.0%}" for r in sec.ratios) + " |",
                      "|---|" + "---|" * len(sec.ratios)]
            lines += [f"| {label} | " + " | ".join(f"{c:.3f}" for c in vals) + " |" for label, vals in sec.extra.items()]
            lines.append("")
        counts = {k: v for k, v in sec.params.items() if k.startswith("TP")}
        if counts:
            spa_counts = next(iter(sec.params.values()))
            lines += ["Parameters after pruning (Torch-Pruning's ratio bisected to SPA's count):", "",
                      "| | " + " | ".join(f"{r:.0%}" for r in sec.ratios) + " |",
                      "|---|" + "---|" * len(sec.ratios),
                      "| SPA plan | " + " | ".join(f"{n:,}" for n in spa_counts) + " |"]
            lines += [f"| {label} | " + " | ".join(f"{n:,}" for n in vals) + " |" for label, vals in counts.items()]
            lines.append("")
        lines += [f"Note: {n}" for n in sec.notes] + ([""] if sec.notes else [])
    return lines


def _plot(sections, path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(sections), 3)
    rows_ = -(-len(sections) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(6 * cols, 4.5 * rows_), squeeze=False)
    labels = list(dict.fromkeys([c[0] for c in CRITERIA] + [c[0] for c in TEXT_CRITERIA] + list(IMPORTANCES)))
    labels += [k for sec in sections for k in sec.rows if k not in labels]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {k: cycle[i % len(cycle)] for i, k in enumerate(labels)}
    for ax, sec in zip(axes.flat, sections):
        for label, vals in sec.rows.items():
            ax.plot([100 * r for r in sec.ratios], vals, marker="o", label=label, color=colors[label],
                    linestyle="--" if label.startswith("TP") else "-")
        ax.axhline(sec.dense, color="gray", linestyle=":", linewidth=1, label="dense")
        ax.set_title(sec.title if len(sec.title) < 70 else sec.title.split(" (")[0] + sec.title.split(")")[-1],
                     fontsize=9)
        ax.set_xlabel("channels removed (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(sections):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/quality", help="output prefix for the .png, .md and .json")
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--only", default="cnn,cnn-nobn,transformer,llama,text",
                    help="sections to run, comma-separated (text = mlm,clm,lm; lm is the wide causal LM)")
    ap.add_argument("--text-ratios", default="0.2,0.3,0.5", help="ratios of the text models")
    ap.add_argument("--criteria", default=None, help="only criteria whose label contains one of these")
    ap.add_argument("--merge", default=None, metavar="A.json,B.json",
                    help="no run: write the .md and .png from the sections of earlier runs' .json files")
    args = ap.parse_args()
    import json

    t0 = time.perf_counter()
    if args.merge:
        sections, commands, seconds = [], [], 0.0
        for f in args.merge.split(","):
            saved = json.loads(Path(f).read_text())
            commands.append(saved["command"])
            seconds += saved["seconds"]
            for d in saved["sections"]:
                sec = Section(d["title"], d["ratios"], d["dense"], d["dense_params"])
                sec.__dict__.update(d)
                sections.append(sec)
        command = "`; `".join(commands)
    else:
        sections = run_sections(args)
        seconds = time.perf_counter() - t0
        command = "python examples/bench_quality.py " + " ".join(sys.argv[1:])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(
            {"command": command, "seconds": seconds, "sections": [s_.__dict__ for s_ in sections]}, indent=1))
    lines = _markdown(sections, command, seconds)
    Path(f"{args.out}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    _plot(sections, f"{args.out}.png")
    print(f"wrote {args.out}.png and {args.out}.md")


def run_sections(args) -> list:
    ratios = [float(r) for r in args.ratios.split(",")]
    only = set(args.only.split(","))
    wanted = args.criteria.split(",") if args.criteria else None
    x_tr, y_tr, x_te, y_te = data()
    sections = []
    for name, title, make, kw in (
            ("cnn", "CNN on digits (BatchNorm): test accuracy", SmallCNN, {}),
            ("cnn-nobn", "CNN on digits without BatchNorm: test accuracy", lambda: SmallCNN(bn=False), {}),
            ("transformer", "Transformer on digits: test accuracy", TinyTransformer, {"lr": 1e-3})):
        if name in only:
            torch.manual_seed(0)
            epochs = args.epochs * (2 if name == "transformer" else 1)
            model = train(make(), x_tr, y_tr, epochs, **kw)
            sections.append(classification(name, title, model, x_tr, y_tr, x_te, y_te, ratios, wanted))
    if "llama" in only:
        sections.append(llama_fidelity(ratios))
    text_ratios = [float(r) for r in args.text_ratios.split(",")]
    for kind in ("mlm", "clm", "lm"):
        if only & {"text", kind}:
            sections.append(text_quality(kind, text_ratios, wanted))
    return sections


if __name__ == "__main__":
    main()

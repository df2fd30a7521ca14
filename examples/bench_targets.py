"""Target error of ``spa prune --target``: params, MACs and latency targets on a BERT-like
transformer and a ResNet-style CNN, and how well the latency model predicts the timed models.

  * BERT-like: hidden 256, 4 layers, 4 heads, FFN 1024, vocab 8000, sequence 128, batch 1
    (built with `transformers` from a config, random init, nothing downloaded; TorchScript
    export);
  * CNN: ResNet-style, 2+2 basic blocks at widths 32 / 64 / 128 / 256, 64x64 input, batch 4.

For every model and target the script prints the goal, the achieved figure as a share of the
dense model's, and the error (|achieved - goal| / dense figure, the tolerance is 1% for params
and MACs and 5% for latency), the number of plans the search evaluated and, for latency, the
number of models it timed and the latency model's first prediction (for the plan it chose,
before that plan was timed) against the timed figure, with either feature of the latency
model: ``layers`` (a per-layer table, each weight layer timed alone at eight widths) and
``macs`` (the pruned model's MACs). Latency is the median of onnxruntime runs on the CPU with
``--threads``, interleaved with the dense model.

    python examples/bench_targets.py [--models bert,cnn] [--threads 2] [--targets params=0.5,...]
"""

from __future__ import annotations

import argparse
import time
import warnings

import spa
from spa import targets
from spa.report import table

DEFAULT_TARGETS = "params=0.5,params=0.3,macs=0.5,macs=0.3,latency=0.7,latency=0.5"


def build(name: str):
    """(ModelProto, input shapes) of the benchmark's models."""
    if name == "cnn":
        from spa import zoo

        return zoo.resnet((2, 2, 2, 2), (32, 64, 128, 256), image=64, classes=10), {"input": [4, 3, 64, 64]}
    import io

    import onnx
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                     vocab_size=8000, num_labels=2)
    model = BertForSequenceClassification(cfg).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x).logits

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits().eval(), (torch.randint(0, 8000, (1, 128)),), f, dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "batch", 1: "seq"}}, opset_version=17)
    return onnx.load_from_string(f.getvalue()), {"x": [1, 128]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="bert,cnn")
    ap.add_argument("--targets", default=DEFAULT_TARGETS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-model", default="layers,macs",
                    help="features of the latency model to compare: layers (per-layer table), macs")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        proto, shapes = build(name)
        runs = [(spec, lm) for spec in args.targets.split(",")
                for lm in (args.latency_model.split(",") if spec.startswith("latency") else ["-"])]
        for spec, lm in runs:
            if lm != "-":
                targets.LATENCY_MODEL = lm
            t0 = time.perf_counter()
            result = spa.prune(proto, target=spec, threads=args.threads, input_shapes=shapes, verify=False)
            took = time.perf_counter() - t0
            out = result.target
            pred = "-"
            if out.rounds:  # the latency model's first prediction, before that model was timed
                p, ms = out.rounds[0]
                pred = f"{p:.2f} vs {ms:.2f} ms ({100 * (p / ms - 1):+.0f}%)"
            rows.append([name, spec, lm, f"{out.achieved / out.dense:.3f}", f"{100 * out.error:.2f}%",
                         "yes" if out.met else "no", str(out.plans_tried), str(out.timed or "-"), pred,
                         f"{took:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    print()
    print(table(["model", "target", "latency model", "achieved/dense", "error", "met", "plans", "timed", "first prediction", "s"],
                rows, "lllrrlrrll"))


if __name__ == "__main__":
    main()

"""Prune a trained model and fine-tune it, iteratively: several steps of (prune a share of the
channels with the Taylor criterion, fine-tune a few epochs). Digits, bundled with scikit-learn.

    python examples/torch_prune_finetune.py [--steps 3] [--step-ratio 0.3] [--epochs 20] [--finetune 3]
"""

from __future__ import annotations

import argparse

from digits_common import accuracy, batches, row, train, trained_cnn

import spa
from spa.report import table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--step-ratio", type=float, default=0.3, help="share of the remaining channels per step")
    ap.add_argument("--epochs", type=int, default=20, help="training of the dense model")
    ap.add_argument("--finetune", type=int, default=3, help="fine-tuning epochs after each step")
    args = ap.parse_args()
    model, x_tr, y_tr, x_te, y_te, example = trained_cnn(args.epochs)
    rows = [row("dense, trained", model, x_te, y_te, example)]
    for step in range(1, args.steps + 1):
        result = spa.prune(model, example, ratio=args.step_ratio, criterion="taylor", data=batches(x_tr, y_tr)[:8])
        model = result.module
        pruned_acc = accuracy(model, x_te, y_te)
        model = train(model, x_tr, y_tr, args.finetune, lr=1e-3, seed=100 * step)
        rows.append(row(f"step {step}: pruned (acc {pruned_acc:.3f}), fine-tuned {args.finetune} ep",
                        model, x_te, y_te, example))
    print(table(["model", "test accuracy", "params", "MACs"], rows, "lrrr"))


if __name__ == "__main__":
    main()

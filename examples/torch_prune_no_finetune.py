"""Prune a trained model without fine-tuning: accuracy right after pruning, per criterion and
ratio (magnitude L1/L2, and Taylor from a few training batches). Digits, bundled with
scikit-learn.

    python examples/torch_prune_no_finetune.py [--ratios 0.1,0.2,0.3,0.5] [--epochs 20]
"""

from __future__ import annotations

import argparse

from digits_common import batches, row, trained_cnn

import spa
from spa.report import table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    model, x_tr, y_tr, x_te, y_te, example = trained_cnn(args.epochs)
    rows = [row("dense, trained", model, x_te, y_te, example)]
    calib = batches(x_tr, y_tr)[:8]
    for ratio in (float(r) for r in args.ratios.split(",")):
        for criterion in ("l1", "l2", "taylor"):
            extra = {"data": calib} if criterion == "taylor" else {}
            small = spa.prune(model, example, ratio=ratio, criterion=criterion, **extra).module
            rows.append(row(f"{ratio:.0%} removed, {criterion}", small, x_te, y_te, example))
    print(table(["model (no fine-tuning)", "test accuracy", "params", "MACs"], rows, "lrrr"))


if __name__ == "__main__":
    main()

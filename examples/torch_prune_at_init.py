"""Prune at initialization with SNIP, then train the small model: accuracy against the dense
model trained the same way (digits, bundled with scikit-learn).

    python examples/torch_prune_at_init.py [--ratio 0.5] [--epochs 15]
"""

from __future__ import annotations

import argparse

import torch
from digits_common import SmallCNN, batches, data, row, train

import spa
from spa.report import table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args()
    x_tr, y_tr, x_te, y_te = data()
    example = x_tr[:2]

    torch.manual_seed(0)
    init = SmallCNN().eval()
    # SNIP: connection sensitivity |w * dL/dw| at initialization, on a few training batches.
    result = spa.prune(init, example, ratio=args.ratio, criterion="snip", data=batches(x_tr, y_tr)[:4])
    small = result.module
    print(f"SNIP at init removed {args.ratio:.0%} of the channels of {len(result.plan.pruned_groups)} groups")

    rows = [row("random init (untrained)", init, x_te, y_te, example),
            row("SNIP-pruned at init (untrained)", small, x_te, y_te, example)]
    dense = train(init, x_tr, y_tr, args.epochs)  # the pruned copy is independent of it
    small = train(small, x_tr, y_tr, args.epochs)
    rows += [row(f"dense, trained {args.epochs} epochs", dense, x_te, y_te, example),
             row(f"SNIP-pruned at init, trained {args.epochs} epochs", small, x_te, y_te, example)]
    print(table(["model", "test accuracy", "params", "MACs"], rows, "lrrr"))


if __name__ == "__main__":
    main()

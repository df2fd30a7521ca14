"""The graph API step by step on a model exported from PyTorch (or any ONNX file you pass).

    python examples/prune_api.py [MODEL.onnx]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import onnx

import spa
from spa import zoo


def main() -> None:
    if len(sys.argv) > 1:
        source = sys.argv[1]
    else:
        source = zoo.resnet((1, 1), (16, 32), image=32, classes=10)

    model = spa.load(source)                        # canonicalized onnx_ir.Model; the source is untouched
    dg = spa.dependency_graph(model)                # dims, couplings, groups, barriers
    print(f"{len(dg.groups)} groups, {len(dg.blocked_groups)} blocked parameter axes, {len(dg.barriers)} barriers")
    first = dg.groups[0]
    print(f"group {first.key}: {first.describe()}")
    for m in first.members[:6]:
        print(f"  {m.dim}  role={m.role}  param={m.param}")
    producer, consumer = first.params[0].dim, [m.dim for m in first.params if m.role == "in"][0]
    print("why coupled:", *dg.explain(producer, consumer), sep="\n  ")

    scores = spa.score(dg, criterion="l2", reduction="mean", normalization="mean")
    plan = spa.make_plan(dg, scores, ratio=0.5, round_to=8, protect=[])
    print(plan.to_json()[:300], "...")
    small = spa.apply_plan(model, plan)             # verified: checker, shape inference, onnxruntime run
    with tempfile.TemporaryDirectory() as tmp:
        out = spa.save(small, Path(tmp) / "small.onnx")
        print(f"wrote {out} ({len(onnx.load(out).graph.node)} nodes)")


if __name__ == "__main__":
    main()

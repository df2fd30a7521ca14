"""How long each analysis stage of SPA takes on two transformers, and how it scales with depth.

  * BERT-base shape: hidden 768, 12 layers, 12 heads, FFN 3072, vocab 30522;
  * LLaMA shape: hidden 1024, 8 layers, 16 query heads in 4 KV groups (GQA), SwiGLU FFN 2816.

Both are built with `transformers` from config objects (random init, nothing downloaded) and
exported with the torch exporter (dynamo, dynamic batch and sequence) into a temporary directory
(``--cache DIR`` keeps the exports between runs). Timed per model: ``spa.load`` (canonicalization
and shape inference/completion apart), the dependency graph and its groups, L1 scoring (all
kinds, and heads + FFN channels only), allocation, apply (with verification), the CLI's
before/after table, ``spa inspect`` end to end in a subprocess, and Torch-Pruning's
``DependencyGraph.build_dependency`` on the same torch model (when ``torch_pruning`` is
installed). The scaling table times the LLaMA shape at 4, 8 and 16 layers: with a pipeline linear
in graph size, seconds per layer stay flat.

    python examples/bench_analysis.py [--models bert,llama] [--layers 4,8,16] [--small] [--cache DIR]
    python examples/bench_analysis.py --profile llama   # cProfile of load + graph + score, top 25
    python examples/bench_analysis.py --against /path/to/old/checkout   # before/after in one run

``--small`` uses hidden sizes a quarter as large (a quick check of the script itself).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict

import spa
from spa.report import table

SHAPE_PASSES = ("InferShapesPass", "CompleteShapesPass", "SymbolicShapesPass")


def build(name: str, layers: int | None = None, small: bool = False):
    import torch
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    q = 4 if small else 1
    if name == "bert":
        cfg = BertConfig(hidden_size=768 // q, num_hidden_layers=layers or 12, num_attention_heads=12,
                         intermediate_size=3072 // q, vocab_size=30522 // q, num_labels=2)
        return BertForSequenceClassification(cfg).eval(), cfg
    cfg = LlamaConfig(hidden_size=1024 // q, num_hidden_layers=layers or 8, num_attention_heads=16,
                      num_key_value_heads=4, intermediate_size=2816 // q, vocab_size=32000 // q, use_cache=False)
    return LlamaForCausalLM(cfg).eval(), cfg


class Logits:
    """Wraps a `transformers` model so that it returns the logits tensor only."""

    def __new__(cls, model):
        import torch

        class _Logits(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, x):
                return self.model(x).logits

        return _Logits().eval()


def export(model, cfg, path: str) -> None:
    import torch

    x = torch.randint(0, cfg.vocab_size, (2, 16))
    shapes = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=512)},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(Logits(model), (x,), dynamo=True, optimize=False, dynamic_shapes=shapes,
                                 input_names=["input_ids"], verbose=False)
    prog.save(path)


def exported(name: str, workdir: str, layers: int | None, small: bool) -> str:
    layers = layers or (12 if name == "bert" else 8)
    path = os.path.join(workdir, f"{name}-{layers}{'-small' if small else ''}.onnx")
    if not os.path.exists(path):
        model, cfg = build(name, layers, small)
        export(model, cfg, path)
    return path


@contextlib.contextmanager
def pass_timer(times: dict):
    """Seconds per canonicalization pass (by class name), from the runner all steps go through."""
    from spa.passes import canonicalize

    run = canonicalize.run_pass

    def timed(step, model, stage):
        t0 = time.perf_counter()
        try:
            return run(step, model, stage)
        finally:
            times[type(step).__name__] += time.perf_counter() - t0

    canonicalize.run_pass = timed
    try:
        yield
    finally:
        canonicalize.run_pass = run


def clock(rows: list, label: str, fn):
    t0 = time.perf_counter()
    out = fn()
    rows.append([label, f"{time.perf_counter() - t0:.2f}"])
    return out


def summary_rows(before, after, shapes):
    try:
        from spa.cli import summary_rows as rows
    except ImportError:  # a tree from before the table was a function: its inline form
        from spa.metrics import count_macs, count_params

        return [[name, f"{fn(before):,}", f"{fn(after):,}", f"{fn(after) / max(fn(before), 1):.3f}"]
                for name, fn in (("params", count_params), ("MACs", lambda m: count_macs(m, shapes)))]
    return rows(before, after, shapes)


def torch_pruning_build(name: str, layers, small: bool) -> float | None:
    try:
        import torch
        import torch_pruning as tp
    except ImportError:
        return None
    model, cfg = build(name, layers, small)
    x = torch.randint(0, cfg.vocab_size, (1, 128))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.DependencyGraph().build_dependency(model, example_inputs=x)
    return time.perf_counter() - t0


def bench(name: str, workdir: str, small: bool) -> list[list]:
    path = exported(name, workdir, None, small)
    rows: list[list] = []
    times: dict = defaultdict(float)
    with pass_timer(times):
        t0 = time.perf_counter()
        model = spa.load(path)
        load_s = time.perf_counter() - t0
    shape_s = sum(times[p] for p in SHAPE_PASSES)
    rows.append(["spa.load", f"{load_s:.2f}"])
    rows.append(["  shape inference + completion", f"{shape_s:.2f}"])
    rows.append(["  canonicalization (other passes, reading)", f"{load_s - shape_s:.2f}"])
    dg = clock(rows, "dependency graph + groups", lambda: (lambda d: (d, d.groups))(spa.dependency_graph(model))[0])
    clock(rows, "score l1 (all kinds)", lambda: [spa.score(dg, "l1")[g.key] for g in dg.groups])
    kinds = ("heads", "channels")
    scores = spa.score(dg, "l1")
    _ = [scores[g.key] for g in dg.groups if g.kind in kinds]  # allocation alone below (scores may be lazy)
    clock(rows, "score l1 (heads, channels)", lambda: [spa.score(dg, "l1")[g.key] for g in dg.groups
                                                       if g.kind in kinds])
    plan = clock(rows, "allocation", lambda: spa.make_plan(dg, scores, 0.3, kinds=kinds))
    pruned = clock(rows, "apply (verified)", lambda: spa.apply_plan(model, plan, input_shapes={"batch": 1, "seq": 128}))
    clock(rows, "CLI before/after table", lambda: summary_rows(model, pruned, {"batch": 1, "seq": 128}))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spa.cli", "inspect", path], capture_output=True, check=True)
    rows.append(["spa inspect (subprocess)", f"{time.perf_counter() - t0:.2f}"])
    tp_s = None if os.environ.get("SPA_BENCH_NO_TP") else torch_pruning_build(name, None, small)
    rows.append(["Torch-Pruning build_dependency", "-" if tp_s is None else f"{tp_s:.2f}"])
    return [[name, *r] for r in rows]


def scaling(workdir: str, layers: list[int], small: bool) -> list[list]:
    rows = []
    for n in layers:
        path = exported("llama", workdir, n, small)
        t0 = time.perf_counter()
        model = spa.load(path)
        t1 = time.perf_counter()
        dg = spa.dependency_graph(model)
        _ = dg.groups
        t2 = time.perf_counter()
        scores = spa.score(dg, "l1")
        _ = [scores[g.key] for g in dg.groups]
        t3 = time.perf_counter()
        total = t3 - t0
        rows.append([str(n), f"{t1 - t0:.2f}", f"{t2 - t1:.2f}", f"{t3 - t2:.2f}", f"{total:.2f}",
                     f"{total / n:.3f}", str(len(dg.groups))])
    return rows


def profile(name: str, workdir: str, small: bool) -> None:
    path = exported(name, workdir, None, small)
    prof = cProfile.Profile()
    prof.enable()
    model = spa.load(path)
    dg = spa.dependency_graph(model)
    scores = spa.score(dg, "l1")
    _ = [scores[g.key] for g in dg.groups]
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def against(args, workdir: str) -> None:
    """Every measurement in a subprocess per source tree (``--against DIR``, then this one),
    model by model, so both run under the same load; seconds side by side with their ratio."""
    import json

    trees = [("base", os.path.abspath(args.against)), ("this", ROOT)]
    results = {}
    for part in [f"--models={m}" for m in args.models.split(",") if m.strip()] + (
            [f"--layers={args.layers}"] if args.layers else []):
        for label, tree in trees:
            out = os.path.join(workdir, f"{label}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--cache", workdir, "--json", out,
                   "--models=" if part.startswith("--layers") else "--layers=", part] + (["--small"] if args.small else [])
            env = {**os.environ, "PYTHONPATH": tree, **({"SPA_BENCH_NO_TP": "1"} if label == "base" else {})}
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            with open(out) as f:
                for kind, rows in json.load(f).items():
                    results.setdefault((label, kind), []).extend(rows)
    for kind, headers in (("stages", ["model", "stage"]), ("scaling", ["layers"])):
        base, this = results.get(("base", kind), []), results.get(("this", kind), [])
        if not this:
            continue
        n = len(headers)
        rows = []
        for b, t in zip(base, this):
            extra = []
            if kind == "stages":
                bs, ts = (float(x) if x not in ("-", "") else None for x in (b[n], t[n]))
                extra = [b[n], t[n], f"{ts / bs:.2f}" if bs and ts is not None else "-"]
                if t[1].startswith("Torch-Pruning"):  # the same code in both runs: timed once
                    extra = ["", t[n], ""]
            else:
                extra = [b[4], t[4], f"{float(t[4]) / float(b[4]):.2f}", b[5], t[5]]
            rows.append(t[:n] + extra)
        heads = headers + (["base s", "this s", "this/base"] if kind == "stages" else
                           ["base total s", "this total s", "this/base", "base s/layer", "this s/layer"])
        print(table(heads, rows, "l" * n + "r" * (len(heads) - n)))
        print()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bert,llama")
    ap.add_argument("--layers", default="4,8,16", help="LLaMA depths of the scaling table ('' to skip)")
    ap.add_argument("--small", action="store_true", help="hidden sizes a quarter as large")
    ap.add_argument("--cache", metavar="DIR", help="keep the exports here (default: a temporary directory)")
    ap.add_argument("--profile", metavar="MODEL", help="cProfile load + graph + score of bert or llama instead")
    ap.add_argument("--against", metavar="DIR", help="also time the source tree DIR (e.g. a checkout of the "
                                                     "previous commit), each stage in the same run")
    ap.add_argument("--json", metavar="FILE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        workdir = args.cache or stack.enter_context(tempfile.TemporaryDirectory(prefix="spa-bench-"))
        os.makedirs(workdir, exist_ok=True)
        if args.profile:
            profile(args.profile, workdir, args.small)
            return
        if args.against:
            against(args, workdir)
            return
        rows = []
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            rows += bench(name, workdir, args.small)
        if rows:
            print(table(["model", "stage", "seconds"], rows, "llr"))
        layers = [int(n) for n in args.layers.split(",") if n.strip()]
        scale = scaling(workdir, layers, args.small) if layers else []
        if scale:
            print("\nLLaMA shape by depth (load, graph, l1 scores):")
            print(table(["layers", "load s", "graph s", "score s", "total s", "s / layer", "groups"], scale,
                        "rrrrrrr"))
        if args.json:
            import json

            with open(args.json, "w") as f:
                json.dump({"stages": rows, "scaling": scale}, f)


if __name__ == "__main__":
    main()

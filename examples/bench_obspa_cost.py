"""Cost of OBSPA against an L1 prune of the same model, in the same run: a BERT-base-shaped
model (12 layers, hidden 768, 12 heads, FFN 3072, random init, nothing downloaded), data-free
(random tokens) calibration, heads + FFN + hidden pruned 30%.

Each prune runs in its own child process, so that its peak resident memory is its own; the
script prints OBSPA time / L1 time and OBSPA peak RSS / model weight bytes (also the peak
above the child's resident memory before the prune: the imports of spa, torch and onnxruntime
left out). Times are wall clock and CPU time of the child (all threads), as ratios to L1's.
The OBSPA measured is the default one (``spa.criteria.obspa.SEQUENTIAL`` as shipped: the
reconstruction from the dense model's H); ``--sequential`` adds the block-wise sequential
reconstruction. ``--profile N`` prints the N hottest functions of the default OBSPA prune
(cProfile, cumulative time).

    python examples/bench_obspa_cost.py [--ratio 0.3] [--batches 8] [--seq 128] [--layers 12]
        [--hidden 768] [--sequential] [--profile 25]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
import warnings


def export(path: str, layers: int, hidden: int) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                     intermediate_size=4 * hidden, vocab_size=30522, num_labels=2)
    cfg.return_dict = False  # a tuple out: (logits,)
    model = BertForSequenceClassification(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=512)},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, (x,), dynamo=True, optimize=False, dynamic_shapes=dims,
                                 input_names=["input_ids"], verbose=False)
    prog.save(path)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _child(path: str, criterion: str, sequential, args, queue) -> None:
    import cProfile
    import io
    import pstats
    import resource

    import onnxruntime  # noqa: F401  (imported by every prune: outside the "above the start" share)
    import torch  # noqa: F401

    import spa
    from spa.criteria import obspa

    if sequential is not None:
        obspa.SEQUENTIAL = sequential
    before = _rss_kib()
    cpu0 = time.process_time()
    profiler = cProfile.Profile() if args.profile and criterion == "obspa" and sequential is None else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    result = spa.prune(path, args.ratio, criterion=criterion, calibration="gaussian",
                       calibration_batches=args.batches, input_shapes={"seq": args.seq})
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    text = ""
    if profiler:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.profile)
        text = out.getvalue()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    fid = result.fidelity
    queue.put((seconds, cpu, peak * 1024, (peak - before) * 1024, len(result.plan.pruned_groups),
               None if fid is None else fid.cosine, text))


def measure(path: str, criterion: str, sequential, args) -> tuple:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(path, criterion, sequential, args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--batches", type=int, default=8, help="data-free batches of random sequences")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--sequential", action="store_true", help="also time the block-wise sequential OBSPA")
    ap.add_argument("--profile", type=int, default=0, help="print the N hottest functions of the OBSPA prune")
    args = ap.parse_args()

    from spa.io import model_nbytes

    import spa

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bert.onnx")
        export(path, args.layers, args.hidden)
        weights = model_nbytes(spa.load(path))
        runs = [("l1", "l1", None), ("obspa", "obspa", None)]
        if args.sequential:
            runs.append(("obspa (block-wise sequential)", "obspa", True))
        got = {label: measure(path, crit, seq, args) for label, crit, seq in runs}
    base, base_cpu = got["l1"][0], got["l1"][1]
    print(f"\nBERT shape: {args.layers} layers, hidden {args.hidden}; {args.batches} data-free batches of "
          f"{args.seq} tokens; ratio {args.ratio}; weights {weights / 2**20:.0f} MiB")
    for label, (sec, cpu, peak, above, groups, cosine, text) in got.items():
        fid = "" if cosine is None else f", fidelity cosine {cosine:.4f}"
        print(f"  {label:31s} {sec:7.1f} s = {sec / base:5.2f} x L1 time (CPU time {cpu / base_cpu:5.2f} x); peak RSS {peak / 2**20:6.0f} MiB = "
              f"{peak / weights:4.2f} x weights ({above / weights:4.2f} x above the child's start); "
              f"{groups} groups pruned{fid}")
        if text:
            print(text)


if __name__ == "__main__":
    main()

"""Allocation search vs the heuristics, on the small CNN and the small transformer (of
``bench_quality.py``) trained on scikit-learn's digits, at a parameter target (default
params=0.5), no fine-tuning:

  * fidelity (relative output error, cosine against the dense model on the calibration
    batches) and test accuracy of uniform, global, owl and alpha (the enqueued first trials)
    and of the search's best plan after 50 and 200 trials (the same study, resumed);
  * the search with a user metric (accuracy on a validation split) instead of fidelity;
  * trials per minute with 1 and 2 local workers and with Ray (``ray.init(num_cpus=2)``), and
    where a trial's time goes.

    python examples/bench_search.py [--target params=0.5] [--trials 50,200] [--rate-trials 30]
                                    [--models cnn,transformer] [--criterion l1] [--no-ray] [--out F.md]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from digits_common import SmallCNN, data, train

import spa
from spa.frontends.torch import export
from spa.runtime import session


def _accuracy(model, x, y, batch=256) -> float:
    sess = session(model)
    name = sess.get_inputs()[0].name
    out = np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return float((out.argmax(-1) == y).mean())


class ValAccuracy:
    """The user metric: accuracy on a validation split (picklable, for process workers)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __call__(self, sess) -> float:
        out = sess.run(None, {sess.get_inputs()[0].name: self.x})[0]
        return float((out.argmax(-1) == self.y).mean())


def _rate(study) -> tuple[float, int]:
    """Trials per minute between the first and the last completion (start-up excluded)."""
    from optuna.trial import TrialState

    ends = sorted(t.datetime_complete for t in study.trials if t.state == TrialState.COMPLETE)
    if len(ends) < 2:
        return float("nan"), len(ends)
    return 60 * (len(ends) - 1) / (ends[-1] - ends[0]).total_seconds(), len(ends)


def _breakdown(study) -> dict:
    from optuna.trial import TrialState

    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    parts = {"driver: Optuna ask + suggest": [t.user_attrs["plan"]["ask_seconds"] for t in done],
             "driver: plan (ratios, target fit, allocate)": [t.user_attrs["plan"]["seconds"] for t in done]}
    names = {"prune": "prune a copy", "session": "onnxruntime session", "fidelity": "run calibration batches, fidelity",
             "latency_metric": "params count (latency, metric)"}
    for k, label in names.items():
        parts[f"worker: {label}"] = [t.user_attrs["result"]["seconds"][k] for t in done]
    parts["trial, submit to result"] = [t.user_attrs["result"]["trial_seconds"] for t in done]
    return {k: 1e3 * float(np.mean(v)) for k, v in parts.items()}


def quality(label: str, net, x_tr, x_val, y_val, xt, yt, counts, args, tmp: Path) -> list[str]:
    """uniform / global / owl / alpha (the enqueued trials) and the search at ``counts`` trials
    (one study, resumed), and the search with the validation-accuracy metric: a Markdown table."""
    folder = tmp / label.split()[0].lower()
    folder.mkdir()
    model_path = folder / "model.onnx"
    model_path.write_bytes(export(net, x_tr[:2]).SerializeToString())
    cal = folder / "calibration"
    cal.mkdir()
    for i in range(4):  # four training batches of 64 images: scores, activations and fidelity
        np.save(cal / f"x.{i}.npy", x_tr[64 * i:64 * (i + 1)].numpy())
    dense = spa.load(model_path)
    dense_acc = _accuracy(dense, xt, yt)
    print(f"{label}: dense test accuracy {dense_acc:.4f}", flush=True)
    common = dict(criterion=args.criterion, calibration=str(cal))
    rows, results = [], {}
    for n in counts:
        t0 = time.perf_counter()
        r = spa.search(str(model_path), args.target, n, out=folder / "study", **common)
        results[n] = (r, time.perf_counter() - t0)
        print(f"{label}, search {n} trials: best trial {r.best['number']} ({r.best['family']}), rel. error "
              f"{r.best['rel_error']:.4f}, {results[n][1]:.1f} s", flush=True)
    first = results[counts[0]][0]
    for name, row in first.heuristics.items():
        acc = _accuracy(spa.apply_plan(dense, first.plan_of(row["number"]), verify=False), xt, yt)
        rows.append((name, row, acc, 0))
    for n in results:
        r, _ = results[n]
        acc = _accuracy(spa.apply_plan(dense, r.plan, verify=False), xt, yt)
        rows.append((f"search, {n} trials ({r.best['family']})", r.best, acc, r.best["params"].get("depth", 0)))
    if not args.no_metric:
        r = spa.search(str(model_path), args.target, counts[0], out=folder / "metric",
                       metric=ValAccuracy(x_val, y_val), **common)
        acc = _accuracy(spa.apply_plan(dense, r.plan, verify=False), xt, yt)
        rows.append((f"search, {counts[0]} trials, metric = val. accuracy ({r.best['family']})", r.best, acc,
                     r.best["params"].get("depth", 0)))
    best_h = min(rows[:len(first.heuristics)], key=lambda t: t[1]["rel_error"])
    units = len(first.space.units)
    lines = [f"{label} on digits (dense test accuracy {dense_acc:.4f}), {args.target}, criterion {args.criterion}, "
             f"calibration: 4 training batches of 64; no fine-tuning; {units} removable residual units "
             f"(a trial may remove up to {first.space.max_depth}).", "",
             "| allocation | rel. error | cosine | params kept | units removed | test accuracy |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {row['rel_error']:.4f} | {row['cosine']:.4f} | {row['params_ratio']:.3f} | {k} | {acc:.4f} |"
              for name, row, acc, k in rows]
    for n in results:
        b = results[n][0].best
        lines += ["", f"search at {n} trials vs the best heuristic ({best_h[0]}): relative error "
                  f"{b['rel_error']:.4f} vs {best_h[1]['rel_error']:.4f} "
                  f"({100 * (1 - b['rel_error'] / best_h[1]['rel_error']):.1f}% lower); "
                  f"{results[n][1]:.0f} s for the run"]
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="params=0.5")
    ap.add_argument("--trials", default="50,200", help="comma-separated trial counts (one study, resumed)")
    ap.add_argument("--models", default="cnn,transformer",
                    help="quality tables for: cnn (SmallCNN), transformer (bench_quality's TinyTransformer)")
    ap.add_argument("--rate-trials", type=int, default=30, help="trials of each throughput run (0: none)")
    ap.add_argument("--criterion", default="l1")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--rate-batches", type=int, default=4,
                    help="calibration batches of 64 images in the throughput runs (more: heavier trials)")
    ap.add_argument("--rate-only", action="store_true", help="only the throughput runs")
    ap.add_argument("--no-metric", action="store_true", help="skip the search with the validation-accuracy metric")
    ap.add_argument("--out", default=None, help="also write the tables as Markdown here")
    args = ap.parse_args()
    t_all = time.perf_counter()
    x_tr, y_tr, x_te, y_te = data()
    x_val, y_val = x_tr[-200:].numpy(), y_tr[-200:].numpy()
    xt, yt = x_te.numpy(), y_te.numpy()
    counts = [int(n) for n in args.trials.split(",")]
    models = [] if args.rate_only else args.models.split(",")
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        cnn = train(SmallCNN(), x_tr[:-200], y_tr[:-200], args.epochs)
        if "cnn" in models:
            lines += quality("Small CNN", cnn, x_tr, x_val, y_val, xt, yt, counts, args, tmp)
        if "transformer" in models:
            from bench_quality import TinyTransformer

            torch.manual_seed(0)
            tfm = train(TinyTransformer(), x_tr[:-200], y_tr[:-200], 2 * args.epochs, lr=1e-3)
            lines += quality("Transformer (2 pre-norm layers, 4 heads)", tfm, x_tr, x_val, y_val, xt, yt, counts,
                             args, tmp)
        model_path = tmp / "cnn.onnx"
        model_path.write_bytes(export(cnn, x_tr[:2]).SerializeToString())
        rate_cal = tmp / "rate-calibration"
        rate_cal.mkdir()
        for i in range(args.rate_batches):
            np.save(rate_cal / f"x.{i:03d}.npy", x_tr[(64 * i) % 1024:(64 * i) % 1024 + 64].numpy())

        rates = []
        runs = [("local:1", "local:1"), ("local:2", "local:2")] + ([] if args.no_ray else [("ray", "ray")])
        for label, workers in runs if args.rate_trials else ():
            ray = None
            if workers == "ray":
                import ray

                t_ray = time.perf_counter()
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
                t_ray = time.perf_counter() - t_ray
            t0 = time.perf_counter()
            r = spa.search(str(model_path), args.target, args.rate_trials, out=tmp / f"rate-{label}", workers=workers,
                           criterion=args.criterion, calibration=str(rate_cal), calibration_batches=args.rate_batches)
            wall = time.perf_counter() - t0
            if ray is not None:
                ray.shutdown()
                label += f" (ray.init {t_ray:.1f} s)"
            rate, n = _rate(r.study)
            rates.append((label, rate, n, wall, _breakdown(r.study)))
            print(f"{label}: {rate:.0f} trials/min over {n} trials, {wall:.1f} s with start-up", flush=True)
    if not rates:
        lines += [f"{time.perf_counter() - t_all:.0f} s in all."]
        _write("\n".join(lines), args.out)
        return
    lines += ["", f"Throughput ({args.rate_trials} trials each, fresh study, {args.rate_batches} calibration batches "
              "of 64 images; rate between the first and last completion, start-up excluded):", "", "| workers | trials / min | wall s (with start-up) |",
              "|---|---|---|"]
    lines += [f"| {label} | {rate:.0f} | {wall:.1f} |" for label, rate, n, wall, _ in rates]
    lines += ["", "Where a trial's time goes (mean ms per trial):", "",
              "| step | " + " | ".join(label.split(" ")[0] for label, *_ in rates) + " |",
              "|---|" + "---|" * len(rates)]
    for step in rates[0][4]:
        lines.append(f"| {step} | " + " | ".join(f"{b[step]:.1f}" for *_, b in rates) + " |")
    lines += ["", f"{time.perf_counter() - t_all:.0f} s in all."]
    _write("\n".join(lines), args.out)


def _write(text: str, out) -> None:
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()

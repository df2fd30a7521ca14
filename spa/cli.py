"""The ``spa`` command line: inspect, prune, apply, bench, sensitivity, search, worker, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from spa.errors import ArgumentError, SpaError
from spa.criteria import names as criterion_names
from spa.criteria.registry import NORMALIZATIONS, REDUCTIONS
from spa.progress import Progress


def _input_shapes(specs: list[str] | None) -> dict | None:
    """``name=1,3,224,224`` (one input) or ``symbol=8`` (a symbolic dim)."""
    if not specs:
        return None
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        try:
            if not sep:
                raise ValueError
            values = [int(d) for d in dims.split(",") if d]
        except ValueError:
            raise ArgumentError(f"--input-shape {spec!r}: expected NAME=D1,D2,... or SYMBOL=N") from None
        shapes[name] = values if len(values) != 1 else values[0]
        if isinstance(shapes[name], int) and "," in dims:
            shapes[name] = [shapes[name]]
    return shapes


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where models run (checks, calibration, bench): auto uses CUDA when a session can be "
                        "created there, else the CPU (default: auto)")
    p.add_argument("--provider", metavar="NAME", help="an installed onnxruntime execution provider instead "
                                                       "(e.g. TensorrtExecutionProvider)")


def _add_shape_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,..",
                   help="concrete shape of an input (or value of a symbolic dim) for running the model; "
                        "repeatable. Default: symbolic batch 1, other symbolic dims 16 (64 for image axes)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spa", description="SPA - structurally prune any ONNX model.")
    p.add_argument("-v", "--verbose", action="store_true", help="log decisions (kept groups, notes)")
    sub = p.add_subparsers(dest="command", required=True)

    ins = sub.add_parser("inspect", help="list prunable groups, blocked axes and barriers")
    ins.add_argument("model")
    ins.add_argument("--json", metavar="FILE", help="also write the full report (every member) as JSON")
    ins.add_argument("--all", action="store_true", help="list every barrier, also those on shape computations")

    pr = sub.add_parser("prune", help="prune a model and write a smaller one")
    pr.add_argument("model")
    pr.add_argument("-o", "--output", required=True)
    pr.add_argument("--ratio", type=float, default=None,
                    help="fraction of channels to remove, in [0, 1) (required unless --depth is given)")
    pr.add_argument("--target", metavar="KIND=VALUE",
                    help="prune to a budget instead of a ratio: params, macs, bytes (weights on disk) or latency, "
                         "as a ratio to the dense model (params=0.5, latency=0.6) or absolute (params=3.5M, "
                         "macs=2G, bytes=40MB, latency=12ms); met within 1%% of the dense figure (latency: 5%%, "
                         "measured on --device with --threads and --input-shape); exclusive with --ratio")
    pr.add_argument("--threads", type=int, default=None, metavar="N",
                    help="onnxruntime intra-op threads for latency targets (default: onnxruntime's)")
    pr.add_argument("--workers", default="local:1", metavar="local:N|ray|ray:ADDRESS",
                    help="shard the activation statistics' calibration batches (wanda, flap, obspa, owl) over N "
                         "local processes or Ray (default local:1: this process)")
    pr.add_argument("--depth", type=float, default=0.0, metavar="D",
                    help="remove whole residual units first: a share below 1 (0.25: a quarter of the removable "
                         "units, at least one) or a count >= 1; combinable with --ratio")
    pr.add_argument("--depth-unit", choices=("layer", "sublayer"), default="layer",
                    help="what --depth counts: transformer layers (attention+FFN; the residual blocks of other "
                         "models) or single sublayers (default: layer)")
    pr.add_argument("--depth-score", choices=("bi", "angular", "greedy"), default="bi",
                    help="how units are chosen: bi (block influence), angular (best contiguous span), greedy "
                         "(least output change, re-measured); on --calibration inputs (default: bi)")
    pr.add_argument("--criterion", default="l1", choices=criterion_names(),
                    help="l1/l2/random/bn (weights); wanda/flap/obspa (activations: see --calibration); "
                         "taylor/snip/grasp need an nn.Module (Python API)")
    pr.add_argument("--calibration", default=None, metavar="gaussian|zipf|lm-sample|model|DIR",
                    help="inputs for wanda/flap/obspa and --allocation owl, data-free: 'gaussian' (the default), "
                         "'zipf' (token ids Zipf over the id, full mask), 'lm-sample' (text the language model "
                         "samples from its own logits), 'model' (zipf for token-id models, else gaussian); "
                         "or a directory of .npy batches (the Python API also takes 'bn' and 'filters': inputs "
                         "optimized through an nn.Module's BatchNorm statistics or first layers)")
    pr.add_argument("--calibration-batches", type=int, default=8, metavar="N",
                    help="data-free batches to synthesize (default 8)")
    pr.add_argument("--allocation", default="uniform", choices=("uniform", "global", "alpha", "owl", "obs", "sensitivity"),
                    help="per-group ratios: uniform, global ranking, alpha (weight spectrum), owl (outliers), "
                         "obs (global OBS cost as relative output error, target in parameters) or "
                         "sensitivity (output change with a group's weakest channels masked)")
    pr.add_argument("--reduction", default="mean", choices=REDUCTIONS, help="how member scores combine")
    pr.add_argument("--normalization", default="mean", choices=NORMALIZATIONS, help="per-group score normalization")
    pr.add_argument("--global", dest="global_pruning", action="store_true",
                    help="rank channels across all groups instead of the same ratio per group")
    pr.add_argument("--round-to", type=int, default=None, metavar="N",
                    help="kept channel counts are multiples of N (default 1; 16 for latency targets)")
    pr.add_argument("--protect", nargs="+", default=[], metavar="NAME",
                    help="node or parameter names (globs) whose groups are never pruned")
    pr.add_argument("--kinds", metavar="K1,K2", type=lambda v: [k.strip() for k in v.split(",") if k.strip()],
                    help="prune only groups of these kinds: heads, channels, hidden (default: all)")
    pr.add_argument("--gqa", choices=("kv", "q", "both"), default="kv",
                    help="GQA attention: remove whole K/V groups (kv), query heads within every K/V group "
                         "(q), or both (default: kv)")
    pr.add_argument("--plan-out", metavar="FILE", help="write the plan as JSON (for spa apply)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the random criterion")
    pr.add_argument("--no-verify", action="store_true",
                    help="skip the onnxruntime runs and the equivalence check (the checker still runs)")
    eqv = pr.add_mutually_exclusive_group()
    eqv.add_argument("--no-check-equivalence", dest="check_equivalence", action="store_false", default=None,
                     help="skip comparing the pruned model with the masked dense model (one run still checks shapes)")
    eqv.add_argument("--check-equivalence", dest="check_equivalence", action="store_true",
                     help="run the equivalence check even above the size limit (1 GiB of weights)")
    pr.add_argument("--allow-noop", action="store_true",
                    help="write the model even when the prune removes (almost) nothing (else: exit 1, saying why)")
    pr.add_argument("--no-folder", dest="folder", action="store_false",
                    help="write the model alone: without it, when the input has a genai_config.json or config.json "
                         "beside it, the output's folder gets them with the pruned sizes and the tokenizer files")
    pr.add_argument("--report", metavar="FILE", help="write the prune summary (equivalence, fidelity) as JSON")
    pr.add_argument("--target-opset", type=int, metavar="N",
                    help="write the pruned model at default-domain opset N (onnx.version_converter); "
                         "default: the input's opset and IR version")
    _add_shape_arg(pr)
    _add_device_args(pr)

    ap = sub.add_parser("apply", help="apply a JSON plan to a model")
    ap.add_argument("model")
    ap.add_argument("plan")
    ap.add_argument("-o", "--output", required=True)
    _add_shape_arg(ap)
    _add_device_args(ap)

    be = sub.add_parser("bench", help="params, MACs and median onnxruntime latency, side by side")
    be.add_argument("model")
    be.add_argument("other", nargs="?")
    be.add_argument("--runs", type=int, default=30)
    be.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    _add_shape_arg(be)
    _add_device_args(be)

    se = sub.add_parser("sensitivity", help="output fidelity of every group and layer pruned alone, ranked, "
                                             "with the parameters, MACs (and time) each saves")
    se.add_argument("model")
    se.add_argument("--ratios", default="0.1,0.3,0.5", metavar="R1,R2,..",
                    help="shares of each group's channels removed, each in (0, 1) (default: 0.1,0.3,0.5)")
    se.add_argument("--criterion", default="l1", metavar="NAME",
                    help=f"which channels go first: {', '.join(n for n in criterion_names() if n not in ('taylor', 'snip', 'grasp'))} "
                         "(default: l1; wanda/flap/obspa read --calibration)")
    se.add_argument("--reduction", default="mean", choices=REDUCTIONS, help="how member scores combine")
    se.add_argument("--normalization", default="mean", choices=NORMALIZATIONS, help="per-group score normalization")
    se.add_argument("--calibration", default=None, metavar="gaussian|zipf|lm-sample|model|DIR",
                    help="inputs the fidelity is measured on (as for prune; default: gaussian)")
    se.add_argument("--calibration-batches", type=int, default=2, metavar="N",
                    help="batches the fidelity is measured on (default 2)")
    se.add_argument("--seed", type=int, default=0, help="seed of the data-free inputs and the random criterion")
    se.add_argument("--json", metavar="FILE", help="write the full report as JSON (schema spa.sensitivity/1)")
    se.add_argument("--plot", metavar="FILE.png", help='write a PNG plot (needs matplotlib: pip install "spa-prune[plot]")')
    se.add_argument("--latency", action="store_true",
                    help="also measure the time each saves (onnxruntime, the pruned-alone model against the dense one)")
    se.add_argument("--runs", type=int, default=20, help="timed runs per model with --latency (default 20)")
    se.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads for --latency")
    se.add_argument("--top", type=int, default=None, metavar="N", help="rows shown per table (default: all)")
    se.add_argument("--cache-dir", metavar="DIR",
                    help="where results are cached (default: $SPA_CACHE_DIR, else ~/.cache/spa)")
    se.add_argument("--no-cache", dest="cache", action="store_false", help="neither read nor write the cache")
    _add_shape_arg(se)
    _add_device_args(se)
    se = sub.add_parser("search", help="search the per-layer allocation for a budget (Optuna)")
    se.add_argument("model")
    se.add_argument("--target", required=True, metavar="KIND=VALUE",
                    help="the budget, as for prune: params=0.5 keeps half the dense model's parameters; macs=0.4, "
                         "bytes=40MB, params=3.5M (latency: use --objective latency or both with a counted target)")
    se.add_argument("--trials", type=int, default=50, metavar="N",
                    help="trials of the study (an earlier run's included; default 50)")
    se.add_argument("--objective", choices=("fidelity", "latency", "both"), default="fidelity",
                    help="minimize the relative output error against the dense model (fidelity), the onnxruntime "
                         "latency, or both (a Pareto front); default fidelity")
    se.add_argument("--sampler", choices=("tpe", "cmaes", "nsga2"), default="tpe", help="Optuna sampler (default tpe)")
    se.add_argument("--criterion", default="l1", choices=criterion_names(),
                    help="channel scores (computed once, cached in --out); default l1")
    se.add_argument("--calibration", default=None, metavar="gaussian|zipf|lm-sample|model|DIR",
                    help="inputs for activations and fidelity (as for prune; default gaussian)")
    se.add_argument("--calibration-batches", type=int, default=4, metavar="N", help="batches (default 4)")
    se.add_argument("--out", required=True, metavar="DIR",
                    help="study folder: best_plan.json, pareto.json, pareto.png, study.log (the same command "
                         "again resumes the study)")
    se.add_argument("--storage", metavar="URL", help="an Optuna RDB URL (sqlite:///x.db) instead of DIR/study.log")
    se.add_argument("--study", default="spa-search", metavar="NAME", help="study name (default spa-search)")
    se.add_argument("--workers", default="local:1", metavar="local:N|ray|ray:ADDRESS",
                    help="where trials run: N local processes (1: this process), or Ray (default local:1)")
    se.add_argument("--shard-calibration", action="store_true",
                    help="spread the activations' calibration batches over the --workers too")
    se.add_argument("--seed", type=int, default=0, help="sampler and calibration seed")
    se.add_argument("--protect", nargs="+", default=[], metavar="NAME", help="node or parameter globs kept whole")
    se.add_argument("--round-to", type=int, default=1, metavar="N", help="kept channel counts are multiples of N")
    se.add_argument("--max-depth", type=int, default=None, metavar="K",
                    help="residual units (spa inspect lists them) a trial may remove besides channels, lowest block "
                         "influence first (default: all but one of the removable; 0: width only)")
    _add_shape_arg(se)

    wo = sub.add_parser("worker", help="run trials of a running search study from this process or host")
    wo.add_argument("--storage", required=True, metavar="URL",
                    help="the study's storage: its study.log path or RDB URL")
    wo.add_argument("--study", default="spa-search", metavar="NAME")
    wo.add_argument("--trials", type=int, default=None, metavar="N", help="stop when the study has N trials "
                    "(default: the number it was started with)")
    wo.add_argument("--seed", type=int, default=0)

    de = sub.add_parser("demo", help="build a small ResNet, prune it 50%%, verify it and compare")
    de.add_argument("--ratio", type=float, default=0.5)
    de.add_argument("--out", metavar="DIR", help="keep dense.onnx and pruned.onnx here")
    return p


def _cmd_inspect(args) -> int:
    import spa
    from spa.report import inspect_dict, inspect_text

    prog = Progress(True)
    with prog.step(f"loading {args.model}"):
        model = spa.load(args.model)
    with prog.step("discovering groups"):
        dg = spa.dependency_graph(model)
        _ = dg.groups  # grouping is lazy: time it inside this step
    print(inspect_text(dg, args.all))
    if args.json:
        from spa.io import atomic_write_bytes

        atomic_write_bytes(Path(args.json), json.dumps(inspect_dict(dg), indent=1).encode())
        prog.note(f"wrote {args.json}")
    return 0


def summary_rows(before, after, shapes: dict | None) -> list[list[str]]:
    """The before/after table of a prune: params and MACs of both models, and their ratios."""
    from spa.metrics import count_macs, count_params

    rows = []
    for name, fn in (("params", count_params), ("MACs", lambda m: count_macs(m, shapes))):
        a, b = fn(before), fn(after)  # once per model: MACs run shape inference (and onnxruntime)
        rows.append([name, f"{a:,}", f"{b:,}", f"{b / max(a, 1):.3f}"])
    return rows


def _cmd_prune(args) -> int:
    import spa

    prog = Progress(True)
    if args.target is not None and args.ratio is not None:
        raise ArgumentError(f"--target {args.target} and --ratio {args.ratio:g} are exclusive: a target chooses the "
                            "ratio. Pass one of them (--depth combines with either)")
    if args.ratio is None and args.target is None and not args.depth:
        raise ArgumentError("pass --ratio (width), --target (a budget), --depth (residual units), or --depth with "
                            "one of the others")
    ratio = None if args.target is not None else (args.ratio or 0.0)
    result = spa.prune(
        args.model, ratio, target=args.target, threads=args.threads, depth=args.depth, depth_unit=args.depth_unit,
        depth_score=args.depth_score,
        criterion=args.criterion, reduction=args.reduction,
        normalization=args.normalization, global_pruning=args.global_pruning, round_to=args.round_to,
        protect=args.protect, kinds=args.kinds, gqa=args.gqa, seed=args.seed, calibration=args.calibration,
        calibration_batches=args.calibration_batches, allocation=args.allocation, output=args.output, plan_out=args.plan_out,
        input_shapes=_input_shapes(args.input_shape), progress=prog, verify=True, run=not args.no_verify,
        check_equivalence=args.check_equivalence, report=args.report, device=args.device, provider=args.provider,
        target_opset=args.target_opset, allow_noop=args.allow_noop, folder=args.folder, workers=args.workers,
    )
    pruned = len(result.plan.pruned_groups)
    removed = sum(g.removed for g in result.plan.groups)
    total = sum(g.size for g in result.plan.groups)
    print(f"pruned {removed}/{total} channels in {pruned} groups -> {args.output}")
    from spa.report import table

    rows = summary_rows(result.dense, result.model, _input_shapes(args.input_shape))
    print(table(["", "before", "after", "ratio"], rows, "lrrr"))
    if result.target is not None:
        print(result.target.summary())
    form = result.form()
    print(f"form: opset {form['opset']['in']} -> {form['opset']['out']}, "
          f"IR version {form['ir_version']['in']} -> {form['ir_version']['out']}")
    print(f"ran on: {result.device}")
    for f in result.folder:
        print(f.line(Path(args.output).parent))
    from spa.report import signature_lines

    changes = result.signature_changes()
    if changes:
        print(f"changed graph inputs/outputs: {len(changes)}")
        print("\n".join(signature_lines(changes)))
    if result.equivalence is not None and not result.equivalence.skipped:
        print(f"check: {result.equivalence.summary()} (on {result.device})")
    for note in result.notes:
        if note != result.noop:
            print(f"note: {note}")
    if result.noop:  # the last line says why nothing much went
        print(f"note: {result.noop}")
    return 0


def _cmd_apply(args) -> int:
    import spa

    prog = Progress(True)
    plan = spa.Plan.from_json(args.plan)
    with prog.step(f"loading {args.model}"):
        model = spa.load(args.model)
    if Path(args.output).resolve() == Path(args.model).resolve():
        raise ArgumentError("the output path is the input model; SPA never overwrites its input")
    out = spa.apply_plan(model, plan, input_shapes=_input_shapes(args.input_shape), progress=prog,
                         device=args.device, provider=args.provider)
    spa.save(out, args.output)
    print(f"applied {len(plan.pruned_groups)} pruned groups -> {args.output}")
    return 0


def bench_rows(paths: list, runs: int = 30, threads: int | None = None, input_shapes=None) -> list[list]:
    """Params, MACs and median latency of each model, with ratios to the first."""
    import spa
    from spa import runtime
    from spa.metrics import count_macs, count_params

    from spa.errors import UnsupportedModelError

    stats = []
    feeds = None
    for path in paths:
        model = spa.load(path)
        try:
            sess = runtime.session(model, threads=threads)
            if feeds is None or set(feeds) != {i.name for i in sess.get_inputs()}:
                feeds = runtime.random_feeds(sess, input_shapes)
            latency = runtime.latency_ms(sess, feeds, runs=runs)
        except runtime.ort_errors() as exc:
            raise UnsupportedModelError(f"onnxruntime cannot run {path} on {runtime.current_device().name}: "
                                        f"{str(exc).strip()[:400]}") from exc
        stats.append((count_params(model), count_macs(model, input_shapes), latency))
    rows = [["params", *[f"{s[0]:,}" for s in stats]], ["MACs", *[f"{s[1]:,}" for s in stats]],
            ["latency (ms, median)", *[f"{s[2]:.3f}" for s in stats]]]
    if len(stats) == 2:
        for row, i in zip(rows, range(3)):
            row.append(f"{stats[1][i] / stats[0][i]:.3f}" if stats[0][i] else "-")
    return rows


def _cmd_bench(args) -> int:
    paths = [args.model] + ([args.other] if args.other else [])
    from spa.report import table

    from spa import runtime

    with runtime.use_device(args.device, args.provider) as dev:
        rows = bench_rows(paths, args.runs, args.threads, _input_shapes(args.input_shape))
    headers = ["metric", Path(args.model).name] + ([Path(args.other).name, "ratio"] if args.other else [])
    print(table(headers, rows, "l" + "r" * (len(headers) - 1)))
    print(f"device: {dev.name}" + (f" ({dev.note})" if dev.note else ""))
    return 0


def _cmd_sensitivity(args) -> int:
    import spa

    prog = Progress(True)
    if args.plot:  # before the measurement: a missing matplotlib should not cost the run
        from spa.sensitivity_report import _pyplot

        _pyplot()
    result = spa.sensitivity(args.model, ratios=args.ratios, criterion=args.criterion, reduction=args.reduction,
                             normalization=args.normalization, calibration=args.calibration,
                             calibration_batches=args.calibration_batches, input_shapes=_input_shapes(args.input_shape),
                             seed=args.seed, latency=args.latency, latency_runs=args.runs, threads=args.threads,
                             cache=args.cache, cache_dir=args.cache_dir, progress=prog, device=args.device,
                             provider=args.provider)
    if result.cached:
        print(f"reused cached results from {result.cache_path} (measured in {result.seconds:.1f}s; --no-cache "
              "measures again)")
    print(f"ranked least sensitive first (relative output error at ratio {result.ratios[-1]:g}); "
          f"{len(result.groups)} groups, {len(result.layers)} layers, each pruned alone")
    print(result.table("group", args.top))
    if result.layers:
        print()
        print(result.table("layer", args.top))
    if result.latency_method:
        print(f"time saved: {result.latency_method} (median onnxruntime latency of the dense model minus the "
              f"pruned-alone model's, timed in alternation; dense {result.model['latency_ms']:.3f} ms)")
    for note in result.notes:
        print(f"note: {note}")
    if args.json:
        result.to_json(args.json)
        prog.note(f"wrote {args.json}")
    if args.plot:
        result.plot(args.plot)
        prog.note(f"wrote {args.plot}")
    return 0


def _cmd_search(args) -> int:
    import spa.search as search

    prog = Progress(True)
    try:
        result = search.search(
            args.model, args.target, args.trials, out=args.out, objective=args.objective, sampler=args.sampler,
            criterion=args.criterion, calibration=args.calibration, calibration_batches=args.calibration_batches,
            storage=args.storage, study=args.study, workers=args.workers, seed=args.seed, protect=args.protect,
            round_to=args.round_to, input_shapes=_input_shapes(args.input_shape),
            shard_calibration=args.shard_calibration, max_depth=args.max_depth, progress=prog)
    except KeyboardInterrupt:
        print(f"spa: interrupted; the study is kept in {args.storage or Path(args.out) / 'study.log'}: the same "
              "command resumes it", file=sys.stderr)
        return 130
    print("\n".join(result.summary()))
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {Path(args.out) / 'best_plan.json'} (spa apply MODEL {Path(args.out) / 'best_plan.json'} -o OUT), "
          "pareto.json, pareto.png")
    return 0


def _cmd_worker(args) -> int:
    import spa.search as search

    try:
        n = search.join(args.storage, args.study, args.trials, args.seed, progress=Progress(True))
    except KeyboardInterrupt:
        print("spa: interrupted; the trials this worker ran are in the study", file=sys.stderr)
        return 130
    print(f"ran {n} trials of study '{args.study}'")
    return 0


def _cmd_demo(args) -> int:
    import spa
    from spa import zoo
    from spa.report import table

    prog = Progress(True)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.out) if args.out else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        dense = out_dir / "dense.onnx"
        pruned = out_dir / "pruned.onnx"
        with prog.step("building a ResNet-style model (64x64 input, 10 classes)"):
            from spa.io import atomic_write_bytes

            atomic_write_bytes(dense, zoo.small_resnet().SerializeToString())
        result = spa.prune(dense, args.ratio, criterion="l1", output=pruned, progress=prog)
        print(f"\n{len(result.graph.groups)} groups found; {len(result.plan.pruned_groups)} pruned at ratio {args.ratio}; "
              f"verified: checker={result.verify_report.checker}, onnxruntime run={result.verify_report.ran}; "
              f"{result.equivalence.summary() if result.equivalence is not None else ''}\n")
        with prog.step("benchmarking both models"):
            rows = bench_rows([dense, pruned], runs=50)
        print(table(["metric", "dense", "pruned", "ratio"], rows, "lrrr"))
        if args.out:
            print(f"\nmodels kept in {out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="[spa] %(message)s")
    handler = {"inspect": _cmd_inspect, "prune": _cmd_prune, "apply": _cmd_apply, "bench": _cmd_bench,
               "sensitivity": _cmd_sensitivity, "demo": _cmd_demo, "search": _cmd_search,
               "worker": _cmd_worker}[args.command]
    try:
        from spa.io import refuse_overwriting_inputs

        refuse_overwriting_inputs(
            [(flag, getattr(args, attr)) for flag, attr in (("-o", "output"), ("--json", "json"),
                                                            ("--plan-out", "plan_out"), ("--report", "report"),
                                                            ("--plot", "plot"))
             if getattr(args, attr, None)],
            [(what, getattr(args, attr)) for what, attr in (("the input model", "model"), ("the plan", "plan"),
                                                            ("the other model", "other"))
             if getattr(args, attr, None)],
            model=getattr(args, "model", None))
        return handler(args)
    except SpaError as exc:
        print(f"spa: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("spa: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MemoryError as exc:
        detail = f" ({exc})" if str(exc) else ""
        print(f"spa: error: out of memory{detail}; nothing was written. Use smaller --input-shape values or a "
              "machine with more memory", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: the last-resort safety net, never the path a user error takes
        if args.verbose:
            import traceback

            traceback.print_exc()
        msg = " ".join(str(exc).split())
        msg = msg if len(msg) <= 500 else msg[:497] + "..."
        print(f"spa: internal error: {type(exc).__name__}: {msg} — please report this with the model "
              "(rerun with -v for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

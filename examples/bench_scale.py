"""Scale benchmark: a LLaMA-shaped decoder built directly as ONNX (weights streamed to an
external data file layer by layer), then timed against same-run baselines.

    python examples/bench_scale.py [--shape small|1.1b|7b] [--dtype float32|float16] [--obspa [--batches N]]
        [--run] [--keep]

Shapes: ``1.1b`` = TinyLlama (hidden 2048, 22 layers, 32 query / 4 K/V heads, SwiGLU 5632,
vocab 32000); ``7b`` = LLaMA-2-7B (4096, 32 layers, 32 heads, 11008); ``small`` for a quick
look. The graph is what a torch export of such a model holds: an embedding Gather, RMSNorm
as Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul, attention with MatMul/Softmax and the K/V repeat
as Unsqueeze/Expand/Reshape, a SwiGLU MLP, an LM head. Input shape is static (batch 1,
``--seq`` tokens).

Measured, each in its own process (wall time; peak RSS from /usr/bin/time -v):
``cat`` of the files, an ``onnx.load`` + ``onnx.save`` (external data) round trip,
``spa inspect``, ``spa prune --ratio 0.3 --criterion l1``, optionally ``--criterion obspa``
(data-free, ``--batches`` calibration batches of the model's ``--seq`` tokens) and
``spa.prune`` from Python (``--api``: the same prune without the CLI's before/after table),
and an onnxruntime session over the pruned file (``--run``: one run, too). It checks the free
disk first and removes everything it wrote unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

SHAPES = {  # hidden, layers, heads, kv_heads, ffn, vocab
    "small": (256, 2, 8, 2, 688, 1000),
    "1.1b": (2048, 22, 32, 4, 5632, 32000),
    "7b": (4096, 32, 32, 32, 11008, 32000),
}
REPO = Path(__file__).resolve().parents[1]


class Weights:
    """Tensors appended one at a time to one external data file."""

    def __init__(self, path: Path, dtype, seed: int = 0):
        self.path, self.dtype = path, np.dtype(dtype)
        self.file = open(path, "wb")
        self.offset = 0
        self.rng = np.random.default_rng(seed)
        self.inits: list[TensorProto] = []

    def add(self, name: str, shape, scale: float | None = None, fill: float | None = None) -> str:
        if fill is not None:
            arr = np.full(shape, fill, self.dtype)
        else:
            arr = self.rng.standard_normal(shape, dtype=np.float32)
            arr *= scale if scale is not None else 1.0 / np.sqrt(shape[0])
            arr = arr.astype(self.dtype, copy=False)
        self.file.write(arr.tobytes())
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(self.dtype), dims=list(shape),
                        data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(arr.nbytes))):
            t.external_data.add(key=k, value=v)
        self.offset += arr.nbytes
        self.inits.append(t)
        return name

    def close(self) -> None:
        self.file.close()


def build(folder: Path, shape: str, dtype: str, seq: int) -> Path:
    """Write ``folder/model.onnx`` + ``model.onnx.data``; memory: one layer's weights."""
    hidden, layers, heads, kv, ffn, vocab = SHAPES[shape]
    hd = hidden // heads
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = Weights(folder / "model.onnx.data", dtype)
    nodes: list = []
    consts: list = []
    count = [0]

    def node(op, inputs, **attrs) -> str:
        count[0] += 1
        out = f"{op.lower()}_{count[0]}"
        nodes.append(helper.make_node(op, inputs, [out], name=f"/{op}_{count[0]}", **attrs))
        return out

    def const(name, values, dt=np.int64) -> str:
        consts.append(onnx.numpy_helper.from_array(np.asarray(values, dtype=dt), name))
        return name

    const("axes_last", [-1])
    const("two", np.array(2.0, dtype), np.dtype(dtype))
    const("one", np.array(1.0, dtype), np.dtype(dtype))
    const("eps", np.array(1e-5, dtype), np.dtype(dtype))
    const("scale", np.array(1.0 / np.sqrt(hd), dtype), np.dtype(dtype))
    const("axis2", [2])
    mask = np.triu(np.full((seq, seq), -1e4 if dtype == "float16" else -1e9, np.float32), 1)[None, None]
    const("causal", mask.astype(dtype), np.dtype(dtype))

    def rmsnorm(x, name):
        sq = node("Pow", [x, "two"])
        mean = node("ReduceMean", [sq, "axes_last"], keepdims=1)
        rstd = node("Reciprocal", [node("Sqrt", [node("Add", [mean, "eps"])])])
        return node("Mul", [w.add(name, [hidden], fill=1.0), node("Mul", [x, rstd])])

    h = node("Gather", [w.add("model.embed_tokens.weight", [vocab, hidden], scale=0.02), "input_ids"], axis=0)
    for i in range(layers):
        p = f"model.layers.{i}"
        n = rmsnorm(h, f"{p}.input_layernorm.weight")
        q = node("MatMul", [n, w.add(f"{p}.self_attn.q_proj.weight", [hidden, heads * hd])])
        k = node("MatMul", [n, w.add(f"{p}.self_attn.k_proj.weight", [hidden, kv * hd])])
        v = node("MatMul", [n, w.add(f"{p}.self_attn.v_proj.weight", [hidden, kv * hd])])
        q = node("Transpose", [node("Reshape", [q, const(f"{p}.q_shape", [1, seq, heads, hd])])], perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [k, const(f"{p}.k_shape", [1, seq, kv, hd])])], perm=[0, 2, 1, 3])
        v = node("Transpose", [node("Reshape", [v, const(f"{p}.v_shape", [1, seq, kv, hd])])], perm=[0, 2, 1, 3])
        if kv != heads:  # repeat_kv: [1, kv, S, hd] -> [1, kv, rep, S, hd] -> [1, heads, S, hd]
            rep = [1, kv, heads // kv, seq, hd]
            k = node("Reshape", [node("Expand", [node("Unsqueeze", [k, "axis2"]), const(f"{p}.k_rep", rep)]),
                                 const(f"{p}.k_heads", [1, heads, seq, hd])])
            v = node("Reshape", [node("Expand", [node("Unsqueeze", [v, "axis2"]), const(f"{p}.v_rep", rep)]),
                                 const(f"{p}.v_heads", [1, heads, seq, hd])])
        scores = node("Add", [node("Mul", [node("MatMul", [q, node("Transpose", [k], perm=[0, 1, 3, 2])]), "scale"]),
                              "causal"])
        ctx = node("MatMul", [node("Softmax", [scores], axis=-1), v])
        ctx = node("Reshape", [node("Transpose", [ctx], perm=[0, 2, 1, 3]), const(f"{p}.o_shape", [1, seq, hidden])])
        h = node("Add", [h, node("MatMul", [ctx, w.add(f"{p}.self_attn.o_proj.weight", [heads * hd, hidden])])])
        n = rmsnorm(h, f"{p}.post_attention_layernorm.weight")
        gate = node("MatMul", [n, w.add(f"{p}.mlp.gate_proj.weight", [hidden, ffn])])
        up = node("MatMul", [n, w.add(f"{p}.mlp.up_proj.weight", [hidden, ffn])])
        act = node("Mul", [node("Mul", [gate, node("Sigmoid", [gate])]), up])
        h = node("Add", [h, node("MatMul", [act, w.add(f"{p}.mlp.down_proj.weight", [ffn, hidden])])])
    n = rmsnorm(h, "model.norm.weight")
    nodes.append(helper.make_node("MatMul", [n, w.add("lm_head.weight", [hidden, vocab])], ["logits"], name="/lm_head"))
    w.close()
    graph = helper.make_graph(nodes, f"llama_{shape}",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, seq])],
                              [helper.make_tensor_value_info("logits", elem, [1, seq, vocab])], consts + w.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


def measure(cmd: list[str], env=None, log: Path | None = None) -> dict:
    """Wall seconds and peak RSS (GiB) of ``cmd``; its last output lines. With ``log``, its
    output also goes to that file as it runs (what a step cut short had done)."""
    t0 = time.perf_counter()
    if log is None:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    else:
        with open(log, "w") as f:
            proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, text=True,
                                  env=env)
        proc.stdout, proc.stderr = log.read_text(), ""
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stdout + proc.stderr)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "\t" not in ln[:1]]
    return {"rc": proc.returncode, "s": round(wall, 2), "rss_gib": round(int(rss.group(1)) / 2**20, 2) if rss else None,
            "tail": lines[-12:]}


ROUND_TRIP = """import onnx, sys
m = onnx.load(sys.argv[1])
onnx.save(m, sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True, location="rt.onnx.data")
"""
API_PRUNE = """import sys, spa
r = spa.prune(sys.argv[1], ratio=float(sys.argv[3]), criterion="l1", output=sys.argv[2])
print(*r.notes, sep="\\n")
"""
SESSION = """import sys, time, numpy as np, onnxruntime as ort
t = time.perf_counter(); s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
print(f"session {time.perf_counter() - t:.1f}s")
if sys.argv[2] == "1":
    seq = s.get_inputs()[0].shape[1]
    t = time.perf_counter(); y = s.run(None, {"input_ids": np.arange(seq, dtype=np.int64)[None] % 1000})[0]
    print(f"run {time.perf_counter() - t:.1f}s logits {y.shape} finite {bool(np.isfinite(y).all())}")
"""


def _exit_on_term(signum, frame) -> None:
    raise SystemExit(128 + signum)  # a terminated run (a timeout) still removes what it wrote


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_term)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="small")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    ap.add_argument("--seq", type=int, default=16, help="tokens of the static input")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--obspa", action="store_true", help="also time --criterion obspa (data-free)")
    ap.add_argument("--batches", type=int, default=8, help="--obspa: calibration batches")
    ap.add_argument("--api", action="store_true", help="also time spa.prune from Python (no before/after table)")
    ap.add_argument("--run", action="store_true", help="run the pruned model once in onnxruntime")
    ap.add_argument("--no-round-trip", action="store_true", help="skip the onnx load+save baseline")
    ap.add_argument("--dir", default=None, help="work folder (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the models")
    ap.add_argument("--json", default=None, help="write the figures as JSON")
    ap.add_argument("--logs", default=None, help="folder for each step's output, written as it runs")
    args = ap.parse_args()

    hidden, layers, heads, kv, ffn, vocab = SHAPES[args.shape]
    params = 2 * vocab * hidden + layers * (2 * hidden * heads * (hidden // heads) + 2 * hidden * kv * (hidden // heads)
                                            + 3 * hidden * ffn + 2 * hidden) + hidden
    weight_bytes = params * np.dtype(args.dtype).itemsize
    work = Path(args.dir or tempfile.mkdtemp(prefix="spa-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    need = weight_bytes * (2.0 if args.no_round_trip else 3.0) + (1 << 30)
    free = shutil.disk_usage(work).free
    if free < need:
        sys.exit(f"{work}: {free / 2**30:.1f} GiB free, needs about {need / 2**30:.1f} GiB "
                 "(model, pruned output, round-trip copy); use --dir or --no-round-trip")
    src, out = work / "src", work / "out"
    src.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    figures: dict = {"shape": args.shape, "dtype": args.dtype, "params": params, "weight_gib": round(weight_bytes / 2**30, 2)}
    try:
        t0 = time.perf_counter()
        model = build(src, args.shape, args.dtype, args.seq)
        figures["build_s"] = round(time.perf_counter() - t0, 1)
        print(f"built {model} ({figures['weight_gib']} GiB of {args.dtype} weights) in {figures['build_s']}s",
              flush=True)
        spa = [sys.executable, "-m", "spa.cli"]
        steps = [("cat", ["sh", "-c", f"cat '{model}' '{model}.data' > /dev/null"])]
        if not args.no_round_trip:
            steps.append(("onnx_round_trip", [sys.executable, "-c", ROUND_TRIP, str(model), str(out / "rt.onnx")]))
        steps += [("spa_inspect", [*spa, "inspect", str(model)]),
                  ("spa_prune_l1", [*spa, "prune", str(model), "-o", str(out / "pruned.onnx"), "--ratio",
                                    str(args.ratio), "--criterion", "l1"])]
        if args.api:
            steps.append(("spa_prune_api", [sys.executable, "-c", API_PRUNE, str(model), str(out / "pruned_api.onnx"),
                                            str(args.ratio)]))
        if args.obspa:
            steps.append(("spa_prune_obspa", [*spa, "prune", str(model), "-o", str(out / "pruned_obspa.onnx"),
                                              "--ratio", str(args.ratio), "--criterion", "obspa",
                                              "--calibration-batches", str(args.batches)]))
        steps.append(("ort_session_pruned", [sys.executable, "-c", SESSION, str(out / "pruned.onnx"),
                                             "1" if args.run else "0"]))
        for name, cmd in steps:
            if name.startswith("spa_prune") and (out / "rt.onnx").exists():  # free the round trip's disk
                (out / "rt.onnx").unlink()
                (out / "rt.onnx.data").unlink(missing_ok=True)
            logs = Path(args.logs) if args.logs else None
            if logs is not None:
                logs.mkdir(parents=True, exist_ok=True)
            r = measure(cmd, env, None if logs is None else logs / f"{name}.log")
            figures[name] = {k: r[k] for k in ("rc", "s", "rss_gib")}
            print(f"{name:20s} rc={r['rc']} {r['s']:8.2f} s  peak RSS {r['rss_gib']} GiB", flush=True)
            if r["rc"] != 0 or name.startswith("spa_prune") or name == "ort_session_pruned":
                print("    " + "\n    ".join(r["tail"]), flush=True)
        if "onnx_round_trip" in figures and figures["spa_prune_l1"]["rc"] == 0:
            figures["prune_over_round_trip"] = round(figures["spa_prune_l1"]["s"] / figures["onnx_round_trip"]["s"], 2)
        if figures["spa_prune_l1"]["rss_gib"]:
            figures["prune_rss_over_weights"] = round(figures["spa_prune_l1"]["rss_gib"] * 2**30 / weight_bytes, 2)
        obs = figures.get("spa_prune_obspa")
        if obs and obs["rc"] == 0 and obs["rss_gib"]:
            figures["obspa_rss_over_weights"] = round(obs["rss_gib"] * 2**30 / weight_bytes, 2)
            figures["obspa_over_l1_time"] = round(obs["s"] / figures["spa_prune_l1"]["s"], 2)
        print(json.dumps(figures, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Deploying pruned LLMs with onnxruntime-genai: prefill and decode speed, KV-cache size.

A LLaMA-shaped causal LM (random init, nothing downloaded) goes through onnxruntime-genai's
model builder (fp32, CPU); SPA prunes the builder's output into deployable folders (FFN
channels, KV heads, depth) and onnxruntime-genai runs each folder:

* prefill tokens/s: one prompt of ``--prompt`` tokens,
* decode tokens/s: ``--new`` greedy tokens after it,
* KV-cache bytes per token: 2 x layers x kv_heads x head_size x 4 (from the folder's
  genai_config.json) and measured from the ``present.*`` outputs of one onnxruntime run.

Dense and pruned models alternate within each of ``--rounds`` rounds; the table shows medians
and ratios to the dense model measured in the same run. A variant SPA refuses (e.g. heads
without KV-cache state support) is listed with the reason.

    python examples/bench_llm_deploy.py                    # hidden 1024, 8 layers, 16/4 heads, FFN 2816, vocab 32000
    python examples/bench_llm_deploy.py --small --rounds 2 # a quick look (hidden 256, 4 layers)
    python examples/bench_llm_deploy.py --doc docs/llm_deploy.md

Needs about 6 GB of free disk in ``--workdir`` (default: a temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FULL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=512)
SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512)
#: name -> spa.prune keyword arguments
VARIANTS = {
    "ffn 25%": dict(ratio=0.25, kinds=["channels"]),
    "ffn 50%": dict(ratio=0.5, kinds=["channels"]),
    "kv heads 25%": dict(ratio=0.25, kinds=["heads"], gqa="kv"),
    "kv heads 50%": dict(ratio=0.5, kinds=["heads"], gqa="kv"),
    "depth 25%": dict(ratio=0.0, depth=0.25),
}


def build_dense(work: Path, shape: dict) -> Path:
    import torch
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = work / "hf"
    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(**shape)).eval().save_pretrained(hf)
    vocab = {f"w{i}": i for i in range(3, shape["vocab_size"])}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                              eos_token="</s>").save_pretrained(hf)
    out = work / "dense"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                    "-p", "fp32", "-e", "cpu", "-c", str(work / "cache")], check=True, capture_output=True)
    shutil.rmtree(hf)
    shutil.rmtree(work / "cache", ignore_errors=True)
    return out


def prune(dense: Path, out: Path, kwargs: dict, head_size: int) -> str | None:
    """Prune into ``out``; the reason when SPA refuses."""
    import spa
    from spa.errors import SpaError

    try:
        spa.prune(dense / "model.onnx", output=out / "model.onnx", allow_noop=False,
                  input_shapes={"kv_cache_dim": head_size}, **kwargs)
    except SpaError as exc:
        return " ".join(str(exc).split())[:160]
    return None


def kv_bytes(folder: Path, tokens: int = 16) -> tuple[int, float]:
    """(formula, measured) KV-cache bytes per token of a builder folder."""
    import onnxruntime as ort

    d = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    formula = 2 * d["num_hidden_layers"] * d["num_key_value_heads"] * d["head_size"] * 4
    sess = ort.InferenceSession(str(folder / d["filename"]), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = np.arange(3, 3 + tokens, dtype=np.int64)[None]
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, tokens), dtype=np.int64)
        else:  # an empty past: [batch, kv_heads, 0, head_size]
            feeds[i.name] = np.zeros((1, i.shape[1], 0, d["head_size"]), dtype=np.float32)
    names = [o.name for o in sess.get_outputs() if o.name.startswith("present")]
    presents = sess.run(names, feeds)
    return formula, sum(p.nbytes for p in presents) / tokens


def time_generation(model, prompt: list[int], new: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one greedy generation."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens([prompt])
    t1 = time.perf_counter()
    steps = 0
    while not gen.is_done():
        gen.generate_next_token()
        steps += 1
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), steps / max(t2 - t1, 1e-9)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="hidden 256, 4 layers, vocab 1000 (a quick look)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--workdir", help="where the models are built (default: a temporary folder, removed)")
    ap.add_argument("--doc", help="also write the table as markdown to this file")
    args = ap.parse_args()
    import onnxruntime_genai as og

    shape = SMALL if args.small else FULL
    head_size = shape["hidden_size"] // shape["num_attention_heads"]
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="spa-bench-llm-") as tmp:
        work = Path(tmp)
        free = shutil.disk_usage(work).free
        if free < (1 if args.small else 6) * 2**30:
            print(f"not enough free disk in {work}: {free / 2**30:.1f} GiB", file=sys.stderr)
            return 1
        t = time.perf_counter()
        dense = build_dense(work, shape)
        print(f"built the dense model in {time.perf_counter() - t:.0f} s")
        folders, refused = {"dense": dense}, {}
        for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
            t = time.perf_counter()
            why = prune(dense, work / name.replace(" ", "_").replace("%", ""), VARIANTS[name], head_size)
            if why:
                refused[name] = why
                print(f"{name}: refused: {why}")
            else:
                folders[name] = work / name.replace(" ", "_").replace("%", "")
                print(f"{name}: pruned in {time.perf_counter() - t:.0f} s")
        models = {name: og.Model(str(f)) for name, f in folders.items()}
        rng = np.random.default_rng(0)
        prompt = [1] + rng.integers(3, shape["vocab_size"], args.prompt - 1).tolist()
        for m in models.values():  # warm-up
            time_generation(m, prompt[:16], 4)
        runs = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, m in models.items():  # dense and pruned alternate within each round
                runs[name].append(time_generation(m, prompt, args.new))
        rows = []
        base = None
        for name, folder in folders.items():
            prefill = statistics.median(r[0] for r in runs[name])
            decode = statistics.median(r[1] for r in runs[name])
            formula, measured = kv_bytes(folder)
            d = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
            mb = sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 2**20
            base = base or (prefill, decode, formula, mb)
            rows.append([name, f"{d['num_hidden_layers']}", f"{d['num_key_value_heads']}", f"{mb:.0f}",
                         f"{prefill:.0f} ({prefill / base[0]:.2f}x)", f"{decode:.1f} ({decode / base[1]:.2f}x)",
                         f"{formula:,} / {measured:,.0f} ({formula / base[2]:.2f}x)"])
        headers = ["model", "layers", "kv heads", "MB", "prefill tok/s", "decode tok/s",
                   "KV bytes/token formula / measured"]
        from spa.report import table

        print(table(headers, rows, "lrrrrrr"))
        for name, why in refused.items():
            print(f"refused: {name}: {why}")
        if args.doc:
            md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            md += ["| " + " | ".join(r) + " |" for r in rows]
            md += [f"| {name} | refused: {why} |" + " |" * (len(headers) - 2) for name, why in refused.items()]
            Path(args.doc).write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

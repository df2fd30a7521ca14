"""Small causal LMs exported by the onnxruntime-genai model builder, for tests.

Every builder here writes a Hugging Face folder (random weights, a word-level
tokenizer) and runs ``onnxruntime_genai.models.builder`` on it; the output
folder holds ``model.onnx`` (+ ``model.onnx.data``) and ``genai_config.json``.
Built folders are cached per process (per pytest session) by their settings.

    genai_llama(tmp, precision="fp32", **cfg) -> Path of the output folder
    genai_qwen2(tmp, ...), genai_qwen3(tmp, ...), genai_phi3(tmp, ...)

``cfg`` overrides the small default config (hidden_size=256,
intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
num_key_value_heads=4, vocab_size=1000, max_position_embeddings=256), so
head_dim is 32 and the KV caches are [batch, 4, past, 32].
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, vocab_size=1000,
             max_position_embeddings=256)

_CACHE: dict = {}


def _tokenizer(hf_dir: Path, vocab_size: int) -> None:
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(3, vocab_size)}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                              bos_token="<s>", eos_token="</s>").save_pretrained(hf_dir)


def _build(kind: str, tmp, precision: str, cfg: dict) -> Path:
    key = (kind, precision, tuple(sorted(cfg.items())))
    if key in _CACHE and (_CACHE[key] / "model.onnx").exists():
        return _CACHE[key]
    import torch
    import transformers as T
    settings = {**SMALL, **cfg}
    config_cls, model_cls = {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
        "qwen3": (getattr(T, "Qwen3Config", None), getattr(T, "Qwen3ForCausalLM", None)),
        "phi3": (T.Phi3Config, T.Phi3ForCausalLM),
    }[kind]
    if config_cls is None:
        raise RuntimeError(f"transformers has no {kind} model")
    if kind == "phi3":
        settings.setdefault("original_max_position_embeddings", settings["max_position_embeddings"])
        settings.setdefault("pad_token_id", 0)
        settings.setdefault("bos_token_id", 1)
        settings.setdefault("eos_token_id", 2)
    if kind == "qwen3":
        settings.setdefault("head_dim", settings["hidden_size"] // settings["num_attention_heads"])
    root = Path(tmp) / f"{kind}_{precision}_{len(_CACHE)}"
    hf_dir, out, cache = root / "hf", root / "onnx", root / "cache"
    torch.manual_seed(0)
    model_cls(config_cls(**settings)).eval().save_pretrained(hf_dir)
    _tokenizer(hf_dir, settings["vocab_size"])
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
           "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not (out / "model.onnx").exists():
        raise RuntimeError(f"model builder failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    _CACHE[key] = out
    return out


def genai_llama(tmp, precision: str = "fp32", **cfg) -> Path:
    """Llama decoder (GQA, RMSNorm, SwiGLU) built by the genai builder."""
    return _build("llama", tmp, precision, cfg)


def genai_qwen2(tmp, precision: str = "fp32", **cfg) -> Path:
    """Qwen2 decoder (q/k/v biases) built by the genai builder."""
    return _build("qwen2", tmp, precision, cfg)


def genai_qwen3(tmp, precision: str = "fp32", **cfg) -> Path:
    """Qwen3 decoder (q/k norms) built by the genai builder."""
    return _build("qwen3", tmp, precision, cfg)


def genai_phi3(tmp, precision: str = "fp32", **cfg) -> Path:
    """Phi-3 decoder (fused qkv and gate_up projections) built by the genai builder."""
    return _build("phi3", tmp, precision, cfg)

"""Prune a small causal LM 30% data-free, generate before and after, save it with
``save_pretrained`` and load it back (no download: the model is built from a config).

    python examples/hf_prune_llm.py [--global]

Where every layer keeps the same sizes and the config accepts them, ``AutoModelForCausalLM.
from_pretrained`` reloads the model; otherwise (``--global`` prunes each layer to its own sizes,
or a hidden size that is no longer a multiple of the head count) ``spa.from_pretrained`` does.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import spa


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--global", dest="global_pruning", action="store_true", help="layer sizes may differ")
    args.add_argument("--kinds", default=None, help="comma-separated group kinds to prune (heads,channels,hidden)")
    args = args.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 16))
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}  # as a tokenizer returns them
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)  # generate() with its KV cache
    with torch.no_grad():
        before = model.generate(prompt, **greedy)

    start = time.perf_counter()
    result = spa.prune(model, inputs, ratio=0.3, round_to=8, global_pruning=args.global_pruning,
                         kinds=args.kinds.split(",") if args.kinds else None)
    pruned = result.module
    print(f"pruned in {time.perf_counter() - start:.1f} s: {parameters(model):,} -> {parameters(pruned):,} "
          f"parameters; FFN sizes per layer {[m.mlp.up_proj.out_features for m in pruned.model.layers]}, "
          f"hidden {pruned.model.embed_tokens.embedding_dim}")
    with torch.no_grad():
        after = pruned.generate(prompt, **greedy)
    print(f"generated before: {before[0, 16:].tolist()}")
    print(f"generated after:  {after[0, 16:].tolist()}  (random weights: tokens may change)")

    with tempfile.TemporaryDirectory() as directory:
        pruned.save_pretrained(directory)
        if not pruned.config.spa_pruned_sizes["from_config"]:  # sizes the config cannot hold (they differ
            reloaded = spa.from_pretrained(directory)  # per layer, or hidden_size is no multiple of the heads)
            how = "spa.from_pretrained (the config alone cannot describe the pruned sizes)"
        else:
            reloaded = AutoModelForCausalLM.from_pretrained(directory).eval()
            how = "AutoModelForCausalLM.from_pretrained"
        with torch.no_grad():
            diff = (reloaded(prompt).logits - pruned(prompt).logits).abs().max().item()
            again = reloaded.generate(prompt, **greedy)
    print(f"reloaded with {how}: {parameters(reloaded):,} parameters, max |logits difference| {diff:.3g}, "
          f"same generated tokens: {torch.equal(again, after)}")
    if diff > 0 or not torch.equal(again, after):
        raise SystemExit("the reloaded model differs from the pruned one")


if __name__ == "__main__":
    main()

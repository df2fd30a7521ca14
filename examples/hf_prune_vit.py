"""Prune a small ViT image classifier 30% data-free, save it with ``save_pretrained`` and load it
back with ``spa.from_pretrained`` (no download: the model is built from a config).

    python examples/hf_prune_vit.py

ViT's config has no ``head_dim``: heads or hidden size pruned, ``ViTConfig`` cannot describe
the model, so the sizes SPA stores in the saved config rebuild it.
"""

from __future__ import annotations

import tempfile
import time

import torch
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

import spa


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    torch.manual_seed(0)
    config = ViTConfig(image_size=64, patch_size=8, num_channels=3, hidden_size=128, num_hidden_layers=4,
                       num_attention_heads=8, intermediate_size=384, num_labels=10)
    model = ViTForImageClassification(config).eval()
    pixels = torch.randn(2, 3, 64, 64)

    start = time.perf_counter()
    result = spa.prune(model, {"pixel_values": pixels}, ratio=0.3)  # keyword inputs, as an image processor gives
    pruned = result.module
    print(f"pruned in {time.perf_counter() - start:.1f} s: {parameters(model):,} -> {parameters(pruned):,} "
          f"parameters; fidelity {result.fidelity}")

    with tempfile.TemporaryDirectory() as directory:
        pruned.save_pretrained(directory)
        reloaded = spa.from_pretrained(directory, auto_class=AutoModelForImageClassification)
        with torch.no_grad():
            want, got = pruned(pixels).logits, reloaded(pixels).logits
    diff = (want - got).abs().max().item()
    print(f"reloaded {type(reloaded).__name__}: {parameters(reloaded):,} parameters, "
          f"max |logits difference| {diff:.3g}, same top-1: {torch.equal(want.argmax(-1), got.argmax(-1))}")
    if diff > 0:
        raise SystemExit("the reloaded model differs from the pruned one")


if __name__ == "__main__":
    main()

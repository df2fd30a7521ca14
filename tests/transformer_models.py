"""Small transformers built with `transformers` from config objects (random init, nothing
downloaded) and exported to ONNX, plus an attention written with einsum."""

from __future__ import annotations

import io
import warnings

import onnx
import torch
from torch import nn


class Logits(nn.Module):
    """Returns only the logits (a plain tensor output) of a `transformers` model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def _cfg(cfg, attn):
    cfg._attn_implementation = attn
    return cfg


def bert(attn="sdpa"):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(_cfg(cfg, attn)), torch.randint(0, 97, (2, 12))


def llama(attn="sdpa", layers=2):
    """GQA: 8 query heads share 2 K/V heads; SwiGLU FFN; RMSNorm; rotary embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=80, max_position_embeddings=64, use_cache=False)
    return LlamaForCausalLM(_cfg(cfg, attn)), torch.randint(0, 97, (2, 12))


def qwen3(attn="sdpa"):
    """Per-head q/k RMSNorm over head_dim; 8 query heads over 4 K/V heads."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=16, intermediate_size=80, max_position_embeddings=64,
                      use_cache=False)
    return Qwen3ForCausalLM(_cfg(cfg, attn)), torch.randint(0, 97, (2, 12))


def gpt2(attn="sdpa"):
    """Fused QKV projection split on the channel axis; LM head tied to the embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False)
    return GPT2LMHeadModel(_cfg(cfg, attn)), torch.randint(0, 97, (2, 12))


def vit(attn="sdpa"):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=96, num_labels=5)
    return ViTForImageClassification(_cfg(cfg, attn)), torch.randn(2, 3, 32, 32)


class EinsumAttention(nn.Module):
    """Multi-head attention and an MLP written with einsum on 3-D weights (heads explicit)."""

    def __init__(self, d=32, heads=4, ffn=48):
        super().__init__()
        e = d // heads
        self.wq, self.wk, self.wv = (nn.Parameter(torch.randn(d, heads, e) * 0.2) for _ in range(3))
        self.wo = nn.Parameter(torch.randn(heads, e, d) * 0.2)
        self.up = nn.Parameter(torch.randn(d, ffn) * 0.2)
        self.down = nn.Parameter(torch.randn(ffn, d) * 0.2)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = (torch.einsum("bsd,dhe->bhse", h, w) for w in (self.wq, self.wk, self.wv))
        a = torch.softmax(torch.einsum("bhqe,bhke->bhqk", q, k) / 3.0, -1)
        x = x + torch.einsum("bhqe,hed->bqd", torch.einsum("bhqk,bhke->bhqe", a, v), self.wo)
        x = x + torch.einsum("bsf,fd->bsd", torch.relu(torch.einsum("bsd,df->bsf", x, self.up)), self.down)
        return self.head(x)


def export(model, x, dynamo=True, dynamic=True, optimize=False) -> onnx.ModelProto:
    """Export with dynamic batch (and sequence, for token inputs); dynamo with ``optimize=False``
    keeps parameter names (the optimizer folds transposed weights into unnamed ones and shares
    one shape computation among layers)."""
    wrapped = Logits(model.eval()) if hasattr(model, "config") else model.eval()
    tokens = x.dtype == torch.int64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = None
            if dynamic:
                axes = {0: torch.export.Dim("batch")}
                if tokens:
                    axes[1] = torch.export.Dim("seq")
                shapes = (axes,)
            prog = torch.onnx.export(wrapped, (x,), dynamo=True, optimize=optimize, dynamic_shapes=shapes,
                                     input_names=["x"], verbose=False)
            return prog.model_proto
        f = io.BytesIO()
        axes = {"x": {0: "batch", 1: "seq"} if tokens else {0: "batch"}} if dynamic else None
        torch.onnx.export(wrapped, (x,), f, dynamo=False, input_names=["x"], dynamic_axes=axes, opset_version=17)
        return onnx.load_from_string(f.getvalue())

"""``nn.MultiheadAttention`` with pruned heads.

``nn.MultiheadAttention`` fixes ``head_dim = embed_dim // num_heads``, so a layer that keeps
fewer heads of the same width cannot be one. :class:`PrunedMultiheadAttention` computes what it
computes with the kept heads only: same parameter names (so a state dict keeps its keys), same
call signature, same return value ``(attn_output, attn_weights or None)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from spa.errors import UnsupportedModelError

_TENSORS = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention over ``num_heads`` heads of ``head_dim`` each, mapped back to
    ``embed_dim`` by ``out_proj`` (``num_heads * head_dim`` may be less than ``embed_dim``)."""

    def __init__(self, source: nn.MultiheadAttention, num_heads: int, head_dim: int, kept_heads, dense_heads: int):
        super().__init__()
        if source._qkv_same_embed_dim:
            self.embed_dim = self.kdim = self.vdim = source.in_proj_weight.shape[1]
        else:
            self.embed_dim, self.kdim, self.vdim = (w.shape[1] for w in (
                source.q_proj_weight, source.k_proj_weight, source.v_proj_weight))
        self.num_heads, self.head_dim = int(num_heads), int(head_dim)
        self.batch_first, self.dropout = source.batch_first, source.dropout
        self.packed = source._qkv_same_embed_dim
        # Read by nn.TransformerEncoder(Layer) to choose its fused fast path, which assumes
        # embed_dim == num_heads * head_dim: False keeps them on the path that calls forward().
        self._qkv_same_embed_dim = False
        self.dense_heads = int(dense_heads)
        self.register_buffer("kept_heads", torch.as_tensor(list(kept_heads), dtype=torch.long), persistent=False)
        for name in _TENSORS:
            value = getattr(source, name, None)
            if isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            else:
                self.register_parameter(name, None)
        self.out_proj = source.out_proj

    def _projections(self):
        inner = self.num_heads * self.head_dim
        if self.packed:
            weights = self.in_proj_weight.split(inner)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.split(inner) if self.in_proj_bias is not None else (None, None, None)
        return weights, biases

    def _mask(self, attn_mask, key_padding_mask, is_causal, n, tgt, src, dtype, device):
        """Additive mask of shape broadcastable to [n, heads, tgt, src], or None."""
        mask = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=device).triu(1)
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            if mask.dim() == 3:  # [n * dense heads, tgt, src]: keep the kept heads' rows
                mask = mask.reshape(n, self.dense_heads, tgt, src).index_select(1, self.kept_heads)
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, dtype).reshape(n, 1, 1, src)
            mask = pad if mask is None else mask + pad
        return mask

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        tgt, n, _ = query.shape
        src = key.shape[0]
        (wq, wk, wv), (bq, bk, bv) = self._projections()
        heads, d = self.num_heads, self.head_dim
        q = F.linear(query, wq, bq).reshape(tgt, n * heads, d).transpose(0, 1)
        k = F.linear(key, wk, bk).reshape(src, n * heads, d).transpose(0, 1)
        v = F.linear(value, wv, bv).reshape(src, n * heads, d).transpose(0, 1)
        scores = torch.bmm(q * (1.0 / math.sqrt(d)), k.transpose(1, 2)).reshape(n, heads, tgt, src)
        mask = self._mask(attn_mask, key_padding_mask, is_causal, n, tgt, src, scores.dtype, scores.device)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        attended = F.dropout(weights, p=self.dropout, training=self.training) if self.dropout > 0 else weights
        out = torch.matmul(attended, v.reshape(n, heads, src, d))  # [n, heads, tgt, d]
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt, n, heads * d))
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights.squeeze(0) if unbatched else weights)


def _additive(mask, dtype):
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _kept_heads(name: str, dg, plan):
    """Kept head indices of the heads group whose parameters belong to module ``name``."""
    groups = {g.key: g for g in dg.groups}
    for gp in plan.groups:
        g = groups.get(gp.key)
        if g is not None and g.heads is not None and any((m.param or "").startswith(name + ".") for m in g.params):
            return [int(h) for h in gp.keep]
    return None


def swap_multihead_attention(pruned, original, dg, plan):
    """Every ``nn.MultiheadAttention`` of ``pruned`` whose tensors the plan cut (heads, output) becomes a
    :class:`PrunedMultiheadAttention`. Raises UnsupportedModelError for configurations it
    cannot express (``add_bias_kv``, ``add_zero_attn``). Returns ``pruned`` (or its swap when
    it is one itself)."""
    before = dict(original.named_modules())
    for name, mod in list(pruned.named_modules()):
        if type(mod) is not nn.MultiheadAttention:
            continue
        old = before[name]
        if all(getattr(mod, t) is None or getattr(mod, t).shape == getattr(old, t).shape for t in _TENSORS) \
                and mod.out_proj.weight.shape == old.out_proj.weight.shape:
            continue
        if mod.bias_k is not None or mod.add_zero_attn:
            raise UnsupportedModelError(
                f"nn.MultiheadAttention '{name}' uses add_bias_kv/add_zero_attn, which a pruned layer does not "
                f"support yet; keep its groups whole with protect=['{name}']")
        dense = old.in_proj_weight if old.in_proj_weight is not None else old.q_proj_weight
        now = mod.in_proj_weight if mod.in_proj_weight is not None else mod.q_proj_weight
        head_dim = old.embed_dim // old.num_heads
        parts = 3 if mod._qkv_same_embed_dim else 1
        heads = now.shape[0] // parts // head_dim
        kept = _kept_heads(name, dg, plan) or (list(range(heads)) if heads == old.num_heads else None)
        if kept is None or len(kept) != heads or now.shape[0] != parts * heads * head_dim:
            raise UnsupportedModelError(
                f"the plan cuts nn.MultiheadAttention '{name}' other than by whole heads (in-projection "
                f"{tuple(dense.shape)} -> {tuple(now.shape)}); keep its groups whole with protect=['{name}']")
        swapped = PrunedMultiheadAttention(mod, heads, head_dim, kept, old.num_heads).train(mod.training)
        if not name:
            return swapped
        parent, _, attr = name.rpartition(".")
        setattr(pruned.get_submodule(parent) if parent else pruned, attr, swapped)
    return pruned

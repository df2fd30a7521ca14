"""nn.MultiheadAttention: heads found through the packed in-projection (or the separate q/k/v
projections), pruned, and the module swapped for one that runs with fewer heads."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from helpers import run  # noqa: E402
from torch import nn  # noqa: E402

import spa  # noqa: E402
from spa.frontends import torch as tf  # noqa: E402
from spa.frontends.torch_mha import PrunedMultiheadAttention  # noqa: E402
from spa.io import to_proto  # noqa: E402

E, H = 32, 4


class Block(nn.Module):
    """Post-norm encoder block around one nn.MultiheadAttention."""

    def __init__(self, batch_first=True, kdim=None, bias=True, need_weights=False, causal=False):
        super().__init__()
        self.batch_first, self.need_weights, self.causal = batch_first, need_weights, causal
        self.kv = nn.Linear(E, kdim) if kdim else None
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias)
        self.ln = nn.LayerNorm(E)
        self.ff = nn.Sequential(nn.Linear(E, 64), nn.ReLU(), nn.Linear(64, E))

    def forward(self, x):
        kv = self.kv(x) if self.kv is not None else x
        mask = None
        if self.causal:
            n = x.shape[1] if self.batch_first else x.shape[0]
            mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        a, w = self.attn(x, kv, kv, need_weights=self.need_weights, attn_mask=mask)
        x = self.ln(x + a)
        y = x + self.ff(x)
        return (y, w) if self.need_weights else y


CONFIGS = {
    "packed": (dict(), "attn.in_proj_weight:0"),
    "seq_first": (dict(batch_first=False), "attn.in_proj_weight:0"),
    "kdim_vdim": (dict(kdim=24), "attn.q_proj_weight:0"),
    "no_bias": (dict(bias=False), "attn.in_proj_weight:0"),
    "weights_causal": (dict(need_weights=True, causal=True), "attn.in_proj_weight:0"),
}


def _params(m):
    return sum(p.numel() for p in m.parameters())


def _outputs(module, x):
    with torch.no_grad():
        out = module(x)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _check_pruned(module, x, key, ratio=0.5):
    result = spa.prune(module, x, ratio=ratio)  # its built-in checks: masked equivalence, module == ONNX
    assert [(g.key, g.size) for g in result.graph.groups if g.kind == "heads"] == [(key, H)]
    kept = {gp.key: len(gp.keep) for gp in result.plan.groups}
    assert kept[key] == H // 2
    proto = to_proto(result.model)
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    got = _outputs(result.module, x)
    for a, b in zip(got, run(result.model, {result.model.graph.inputs[0].name: x.numpy()})):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    assert _params(result.module) < _params(module)
    again = spa.load(tf.export(result.module, x))  # the swapped module exports again
    assert any(g.kind == "heads" and g.size == H // 2 for g in spa.dependency_graph(again).groups)
    return result


@pytest.mark.parametrize("name", list(CONFIGS))
def test_heads_found_pruned_and_swapped(name):
    kwargs, key = CONFIGS[name]
    torch.manual_seed(0)
    module = Block(**kwargs).eval()
    x = torch.randn(2, 5, E)
    result = _check_pruned(module, x, key)
    attn = result.module.attn
    assert isinstance(attn, PrunedMultiheadAttention) and isinstance(module.attn, nn.MultiheadAttention)
    assert (attn.num_heads, attn.head_dim, attn.embed_dim) == (H // 2, E // H, E)
    assert attn.out_proj.weight.shape == (E, E // 2)
    names = {n for n, _ in result.module.named_parameters()}
    assert names == {n for n, _ in module.named_parameters()}  # the state dict keeps its keys


def test_transformer_encoder_layer():
    torch.manual_seed(0)
    module = nn.Sequential(nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True),
                           nn.Linear(E, 8)).eval()
    x = torch.randn(2, 5, E)
    result = _check_pruned(module, x, "0.self_attn.in_proj_weight:0")
    assert isinstance(result.module[0].self_attn, PrunedMultiheadAttention)
    with torch.no_grad():  # eval + no_grad: the fused fast path stays off for the pruned layer
        np.testing.assert_allclose(result.module(x).numpy(), _outputs(result.module, x)[0], atol=1e-6)


def _masked_dense(attn, keep):
    """The dense layer with the removed heads' outputs zeroed (what pruning must equal)."""
    dense = nn.MultiheadAttention(E, H, batch_first=True)
    dense.load_state_dict(attn.state_dict())
    d = E // H
    cols = torch.zeros(E, dtype=torch.bool)
    for h in keep:
        cols[h * d:(h + 1) * d] = True
    with torch.no_grad():
        dense.out_proj.weight[:, ~cols] = 0
    return dense


def test_masks_and_weights_follow_the_kept_heads():
    torch.manual_seed(0)
    module = Block().eval()
    x = torch.randn(2, 5, E)
    result = spa.prune(module, x, ratio=0.5)
    keep = list(next(gp.keep for gp in result.plan.groups if gp.key == "attn.in_proj_weight:0"))
    small, dense = result.module.attn, _masked_dense(module.attn, keep)
    q, kv = torch.randn(2, 3, E), torch.randn(2, 5, E)
    pad = torch.tensor([[False] * 4 + [True], [False] * 5])
    mask3 = torch.randn(2 * H, 3, 5)
    with torch.no_grad():
        for kw in (dict(key_padding_mask=pad), dict(attn_mask=mask3), dict(attn_mask=mask3 > 1, key_padding_mask=pad)):
            a, w = small(q, kv, kv, need_weights=True, average_attn_weights=False, **kw)
            b, wd = dense(q, kv, kv, need_weights=True, average_attn_weights=False, **kw)
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
            np.testing.assert_allclose(w.numpy(), wd[:, keep].numpy(), atol=1e-6)
        a, none = small(q[0], kv[0], kv[0], need_weights=False)  # unbatched input
        assert none is None
        np.testing.assert_allclose(a.numpy(), dense(q[0], kv[0], kv[0])[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("option", ["add_bias_kv", "add_zero_attn"])
def test_extra_key_options_keep_the_layer_dense(option):
    """A learned key/value bias or a zero key is concatenated onto the keys: the heads stay
    blocked, the rest of the block is pruned and the layer is left as it was."""
    torch.manual_seed(0)
    module = Block().eval()
    module.attn = nn.MultiheadAttention(E, H, batch_first=True, **{option: True}).eval()
    x = torch.randn(2, 5, E)
    result = spa.prune(module, x, ratio=0.5)
    assert [g.kind for g in result.graph.groups] == ["channels"]
    assert any(b.key == "attn.in_proj_weight:0" for b in result.graph.blocked_groups)
    assert type(result.module.attn) is nn.MultiheadAttention
    assert result.module.attn.in_proj_weight.shape == (3 * E, E)
    assert result.module.ff[0].out_features == 32

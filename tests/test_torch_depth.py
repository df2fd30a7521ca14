"""Depth pruning applied to nn.Modules (frontends/torch_depth.py): removed layers deleted from
their ModuleList, removed attention / FFN sublayers replaced by parameterless stand-ins, removed
residual blocks skipped. Each pruned module is checked against the same dense module with that
branch's output forced to zero by a forward hook: equal outputs, fewer parameters, the same
greedy generation with the default KV cache, and a save / reload round trip.

SPA_SLOW=1 also runs spa.prune(module, depth=...) end to end (exports the model; slower)."""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

import spa  # noqa: E402
from spa.errors import UnsupportedModelError  # noqa: E402
from spa.frontends.torch_depth import (Skip, ZeroBranch, module_blocks_from_names,  # noqa: E402
                                       remove_blocks)

VOCAB = 64


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def names(module, *prefixes) -> tuple[str, ...]:
    """Parameter and buffer names under the prefixes (what the export's initializers are named)."""
    return tuple(n for n in module.state_dict() if n.startswith(prefixes))


def block(kind, module, *prefixes, layer=None):
    return SimpleNamespace(key=f"{kind}:{prefixes[0]}", kind=kind, layer=layer, params=names(module, *prefixes))


def zero_output(mod):
    """Forward hook: the module's output (or the first item of its tuple) becomes zeros."""
    def hook(_, __, out):
        if isinstance(out, tuple):
            return (torch.zeros_like(out[0]),) + out[1:]
        return torch.zeros_like(out)
    return mod.register_forward_hook(hook)


def skip_module(mod):
    """Forward hook: the module returns its first input (a removed residual block or layer)."""
    return mod.register_forward_hook(lambda _, args, __: args[0])


def _same(a, b, *args, atol=1e-5, **kwargs):
    with torch.no_grad():
        x, y = a(*args, **kwargs), b(*args, **kwargs)
    x = getattr(x, "logits", None) if hasattr(x, "logits") else getattr(x, "last_hidden_state", x)
    y = getattr(y, "logits", None) if hasattr(y, "logits") else getattr(y, "last_hidden_state", y)
    assert x.shape == y.shape
    torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


def _generate(model, ids):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                              pad_token_id=0)


def _ids(seed=1):
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


# parameter names -> module -------------------------------------------------------------------

def _llama(layers=4, **kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_module_blocks_from_names_is_the_smallest_owner():
    m = _llama(2)
    assert module_blocks_from_names(m, names(m, "model.layers.1.self_attn.")) == "model.layers.1.self_attn"
    assert module_blocks_from_names(m, ["model.layers.1.self_attn.q_proj.weight"]) == "model.layers.1.self_attn.q_proj"
    both = names(m, "model.layers.1.input_layernorm.", "model.layers.1.self_attn.")
    assert module_blocks_from_names(m, both) == "model.layers.1"
    assert module_blocks_from_names(m, names(m, "model.layers.")) == "model.layers"
    assert module_blocks_from_names(m, ["lm_head.weight", "model.norm.weight"]) == ""
    with pytest.raises(UnsupportedModelError, match="model.layers.7.mlp.up_proj.weight"):
        module_blocks_from_names(m, ["model.layers.7.mlp.up_proj.weight"])
    with pytest.raises(UnsupportedModelError, match="no parameters"):
        module_blocks_from_names(m, [])


# LLaMA ---------------------------------------------------------------------------------------

def test_llama_layers_and_sublayers(tmp_path):
    dense = _llama(4)
    ref = copy.deepcopy(dense)
    blocks = [block("layer", dense, "model.layers.1.", layer=1),
              block("attention", dense, "model.layers.0.input_layernorm.", "model.layers.0.self_attn.", layer=0),
              block("ffn", dense, "model.layers.2.post_attention_layernorm.", "model.layers.2.mlp.", layer=2)]
    pruned = remove_blocks(copy.deepcopy(dense), blocks)
    skip_module(ref.model.layers[1])
    zero_output(ref.model.layers[0].self_attn)
    zero_output(ref.model.layers[2].mlp)

    layers = pruned.model.layers
    assert len(layers) == 3 and pruned.config.num_hidden_layers == 3
    assert isinstance(layers[0].self_attn, ZeroBranch) and isinstance(layers[0].input_layernorm, Skip)
    assert isinstance(layers[1].mlp, ZeroBranch) and isinstance(layers[1].post_attention_layernorm, Skip)
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]  # renumbered: dense layer 3 is now 2
    assert _count(pruned) < _count(dense)
    assert not any(n.startswith(("model.layers.0.self_attn", "model.layers.3")) for n, _ in pruned.named_parameters())
    ids = _ids()
    _same(pruned, ref, ids)
    # Layer 0 has no attention left, yet its cache slot (whose length generation reads) still grows.
    assert torch.equal(_generate(pruned, ids), _generate(ref, ids))

    pruned.save_pretrained(tmp_path)
    loaded = spa.from_pretrained(tmp_path)
    assert type(loaded) is transformers.LlamaForCausalLM and loaded.config.num_hidden_layers == 3
    assert isinstance(loaded.model.layers[0].self_attn, ZeroBranch)
    assert _count(loaded) == _count(pruned)
    _same(loaded.eval(), pruned, ids, atol=0)
    assert torch.equal(_generate(loaded, ids), _generate(ref, ids))

    path = spa.save_module(pruned, tmp_path / "llama.spa.pt")  # the dense class rebuilt, then shortened
    rebuilt = spa.load_module(path, build=lambda: _llama(4)).eval()
    assert rebuilt.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in rebuilt.model.layers] == [0, 1, 2]
    _same(rebuilt, pruned, ids, atol=0)
    assert torch.equal(_generate(rebuilt, ids), _generate(ref, ids))


def test_llama_whole_layers_reload_with_auto_class(tmp_path):
    dense = _llama(4)
    ref = copy.deepcopy(dense)
    layer0 = block("layer", dense, "model.layers.0.", layer=0)
    layer0.params += ("val_12", "val_13")  # constants of the export (an epsilon, a scale): no tensors of the module
    pruned = remove_blocks(copy.deepcopy(dense), [layer0, block("layer", dense, "model.layers.2.", layer=2)])
    skip_module(ref.model.layers[0])
    skip_module(ref.model.layers[2])
    assert len(pruned.model.layers) == 2 and pruned.config.num_hidden_layers == 2
    ids = _ids(2)
    _same(pruned, ref, ids)
    assert torch.equal(_generate(pruned, ids), _generate(ref, ids))
    assert pruned.config.spa_pruned_sizes["from_config"] is True
    pruned.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # the config builds it
    assert loaded.config.num_hidden_layers == 2
    _same(loaded, pruned, ids, atol=0)


def _narrower_ffn(dense, layer: int, keep: int):
    """What width pruning makes of ``dense``: layer ``layer``'s FFN cut to its first ``keep``
    channels (the slicing and size record of slice_module, without the export)."""
    from spa.frontends.hf import record_on_config

    pruned = copy.deepcopy(dense)
    mlp = pruned.model.layers[layer].mlp
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight = nn.Parameter(lin.weight[:keep].clone())
            lin.out_features = keep
        mlp.down_proj.weight = nn.Parameter(mlp.down_proj.weight[:, :keep].clone())
        mlp.down_proj.in_features = keep
    record_on_config(pruned, dense)
    assert pruned.config.spa_pruned_sizes["from_config"] is False
    return pruned


def test_width_pruned_then_depth_pruned_llama_round_trips(tmp_path):
    dense = _llama(3)
    ids = _ids(3)
    width = _narrower_ffn(dense, 1, 24)  # layers of different sizes
    ref = copy.deepcopy(width)
    pruned = remove_blocks(copy.deepcopy(width), [block("layer", width, "model.layers.0.", layer=0),
                                                  block("ffn", width, "model.layers.2.post_attention_layernorm.",
                                                        "model.layers.2.mlp.", layer=2)])
    skip_module(ref.model.layers[0])
    zero_output(ref.model.layers[2].mlp)
    _same(pruned, ref, ids)
    record = pruned.config.spa_pruned_sizes
    # The narrow FFN of dense layer 1 is now layer 0's; dense layer 2's FFN is gone.
    assert record["shapes"] == {"model.layers.0.mlp.gate_proj.weight": [24, 32],
                                "model.layers.0.mlp.up_proj.weight": [24, 32],
                                "model.layers.0.mlp.down_proj.weight": [32, 24]}
    assert "num_hidden_layers" not in record["config"]
    pruned.save_pretrained(tmp_path)
    loaded = spa.from_pretrained(tmp_path).eval()
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    _same(loaded, pruned, ids, atol=0)
    assert torch.equal(_generate(loaded, ids), _generate(ref, ids))


def test_per_layer_config_lists_shortened_in_step(tmp_path):
    torch.manual_seed(0)
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_sliding_window=True, sliding_window=4, layer_types=types)
    dense = transformers.Qwen2ForCausalLM(cfg).eval()
    ref = copy.deepcopy(dense)
    pruned = remove_blocks(copy.deepcopy(dense), [block("layer", dense, "model.layers.1.", layer=1)])
    skip_module(ref.model.layers[1])
    assert pruned.config.layer_types == [types[0], types[2], types[3]]
    ids = _ids(4)
    _same(pruned, ref, ids)
    assert torch.equal(_generate(pruned, ids), _generate(ref, ids))
    pruned.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.layer_types == [types[0], types[2], types[3]]
    _same(loaded, pruned, ids, atol=0)


# GPT-2 ---------------------------------------------------------------------------------------

def test_gpt2_layers_and_sublayers(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    dense = transformers.GPT2LMHeadModel(cfg).eval()
    ref = copy.deepcopy(dense)
    pruned = remove_blocks(copy.deepcopy(dense), [block("layer", dense, "transformer.h.2.", layer=2),
                                                  block("attention", dense, "transformer.h.0.ln_1.",
                                                        "transformer.h.0.attn.", layer=0),
                                                  block("ffn", dense, "transformer.h.1.ln_2.", "transformer.h.1.mlp.",
                                                        layer=1)])
    skip_module(ref.transformer.h[2])
    zero_output(ref.transformer.h[0].attn)
    zero_output(ref.transformer.h[1].mlp)
    assert pruned.config.n_layer == pruned.config.num_hidden_layers == 2 and len(pruned.transformer.h) == 2
    assert _count(pruned) < _count(dense)
    ids = _ids(5)
    _same(pruned, ref, ids)
    assert torch.equal(_generate(pruned, ids), _generate(ref, ids))
    pruned.save_pretrained(tmp_path)
    loaded = spa.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    _same(loaded, pruned, ids, atol=0)


# BERT (post-norm) ----------------------------------------------------------------------------

def _bert(layers=3):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def test_bert_post_norm_branches_leave_the_norm_of_the_residual(tmp_path):
    dense = _bert(4)
    ref = copy.deepcopy(dense)
    # The branch stops before the add; the LayerNorm after it stays: the layer computes LayerNorm(x).
    attention = ("encoder.layer.{}.attention.self.", "encoder.layer.{}.attention.output.dense.")
    ffn = ("encoder.layer.{}.intermediate.", "encoder.layer.{}.output.dense.")
    blocks = [block("attention", dense, *(p.format(0) for p in attention), layer=0),
              block("ffn", dense, *(p.format(1) for p in ffn), layer=1),
              # Both branches of layer 2, as the export finds them: its two LayerNorms stay.
              block("layer", dense, *(p.format(2) for p in attention + ffn), layer=2),
              block("layer", dense, "encoder.layer.3.", layer=3)]
    pruned = remove_blocks(copy.deepcopy(dense), blocks)
    for mod in (ref.encoder.layer[0].attention.output.dense, ref.encoder.layer[1].output.dense,
                ref.encoder.layer[2].attention.output.dense, ref.encoder.layer[2].output.dense):
        zero_output(mod)
    skip_module(ref.encoder.layer[3])
    assert isinstance(pruned.encoder.layer[0].attention.self, ZeroBranch)
    assert pruned.encoder.layer[0].attention.self.outputs == 2
    layer2 = pruned.encoder.layer[2]
    assert isinstance(layer2.intermediate, ZeroBranch) and isinstance(layer2.output.dense, ZeroBranch)
    assert isinstance(layer2.output.LayerNorm, nn.LayerNorm)
    assert len(pruned.encoder.layer) == 3 and pruned.config.num_hidden_layers == 3
    assert _count(pruned) < _count(dense)
    ids = _ids(6)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    _same(pruned, ref, input_ids=ids, attention_mask=mask)
    pruned.save_pretrained(tmp_path)
    loaded = spa.from_pretrained(tmp_path).eval()
    _same(loaded, pruned, input_ids=ids, attention_mask=mask, atol=0)


def test_bert_branch_with_its_post_norm_is_refused():
    dense = _bert(2)
    wrong = block("attention", dense, "encoder.layer.0.attention.", layer=0)  # the residual's LayerNorm too
    with pytest.raises(UnsupportedModelError, match=r"attention:encoder.layer.0.attention.*output.LayerNorm"):
        remove_blocks(copy.deepcopy(dense), [wrong])


# generic residual blocks ---------------------------------------------------------------------

class Bottleneck(nn.Module):
    def __init__(self, c=8, mid=4):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(), nn.Conv2d(mid, mid, 3, padding=1),
                               nn.BatchNorm2d(mid), nn.ReLU(), nn.Conv2d(mid, c, 1), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.f(x)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pw2(torch.nn.functional.gelu(self.pw1(y)))
        return x + y.permute(0, 3, 1, 2)


class Net(nn.Module):
    def __init__(self, blocks=3):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage = nn.Sequential(*(Bottleneck() for _ in range(blocks)))
        self.blocks = nn.ModuleList(ConvNeXtBlock() for _ in range(blocks))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stage(self.stem(x))
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((2, 3)))


def _net():
    torch.manual_seed(0)
    net = Net().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return net


def test_residual_blocks_skipped_and_layers_deleted(tmp_path):
    dense = _net()
    ref = copy.deepcopy(dense)
    blocks = [block("block", dense, "stage.1.", layer=None), block("block", dense, "blocks.0.", layer=None),
              block("layer", dense, "blocks.2.", layer=2)]
    exported = {n for n in dense.state_dict() if not n.endswith("num_batches_tracked")}
    pruned = remove_blocks(copy.deepcopy(dense), blocks, exported)
    for m in (ref.stage[1], ref.blocks[0], ref.blocks[2]):
        skip_module(m)
    assert isinstance(pruned.stage[1], Skip) and isinstance(pruned.blocks[0], Skip) and len(pruned.blocks) == 2
    assert _count(pruned) < _count(dense)
    x = torch.randn(2, 3, 12, 12)
    _same(pruned, ref, x)

    path = spa.save_module(pruned, tmp_path / "net.spa.pt")
    loaded = spa.load_module(path, build=Net).eval()
    assert isinstance(loaded.stage[1], Skip) and len(loaded.blocks) == 2
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    _same(loaded, pruned, x, atol=0)


def test_block_that_is_no_module_of_its_own_is_refused():
    dense = _net()
    half = SimpleNamespace(key="block:stage.0.f", kind="block", layer=None, params=names(dense, "stage.0.f.0.", "stage.0.f.3."))
    with pytest.raises(UnsupportedModelError, match=r"block:stage.0.f.*stage.0.f"):
        remove_blocks(copy.deepcopy(dense), [half])
    partial = SimpleNamespace(key="layer:blocks.1", kind="layer", layer=1, params=names(dense, "blocks.1.pw"))
    with pytest.raises(UnsupportedModelError, match=r"blocks.1"):
        remove_blocks(copy.deepcopy(dense), [partial])
    gamma = SimpleNamespace(key="ffn:blocks.1", kind="ffn", layer=1, params=names(dense, "blocks.1.pw", "blocks.1.gamma"))
    with pytest.raises(UnsupportedModelError, match=r"ffn:blocks.1.*blocks.1.gamma"):
        remove_blocks(copy.deepcopy(dense), [gamma])


class TwoStacks(nn.Module):
    """Two layer lists as long as the config's layer count (an encoder and a decoder)."""

    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig(num_hidden_layers=2)
        self.encoder = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.decoder = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))


def test_layers_scaled_by_their_index_are_refused():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                  scale_attn_by_inverse_layer_idx=True)
    dense = transformers.GPT2LMHeadModel(cfg).eval()
    model = copy.deepcopy(dense)
    with pytest.raises(UnsupportedModelError, match="transformer.h scale attention by their index"):
        remove_blocks(model, [block("layer", model, "transformer.h.0.", layer=0),
                              block("ffn", model, "transformer.h.1.ln_2.", "transformer.h.1.mlp.", layer=1)])
    assert _count(model) == _count(dense) and not any(isinstance(m, ZeroBranch) for m in model.modules())


def test_layer_count_of_an_ambiguous_config_is_refused():
    m = TwoStacks()
    with pytest.raises(UnsupportedModelError, match="encoder and decoder both have 2 layers"):
        remove_blocks(m, [block("layer", m, "encoder.1.", layer=1)])


def test_block_of_another_model_is_refused():
    foreign = SimpleNamespace(key="layer3", kind="layer", layer=3, params=("val_1", "encoder.layer.3.output.dense.weight"))
    with pytest.raises(UnsupportedModelError, match="'layer3' names none of the module's parameters"):
        remove_blocks(_net(), [foreign])
    with pytest.raises(UnsupportedModelError, match="kind 'head'"):
        remove_blocks(_net(), [SimpleNamespace(key="x", kind="head", layer=None, params=("head.weight",))])


@pytest.mark.skipif(not os.environ.get("SPA_SLOW"), reason="exports and scores the model twice; SPA_SLOW=1 runs it")
@pytest.mark.parametrize("unit", ["layer", "sublayer"])
def test_spa_prune_with_depth_on_a_module(unit, tmp_path):
    """The whole pipeline: blocks found in the export, removed there and from the module, the
    module checked against the shallower ONNX model, then generation and a reload."""
    pytest.importorskip("spa.depth")
    dense = _llama(4)
    ids = _ids(7)
    result = spa.prune(dense, {"input_ids": ids}, ratio=0.0, depth=1, depth_unit=unit)
    (removed,) = result.plan.blocks
    pruned = result.module
    assert _count(pruned) < _count(dense)
    if unit == "layer":
        assert len(pruned.model.layers) == pruned.config.num_hidden_layers == 3
    else:
        assert any(isinstance(m, ZeroBranch) for m in pruned.modules())
    ref = copy.deepcopy(dense)
    if unit == "layer":
        skip_module(ref.model.layers[removed.layer])
    else:
        zero_output(getattr(ref.model.layers[removed.layer], "self_attn" if removed.kind == "attention" else "mlp"))
    _same(pruned, ref, ids)
    assert torch.equal(_generate(pruned, ids), _generate(ref, ids))
    pruned.save_pretrained(tmp_path)
    _same(spa.from_pretrained(tmp_path).eval(), pruned, ids, atol=0)


@pytest.mark.skipif(not os.environ.get("SPA_SLOW"), reason="exports the model; SPA_SLOW=1 runs it")
def test_depth_pruned_module_pruned_again_in_width(tmp_path):
    """A module with stand-ins exports and width-prunes like any other (the stand-ins follow the
    hidden size), and the merged size record reloads it."""
    dense = _llama(3)
    ids = _ids(8)
    shallow = remove_blocks(copy.deepcopy(dense), [
        block("attention", dense, "model.layers.0.input_layernorm.", "model.layers.0.self_attn.", layer=0),
        block("layer", dense, "model.layers.2.", layer=2)])
    result = spa.prune(shallow, {"input_ids": ids}, ratio=0.25)  # the hidden group too
    narrow = result.module
    assert narrow.config.hidden_size < dense.config.hidden_size and _count(narrow) < _count(shallow)
    assert isinstance(narrow.model.layers[0].self_attn, ZeroBranch) and len(narrow.model.layers) == 2
    narrow.save_pretrained(tmp_path)
    loaded = spa.from_pretrained(tmp_path).eval()
    _same(loaded, narrow, ids, atol=0)
    assert torch.equal(_generate(loaded, ids), _generate(narrow, ids))

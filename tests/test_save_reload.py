"""Pruned modules saved and loaded again: plain nn.Modules through spa.save_module /
spa.load_module (original class + sizes, never a pickled module), `transformers` models
through save_pretrained -> AutoModel*.from_pretrained (same sizes in every layer) or
spa.from_pretrained (layers of different sizes, or sizes the config cannot hold)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

import torch_models as tm  # noqa: E402
from torch import nn  # noqa: E402

import spa  # noqa: E402


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _same_outputs(a, b, *args):
    with torch.no_grad():
        return torch.equal(a(*args), b(*args))


class MLP(nn.Module):
    def __init__(self, inputs=12, hidden=32, classes=5):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(inputs, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _resnet():
    torch.manual_seed(0)
    return tm.randomize_norms(tm.ResNet()).eval()


@pytest.fixture(scope="module")
def cnn():
    x = torch.randn(2, 3, 16, 16)
    dense = _resnet()
    return dense, spa.prune(dense, (x,), ratio=0.4), x


def test_cnn_round_trip_from_sizes(cnn, tmp_path):
    dense, result, x = cnn
    path = spa.save_module(result, tmp_path / "resnet.spa.pt")
    payload = torch.load(path, weights_only=True)  # plain data and tensors: no pickled classes
    assert payload["plan"] is not None and payload["sizes"]["shapes"]
    loaded = spa.load_module(path, build=lambda: tm.ResNet()).eval()
    assert type(loaded) is tm.ResNet
    assert {k: v.shape for k, v in loaded.state_dict().items()} == \
        {k: v.shape for k, v in result.module.state_dict().items()}
    assert _count(loaded) == _count(result.module) < _count(dense)
    assert _same_outputs(loaded, result.module, x)
    convs = [m for m in loaded.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.out_channels == m.weight.shape[0] for m in convs)


def test_cnn_round_trip_by_reapplying_the_plan(cnn, tmp_path):
    _, result, x = cnn
    path = spa.save_module(result.module, tmp_path / "resnet.spa.pt", plan=result.plan)
    loaded = spa.load_module(path, build=tm.ResNet, example_inputs=(x,)).eval()
    assert _same_outputs(loaded, result.module, x)


def test_mlp_round_trip_from_class_and_kwargs(tmp_path):
    torch.manual_seed(0)
    dense, x = MLP(hidden=40).eval(), torch.randn(4, 12)
    result = spa.prune(dense, (x,), ratio=0.5)
    path = spa.save_module(result, tmp_path / "mlp.pt")
    loaded = spa.load_module(path, MLP, hidden=40).eval()
    assert (loaded.fc1.out_features, loaded.fc2.in_features) == (result.module.fc1.out_features, 20)
    assert _count(loaded) < _count(dense)
    assert _same_outputs(loaded, result.module, x)


def test_loading_into_another_architecture_is_refused(tmp_path):
    torch.manual_seed(0)
    result = spa.prune(MLP().eval(), (torch.randn(4, 12),), ratio=0.5)
    path = spa.save_module(result, tmp_path / "mlp.pt")
    with pytest.raises(spa.FrontendError, match="does not have"):
        spa.load_module(path, build=lambda: nn.Sequential(nn.Linear(12, 5)))
    (tmp_path / "junk.pt").write_bytes(b"not a module")
    with pytest.raises(spa.FrontendError, match="cannot read"):
        spa.load_module(tmp_path / "junk.pt", build=MLP)


# transformers ---------------------------------------------------------------------------------

def _llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg).eval(), torch.randint(0, 97, (2, 12))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_llama_same_sizes_everywhere_reloads_with_auto_class(tmp_path):
    from transformers import AutoModelForCausalLM

    dense, ids = _llama()
    result = spa.prune(dense, (ids,), ratio=0.3, round_to=8)
    pruned = result.module
    ffn = {m.mlp.up_proj.out_features for m in pruned.model.layers}
    assert len(ffn) == 1 and pruned.config.intermediate_size == ffn.pop() < 96
    assert pruned.config.hidden_size == pruned.model.embed_tokens.embedding_dim < 64
    assert pruned.config.spa_pruned_sizes["from_config"]
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert _count(reloaded) == _count(pruned) < _count(dense)
    assert torch.equal(_logits(reloaded, ids), _logits(pruned, ids))
    again = spa.from_pretrained(tmp_path)
    assert again.config.intermediate_size == pruned.config.intermediate_size
    assert torch.equal(_logits(again, ids), _logits(pruned, ids))
    tokens = dict(max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(reloaded.generate(ids[:1], **tokens), pruned.generate(ids[:1], **tokens))


def test_llama_layers_of_different_sizes_reload_with_spa_from_pretrained(tmp_path):
    dense, ids = _llama()
    result = spa.prune(dense, (ids,), ratio=0.3, global_pruning=True)
    pruned = result.module
    assert len({m.mlp.up_proj.out_features for m in pruned.model.layers}) > 1
    pruned.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["intermediate_size"] == 96  # the config cannot hold one size per layer
    assert not saved["spa_pruned_sizes"]["from_config"]
    assert "model.layers.0.mlp.up_proj.weight" in saved["spa_pruned_sizes"]["shapes"]
    from transformers import AutoModelForCausalLM

    with pytest.raises(Exception, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path)  # transformers refuses loudly, never silently
    reloaded = spa.from_pretrained(tmp_path)
    assert [m.mlp.up_proj.out_features for m in reloaded.model.layers] == \
        [m.mlp.up_proj.out_features for m in pruned.model.layers]
    assert _count(reloaded) == _count(pruned) < _count(dense)
    assert torch.equal(_logits(reloaded, ids), _logits(pruned, ids))


def test_hidden_size_the_config_rejects_still_saves_and_reloads(tmp_path):
    dense, ids = _llama()
    result = spa.prune(dense, (ids,), ratio=0.3, kinds=["hidden"])
    pruned = result.module
    hidden = pruned.model.embed_tokens.embedding_dim
    assert hidden % 4 and pruned.config.hidden_size == 64  # not a multiple of the 4 heads
    assert not pruned.config.spa_pruned_sizes["from_config"]
    pruned.save_pretrained(tmp_path)
    reloaded = spa.from_pretrained(tmp_path)
    assert reloaded.config.hidden_size == 64 and reloaded.model.norm.weight.shape == (hidden,)
    assert torch.equal(_logits(reloaded, ids), _logits(pruned, ids))


def test_vit_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=96, num_labels=5)
    dense, pixels = transformers.ViTForImageClassification(cfg).eval(), torch.randn(2, 3, 32, 32)
    result = spa.prune(dense, (pixels,), ratio=0.3)
    result.module.save_pretrained(tmp_path)
    reloaded = spa.from_pretrained(tmp_path, auto_class=transformers.AutoModelForImageClassification)
    assert type(reloaded) is transformers.ViTForImageClassification
    assert _count(reloaded) == _count(result.module) < _count(dense)
    with torch.no_grad():
        assert torch.equal(reloaded(pixels).logits, result.module(pixels).logits)


def test_model_saved_without_pruning_loads_through_its_class(tmp_path):
    dense, ids = _llama()
    dense.save_pretrained(tmp_path)
    reloaded = spa.from_pretrained(tmp_path)
    assert torch.equal(_logits(reloaded, ids), _logits(dense, ids))


def test_gpt2_tied_head_and_conv1d_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=64, use_cache=False)
    dense, ids = transformers.GPT2LMHeadModel(cfg).eval(), torch.randint(0, 97, (2, 12))
    pruned = spa.prune(dense, (ids,), ratio=0.3).module
    pruned.save_pretrained(tmp_path)
    reloaded = spa.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight  # still tied
    assert [b.mlp.c_fc.nf for b in reloaded.transformer.h] == [b.mlp.c_fc.nf for b in pruned.transformer.h]
    assert _count(reloaded) == _count(pruned) < _count(dense)
    assert torch.equal(_logits(reloaded, ids), _logits(pruned, ids))

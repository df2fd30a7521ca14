"""Hugging Face `transformers` models built from small configs (random weights, nothing
downloaded) prune through ``spa.prune(model, inputs)`` with keyword inputs, caching on by
default in the config, and ``ModelOutput`` results; the user's config is left as it was.

The default run covers an encoder, a decoder, a GQA decoder, a vision and a speech model
(``DEFAULT``; T5 and Swin, the slowest to export, run with the others); ``SPA_HF_MODELS=all python -m
pytest tests/test_hf_models.py`` runs all 19 classes (about 3 minutes here), and
``SPA_HF_MODELS=gemma,phi3`` picks some. ``python tests/test_hf_models.py`` prints, per model class, the groups, their kinds, the
parameters before and after pruning 30% and the built-in check's result.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import spa  # noqa: E402
from spa.errors import FrontendError, SpaError  # noqa: E402

V = 200  # vocabulary
TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=V,
            max_position_embeddings=64)
DECODER = dict(TEXT, num_key_value_heads=2)
VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
              patch_size=8)


def _text(batch=2, seq=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (batch, seq), generator=g)
    return transformers.BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def _pixels(batch=2, size=32):
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))}


def _whisper():
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = transformers.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                                        num_mel_bins=16, max_source_positions=16, vocab_size=V)
    return WhisperEncoder(config), {"input_features": torch.randn(2, 16, 32)}


def _t(cls, config, **kw):
    return lambda: (getattr(transformers, cls)(getattr(transformers, config)(**kw)), _text())


def _v(cls, config, **kw):
    return lambda: (getattr(transformers, cls)(getattr(transformers, config)(**kw)), _pixels())


MODELS = {
    "bert": _t("BertModel", "BertConfig", **TEXT),
    "roberta": _t("RobertaModel", "RobertaConfig", **dict(TEXT, max_position_embeddings=70)),
    "distilbert": _t("DistilBertModel", "DistilBertConfig", dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                     vocab_size=V, max_position_embeddings=64),
    "gpt2": _t("GPT2LMHeadModel", "GPT2Config", n_layer=2, n_embd=64, n_head=4, vocab_size=V, n_positions=64),
    "llama": _t("LlamaForCausalLM", "LlamaConfig", **DECODER),
    "qwen2": _t("Qwen2ForCausalLM", "Qwen2Config", **DECODER),
    "qwen3": _t("Qwen3ForCausalLM", "Qwen3Config", head_dim=16, **DECODER),
    "mistral": _t("MistralForCausalLM", "MistralConfig", **DECODER),
    "phi3": _t("Phi3ForCausalLM", "Phi3Config", pad_token_id=0, **DECODER),
    "gemma": _t("GemmaForCausalLM", "GemmaConfig", head_dim=16, **DECODER),
    "t5_encoder": _t("T5EncoderModel", "T5Config", d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                     vocab_size=V),
    "clip_text": _t("CLIPTextModel", "CLIPTextConfig", **TEXT),
    "vit": _v("ViTModel", "ViTConfig", **VISION),
    "deit": _v("DeiTModel", "DeiTConfig", **VISION),
    "clip_vision": _v("CLIPVisionModel", "CLIPVisionConfig", **VISION),
    "swin": _v("SwinModel", "SwinConfig", image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
               num_heads=[2, 4], window_size=4),
    "convnext": _v("ConvNextModel", "ConvNextConfig", num_stages=2, hidden_sizes=[16, 32], depths=[1, 1]),
    "resnet": _v("ResNetModel", "ResNetConfig", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                 layer_type="basic"),
    "whisper_encoder": _whisper,
}


#: One of each family in the default run: encoder, causal LM with GQA, encoder-decoder's
#: encoder, vision transformer, windowed attention, speech encoder.
DEFAULT = ("bert", "gpt2", "qwen3", "vit", "whisper_encoder")


def _selected() -> list[str]:
    import os

    chosen = os.environ.get("SPA_HF_MODELS", "")
    if chosen == "all":
        return list(MODELS)
    if chosen:
        names = [n.strip() for n in chosen.split(",") if n.strip()]
        unknown = sorted(set(names) - set(MODELS))
        if unknown:
            raise ValueError(f"SPA_HF_MODELS names unknown models {unknown}; known: {sorted(MODELS)}")
        return names
    return list(DEFAULT)


def _params(module):
    return sum(p.numel() for p in module.parameters())


def _build(name):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    return model.eval(), inputs


def measure(name, positional=False) -> dict:
    """Prune one model 30% and describe what happened (``positional``: the first input alone, as a tensor)."""
    model, inputs = _build(name)
    if positional:
        inputs = next(iter(inputs.values()))
    row = {"model": type(model).__name__, "params_before": _params(model)}
    try:
        result = spa.prune(model, inputs, ratio=0.3)
    except SpaError as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row
    kinds = {}
    for g in result.graph.groups:
        kinds[g.kind] = kinds.get(g.kind, 0) + 1
    eq = result.equivalence
    row.update(groups=len(result.graph.groups), kinds=kinds, params_after=_params(result.module),
               check=None if eq is None else ("skipped" if eq.skipped else "passed"))
    return row


def _onnx_run(model, inputs):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v.numpy() for k, v in inputs.items() if k in names})


@pytest.mark.parametrize("name", _selected())
def test_model_from_config_prunes_with_keyword_inputs(name):
    import onnx

    model, inputs = _build(name)
    config = model.config.to_dict()
    with torch.no_grad():
        dense = model(**inputs)
    result = spa.prune(model, inputs, ratio=0.3)
    assert model.config.to_dict() == config  # caching was turned off for the export only
    assert result.graph.groups and result.plan.pruned_groups
    assert result.equivalence is not None and not result.equivalence.skipped
    small = result.module
    assert _params(small) < _params(model)
    proto = result.proto
    onnx.checker.check_model(proto, full_check=True)
    assert {i.name for i in proto.graph.input} <= set(inputs)  # keyword inputs are the graph's inputs
    with torch.no_grad():
        got = small(**inputs)  # called the way the dense model is
        again = model(**inputs)
    first = got.to_tuple()[0]
    assert first.shape[0] == dense.to_tuple()[0].shape[0]
    torch.testing.assert_close(again.to_tuple()[0], dense.to_tuple()[0])  # the dense model is untouched
    ref = _onnx_run(proto, inputs)[0]
    assert ref.shape == tuple(first.shape)
    assert abs(ref - first.numpy()).max() < 1e-4


def test_causal_lm_keeps_its_cache_setting_and_prunes_from_a_tensor():
    model, inputs = _build("gpt2")
    assert model.config.use_cache is True
    result = spa.prune(model, inputs["input_ids"], ratio=0.3)  # positional, one tensor
    assert model.config.use_cache is True and result.module.config.use_cache is True
    with torch.no_grad():
        out = result.module(inputs["input_ids"])
    assert out.past_key_values is not None  # the pruned model still caches for generation
    assert _params(result.module) < _params(model)


def test_inputs_as_tensor_tuple_and_mapping():
    from spa.frontends.torch import as_args, as_call

    x, y = torch.zeros(2, 3), torch.ones(2, 3)
    assert as_call(x)[0][0] is x and as_call((x, y))[0] == (x, y) and as_call([x])[0] == (x,)
    args, kwargs = as_call(transformers.BatchEncoding({"input_ids": x, "attention_mask": y}))
    assert args == () and list(kwargs) == ["input_ids", "attention_mask"]
    assert as_args({"a": x, "b": None, "c": y}) == (x, y)
    with pytest.raises(FrontendError, match="dict of keyword inputs"):
        as_call("text")


class _Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y if y.sum() > 0 else -y


def test_exporter_failure_names_the_cause_and_fitting_advice():
    with pytest.raises(FrontendError) as info:
        spa.prune(_Branchy(), torch.randn(2, 4), ratio=0.3)
    text = str(info.value)
    assert "\x1b" not in text and "_Branchy" in text
    assert "data-dependent" in text and "control flow" in text
    model, inputs = _build("gpt2")
    with pytest.raises(FrontendError) as info:  # caching asked for explicitly: the cache is an output
        spa.prune(model, {**inputs, "use_cache": True}, ratio=0.3)
    text = str(info.value)
    assert "\x1b" not in text and "DynamicCache" in text and "use_cache" in text
    assert model.config.use_cache is True


if __name__ == "__main__":
    import sys
    import time

    positional = "--positional" in sys.argv
    for name in [a for a in sys.argv[1:] if not a.startswith("--")] or MODELS:
        t = time.time()
        print(name, measure(name, positional), f"{time.time() - t:.1f}s", flush=True)

"""Data-free calibration sources that use the model's knowledge (spa.calibration.synth): Zipf
token ids, text sampled from the model's own logits, and the automatic choice among them.

By default OBSPA prunes with ``zipf`` on the encoder and ``lm-sample`` on the causal LM;
``SPA_SLOW=1`` prunes with every source on both."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import spa  # noqa: E402
from spa import calibration as cal  # noqa: E402
from spa import runtime  # noqa: E402
from spa.calibration import synth  # noqa: E402
from spa.errors import ArgumentError  # noqa: E402
from spa.frontends.torch import export  # noqa: E402

VOCAB, SEQ = 61, 10


def _peaked(model):
    """Sharpen the LM head so the model's next-token distribution is far from uniform."""
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight.mul_(40.0)
    return model.eval()


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, type_vocab_size=1)
    return _peaked(BertForMaskedLM(cfg))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32, use_cache=False,
                      tie_word_embeddings=False)
    return _peaked(LlamaForCausalLM(cfg))


def _example():
    ids = torch.randint(0, VOCAB, (2, SEQ))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def exported():
    out = {}
    for name, ctor in (("bert", _bert), ("llama", _llama)):
        module = ctor()
        proto = export(module, _example())
        model = spa.load(proto)
        out[name] = (module, model, runtime.session(proto, optimize=False))
    return out


def _log_prob(module, ids: np.ndarray) -> float:
    """Mean log-probability the causal model gives each next token of ``ids``."""
    with torch.no_grad():
        x = torch.as_tensor(ids)
        logp = torch.log_softmax(module(input_ids=x).logits[:, :-1], -1)
    return float(logp.gather(-1, x[:, 1:, None]).mean())


@pytest.mark.parametrize("source", ["zipf", "lm-sample", "model"])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_sources_give_feeds_of_the_models_inputs(exported, name, source):
    _, model, sess = exported[name]
    feeds = cal.batches(source, model, sess, n_batches=3, seed=0)
    gauss = cal.batches("gaussian", model, sess, n_batches=3, seed=0)
    assert len(feeds) == 3
    for f, g in zip(feeds, gauss):
        assert sorted(f) == sorted(i.name for i in sess.get_inputs())
        ids, mask = f["input_ids"], f["attention_mask"]
        assert ids.dtype == np.int64 and mask.dtype == np.int64
        assert ids.shape == mask.shape == g["input_ids"].shape and ids.ndim == 2
        assert ids.min() >= 0 and ids.max() < VOCAB
        assert (mask == 1).all()
        sess.run(None, f)


def test_zipf_ids_favor_low_ids(exported):
    _, model, sess = exported["bert"]
    ids = np.concatenate([f["input_ids"].ravel() for f in cal.batches("zipf", model, sess, 8)])
    counts = np.bincount(ids, minlength=VOCAB)
    assert counts[:5].sum() > counts[-20:].sum()  # Zipf(1) over 61 ids: ~49% vs ~7%
    assert counts[0] > counts[VOCAB // 2] > 0 or counts[0] > 3 * counts[VOCAB // 2]


def test_logits_output_and_causality_are_found(exported):
    for name, causal in (("bert", False), ("llama", True)):
        _, model, sess = exported[name]
        ids, vocab = synth.text_input(model, sess)
        assert (ids, vocab) == ("input_ids", VOCAB)
        out = synth.logits_output(sess, vocab)
        assert out is not None
        feeds = cal.batches("zipf", model, sess, 1)[0]
        assert synth.is_causal(sess, feeds, ids, out, vocab) is causal


def test_lm_samples_are_likely_under_the_model(exported):
    module, model, sess = exported["llama"]
    sampled = np.concatenate([f["input_ids"] for f in cal.batches("lm-sample", model, sess, 2)])
    uniform = np.random.default_rng(0).integers(0, VOCAB, sampled.shape)
    zipf = np.concatenate([f["input_ids"] for f in cal.batches("zipf", model, sess, 2)])
    lp_sampled, lp_uniform, lp_zipf = (_log_prob(module, x) for x in (sampled, uniform, zipf))
    assert lp_sampled > lp_uniform + 1.0 and lp_sampled > lp_zipf + 1.0


def test_model_source_falls_back_to_gaussian_without_token_ids():
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    proto = export(net, torch.randn(2, 6))
    model, sess = spa.load(proto), runtime.session(proto, optimize=False)
    auto = cal.batches("model", model, sess, 2)
    gauss = cal.batches("gaussian", model, sess, 2)
    assert all(np.array_equal(a[k], g[k]) for a, g in zip(auto, gauss) for k in a)
    for source in ("zipf", "lm-sample"):
        with pytest.raises(ArgumentError, match=source):
            cal.batches(source, model, sess, 2)


PRUNES = [(n, s) for n in ("bert", "llama") for s in ("lm-sample", "zipf", "model")] \
    if os.environ.get("SPA_SLOW") == "1" else [("bert", "zipf"), ("llama", "lm-sample")]


@pytest.mark.parametrize("name,source", PRUNES)
def test_prune_with_model_sources_passes_its_checks(exported, name, source):
    module = exported[name][0]
    result = spa.prune(module, _example(), ratio=0.3, criterion="obspa", calibration=source,
                       kinds=["heads", "channels"])
    assert result.verify_report.ran
    dense = sum(p.numel() for p in module.parameters())
    assert sum(p.numel() for p in result.module.parameters()) < dense
    with torch.no_grad():
        logits = result.module(**_example()).logits
    assert logits.shape == (2, SEQ, VOCAB) and torch.isfinite(logits).all()

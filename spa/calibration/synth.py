"""Data-free text inputs that carry the model's own knowledge.

  * ``zipf``: token ids drawn from a Zipf law over the id (tokenizers number tokens roughly by
    frequency, most frequent first), a full attention mask, positions 0.., other id inputs (token
    types) zero;
  * ``lm-sample``: text the model writes itself. The graph output holding logits over the token
    vocabulary is found (last axis = the rows of the embedding table the ids index); a causal
    model (a later token changes no earlier logit) samples left to right from a Zipf-drawn first
    token, one run per position; a bidirectional one (a masked LM) starts from ``zipf`` ids and
    resamples every position from its own predictions a few rounds;
  * ``model``: the best measured source for the model's kind (docs/quality.md): ``zipf`` where
    it reads token ids (it beat ``lm-sample`` on a causal LM trained on real text), else the
    role-aware Gaussian default.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

#: Zipf exponent of ``zipf`` ids (p(rank r) ∝ (r + 1) ** -ZIPF_S).
ZIPF_S = 1.0
#: Sampling temperature of ``lm-sample``.
TEMPERATURE = 1.0
#: Resampling rounds of ``lm-sample`` on a bidirectional model.
ROUNDS = 4


def text_input(model, sess) -> tuple[str, int] | None:
    """(name, vocabulary) of the token-id input: the integer input over the largest table."""
    from spa.calibration import _vocab

    best = None
    for i in sess.get_inputs():
        if "int" not in i.type:
            continue
        vocab = _vocab(model, i.name)
        if vocab and vocab > 2 and (best is None or vocab > best[1]):
            best = (i.name, vocab)
    return best


def logits_output(sess, vocab: int) -> str | None:
    """The first output whose last axis is ``vocab`` long (logits over the token vocabulary)."""
    for o in sess.get_outputs():
        if o.shape and len(o.shape) >= 2 and o.shape[-1] == vocab:
            return o.name
    return None


def zipf_ids(rng, vocab: int, shape, s: float = ZIPF_S) -> np.ndarray:
    """Ids with p(id r) ∝ (r + 1) ** -s."""
    p = np.arange(1, vocab + 1, dtype=np.float64) ** -s
    return rng.choice(vocab, size=shape, p=p / p.sum())


def _textual(model, sess, feeds: dict, ids: str, vocab: int, rng) -> dict:
    """``feeds`` as one text: Zipf ids, full mask, zero token types (positions kept)."""
    from spa.calibration import _role

    out = dict(feeds)
    for i in sess.get_inputs():
        arr = feeds[i.name]
        if i.name == ids:
            out[i.name] = zipf_ids(rng, vocab, arr.shape).astype(arr.dtype)
        elif np.issubdtype(arr.dtype, np.integer):
            role = _role(model, i.name, arr.dtype)
            if role == "mask":
                out[i.name] = np.ones_like(arr)
            elif role == "ids":
                out[i.name] = np.zeros_like(arr)
    return out


def _sample(rng, logits: np.ndarray, temperature: float) -> np.ndarray:
    """One id per row of ``logits`` (..., vocab), from softmax(logits / temperature)."""
    z = logits.astype(np.float64) / max(temperature, 1e-6)
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    u = rng.random(p.shape[:-1] + (1,))
    return np.minimum((p.cumsum(axis=-1) < u).sum(axis=-1), p.shape[-1] - 1)


def is_causal(sess, feeds: dict, ids: str, out: str, vocab: int) -> bool:
    """Whether changing the last token leaves every earlier position's logits as they were."""
    x = feeds[ids]
    if x.ndim != 2 or x.shape[1] < 2:
        return False
    other = dict(feeds)
    other[ids] = x.copy()
    other[ids][:, -1] = (x[:, -1] + 1 + vocab // 2) % vocab
    a, b = (sess.run([out], f)[0] for f in (feeds, other))
    if a.ndim != 3 or a.shape[1] != x.shape[1]:
        return False
    return bool(np.allclose(a[:, :-1], b[:, :-1], rtol=1e-4, atol=1e-4 * (1 + float(np.abs(a).max()))))


def lm_sample(model, sess, template: Iterator[dict], ids: str, vocab: int, out: str, rng,
              temperature: float = TEMPERATURE, rounds: int = ROUNDS) -> Iterator[dict]:
    """Batches of text sampled from the model itself (see the module docstring)."""
    causal = None
    for feeds in template:
        feeds = _textual(model, sess, feeds, ids, vocab, rng)
        x = feeds[ids]
        if causal is None:
            causal = is_causal(sess, feeds, ids, out, vocab)
        if x.ndim != 2:  # no (batch, sequence) ids: Zipf text
            yield feeds
            continue
        if causal:
            for t in range(1, x.shape[1]):
                logits = sess.run([out], feeds)[0]
                x[:, t] = _sample(rng, logits[:, t - 1], temperature)
        else:
            for _ in range(rounds):
                x[...] = _sample(rng, sess.run([out], feeds)[0], temperature)
        yield feeds


def synthesize_text(source: str, model, sess, template: Iterator[dict], seed: int = 0) -> Iterator[dict] | None:
    """``zipf`` / ``lm-sample`` / ``model`` batches shaped like ``template``'s; None where the
    model reads no token ids (or, for ``lm-sample``, has no logits over them)."""
    rng = np.random.default_rng(seed + 1)
    found = text_input(model, sess)
    if found is None:
        return None
    ids, vocab = found
    out = logits_output(sess, vocab) if source == "lm-sample" else None
    if out is not None:
        return lm_sample(model, sess, template, ids, vocab, out, rng)
    if source == "lm-sample":
        return None
    return (_textual(model, sess, f, ids, vocab, rng) for f in template)

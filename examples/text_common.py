"""Real text, a tokenizer and two small transformers trained on it, with nothing downloaded:

  * text: the docstrings of Python standard-library modules, their classes and functions
    (``inspect`` over the running interpreter), split into sentences; a fixed held-out share;
  * tokenizer: lower-cased words and punctuation, a vocabulary ordered by frequency (id 0..4 the
    special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]``, then words, most frequent first), like
    real tokenizers roughly are;
  * models: a BERT-like masked LM (``transformers.BertForMaskedLM``) and a LLaMA-like causal LM
    (``transformers.LlamaForCausalLM``), small configs, trained on CPU (minutes; the wide causal
    LM ~17 minutes with one thread);
    weights cached under ``$SPA_BENCH_CACHE`` (default ``~/.cache/spa-bench``) so reruns are quick;
  * metrics: masked-token accuracy, next-token accuracy and perplexity on held-out sentences,
    and the cosine similarity of a model's logits to the dense model's.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(5)
MODULES = ("argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "csv",
           "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools",
           "glob", "gzip", "hashlib", "heapq", "http.client", "imaplib", "inspect", "io", "ipaddress",
           "itertools", "json", "logging", "mailbox", "math", "multiprocessing", "os", "pathlib", "pickle",
           "pprint", "queue", "random", "re", "shutil", "smtplib", "socket", "sqlite3", "ssl", "statistics",
           "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "tkinter",
           "turtle", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "wave", "xml.dom.minidom",
           "zipfile", "zlib", "ftplib", "configparser", "codecs", "locale", "optparse", "pdb", "doctest",
           "tokenize", "ast", "dis", "shelve", "selectors", "sched", "numbers", "operator", "copy", "types")
_WORD = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _docstrings() -> list[str]:
    docs, seen = [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                mod = importlib.import_module(name)
            except Exception:  # a module missing from this interpreter
                continue
            objs = [mod] + [v for k, v in sorted(vars(mod).items()) if not k.startswith("_")
                            and (inspect.isclass(v) or inspect.isfunction(v) or inspect.isbuiltin(v))]
            for cls in [o for o in objs if inspect.isclass(o)]:
                objs += [v for k, v in sorted(vars(cls).items()) if not k.startswith("_") and callable(v)]
            for o in objs:
                doc = inspect.getdoc(o) if not isinstance(o, (staticmethod, classmethod)) else None
                if doc and id(doc) not in seen and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    return docs


def sentences() -> list[str]:
    """Prose sentences of the standard library's docstrings (code examples and tables left out)."""
    out = []
    for doc in _docstrings():
        for para in doc.split("\n\n"):
            if ">>>" in para or para.lstrip().startswith(("-", "=", "+", "|")):
                continue
            for s in _SENT.split(" ".join(para.split())):
                n = len(_WORD.findall(s.lower()))
                if 4 <= n <= 60:
                    out.append(s)
    return sorted(set(out))


class Tokenizer:
    """Word-level, frequency-ordered vocabulary: specials 0..4, then words most frequent first."""

    def __init__(self, texts: list[str], size: int = 2000):
        counts = Counter(w for t in texts for w in _WORD.findall(t.lower()))
        self.vocab = SPECIALS + [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:size - 5]
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, length: int) -> np.ndarray:
        """``[CLS] words [SEP]`` padded with ``[PAD]`` (or cut) to ``length`` ids."""
        ids = [CLS] + [self.ids.get(w, UNK) for w in _WORD.findall(text.lower())][:length - 2] + [SEP]
        return np.array(ids + [PAD] * (length - len(ids)), dtype=np.int64)

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids if int(i) != PAD)


class Corpus:
    """Tokenized sentences: ``train``/``test`` id arrays ``(n, seq)`` and their attention masks."""

    def __init__(self, seq: int = 32, vocab: int = 2000, test_share: float = 0.1, seed: int = 0):
        texts = sentences()
        order = np.random.default_rng(seed).permutation(len(texts))
        n_test = int(len(texts) * test_share)
        self.test_texts = [texts[i] for i in order[:n_test]]
        self.train_texts = [texts[i] for i in order[n_test:]]
        self.tokenizer = Tokenizer(self.train_texts, vocab)
        self.seq = seq
        self.train = np.stack([self.tokenizer.encode(t, seq) for t in self.train_texts])
        self.test = np.stack([self.tokenizer.encode(t, seq) for t in self.test_texts])

    @staticmethod
    def mask_of(ids: np.ndarray) -> np.ndarray:
        return (ids != PAD).astype(np.int64)

    def calibration(self, n_batches: int = 8, batch: int = 16, seed: int = 1) -> list[dict]:
        """Held-out-from-test training sentences as calibration batches ``{input_ids, attention_mask}``."""
        rng = np.random.default_rng(seed)
        rows = rng.choice(len(self.train), n_batches * batch, replace=False)
        return [{"input_ids": self.train[r], "attention_mask": self.mask_of(self.train[r])}
                for r in rows.reshape(n_batches, batch)]


def _cache_dir() -> Path:
    return Path(os.environ.get("SPA_BENCH_CACHE", Path.home() / ".cache" / "spa-bench"))


def _mlm_batch(ids: torch.Tensor, rng: torch.Generator, p: float = 0.15):
    """BERT masking: ``p`` of the real tokens chosen; 80% -> [MASK], 10% random, 10% kept."""
    real = ids > SEP
    pick = (torch.rand(ids.shape, generator=rng) < p) & real
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=rng)
    x = ids.clone()
    x[pick & (roll < 0.8)] = MASK
    rand = pick & (roll >= 0.8) & (roll < 0.9)
    x[rand] = torch.randint(5, int(ids.max()) + 1, (int(rand.sum()),), generator=rng)
    return x, labels


def bert_config(vocab: int, seq: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=256, max_position_embeddings=seq, type_vocab_size=1,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD)


#: The wide causal LM (``kind="lm"``): most of its parameters in the decoder layers (not the
#: embeddings). Measured (docs/quality.md): at 20-30% only FFN channels are pruned (a GQA group is
#: the head unit) and the trained model barely needs them, so criteria separate at 50%, not 30%.
WIDE_LM = {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "ffn": 1024}
#: Training of the wide causal LM: steps (batch 32, ~6.6 epochs of the training sentences) and peak
#: learning rate. Measured: held-out next-token accuracy 0.294, perplexity 52.6 (300 steps gave
#: 0.211 / 113); 1,006 s with 1 thread (~0.67 s a step). Trajectory in docs/quality.md.
WIDE_LM_TRAIN = {"steps": 1500, "lr": 3e-3}


def llama_config(vocab: int, seq: int, layers: int = 2, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
                 ffn: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=seq,
                       bos_token_id=CLS, eos_token_id=SEP, pad_token_id=PAD, use_cache=False,
                       tie_word_embeddings=False)


def _train(model, corpus: Corpus, kind: str, steps: int, lr: float, batch: int = 32, seed: int = 0,
           log: bool = False, log_every: int = 100):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    rng = torch.Generator().manual_seed(seed)
    data = torch.as_tensor(corpus.train)
    model.train()
    losses = []
    for step in range(steps):
        ids = data[torch.randint(0, len(data), (batch,), generator=rng)]
        mask = (ids != PAD).long()
        if kind == "mlm":
            x, labels = _mlm_batch(ids, rng)
        else:
            x, labels = ids, torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps - 1):
            held_out = ""
            if kind != "mlm":  # the held-out trajectory (eval mode, no gradients: training unchanged)
                acc, ppl = next_token(model.eval(), corpus)
                model.train()
                held_out = f" test next-token accuracy {acc:.3f} perplexity {ppl:.1f}"
            print(f"[train {kind}] step {step}/{steps} loss {losses[-1]:.3f} (mean of the last "
                  f"{len(losses)} {np.mean(losses):.3f}){held_out}", flush=True)
            losses = []
    return model.eval()


def trained(kind: str, corpus: Corpus, steps: int = 800, lr: float = 3e-3, layers: int = 2,
            log: bool = False):
    """The masked LM (``kind="mlm"``), causal LM (``"clm"``, ``layers`` decoder layers) or wide
    causal LM (``"lm"``: ``WIDE_LM`` trained as ``WIDE_LM_TRAIN``; ``steps``/``lr``/``layers``
    ignored) trained on ``corpus``, from the cache when an identical run was cached before."""
    from transformers import BertForMaskedLM, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = len(corpus.tokenizer)
    if kind == "lm":
        steps, lr = WIDE_LM_TRAIN["steps"], WIDE_LM_TRAIN["lr"]
        model = LlamaForCausalLM(llama_config(vocab, corpus.seq, **WIDE_LM))
    else:
        model = (BertForMaskedLM(bert_config(vocab, corpus.seq)) if kind == "mlm"
                 else LlamaForCausalLM(llama_config(vocab, corpus.seq, layers)))
    tag = hashlib.sha1(f"{kind}{steps}{lr}{vocab}{corpus.seq}{len(corpus.train)}{model.config}".encode()).hexdigest()[:12]
    path = _cache_dir() / f"{kind}-{tag}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    _train(model, corpus, kind, steps, lr, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def _logits(model, ids: np.ndarray, mask: np.ndarray | None = None, chunk: int = 256) -> torch.Tensor:
    mask = Corpus.mask_of(ids) if mask is None else mask
    out = []
    with torch.no_grad():
        for i in range(0, len(ids), chunk):
            out.append(model(input_ids=torch.as_tensor(ids[i:i + chunk]),
                             attention_mask=torch.as_tensor(mask[i:i + chunk])).logits)
    return torch.cat(out)


def masked_test(corpus: Corpus, seed: int = 0):
    """Held-out sentences with 15% of their words masked: (inputs, labels), fixed by ``seed``."""
    x, labels = _mlm_batch(torch.as_tensor(corpus.test), torch.Generator().manual_seed(seed))
    return x.numpy(), labels.numpy()


def mlm_accuracy(model, corpus: Corpus) -> float:
    """Accuracy of the masked words of the held-out sentences."""
    x, labels = masked_test(corpus)
    pred = _logits(model, x, Corpus.mask_of(corpus.test)).argmax(-1).numpy()
    keep = labels != -100
    return float((pred[keep] == labels[keep]).mean())


def next_token(model, corpus: Corpus) -> tuple[float, float]:
    """(next-token accuracy, perplexity) over the held-out sentences' real tokens."""
    ids = corpus.test
    logits = _logits(model, ids)[:, :-1]
    target = torch.as_tensor(ids[:, 1:])
    keep = target != PAD
    nll = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    acc = (logits.argmax(-1)[keep] == target[keep]).float().mean()
    return float(acc), float(torch.exp(nll))


def logit_cosine(model, dense_logits: torch.Tensor, ids: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean cosine similarity, per real token, of ``model``'s logits to the dense model's."""
    got = _logits(model, ids, mask)
    keep = torch.as_tensor((Corpus.mask_of(ids) if mask is None else mask).astype(bool))
    return float(torch.nn.functional.cosine_similarity(got[keep], dense_logits[keep], dim=-1).mean())

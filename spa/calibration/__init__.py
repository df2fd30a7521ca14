"""Calibration inputs for activation-aware criteria (OBSPA, Wanda): the user's data, or inputs
synthesized without any dataset.

A source is one of:
  * ``"gaussian"`` (data-free): standard normal floats; integer inputs by what they hold: ids
    uniform over the table a Gather indexes with them or a OneHot's depth, masks as ones with
    padding, positions, sequence lengths, bytes; a static batch gets as many samples (more
    batches) as a dynamic one;
  * ``"zipf"`` (data-free, text models): token ids Zipf-distributed over the id (low ids
    frequent, as tokenizers order their vocabularies), a full attention mask, zero token types;
  * ``"lm-sample"`` (data-free, language models): text the model writes itself from its logits
    over the vocabulary (left to right for a causal LM, resampled rounds for a masked LM);
  * ``"model"`` (data-free): the best measured source for the model's kind: ``zipf`` where it
    reads token ids, else ``gaussian`` (``spa.calibration.synth``);
  * ``"bn"`` (data-free, nn.Module with BatchNorm): inputs optimized so every BatchNorm layer
    sees batch statistics equal to its running statistics (``spa.frontends.bn_inputs``);
  * ``"filters"`` (data-free, nn.Module, e.g. a CNN without BatchNorm): inputs optimized so every
    output channel of the first Conv/Linear layers responds with mean 0 and the spread its
    filter's norm gives (``spa.frontends.bn_inputs.filter_matched_inputs``);
  * a numpy array (one batch of the first input) or a list of them (several batches);
  * a dict ``{input name: array}`` (one batch) or a list of such dicts;
  * a directory of ``.npy`` files (one batch each, for the first input; or ``NAME.*.npy`` per
    input name);
  * a callable returning an iterable of any of the above.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from spa.errors import ArgumentError

DATA_FREE = ("gaussian", "zipf", "lm-sample", "model", "bn", "filters")
#: Data-free sources optimized through an nn.Module (``spa.frontends.bn_inputs``): function, what they match.
MODULE_SOURCES = {"bn": ("bn_matched_inputs", "BatchNorm statistics"),
                  "filters": ("filter_matched_inputs", "the first layers' filters")}
#: Batch size of synthesized inputs where the model's batch axis is dynamic.
SYNTH_BATCH = 16


#: Ops an integer input passes through unchanged in meaning (ids stay ids).
_ID_VIEWS = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Transpose"})


def _readers(model, name: str) -> list:
    """(node, input index) of every op reading graph input ``name``, through id-preserving views."""
    v = next((x for x in model.graph.inputs if x.name == name), None)
    out, stack, seen = [], [v] if v is not None else [], set()
    while stack:
        value = stack.pop()
        for node, index in value.uses():
            if node.op_type in _ID_VIEWS and index == 0 and node.domain in ("", "ai.onnx"):
                if id(node) not in seen:
                    seen.add(id(node))
                    stack.extend(node.outputs)
            else:
                out.append((node, index))
    return out


def _vocab(model, name: str) -> int | None:
    """How many values integer input ``name`` can take: the rows of the table a Gather indexes
    with it (token ids, token types, categories), or a OneHot's depth (byte or class ids)."""
    sizes = []
    for node, index in _readers(model, name):
        if node.op_type == "Gather" and index == 1 and node.inputs[0].const_value is not None:
            axis = node.attributes.get("axis")
            axis = axis.value if axis is not None else 0
            sizes.append(int(node.inputs[0].const_value.shape[axis]))
        elif node.op_type == "OneHot" and index == 0 and node.inputs[1].const_value is not None:
            sizes.append(int(node.inputs[1].const_value.numpy().reshape(-1)[0]))
    return min(sizes) if sizes else None


def _role(model, name: str, dtype) -> str:
    """What an integer input holds: ``ids`` (over ``_vocab``), ``mask``, ``positions``,
    ``lengths`` (sequence lengths of a recurrent op), ``bytes`` (uint8), else ``other``."""
    lowered = name.lower()
    if _vocab(model, name):
        return "ids"
    if "mask" in lowered:
        return "mask"
    if "position" in lowered:
        return "positions"
    if any(node.op_type in ("LSTM", "GRU", "RNN") and index == 4 for node, index in _readers(model, name)) \
            or "len" in lowered:
        return "lengths"
    if np.dtype(dtype) == np.uint8:
        return "bytes"
    return "other"


def _integer_feed(model, name: str, arr: np.ndarray, rng) -> np.ndarray:
    """A data-free value for integer input ``name`` that respects its role (``_role``)."""
    role = _role(model, name, arr.dtype)
    if role == "ids":
        return rng.integers(0, _vocab(model, name), size=arr.shape).astype(arr.dtype)
    if role == "bytes":
        return rng.integers(0, 256, size=arr.shape).astype(arr.dtype)
    if arr.ndim == 0:
        return np.ones_like(arr) if role in ("mask", "lengths") else arr
    if role == "mask":  # ones; every row after the first is padded at its end by up to a quarter
        out = np.ones_like(arr)
        if arr.ndim >= 2 and arr.shape[-1] > 1:
            for row in range(1, arr.shape[0]):
                pad = int(rng.integers(0, max(arr.shape[-1] // 4, 1) + 1))
                if pad:
                    out[row, ..., arr.shape[-1] - pad:] = 0
        return out
    if role == "positions":
        return np.broadcast_to(np.arange(arr.shape[-1], dtype=arr.dtype), arr.shape).copy()
    if role == "lengths":  # full length: the longest axis any float input has past the batch
        return np.full_like(arr, max(_longest_axis(model), 1))
    return arr


def _longest_axis(model) -> int:
    sizes = [int(d) for v in model.graph.inputs if v.shape is not None and v.dtype is not None
             and v.dtype.is_floating_point() for d in list(v.shape)[:2] if isinstance(d, int)]
    return max(sizes, default=1)


def synthesize(model, sess, n_batches: int, input_shapes: dict | None, seed: int = 0,
               batch: int | None = SYNTH_BATCH) -> Iterator[dict]:
    """Data-free batches: Gaussian floats, integer inputs by role (token ids over the vocabulary,
    masks with padding, byte ids, lengths); a dynamic batch axis gets ``batch`` samples (None:
    the runtime default, 1), and a static one as many more batches as it takes to see as many
    samples."""
    from spa import runtime
    from spa.state import single_batch

    rng = np.random.default_rng(seed)
    shapes = dict(input_shapes or {})
    if batch is not None and single_batch(model):
        batch = None
    static = []
    for i in sess.get_inputs():  # a dynamic batch axis gets SYNTH_BATCH samples, not 1
        if batch is None:
            break
        if i.name in shapes or not i.shape:
            continue
        if isinstance(i.shape[0], int):
            static.append(i.shape[0])
        elif i.shape[0] not in shapes:
            shape = list(runtime.concrete_shape(i.name, i.shape, input_shapes))
            shapes[i.name] = [batch] + shape[1:]
    if batch is not None and static and len(static) == len(sess.get_inputs()) and max(static) < batch:
        n_batches = n_batches * -(-batch // max(max(static), 1))
    for _ in range(n_batches):
        feeds = runtime.random_feeds(sess, shapes, int(rng.integers(1 << 31)))
        for i in sess.get_inputs():
            arr = feeds[i.name]
            if np.issubdtype(arr.dtype, np.integer):
                feeds[i.name] = _integer_feed(model, i.name, arr, rng)
        yield feeds


def _as_feeds(item, names: list[str]) -> dict:
    if isinstance(item, dict):
        unknown = set(item) - set(names)
        if unknown:
            raise ArgumentError(f"calibration batch names input(s) {sorted(unknown)}; the model's are {names}")
        return {k: np.asarray(v) for k, v in item.items()}
    if isinstance(item, (tuple, list)) and len(item) == len(names) and all(hasattr(a, "shape") for a in item):
        return {n: np.asarray(a) for n, a in zip(names, item)}
    if hasattr(item, "shape"):
        return {names[0]: np.asarray(item)}
    raise ArgumentError(f"a calibration batch must be an array, a tuple of arrays or a dict, not {type(item).__name__}")


def _from_dir(path: Path, names: list[str]) -> list[dict]:
    files = sorted(path.glob("*.npy"))
    if not files:
        raise ArgumentError(f"calibration directory {path} holds no .npy file")
    per_name = {n: [f for f in files if f.name.startswith(n + ".")] for n in names}
    if all(per_name.values()) and len(names) > 1:
        return [{n: np.load(per_name[n][k]) for n in names} for k in range(min(len(v) for v in per_name.values()))]
    return [{names[0]: np.load(f)} for f in files]


def batches(source, model, sess, n_batches: int = 8, input_shapes: dict | None = None,
            seed: int = 0) -> list[dict]:
    """Feed dicts for onnxruntime from a calibration source (see the module docstring)."""
    names = [i.name for i in sess.get_inputs()]
    if source is None or (isinstance(source, str) and source in DATA_FREE):
        if source in MODULE_SOURCES:
            raise ArgumentError(f"calibration='{source}' synthesizes inputs matched to an nn.Module's "
                                f"{MODULE_SOURCES[source][1]}; "
                                "pass the module to spa.prune (or use 'gaussian' for an ONNX file)")
        gaussian = synthesize(model, sess, n_batches, input_shapes, seed)
        if source in (None, "gaussian"):
            return list(gaussian)
        from spa.calibration.synth import synthesize_text

        text = synthesize_text(source, model, sess, gaussian, seed)
        if text is None and source != "model":
            what = "logits over its token ids" if source == "lm-sample" else "token ids"
            raise ArgumentError(f"calibration='{source}' needs a model with {what}; this one has none "
                                "(use 'model' or 'gaussian')")
        return list(text if text is not None else gaussian)
    if callable(source):
        source = source()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_dir():
            raise ArgumentError(f"calibration '{source}' is neither a directory of .npy files nor one of "
                                f"{', '.join(DATA_FREE)}")
        return _from_dir(path, names)
    if isinstance(source, (dict, np.ndarray)) or hasattr(source, "shape"):
        return [_as_feeds(source, names)]
    out = [_as_feeds(item, names) for item in source]
    if not out:
        raise ArgumentError("the calibration source gave no batch")
    return out

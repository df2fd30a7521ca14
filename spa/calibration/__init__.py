"""Calibration inputs for activation-aware criteria (OBSPA, Wanda): the user's data, or inputs
synthesized without any dataset.

A source is one of:
  * ``"gaussian"`` (data-free): standard normal floats; token ids uniform over the vocabulary
    of the embedding table the input indexes;
  * ``"bn"`` (data-free, nn.Module with BatchNorm): inputs optimized so every BatchNorm layer
    sees batch statistics equal to its running statistics (``spa.frontends.bn_inputs``);
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

DATA_FREE = ("gaussian", "bn")
#: Batch size of synthesized inputs where the model's batch axis is dynamic.
SYNTH_BATCH = 16


def _vocab(model, name: str) -> int | None:
    """Rows of the embedding table that graph input ``name`` indexes, if it feeds a Gather."""
    v = next((x for x in model.graph.inputs if x.name == name), None)
    if v is None:
        return None
    for node, index in v.uses():
        if node.op_type == "Gather" and index == 1 and node.inputs[0].const_value is not None:
            return int(node.inputs[0].const_value.shape[0])
    return None


def synthesize(model, sess, n_batches: int, input_shapes: dict | None, seed: int = 0,
               batch: int | None = SYNTH_BATCH) -> Iterator[dict]:
    """Data-free batches: Gaussian floats, token ids over the vocabulary; a dynamic batch axis
    gets ``batch`` samples (None: the runtime default, 1)."""
    from spa import runtime

    rng = np.random.default_rng(seed)
    shapes = dict(input_shapes or {})
    for i in sess.get_inputs():  # a dynamic batch axis gets SYNTH_BATCH samples, not 1
        if batch is None:
            break
        if i.name not in shapes and i.shape and not isinstance(i.shape[0], int) and i.shape[0] not in shapes:
            shape = list(runtime.concrete_shape(i.name, i.shape, input_shapes))
            shapes[i.name] = [batch] + shape[1:]
    for _ in range(n_batches):
        feeds = runtime.random_feeds(sess, shapes, int(rng.integers(1 << 31)))
        for i in sess.get_inputs():
            arr = feeds[i.name]
            if np.issubdtype(arr.dtype, np.integer):
                vocab = _vocab(model, i.name)
                if vocab:
                    feeds[i.name] = rng.integers(0, vocab, size=arr.shape).astype(arr.dtype)
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
        if source == "bn":
            raise ArgumentError("calibration='bn' synthesizes inputs from an nn.Module's BatchNorm statistics; "
                                "pass the module to spa.prune (or use 'gaussian' for an ONNX file)")
        return list(synthesize(model, sess, n_batches, input_shapes, seed))
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

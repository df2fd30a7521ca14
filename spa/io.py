"""Model and file output: serialize an onnx_ir.Model; write files atomically (temp file + rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

# Above this a model is written with its weights in an external data file.
EXTERNAL_DATA_THRESHOLD = 1 << 30


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def model_nbytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save(model: ir.Model, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically (external data beside it when it is large)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if model_nbytes(model) < EXTERNAL_DATA_THRESHOLD:
        atomic_write_bytes(path, to_proto(model).SerializeToString())
        return path
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        tmp_model = Path(tmp) / path.name
        ir.save(model, tmp_model, external_data=data_name)
        os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    return path

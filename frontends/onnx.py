"""ONNX frontend: read a model (path, bytes, ModelProto or onnx_ir.Model) and write one atomically."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from spa.errors import FrontendError
from spa.io import model_nbytes, save, to_proto  # noqa: F401  (re-exported)

MIN_OPSET = 11


def load(source) -> ir.Model:
    """Load ``source`` into an onnx_ir.Model. Weights in external data are read lazily."""
    if isinstance(source, ir.Model):
        model = source
    elif isinstance(source, onnx.ModelProto):
        model = ir.serde.deserialize_model(source)
    elif isinstance(source, (bytes, bytearray)):
        model = _from_bytes(bytes(source), "<bytes>")
    elif isinstance(source, (str, os.PathLike)):
        model = _from_path(Path(source))
    else:
        raise FrontendError(f"cannot load a model from {type(source).__name__}; pass a path, bytes, "
                            "onnx.ModelProto or onnx_ir.Model")
    _check_opset(model)
    return model


def _from_bytes(data: bytes, what: str) -> ir.Model:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise FrontendError(f"{what} is not a valid ONNX model (truncated or corrupt protobuf: {exc})") from exc
    if not proto.graph.node and not proto.graph.output:
        raise FrontendError(f"{what} parsed as an empty ONNX model; it is probably not an ONNX file")
    return ir.serde.deserialize_model(proto)


def _from_path(path: Path) -> ir.Model:
    if not path.exists():
        raise FrontendError(f"model file {path} does not exist")
    if path.is_dir():
        raise FrontendError(f"{path} is a directory; pass the .onnx file")
    try:
        model = ir.load(path)
    except DecodeError as exc:
        raise FrontendError(f"{path} is not a valid ONNX model (truncated or corrupt protobuf: {exc})") from exc
    except (OSError, ValueError) as exc:
        raise FrontendError(f"cannot read {path}: {exc}") from exc
    if not len(model.graph) and not model.graph.outputs:
        raise FrontendError(f"{path} parsed as an empty ONNX model; it is probably not an ONNX file")
    return model


def _check_opset(model: ir.Model) -> None:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None:
        raise FrontendError("the model imports no default ONNX opset; it cannot be analysed")
    if opset < MIN_OPSET:
        raise FrontendError(
            f"the model uses ONNX opset {opset}; SPA needs opset {MIN_OPSET} or newer. Convert it first: "
            f"onnx.version_converter.convert_version(model, {MIN_OPSET})"
        )

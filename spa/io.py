"""Model and file output: serialize an onnx_ir.Model; write files atomically (temp file + rename)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from spa.errors import ArgumentError, ValidationError

# Above this a model is written with its weights in an external data file.
EXTERNAL_DATA_THRESHOLD = 1 << 30
# External tensors are inlined by to_proto while the serialized model stays under protobuf's limit.
_INLINE_LIMIT = 1_800_000_000


def _make_parent(path: Path) -> list[Path]:
    """Create ``path``'s missing parent folders; returns those created (outermost first). On
    failure none of them is left behind."""
    missing = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
    except OSError:
        _remove_folders(created)
        raise
    return created


def _remove_folders(created: list[Path]) -> None:
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _write_error(path: Path, exc: OSError) -> ArgumentError:
    reason = exc.strerror or str(exc)
    return ArgumentError(f"cannot write {path}: {reason}; nothing was written. Choose an output path in a "
                         "writable folder (and not an existing directory)")


@contextlib.contextmanager
def _writing(path: Path):
    """Around writing ``path``: its missing folders are created, and on failure removed again;
    an OSError becomes an ArgumentError naming the path."""
    created: list[Path] = []
    done = False
    try:
        created = _make_parent(path)
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory", str(path))
        yield
        done = True
    except OSError as exc:
        raise _write_error(path, exc) from exc
    finally:
        if not done:
            _remove_folders(created)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename: the
    file is either complete or untouched, and no temp file (or folder created for it) stays
    behind on failure. OSError becomes an ArgumentError naming the path."""
    path = Path(path)
    with _writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _external_initializers(model: ir.Model) -> list[ir.Value]:
    return [v for graph in model.graphs() for v in graph.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)]


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a self-contained ModelProto: weights that still live in the input's
    external data file are inlined (while the proto fits protobuf's 2 GB), so that the proto
    runs in onnxruntime and is written as one file wherever it goes. ``model`` is unchanged."""
    external = _external_initializers(model)
    if not external or sum(v.const_value.nbytes for v in external) + 64 * len(external) > _INLINE_LIMIT:
        return ir.serde.serialize_model(model)
    saved = [v.const_value for v in external]
    try:
        for v, t in zip(external, saved):
            v.const_value = ir.Tensor(t.numpy(), dtype=t.dtype, name=t.name)
        proto = ir.serde.serialize_model(model)
    finally:
        for v, t in zip(external, saved):
            v.const_value = t
    if proto.ByteSize() > _INLINE_LIMIT:  # the inlined weights pushed it over: keep the references
        return ir.serde.serialize_model(model)
    return proto


class OnDemandTensor(ir.ExternalTensor):
    """An external tensor that keeps no mapping of its file: each ``numpy()`` maps just its
    own bytes, read-only, and the mapping closes when the array is dropped. Pages count in
    memory only while an array that read them lives, so reading every weight of a large
    model once (scoring, slicing) holds one tensor at a time, not the model. Writing it
    copies file to file (``tofile``)."""

    def numpy(self) -> np.ndarray:
        if self.dtype.bitwidth < 8 or self.size == 0 or self.dtype == ir.DataType.STRING:
            return super().numpy()  # packed sub-byte types: onnx-ir unpacks them
        self._check_validity()
        self._check_path_containment()
        dt = np.dtype(self.dtype.numpy()).newbyteorder("<")
        try:
            return np.memmap(self.path, dtype=dt, mode="r", offset=self.offset or 0, shape=tuple(self.shape.numpy()))
        except ValueError as exc:  # the file ends before the tensor does
            raise ValidationError(f"the external data of tensor '{self.name}' in {self.path} is truncated "
                                  f"(expected {self.nbytes:,} bytes at offset {self.offset or 0}): {exc}") from exc

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype)

    def tobytes(self) -> bytes:
        if self.dtype.bitwidth < 8:
            return super().tobytes()
        self._check_validity()
        self._check_path_containment()
        with open(self.path, "rb") as f:
            f.seek(self.offset or 0)
            return f.read(self.length or self.nbytes)


def read_on_demand(model: ir.Model) -> ir.Model:
    """Replace the model's external tensors by :class:`OnDemandTensor` (same file, offset,
    length); nothing is read. Returns ``model``."""
    for graph in model.graphs():
        for v in graph.initializers.values():
            t = v.const_value
            if type(t) is ir.ExternalTensor:
                v.const_value = OnDemandTensor(t.location, t.offset, t.length, t.dtype, shape=t.shape, name=t.name,
                                               doc_string=t.doc_string, metadata_props=t.metadata_props,
                                               base_dir=t.base_dir)
    return model


#: Initializers at least this large are handed to checks and sessions by reference
#: (:func:`skeleton`), never serialized into protobuf.
BY_REFERENCE_BYTES = 1024
#: The placeholder file a skeleton's references name (offsets in order, never read).
REFERENCE_FILE = "spa.weights"
_BY_REFERENCE_TYPES = frozenset({
    ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8,
    ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32,
    ir.DataType.INT64, ir.DataType.UINT64, ir.DataType.BOOL})


def skeleton(model: ir.Model, floating_only: bool = False) -> tuple[onnx.ModelProto, dict[str, ir.TensorProtocol], int]:
    """The model as a small ModelProto: its large main-graph initializers become external
    references (to :data:`REFERENCE_FILE`, laid out in order) instead of data; also those
    tensors by name, and the bytes they span. Nothing is read or copied; ``model`` is
    unchanged. Sessions get the tensors as external initializers, the checker a sparse
    placeholder file (``skeleton_files``). ``floating_only``: integer tensors stay inline (a
    tool that reads shape constants' values gets them)."""
    listed = {v.name for v in model.graph.inputs}
    by_ref = [v for v in model.graph.initializers.values()
              if v.const_value is not None and v.name not in listed and v.const_value.dtype in _BY_REFERENCE_TYPES
              and v.const_value.nbytes >= BY_REFERENCE_BYTES
              and (not floating_only or v.const_value.dtype.is_floating_point())]
    chosen = {id(v) for v in by_ref}
    inline = [v for v in _external_initializers(model) if id(v) not in chosen]  # small: read into the proto
    changed = by_ref + inline
    saved = [v.const_value for v in changed]
    offset = 0
    try:
        for v, t in zip(by_ref, saved):
            v.const_value = ir.ExternalTensor(REFERENCE_FILE, offset, t.nbytes, t.dtype, shape=t.shape, name=v.name,
                                              base_dir="")
            offset += t.nbytes
        for v, t in zip(inline, saved[len(by_ref):]):
            v.const_value = ir.Tensor(t.numpy(), dtype=t.dtype, name=t.name)
        proto = ir.serde.serialize_model(model)
    finally:
        for v, t in zip(changed, saved):
            v.const_value = t
    return proto, {v.name: t for v, t in zip(by_ref, saved)}, offset


@contextlib.contextmanager
def skeleton_files(model: ir.Model, proto: onnx.ModelProto | None = None, span: int = 0):
    """Within the block, the path of the model's :func:`skeleton` written in a temp folder
    with a sparse placeholder weights file (no disk blocks, nothing copied): what
    onnx.checker and shape inference need to check a model of any size from a path."""
    if proto is None:
        proto, _, span = skeleton(model)
    with tempfile.TemporaryDirectory(prefix="spa-check-") as tmp:
        path = Path(tmp) / "model.onnx"
        with open(Path(tmp) / REFERENCE_FILE, "wb") as f:
            f.truncate(span)
        with open(path, "wb") as f:
            f.write(proto.SerializeToString())
        yield path


def model_nbytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _refuse_overwriting_own_data(model: ir.Model, targets: list[Path]) -> None:
    """Writing over a file the model still reads its weights from would modify the input."""
    resolved = {p.resolve() for p in targets}
    for v in _external_initializers(model):
        source = Path(v.const_value.path).resolve()
        if source in resolved:
            raise ArgumentError(f"writing {source} would overwrite the external data the model reads initializer "
                                f"'{v.name}' from (an input file); SPA never modifies its input. Choose another "
                                "output path")


SOURCE_FORM = "spa.source_form"  # set by spa.frontends.onnx when a model is read
#: meta key: the map-typed tail set aside at load (``spa.frontends.onnx_tail``), put back on write.
DETACHED_TAIL = "spa.detached_tail"


def reattach(proto: onnx.ModelProto, record: dict | None) -> onnx.ModelProto:
    """``proto`` (a model SPA wrote) with the map-typed tail its input had put back: the tail's
    nodes, initializers and value types, the graph outputs in their original order, and the
    tensors the tail reads no longer outputs. ``proto`` is modified and returned."""
    if not record:
        return proto
    g = proto.graph
    ours = {o.name: o for o in g.output}
    outputs = [onnx.ValueInfoProto.FromString(data if data is not None else ours[name].SerializeToString())
               for name, data in record["outputs"]]
    g.node.extend(onnx.NodeProto.FromString(b) for b in record["nodes"])
    g.initializer.extend(onnx.TensorProto.FromString(b) for b in record["initializers"])
    g.value_info.extend(onnx.ValueInfoProto.FromString(b) for b in record["value_info"])
    del g.output[:]
    g.output.extend(outputs)
    have = {o.domain for o in proto.opset_import}
    for domain, version in record["opsets"].items():
        if domain not in have:
            proto.opset_import.append(onnx.helper.make_opsetid(domain, version))
    return proto


def min_ir_version(opset: int) -> int:
    """The oldest IR version that holds a default-domain opset (onnx.helper.VERSION_TABLE)."""
    from onnx.helper import VERSION_TABLE

    return min((row[1] for row in VERSION_TABLE if row[2] >= opset), default=VERSION_TABLE[-1][1])


def output_form(model: ir.Model) -> ir.Model:
    """``model`` in the IR form it was read in: the input's IR version where the output's opset
    allows it, and (IR 3) every initializer also listed as a graph input, with its new shape.
    A copy when anything changes (tensors shared); the model itself otherwise."""
    form = model.meta.get(SOURCE_FORM)
    if not form:
        return model
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx")) or 0
    if opset == form["opset"]:  # the input's opset: the input's IR version holds it
        ir_version = int(form["ir_version"])
    else:  # converted (--target-opset): the newer of the input's and what the opset needs
        ir_version = max(int(form["ir_version"]), min_ir_version(opset))
    as_inputs = form.get("initializers_as_inputs") or ir_version < 4
    if ir_version == model.ir_version and not as_inputs:
        return model
    out = model.clone()
    out.meta.update(model.meta)
    out.ir_version = ir_version
    if as_inputs:
        listed = {v.name for v in out.graph.inputs}
        for name, v in out.graph.initializers.items():
            if name not in listed:
                out.graph.inputs.append(v)
    return out


def save(model: ir.Model, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically (external data beside it when it is large), in
    the IR form the input came in (:func:`output_form`)."""
    path = Path(path)
    model = output_form(model)
    data_name = path.name + ".data"
    _refuse_overwriting_own_data(model, [path, path.parent / data_name])
    tail = model.meta.get(DETACHED_TAIL)
    if tail:
        if model_nbytes(model) >= EXTERNAL_DATA_THRESHOLD:
            raise ArgumentError(f"cannot write {path}: a model over {EXTERNAL_DATA_THRESHOLD >> 30} GiB with map-typed "
                                f"outputs ({', '.join(tail['ops'])}) is not supported; write it without them")
        proto = reattach(to_proto(model), tail)
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            raise ValidationError(f"the model with its map-typed outputs put back ({', '.join(tail['ops'])}) does "
                                  f"not pass onnx.checker: {exc}; nothing was written") from exc
        atomic_write_bytes(path, proto.SerializeToString())
        return path
    if model_nbytes(model) < EXTERNAL_DATA_THRESHOLD:
        atomic_write_bytes(path, to_proto(model).SerializeToString())
        return path
    with _writing(path), tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        tmp_model = Path(tmp) / path.name
        ir.save(model, tmp_model, external_data=data_name)
        os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    return path


def _external_data_files(model: Path) -> set[Path]:
    """The files a model's external data names (resolved); empty when the model cannot be
    parsed (loading it reports why)."""
    try:
        proto = onnx.load(str(model), load_external_data=False)
        from onnx.external_data_helper import _get_all_tensors, uses_external_data

        tensors = [t for t in _get_all_tensors(proto) if uses_external_data(t)]
    except Exception:  # noqa: BLE001 - the frontend reports an unreadable model with its own message
        return set()
    files = set()
    for t in tensors:
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        if location and "\0" not in location and not os.path.isabs(location):
            files.add((model.parent / location).resolve())
    return files


def refuse_overwriting_inputs(outputs, inputs, model=None) -> None:
    """ArgumentError, before anything is read or written, when an output path (``outputs``:
    (flag, path) pairs) is an input (``inputs``: (description, path) pairs), another output,
    or an existing file the ``model`` reads external data from."""
    seen: dict[Path, str] = {}
    for flag, path in outputs:
        where = Path(path).resolve()
        if where in seen:
            raise ArgumentError(f"{flag} {path} is the same file as {seen[where]}; give each output its own path")
        seen[where] = f"{flag} {path}"
        for what, source in inputs:
            if where == Path(source).resolve():
                raise ArgumentError(f"{flag} {path} is {what} {source}; SPA never overwrites its input. "
                                    "Choose another output path")
    existing = {p for p in seen if p.is_file()}
    if existing and model is not None and Path(model).is_file():
        for data_file in _external_data_files(Path(model)) & existing:
            raise ArgumentError(f"{seen[data_file]} is the external data file of the input model {model}; "
                                "SPA never overwrites its input. Choose another output path")

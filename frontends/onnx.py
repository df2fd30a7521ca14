"""ONNX frontend: read a model (path, bytes, ModelProto or onnx_ir.Model) and write one atomically.

A file is checked before onnx-ir builds a model from it, so that a malformed or hostile file
is refused with a :class:`~spa.errors.FrontendError` naming the file and what is wrong:

* it must parse as an ONNX protobuf and not be empty;
* every tensor's declared shape must match the data it holds (a 16-byte tensor cannot declare
  ``[100000, 100000]``), and external data must exist and be long enough;
* an external-data ``location`` must be a relative path inside the model's folder: an
  absolute one, one that escapes with ``..`` or through a symbolic link is refused before
  anything is read (onnx-ir reads external data lazily, from the model's folder);
* types onnx-ir cannot represent (maps) are set aside where they end the graph (the ZipMap of
  scikit-learn classifiers, see ``onnx_tail``) and named anywhere else, instead of failing deep
  inside the deserializer;
* the graph must be acyclic, import a default opset >= 11, and declare graph inputs a
  machine could hold.
"""

from __future__ import annotations

import math
import os
import posixpath
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
import onnx_ir as ir
from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError
from google.protobuf.message import Error as ProtobufError

from spa.errors import FrontendError
from spa.frontends.onnx_tail import detach, has_map, needs_detaching
from spa.io import DETACHED_TAIL, model_nbytes, read_on_demand, save, to_proto  # noqa: F401  (re-exported)

#: The oldest default-domain opset SPA analyses. Models are analysed and written at their own
#: opset: onnx.version_converter has no way back for many ops (measured with onnx 1.23: Gemm 11->10,
#: Clip 11->10, Relu 14->13, BatchNormalization 15->14), so converting up for analysis and back
#: down would refuse most model-zoo files; the rules read the old op forms instead.
MIN_OPSET = 7
#: meta key: the form the model came in (opset, IR version, initializers listed as inputs).
SOURCE_FORM = "spa.source_form"
# A graph input declared larger than this (1 TiB) cannot be fed on any machine: its shape is
# corrupt (or a placeholder), and every run with synthetic inputs would fail allocating it.
MAX_INPUT_BYTES = 1 << 40
# Errors a parser or onnx-ir's deserializer raises on a malformed model.
_READ_ERRORS = (DecodeError, ProtobufError, text_format.ParseError, json_format.ParseError, OSError,
                ValueError, TypeError, KeyError, IndexError, NotImplementedError, RecursionError, MemoryError,
                OverflowError)


def load(source) -> ir.Model:
    """Load ``source`` into an onnx_ir.Model. Weights in external data are read lazily."""
    if isinstance(source, ir.Model):
        what = "the model"
        _check_ir_external_data(source, what)
        model = source
    elif isinstance(source, onnx.ModelProto):
        what = "the ModelProto"
        model = _checked_model(source, what, None)
    elif isinstance(source, (bytes, bytearray)):
        what = "<bytes>"
        model = _from_bytes(bytes(source), what)
    elif isinstance(source, (str, os.PathLike)):
        what = str(source)
        model = _from_path(Path(source))
    else:
        raise FrontendError(f"cannot load a model from {type(source).__name__}; pass a path, bytes, "
                            "onnx.ModelProto or onnx_ir.Model")
    _check_opset(model, what)
    _check_inputs(model, what)
    _check_acyclic(model, what)
    _record_source_form(model)
    return model


def _record_source_form(model: ir.Model) -> None:
    """Remember the opset, IR version and IR-3 form (every initializer also a graph input) the
    model came in, so the writer gives them back; analysis uses IR >= 4 semantics."""
    inputs = {v.name for v in model.graph.inputs}
    inits = set(model.graph.initializers)
    model.meta[SOURCE_FORM] = {
        "opset": model.opset_imports.get("", model.opset_imports.get("ai.onnx")),
        "ir_version": int(model.ir_version),
        "initializers_as_inputs": bool(inits) and inits <= inputs,
    }
    if model.ir_version < 4:  # IR 3 requires initializers among the inputs; SPA takes them out
        model.ir_version = 4


# ----------------------------------------------------------------------------- reading

def _short(exc: BaseException, limit: int = 300) -> str:
    """The innermost cause of ``exc``, on one line, at most ``limit`` characters."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, MemoryError):
        text = f"out of memory{': ' + text if text != 'MemoryError' else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RecursionError, MemoryError, ValueError) as exc:
        raise FrontendError(f"{what} is not a valid ONNX model (truncated or corrupt protobuf: {_short(exc)}); "
                            "check that the file is an .onnx model and was copied completely") from exc
    return proto


def _check_not_empty(proto: onnx.ModelProto, what: str) -> None:
    if not proto.graph.node and not proto.graph.output:
        raise FrontendError(f"{what} parsed as an empty ONNX model (no nodes, no outputs); it is probably not "
                            "an ONNX file: pass the .onnx model")


def _deserialize(proto: onnx.ModelProto, what: str) -> ir.Model:
    try:
        return ir.serde.deserialize_model(proto)
    except (ir.serde.SerdeError, *_READ_ERRORS) as exc:
        raise FrontendError(f"{what} is a malformed ONNX model: {_short(exc)}; check it with "
                            "onnx.checker.check_model and re-export it") from exc


def _checked_model(proto: onnx.ModelProto, what: str, base_dir: Path | None) -> ir.Model:
    """The checked proto as an onnx_ir.Model, a map-typed tail set aside (``onnx_tail``)."""
    tail = None
    if needs_detaching(proto):
        proto, tail = detach(proto, what)
    _check_proto(proto, what, base_dir)
    model = _deserialize(proto, what)
    _own_arrays(model)
    if tail is not None:
        model.meta[DETACHED_TAIL] = tail
    return model


def _owned(t):
    """A protobuf-backed tensor as one the model owns (an array read once), or ``t`` itself."""
    if type(t) is not ir.serde.TensorProtoTensor:
        return t
    try:
        if t.dtype == ir.DataType.STRING:
            return ir.StringTensor(t.numpy(), name=t.name, doc_string=t.doc_string,
                                   metadata_props=dict(t.metadata_props))
        return ir.Tensor(t.numpy(), dtype=t.dtype, name=t.name, doc_string=t.doc_string,
                         metadata_props=dict(t.metadata_props))
    except (TypeError, ValueError):  # a form onnx-ir reads only from protobuf: it stays there
        return t


def _own_arrays(model: ir.Model) -> None:
    """Inline weights (and constant attributes) read once into arrays the model owns. A tensor
    read from protobuf copies its bytes on every ``numpy()`` (each session, each score, each
    check), and any one of them keeps the whole parsed proto alive; read once, the proto is
    freed and everything after views the same arrays."""
    for graph in model.graphs():
        for v in graph.initializers.values():
            if v.const_value is not None:
                v.const_value = _owned(v.const_value)
        for node in graph:
            for name, attr in list(node.attributes.items()):
                if attr.type == ir.AttributeType.TENSOR and type(attr.value) is ir.serde.TensorProtoTensor:
                    node.attributes[name] = ir.AttrTensor(name, _owned(attr.value), doc_string=attr.doc_string)
                elif attr.type == ir.AttributeType.TENSORS and any(type(t) is ir.serde.TensorProtoTensor
                                                                   for t in attr.value):
                    node.attributes[name] = ir.AttrTensors(name, [_owned(t) for t in attr.value],
                                                           doc_string=attr.doc_string)


def _from_bytes(data: bytes, what: str) -> ir.Model:
    if not data:
        raise FrontendError(f"{what} is not a valid ONNX model: it is empty (0 bytes); pass the bytes of an "
                            ".onnx model")
    proto = _parse(data, what)
    _check_not_empty(proto, what)
    return _checked_model(proto, what, None)


def _from_path(path: Path) -> ir.Model:
    try:
        if not path.exists():
            raise FrontendError(f"model file {path} does not exist; check the path")
        if path.is_dir():
            raise FrontendError(f"{path} is a directory; pass the .onnx file")
        if not path.is_file():
            raise FrontendError(f"{path} is not a regular file; pass the .onnx file")
        size = path.stat().st_size
    except OSError as exc:
        raise FrontendError(f"cannot read {path}: {exc}") from exc
    if size == 0:
        raise FrontendError(f"{path} is not a valid ONNX model: the file is empty (0 bytes). Pass the .onnx file")
    try:
        # onnx.load picks the format from the extension (.onnx, .textproto, .json); external
        # data is not read here: onnx-ir reads it lazily, after the checks below.
        proto = onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise FrontendError(f"{path} is not a valid ONNX model (truncated or corrupt protobuf: {_short(exc)}); "
                            "check that the file is an .onnx model and was copied completely") from exc
    except _READ_ERRORS as exc:
        raise FrontendError(f"cannot read {path} as an ONNX model: {type(exc).__name__}: {_short(exc)}") from exc
    _check_not_empty(proto, str(path))
    base_dir = path.parent.absolute()
    model = _checked_model(proto, str(path), base_dir)
    # As onnx_ir.load does: external data is resolved against the model's own folder.
    ir.external_data.set_base_dir(model.graph, str(base_dir))
    return read_on_demand(model)  # weights are read when used, one tensor at a time


# ----------------------------------------------------------------------------- proto checks

def _node_label(node: onnx.NodeProto) -> str:
    return f"node '{node.name}' ({node.op_type})" if node.name else f"a {node.op_type} node"


def _tensors_and_types(proto: onnx.ModelProto):
    """Every tensor of the model, as (description, TensorProto), and every declared value
    type, as (description, TypeProto): main graph, subgraphs and functions (iteratively, so
    that deep nesting cannot exhaust the stack)."""
    tensors, types = [], []
    stack = [("", proto.graph)]
    node_lists = [(f"function '{f.name}': ", f.node) for f in proto.functions]
    while stack:
        prefix, graph = stack.pop()
        for t in graph.initializer:
            tensors.append((f"{prefix}initializer '{t.name}'", t))
        for s in graph.sparse_initializer:
            tensors.append((f"{prefix}sparse initializer '{s.values.name}' (values)", s.values))
            tensors.append((f"{prefix}sparse initializer '{s.values.name}' (indices)", s.indices))
        for kind, values in (("graph input", graph.input), ("graph output", graph.output),
                             ("value", graph.value_info)):
            for vi in values:
                types.append((f"{prefix}{kind} '{vi.name}'", vi.type))
        node_lists.append((prefix, graph.node))
        while node_lists:
            nprefix, nodes = node_lists.pop()
            for node in nodes:
                for a in node.attribute:
                    where = f"{nprefix}attribute '{a.name}' of {_node_label(node)}"
                    if a.HasField("t"):
                        tensors.append((where, a.t))
                    tensors.extend((where, t) for t in a.tensors)
                    sparse = ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors)
                    for s in sparse:
                        tensors.extend(((where, s.values), (where, s.indices)))
                    sub = f"{nprefix}subgraph '{a.name}' of {_node_label(node)}: "
                    if a.HasField("g"):
                        stack.append((sub, a.g))
                    stack.extend((sub, g) for g in a.graphs)
    return tensors, types


def _check_proto(proto: onnx.ModelProto, what: str, base_dir: Path | None) -> None:
    tensors, types = _tensors_and_types(proto)
    for where, tp in types:
        _check_type(tp, where, what)
    for where, t in tensors:
        _check_tensor(t, where, what, base_dir)


def _dtype_text(elem_type: int) -> str:
    try:
        return onnx.helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower()
    except (KeyError, ValueError):
        return f"type {elem_type}"


def _type_text(tp: onnx.TypeProto) -> str:
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        return f"tensor({_dtype_text(tp.tensor_type.elem_type)})"
    if kind == "sequence_type":
        return f"seq({_type_text(tp.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({_type_text(tp.optional_type.elem_type)})"
    if kind == "map_type":
        return f"map({_dtype_text(tp.map_type.key_type)}, {_type_text(tp.map_type.value_type)})"
    return kind or "undefined"


def _check_type(tp: onnx.TypeProto, where: str, what: str) -> None:
    if has_map(tp):
        raise FrontendError(
            f"{what}: {where} has type {_type_text(tp)}; map types cannot be read by onnx-ir, on which SPA is "
            "built, and SPA sets them aside only where they end the main graph (scikit-learn's ZipMap). Export "
            "the model without them (skl2onnx: options={id(model): {'zipmap': False}})")


def _check_location(location: str, where: str, what: str, base_dir: Path | None) -> None:
    """FrontendError unless ``location`` is relative and stays inside the model's folder
    (lexically, and once symbolic links are resolved); nothing is opened."""
    advice = ("SPA never reads a file a model names outside the model's own folder. Move the data file "
              "beside the model and store its bare file name as the location")
    if "\0" in location:
        raise FrontendError(f"{what}: {where} has an external-data location with a NUL byte; the file is corrupt")
    win = PureWindowsPath(location)
    if os.path.isabs(location) or PurePosixPath(location).is_absolute() or win.drive or win.root:
        raise FrontendError(f"{what}: {where} stores its data at the absolute path '{location}'; {advice}")
    norm = posixpath.normpath(location.replace("\\", "/"))
    if norm == ".." or norm.startswith("../") or norm in (".", ""):
        raise FrontendError(f"{what}: {where} stores its data at '{location}', outside the model's folder; {advice}")
    if base_dir is not None:
        try:
            inside = (base_dir / location).resolve().is_relative_to(base_dir.resolve())
        except (OSError, RuntimeError, ValueError):  # a symlink loop, an unreadable folder
            inside = False
        if not inside:
            raise FrontendError(f"{what}: {where} stores its data at '{location}', which leads outside the model's "
                                f"folder (through a symbolic link); {advice}")


def _dims_text(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _check_tensor(t: onnx.TensorProto, where: str, what: str, base_dir: Path | None) -> None:
    dims = list(t.dims)
    if any(d < 0 for d in dims):
        raise FrontendError(f"{what}: {where} declares a negative dimension {_dims_text(dims)}; the file is corrupt")
    try:
        dtype = ir.DataType(t.data_type)
    except ValueError:
        raise FrontendError(f"{what}: {where} has unknown data type {t.data_type}; the file is corrupt or "
                            "needs a newer onnx-ir") from None
    if dtype == ir.DataType.UNDEFINED:
        raise FrontendError(f"{what}: {where} has no data type; the file is corrupt")
    n = math.prod(dims)
    bits = None if dtype == ir.DataType.STRING else dtype.bitwidth
    need = None if bits is None else (n * bits + 7) // 8
    declared = f"declares shape {_dims_text(dims)} ({n:,} {dtype.name} elements"
    declared += ")" if need is None else f", {need:,} bytes)"
    corrupt = "the file is corrupt or truncated; re-export the model"
    if t.data_location == onnx.TensorProto.EXTERNAL:
        entries = {e.key: e.value for e in t.external_data}
        location = entries.get("location")
        if not location:
            raise FrontendError(f"{what}: {where} is stored as external data without a location; {corrupt}")
        _check_location(location, where, what, base_dir)
        try:
            offset = int(entries.get("offset") or 0)
            length = None if entries.get("length") in (None, "") else int(entries["length"])
        except ValueError:
            raise FrontendError(f"{what}: {where} has a malformed external-data offset or length "
                                f"({entries.get('offset')!r}, {entries.get('length')!r}); {corrupt}") from None
        if offset < 0 or (length is not None and length < 0):
            raise FrontendError(f"{what}: {where} has a negative external-data offset or length; {corrupt}")
        if need is not None and length is not None and length < need:
            raise FrontendError(f"{what}: {where} {declared} but its external data in '{location}' is only "
                                f"{length:,} bytes long; {corrupt}")
        if base_dir is None:
            return
        data_file = base_dir / location  # as onnx-ir resolves it: os.path.join(base_dir, location)
        try:
            size = data_file.stat().st_size if data_file.is_file() else None
        except OSError:
            size = None
        if size is None:
            raise FrontendError(f"{what}: {where} stores its data in '{location}', which does not exist in the "
                                f"model's folder {base_dir}; copy the external data file beside the model")
        if need is not None and offset + need > size:
            raise FrontendError(f"{what}: {where} {declared} at offset {offset:,} of '{location}', but that file "
                                f"is {size:,} bytes; {corrupt}")
        return
    if t.HasField("raw_data"):
        if need is not None and len(t.raw_data) != need:
            raise FrontendError(f"{what}: {where} {declared} but holds {len(t.raw_data):,} bytes of data; {corrupt}")
        return
    try:
        field = onnx.helper.tensor_dtype_to_field(t.data_type)
    except (KeyError, ValueError):
        return
    if bits is not None and bits < 8:
        return  # packed several to an int32; the deserializer checks those
    per = 2 if dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128) else 1
    count = len(getattr(t, field))
    if count != n * per:
        raise FrontendError(f"{what}: {where} {declared} but holds {count // per:,} values; {corrupt}")


def _check_ir_external_data(model: ir.Model, what: str) -> None:
    """An onnx_ir.Model built elsewhere: its external tensors' locations obey the same rule."""
    for graph in model.graphs():
        for v in graph.initializers.values():
            t = v.const_value
            if isinstance(t, ir.ExternalTensor):
                base = Path(t.base_dir).absolute() if t.base_dir else None
                _check_location(str(t.location), f"initializer '{v.name}'", what, base)


# ----------------------------------------------------------------------------- model checks

def _check_opset(model: ir.Model, what: str) -> None:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None:
        imported = ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in model.opset_imports.items()) or "none"
        raise FrontendError(
            f"{what} imports no default ONNX opset (opset imports: {imported}), so its standard ops have no "
            "version and it cannot be analysed. Add the opset it was written for, e.g. "
            "model.opset_import.append(onnx.helper.make_opsetid('', 17))")
    if opset < MIN_OPSET:
        raise FrontendError(
            f"{what} uses ONNX opset {opset}; SPA reads opset {MIN_OPSET} or newer. Convert it first: "
            f"onnx.version_converter.convert_version(model, {MIN_OPSET})"
        )


def _check_inputs(model: ir.Model, what: str) -> None:
    for v in model.graph.inputs:
        if v.shape is None or v.dtype is None or v.dtype == ir.DataType.STRING or v.is_initializer():
            continue
        dims = list(v.shape)
        if not all(isinstance(d, int) for d in dims):
            continue
        nbytes = (math.prod(dims) * v.dtype.bitwidth + 7) // 8
        if nbytes > MAX_INPUT_BYTES:
            raise FrontendError(
                f"{what}: graph input '{v.name}' declares shape {_dims_text(dims)} ({nbytes:,} bytes of "
                f"{v.dtype.name}), more than any machine can hold; the declared shape is corrupt. Fix it in the "
                "model (or make those dims symbolic and pass --input-shape)")


def _check_acyclic(model: ir.Model, what: str) -> None:
    """Kahn's algorithm over the main graph; a cycle is named by its nodes."""
    nodes = list(model.graph)
    ids = {id(n): n for n in nodes}
    order = {k: i for i, k in enumerate(ids)}
    preds = {id(n): {id(p) for v in n.inputs if v is not None and (p := v.producer()) is not None
                     and id(p) in ids} for n in nodes}
    indegree = {k: len(p) for k, p in preds.items()}
    succs: dict[int, list[int]] = {k: [] for k in ids}
    for k, ps in preds.items():
        for p in ps:
            succs[p].append(k)
    ready = [k for k, d in indegree.items() if d == 0]
    seen = 0
    while ready:
        k = ready.pop()
        seen += 1
        for s in succs[k]:
            indegree[s] -= 1
            if indegree[s] == 0:
                ready.append(s)
    if seen == len(nodes):
        return
    left = {k for k, d in indegree.items() if d > 0}
    k = next(k for k in ids if k in left)  # the first node (file order) left over
    path, index = [], {}
    while k not in index:  # every left-over node has a left-over predecessor: walk back to a repeat
        index[k] = len(path)
        path.append(k)
        k = min((p for p in preds[k] if p in left), key=order.__getitem__)
    cycle = path[index[k]:][::-1]
    names = [f"'{ids[c].name or ids[c].op_type}'" for c in cycle]
    raise FrontendError(
        f"{what} has a cycle: {' -> '.join(names + names[:1])} (each reads the output of the one before); "
        "ONNX graphs must be acyclic. The file is corrupt or was edited by hand; re-export it")


def convert_opset(model: ir.Model, target: int) -> ir.Model:
    """``model`` converted to default-domain opset ``target`` with onnx.version_converter (other
    domains untouched). Where the converter has no adapter for an op, a FrontendError names the
    op and the opsets (never a group)."""
    import re

    from spa.io import min_ir_version, to_proto

    current = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if target == current:
        return model
    if target < MIN_OPSET:
        raise FrontendError(f"target opset {target}: SPA writes opset {MIN_OPSET} or newer")
    try:
        converted = onnx.version_converter.convert_version(to_proto(model), int(target))
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
        text = str(exc)
        found = re.search(r"(?:From|To) Version \$?(\d+) for (\w+)", text)
        what = (f"op {found.group(2)} (no adapter at opset {found.group(1)} in onnx.version_converter)"
                if found else text.strip().splitlines()[-1][:300])
        raise FrontendError(f"cannot convert the pruned model from opset {current} to {target}: {what}. "
                            f"Choose another --target-opset, or leave it out to keep opset {current}") from exc
    converted.ir_version = max(converted.ir_version, min_ir_version(int(target)))
    out = ir.serde.deserialize_model(converted)
    out.meta.update(model.meta)
    return out

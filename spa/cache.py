"""An on-disk cache of analysis results (sensitivity reports), keyed by a model's content hash
and the settings that produced them.

The folder is ``$SPA_CACHE_DIR`` when set, else ``~/.cache/spa``; every kind of result has its
own subfolder and one JSON file per key. Entries are written atomically; an unreadable entry is
a miss (it is recomputed and overwritten), never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

_CHUNK = 1 << 20


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$SPA_CACHE_DIR``, else ``~/.cache/spa``."""
    if override is not None:
        return Path(override)
    env = os.environ.get("SPA_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "spa"


def _file_digest(h, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)


def model_digest(source) -> str:
    """SHA-256 of a model's content: a file's bytes and those of the external data files it
    names, serialized bytes for a ModelProto or an onnx_ir.Model."""
    import onnx
    import onnx_ir as ir

    h = hashlib.sha256()
    if isinstance(source, (str, os.PathLike)):
        from spa.io import _external_data_files

        path = Path(source)
        if path.is_file():
            _file_digest(h, path)
            for data in sorted(_external_data_files(path)):
                if data.is_file():
                    h.update(data.name.encode())
                    _file_digest(h, data)
            return h.hexdigest()
        h.update(str(path.resolve()).encode())  # loading reports the missing file
        return h.hexdigest()
    if isinstance(source, (bytes, bytearray)):
        h.update(source)
    elif isinstance(source, onnx.ModelProto):
        h.update(source.SerializeToString())
    elif isinstance(source, ir.Model):
        from spa.io import to_proto

        h.update(to_proto(source).SerializeToString())
    else:
        return ""
    return h.hexdigest()


def _array_digest(h, value) -> bool:
    """Fold arrays, dicts and lists of them into ``h``; False for what cannot be hashed."""
    if isinstance(value, np.ndarray):
        h.update(f"{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
        return True
    if isinstance(value, dict):
        for k in sorted(value):
            h.update(str(k).encode())
            if not _array_digest(h, value[k]):
                return False
        return True
    if isinstance(value, (list, tuple)):
        return all(_array_digest(h, v) for v in value)
    return False


def calibration_digest(source):
    """A JSON-ready stand-in for a calibration source in a cache key: the name of a data-free
    source, the content hash of a directory's ``.npy`` files or of in-memory arrays; None when
    the source cannot be hashed (a callable): then nothing is cached."""
    if source is None or isinstance(source, str) and not Path(source).is_dir():
        return source
    h = hashlib.sha256()
    if isinstance(source, (str, os.PathLike)):
        for f in sorted(Path(source).glob("*.npy")):
            h.update(f.name.encode())
            _file_digest(h, f)
        return {"directory": h.hexdigest()}
    return {"arrays": h.hexdigest()} if _array_digest(h, source) else None


def key(settings: dict) -> str:
    """The cache key of a JSON-ready ``settings`` dict."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]


def entry_path(kind: str, settings: dict, directory=None) -> Path:
    return cache_dir(directory) / kind / f"{key(settings)}.json"


def load(path: Path) -> dict | None:
    """The cached JSON at ``path``, or None (missing or unreadable: a miss)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def store(path: Path, data: dict) -> None:
    from spa.io import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(data, indent=1).encode())

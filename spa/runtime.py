"""onnxruntime helpers: sessions on the best provider, synthetic feeds, runs and latency.

onnxruntime is imported lazily so that ``import spa`` stays light.
"""

from __future__ import annotations

import time

import numpy as np

_NP_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def providers() -> list[str]:
    """CUDA when onnxruntime-gpu provides it, else CPU."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]


def session(model, threads: int | None = None, optimize: bool = True):
    """An InferenceSession from a path, bytes or ModelProto."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=providers())


def session_exposing(model, names, optimize: bool = False):
    """A session over ``model`` (an onnx_ir.Model) whose outputs also include the intermediate
    values ``names``, to read activations or shapes off a run."""
    import onnx

    from spa.io import to_proto

    proto = to_proto(model)
    known = {o.name for o in proto.graph.output}
    for name in names:
        if name not in known:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return session(proto, optimize=optimize)


class _Arg:
    """An input as onnxruntime describes it (``name``, ``shape``, ``type``)."""

    def __init__(self, name: str, shape: list, type_: str):
        self.name, self.shape, self.type = name, shape, type_


class ModelInputs:
    """The graph inputs of an onnx_ir.Model in the shape of a session's ``get_inputs()``, to make
    feeds without creating a session."""

    def __init__(self, model):
        self._args = []
        for v in model.graph.inputs:
            if v.name in model.graph.initializers:
                continue
            shape = [] if v.shape is None else [d if isinstance(d, int) else getattr(d, "value", None)
                                                for d in v.shape]
            dtype = v.dtype.numpy() if v.dtype is not None else np.dtype(np.float32)
            name = next((k for k, t in _NP_TYPES.items() if np.dtype(t) == dtype), "tensor(float)")
            self._args.append(_Arg(v.name, shape, name))

    def get_inputs(self) -> list:
        return list(self._args)


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exceptions onnxruntime raises for a model it cannot load or run."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, NotImplemented

    return (Fail, InvalidArgument, InvalidGraph, NotImplemented, RuntimeError)


def concrete_shape(name: str, shape, overrides: dict | None = None) -> tuple[int, ...]:
    """Replace symbolic dims: batch (axis 0) -> 1; sequence-like -> 16; spatial (rank 4) -> 64."""
    if overrides and name in overrides:
        return tuple(int(s) for s in overrides[name])
    out = []
    for axis, s in enumerate(shape):
        if isinstance(s, int) and s >= 0:
            out.append(s)
        elif overrides and isinstance(s, str) and s in overrides:
            out.append(int(overrides[s]))
        elif axis == 0:
            out.append(1)
        else:
            out.append(64 if len(shape) == 4 and axis >= 2 else 16)
    return tuple(out)


def random_feeds(sess, overrides: dict | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        shape = concrete_shape(i.name, i.shape, overrides)
        dtype = _NP_TYPES.get(i.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[i.name] = np.ones(shape, dtype=bool)
        else:
            feeds[i.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def latency_ms(sess, feeds, warmup: int = 5, runs: int = 30) -> float:
    """Median wall time of one run, in milliseconds."""
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)

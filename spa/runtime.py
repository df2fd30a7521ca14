"""onnxruntime helpers: sessions on the best provider, synthetic feeds, runs and latency.

onnxruntime is imported lazily so that ``import spa`` stays light.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np

_NP_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def ort():
    """The onnxruntime module, or a SpaError saying how to install one of its two builds."""
    try:
        import onnxruntime
    except ImportError as exc:
        from spa.errors import RuntimeMissingError

        raise RuntimeMissingError(
            "onnxruntime is not installed. SPA needs exactly one of its builds: "
            "pip install 'spa-prune[cpu]' (onnxruntime) or 'spa-prune[gpu]' (onnxruntime-gpu, CUDA)") from exc
    return onnxruntime


@dataclass(frozen=True, slots=True)
class Device:
    """Where SPA runs models: onnxruntime execution providers in order of preference."""

    providers: tuple
    name: str  # "cpu", "cuda:0", or a provider name
    note: str = ""  # why auto chose it

    @property
    def is_cuda(self) -> bool:
        return self.providers[0] == CUDA if self.providers else False

    @property
    def device_id(self) -> int:
        return int(self.name.split(":")[1]) if self.name.startswith("cuda:") else 0


CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
_BUILDS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn")


def installed_builds() -> list[str]:
    """The onnxruntime distributions installed (more than one is a broken install)."""
    from importlib import metadata

    out = []
    for name in _BUILDS:
        try:
            metadata.version(name)
            out.append(name)
        except metadata.PackageNotFoundError:
            continue
    return out
_current: Device | None = None
_preloaded = False


def _preload_cuda() -> str | None:
    """onnxruntime >= 1.21 finds CUDA and cuDNN from pip's nvidia-* wheels with preload_dlls();
    returns the libraries it could not load, if any (it prints them; they become our message)."""
    global _preloaded
    rt = ort()
    if _preloaded or not hasattr(rt, "preload_dlls"):
        return None
    import io
    import re

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rt.preload_dlls()
    except Exception as exc:  # noqa: BLE001 - the loader's own message says which library is missing
        return str(exc)
    _preloaded = True
    missing = re.findall(r"Failed to load (\S+?):", buf.getvalue())
    return f"cannot load {', '.join(missing)}" if missing else None


_PROBE = None


def _probe_model() -> bytes:
    """A one-node model to see whether a session can really be created on a provider."""
    global _PROBE
    if _PROBE is None:
        from onnx import TensorProto, helper

        g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        _PROBE = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    return _PROBE


def _runs_on(provider_options: list) -> bool:
    rt = ort()
    opts = rt.SessionOptions()
    opts.log_severity_level = 4
    try:
        sess = rt.InferenceSession(_probe_model(), opts, providers=provider_options)
        sess.run(None, {"x": np.zeros(1, np.float32)})
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False
    first = provider_options[0][0] if isinstance(provider_options[0], tuple) else provider_options[0]
    return sess.get_providers()[0] == first


def select_device(device: str = "auto", provider: str | None = None) -> Device:
    """Resolve ``device`` (auto / cpu / cuda / cuda:N) or an explicit execution ``provider``.

    ``auto`` uses CUDA when a session can actually be created there, else the CPU, and says why
    in ``Device.note``. An explicit ``cuda`` where it cannot run is an ArgumentError naming what
    is missing."""
    from spa.errors import ArgumentError

    rt = ort()
    avail = rt.get_available_providers()
    if provider is not None:
        if provider not in avail:
            raise ArgumentError(f"execution provider {provider!r} is not available in this onnxruntime build "
                                f"(available: {', '.join(avail)})")
        return Device((provider, CPU) if provider != CPU else (CPU,), provider)
    dev = (device or "auto").lower()
    if dev == "cpu":
        return Device((CPU,), "cpu")
    if dev == "auto" or dev == "cuda" or dev.startswith("cuda:"):
        try:
            index = int(dev.split(":")[1]) if ":" in dev else 0
        except ValueError:
            raise ArgumentError(f"device={device!r}: expected auto, cpu, cuda or cuda:N") from None
        if CUDA not in avail:
            why = "this onnxruntime build has no CUDA execution provider"
            builds = installed_builds()
            if len(builds) > 1:
                why += (f" ({' and '.join(builds)} are both installed and overwrite each other: pip uninstall -y "
                        f"{' '.join(builds)} && pip install 'spa-prune[gpu]')")
            else:
                why += f" (pip uninstall -y {builds[0] if builds else 'onnxruntime'} && pip install 'spa-prune[gpu]')"
        else:
            problem = _preload_cuda()
            if _runs_on([(CUDA, {"device_id": index}), CPU]):
                return Device(((CUDA, {"device_id": index}), CPU), f"cuda:{index}",
                              "CUDA execution provider" if dev == "auto" else "")
            why = ("a session cannot be created on the CUDA execution provider"
                   + (f" (CUDA libraries: {problem}; pip install 'onnxruntime-gpu[cuda,cudnn]' or install "
                      "the CUDA and cuDNN versions this onnxruntime-gpu was built for)" if problem else
                      " (no usable GPU, or the CUDA / cuDNN libraries are not found: pip install "
                      "'onnxruntime-gpu[cuda,cudnn]' or install them system-wide)"))
        if dev == "auto":
            return Device((CPU,), "cpu", f"CPU ({why})")
        raise ArgumentError(f"device={device!r} cannot be used: {why}")
    raise ArgumentError(f"device={device!r}: expected auto, cpu, cuda or cuda:N")


def current_device() -> Device:
    """The device sessions are created on (``auto`` until :func:`use_device` chooses one)."""
    global _current
    if _current is None:
        _current = select_device("auto")
    return _current


@contextlib.contextmanager
def use_device(device: str | Device = "auto", provider: str | None = None):
    """Within the block, SPA's sessions run on ``device`` (see :func:`select_device`)."""
    global _current
    old = _current
    _current = device if isinstance(device, Device) else select_device(device, provider)
    try:
        yield _current
    finally:
        _current = old


def providers() -> list:
    """The current device's execution providers, in order (CUDA first when it can run)."""
    return list(current_device().providers)


def _options(threads: int | None, optimize: bool, lean: bool = False):
    rt = ort()
    opts = rt.SessionOptions()
    opts.log_severity_level = 3
    if lean:  # MatMul/Gemm weights are not repacked: no second copy of them in the session
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = rt.GraphOptimizationLevel.ORT_DISABLE_ALL
    return opts


def _ort_value(tensor):
    """An OrtValue over the tensor's array (no copy where the array is contiguous); dtypes
    numpy lacks (bfloat16, float8) travel as their bits with the ONNX type named."""
    rt = ort()
    arr = np.ascontiguousarray(tensor.numpy())
    if arr.dtype.type in _NP_NATIVE:
        return rt.OrtValue.ortvalue_from_numpy(arr)
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[arr.dtype.itemsize]
    return rt.OrtValue.ortvalue_from_numpy_with_onnx_type(arr.view(bits), int(tensor.dtype))


_NP_NATIVE = frozenset({np.float32, np.float64, np.float16, np.int8, np.uint8, np.int16, np.uint16, np.int32,
                        np.uint32, np.int64, np.uint64, np.bool_})


#: What a lean session leaves out: constant folding and the transpose optimizer copy every
#: weight an export transposes (``Transpose(W)`` becomes a new initializer); the other
#: optimizations run.
LEAN_DISABLED = ("ConstantFolding", "TransposeOptimizer")


def _model_session(model, threads: int | None, optimize: bool, extra_outputs=(), lean: bool = False):
    """A session over an onnx_ir.Model that never serializes its weights: the graph goes to
    onnxruntime as a small proto (``spa.io.skeleton``), each large initializer as an external
    initializer over its array (memory-mapped or computed, not copied into protobuf). Works
    for models over 2 GB and for external data in any folder."""
    import onnx

    from spa.io import skeleton

    proto, tensors, _ = skeleton(model)
    known = {o.name for o in proto.graph.output}
    for name in extra_outputs:
        if name not in known:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = _options(threads, optimize, lean)
    values = [_ort_value(t) for t in tensors.values()]
    if values:
        opts.add_external_initializers(list(tensors), values)
    sess = ort().InferenceSession(proto.SerializeToString(), opts, providers=providers(), **_disabled(lean))
    sess._spa_weights = values  # the arrays onnxruntime reads stay alive with the session
    return sess


def _disabled(lean: bool) -> dict:
    return {"disabled_optimizers": list(LEAN_DISABLED)} if lean else {}


def session(model, threads: int | None = None, optimize: bool = True, lean: bool = False):
    """An InferenceSession from an onnx_ir.Model (weights by reference, any size), a path
    (its external data beside it), bytes or a ModelProto, on the current device. ``lean``:
    onnxruntime makes no copy of the weights (no prepacking, no constant folding of transposed
    weights; the other optimizations run), for the few runs of a check or a calibration pass,
    where memory counts more than the last percent of speed."""
    import onnx_ir as ir

    if isinstance(model, ir.Model):
        return _model_session(model, threads, optimize, lean=lean)
    opts = _options(threads, optimize, lean)
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    return ort().InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=providers(),
                                  **_disabled(lean))


def session_exposing(model, names, optimize: bool = False):
    """A session over ``model`` (an onnx_ir.Model) whose outputs also include the intermediate
    values ``names``, to read activations or shapes off a run."""
    return _model_session(model, None, optimize, names, lean=True)


class _Arg:
    """An input as onnxruntime describes it (``name``, ``shape``, ``type``)."""

    def __init__(self, name: str, shape: list, type_: str):
        self.name, self.shape, self.type = name, shape, type_


class ModelInputs:
    """The graph inputs of an onnx_ir.Model in the shape of a session's ``get_inputs()``, to make
    feeds without creating a session."""

    def __init__(self, model):
        from spa.state import state_symbols

        self._args = []
        known = state_symbols(model)  # K/V cache dims the attention op fixes
        for v in model.graph.inputs:
            if v.name in model.graph.initializers:
                continue
            shape = [] if v.shape is None else [d if isinstance(d, int) else getattr(d, "value", None)
                                                for d in v.shape]
            shape = [known.get(d, d) if isinstance(d, str) else d for d in shape]
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


#: Synthetic inputs larger than this are refused (a mistyped --input-shape, a huge declared dim).
MAX_FEED_BYTES = 8 << 30


def run_flat(sess, feeds: dict) -> tuple[list[str], list[np.ndarray]]:
    """Run ``sess``; outputs as arrays with their names: a sequence output gives one array per
    element (``name[i]``), an empty optional none. Checks compare runs array by array."""
    names, arrays = [], []
    for name, out in zip((o.name for o in sess.get_outputs()), sess.run(None, feeds)):
        if isinstance(out, (list, tuple)):
            for i, item in enumerate(out):
                names.append(f"{name}[{i}]")
                arrays.append(np.asarray(item))
        elif out is not None:
            names.append(name)
            arrays.append(np.asarray(out))
    return names, arrays


def random_feeds(sess, overrides: dict | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        shape = concrete_shape(i.name, i.shape, overrides)
        dtype = _NP_TYPES.get(i.type, np.float32)
        nbytes = int(np.prod([int(s) for s in shape], dtype=object)) * np.dtype(dtype).itemsize
        if nbytes > MAX_FEED_BYTES or any(int(s) < 0 for s in shape):
            from spa.errors import ArgumentError

            raise ArgumentError(f"input '{i.name}' of shape {list(shape)} would take {nbytes:,} bytes; pass a "
                                f"smaller shape with --input-shape {i.name}=D1,D2,... (input_shapes=...)")
        if np.issubdtype(dtype, np.floating):
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[i.name] = np.ones(shape, dtype=bool)
        else:
            feeds[i.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def latency_ms(sess, feeds, warmup: int = 5, runs: int = 30) -> float:
    """Median wall time of one run, in milliseconds. On CUDA, inputs and outputs stay on the
    device (IO binding), so no host copy is timed; a CUDA run returns once its stream is done."""
    run = runner(sess, feeds)
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def runner(sess, feeds):
    """A callable running ``sess`` once on ``feeds``, as :func:`latency_ms` times it (IO binding
    on CUDA)."""
    return _bound_run(sess, feeds) if sess.get_providers()[0] == CUDA else (lambda: sess.run(None, feeds))


def _bound_run(sess, feeds):
    rt = ort()
    device_id = int(sess.get_provider_options().get(CUDA, {}).get("device_id", 0))
    binding = sess.io_binding()
    for name, arr in feeds.items():
        binding.bind_ortvalue_input(name, rt.OrtValue.ortvalue_from_numpy(arr, "cuda", device_id))
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cuda", device_id)

    def run() -> None:
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run

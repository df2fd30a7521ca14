"""Sensitivity allocation: per-group ratios from how much the model output moves when a share of
a group's lowest-scored channels is masked.

For every candidate group, the ``probe`` share (default: the target ratio) of its lowest-scored
channels is zeroed in all the group's weights (producers, norms and the consumers' input
columns: the masked channels contribute nothing downstream) and the model is run on the
calibration inputs; the sensitivity is the relative squared error of the outputs against the
dense run, ‖y − y₀‖² / ‖y₀‖². One onnxruntime session serves all probes: the group weights are
graph inputs, fed dense or masked. Groups are ranked by log-sensitivity and mapped into
``ratio ± spread`` (the more sensitive lose less), then shifted so the share removed over all
groups, weighted by each group's parameters per channel as in the ``obs`` allocation, is the
target (``layerwise.fit_target``): the parameter count comes out close to uniform's.
"""

from __future__ import annotations

import math
import time

import numpy as np

from spa.allocation.layerwise import _spread, fit_target
from spa.allocation.obs import params_per_channel

#: Seconds the last :func:`sensitivity_ratios` call spent and how many probe runs it made.
LAST_COST: dict = {}


def _session_with_weight_inputs(proto, names: set[str]):
    """A session over ``proto`` where the initializers ``names`` are graph inputs."""
    import onnx

    from spa import runtime

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    keep = []
    for init in m.graph.initializer:
        if init.name in names:
            m.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return runtime.session(m, optimize=True)


def _masked(group, dense: dict, removed: np.ndarray) -> dict:
    """The group's float weights with the indices of the ``removed`` channels zeroed."""
    out = {}
    for m in group.params:
        if m.param not in dense:
            continue
        arr = out.get(m.param, dense[m.param]).copy()
        idx = np.flatnonzero(np.isin(m.channel, removed))
        sl = [slice(None)] * arr.ndim
        sl[m.param_axis] = idx
        arr[tuple(sl)] = 0
        out[m.param] = arr
    return out


def _rel_error(got: list, want: list) -> float:
    num = sum(float(((g.astype(np.float64) - w) ** 2).sum()) for g, w in zip(got, want))
    den = sum(float((w.astype(np.float64) ** 2).sum()) for w in want)
    return num / max(den, 1e-30)


def masking_session(model, groups, proto=None):
    """(session, output names, dense values): one session over ``model`` whose float weights of
    ``groups`` are graph inputs, fed ``values`` (dense) or masked copies."""
    from spa.io import to_proto

    proto = to_proto(model) if proto is None else proto
    floats = {i.name for i in proto.graph.initializer if i.data_type in (1, 10, 11, 16)}
    names = {m.param for g in groups for m in g.params if m.param in floats}
    values = {n: v.const_value.numpy() for n, v in model.graph.initializers.items() if n in names}
    sess = _session_with_weight_inputs(proto, set(values))
    return sess, [o.name for o in sess.get_outputs()], values


def group_sensitivities(model, groups, scores, feeds: list[dict], probe: float) -> dict[str, float]:
    """Relative output error of each group with its ``probe`` share of lowest-scored channels masked."""
    sess, outs, values = masking_session(model, groups)
    base = [sess.run(outs, {**f, **values}) for f in feeds]
    out = {}
    for g in groups:
        s = scores[g.key]
        n = min(g.size - 1, max(1, math.floor(g.size * probe)))
        removed = np.lexsort((np.arange(g.size), s))[:n]  # lowest scores first
        masked = {**values, **_masked(g, values, removed)}
        err = [_rel_error(sess.run(outs, {**f, **masked}), b) for f, b in zip(feeds, base)]
        out[g.key] = float(np.mean(err))
    return out


def sensitivity_ratios(model, groups, scores, feeds: list[dict], ratio: float, probe: float | None = None,
                       spread: float = 0.2, cap: float = 0.9, weights=None) -> dict[str, float]:
    """Per-group ratios: more sensitive groups lose fewer channels; the mean weighted by channels
    (by parameters, with ``weights``: name -> array) is ``ratio``."""
    t0 = time.perf_counter()
    groups = [g for g in groups if scores[g.key] is not None and g.size > 1]
    if not groups:
        return {}
    sens = group_sensitivities(model, groups, scores, feeds, ratio if probe is None else probe)
    metric = np.log(np.array([sens[g.key] for g in groups]) + 1e-12)
    raw = _spread(metric, ratio, min(spread, ratio, 1 - ratio), higher_keeps=True)
    sizes = np.array([g.size * (1.0 if weights is None else params_per_channel(g, weights)) for g in groups])
    out = dict(zip((g.key for g in groups), fit_target(sizes, raw, ratio, cap)))
    LAST_COST.update(seconds=time.perf_counter() - t0, runs=len(feeds) * (len(groups) + 1), groups=len(groups))
    return out

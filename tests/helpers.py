"""Shared test utilities: masked equivalence, onnxruntime runs, torch export."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnx_ir as ir

import spa
from spa import runtime
from spa.groups import Group
from spa.io import to_proto
from spa.plan import GroupPlan, Plan


def run(model, feeds):
    proto = to_proto(model) if isinstance(model, ir.Model) else model
    sess = runtime.session(proto, optimize=False)
    return sess.run(None, feeds)


def feeds_for(model, overrides=None, seed=0):
    proto = to_proto(model) if isinstance(model, ir.Model) else model
    return runtime.random_feeds(runtime.session(proto), overrides, seed)


def single_group_plan(dg, group: Group, keep, slots=None) -> Plan:
    return Plan(tuple(GroupPlan(g.key, g.size, tuple(sorted(keep)), None if slots is None else tuple(sorted(slots)))
                      if g.key == group.key else GroupPlan(g.key, g.size, tuple(range(g.size)))
                      for g in dg.groups))


def masked_model(model: ir.Model, group: Group, keep, slots=None) -> ir.Model:
    """The original model with the consumers' input slices of removed channels zeroed."""
    masked = model.clone()
    keep = np.asarray(sorted(keep))
    slots = None if slots is None else np.asarray(sorted(slots))
    for m in group.params:
        if m.role != "in":
            continue
        v = masked.graph.initializers[m.param]
        arr = v.const_value.numpy().copy()
        removed = np.setdiff1d(np.arange(m.size), m.kept_indices(keep, slots))
        index = [slice(None)] * arr.ndim
        index[m.param_axis] = removed
        arr[tuple(index)] = 0
        v.const_value = ir.tensor(arr, name=v.name)
    return masked


def check_masked_equivalence(source, ratio=0.5, seed=0, atol=1e-4, rtol=1e-4, input_shapes=None,
                             min_groups=1, exact_only=True):
    """Prune each group alone (random channels removed) and compare with masking. Returns groups."""
    model = spa.load(source)
    dg = spa.dependency_graph(model)
    groups = [g for g in dg.groups if g.exact or not exact_only]
    assert len(groups) >= min_groups, f"expected >= {min_groups} groups, found {len(groups)}"
    rng = np.random.default_rng(seed)
    feeds = feeds_for(model, input_shapes, seed)
    for g in groups:
        n_keep = max(1, g.size - int(g.size * ratio))
        keep = np.sort(rng.choice(g.size, n_keep, replace=False))
        pruned = spa.apply_plan(model, single_group_plan(dg, g, keep), input_shapes=input_shapes)
        want = run(masked_model(model, g, keep), feeds)
        got = run(pruned, feeds)
        for w, o in zip(want, got):
            assert w.shape == o.shape, f"group {g.key}: output shape {o.shape} != {w.shape}"
            np.testing.assert_allclose(o, w, atol=atol, rtol=rtol, err_msg=f"group {g.key} ({g.describe()})")
    return groups


def export_torch(module, args, dynamo=True, dynamic_batch=False, input_names=None) -> onnx.ModelProto:
    """Export a torch module to an ONNX ModelProto (in memory)."""
    import torch

    module = module.eval()
    args = tuple(args)
    names = input_names or [f"x{i}" for i in range(len(args))]
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = ({0: torch.export.Dim("batch")},) * len(args) if dynamic_batch else None
            prog = torch.onnx.export(module, args, dynamo=True, input_names=names, dynamic_shapes=shapes,
                                     verbose=False)
            return prog.model_proto
        axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
        torch.onnx.export(module, args, f, dynamo=False, input_names=names, dynamic_axes=axes, opset_version=17)
    return onnx.load_from_string(f.getvalue())


def build(text: str, seed: int = 0, weights: str = "wbcs") -> onnx.ModelProto:
    """Parse an ONNX text model; graph inputs whose names start with one of ``weights``'
    letters become initializers with random values of their declared shape."""
    from onnx import numpy_helper

    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    keep = []
    for inp in model.graph.input:
        if inp.name[0] in weights:
            shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            elem = inp.type.tensor_type.elem_type
            if elem == onnx.TensorProto.FLOAT:
                arr = rng.standard_normal(shape).astype(np.float32)
                if inp.name.startswith("s"):  # scales / variances: positive
                    arr = np.abs(arr) + 0.5
            else:
                arr = rng.integers(0, 3, size=shape).astype(onnx.helper.tensor_dtype_to_np_dtype(elem))
            model.graph.initializer.append(numpy_helper.from_array(arr, inp.name))
        else:
            keep.append(inp)
    del model.graph.input[:]
    model.graph.input.extend(keep)
    onnx.checker.check_model(model)
    return model


def groups_of(source):
    dg = spa.dependency_graph(spa.load(source))
    return dg, {g.key: g for g in dg.groups}


def dims_of(group) -> set[str]:
    return {str(m.dim) for m in group.members if not m.dim.virtual}

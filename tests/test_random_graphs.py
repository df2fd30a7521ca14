"""Randomized testing: random well-formed ONNX graphs (``tests/random_graphs.py``), random plans.

For each generated graph the dense model must pass ``onnx.checker`` (full check) and run in
onnxruntime with the shapes the generator tracked (a generator bug otherwise); the canonical
(``spa.load``) model must compute the same outputs; ``dg.lint()`` must be empty. A random plan
(every group keeps a random non-empty subset, sometimes all) is applied with ``spa.apply_plan``
(which runs SPA's own equivalence check); the pruned model must pass the full checker, run, keep
the output shapes (also at another batch size when the batch axis is dynamic) and, for exact
groups, equal the dense model with the removed channels masked: an oracle written here, zeroing
the removed input slices of every consumer weight (members with role ``in``).

The default run is small and deterministic (``derandomize``: about 200 graphs over the three
property tests, well under a minute). ``SPA_RANDOM_GRAPHS=5000 python -m pytest
tests/test_random_graphs.py`` runs that many graphs in all, drawn afresh each run (not
derandomized); add ``--hypothesis-show-statistics`` to see how many ran and what they held.

Failures found by long runs are pinned below as plain regression tests on the shrunk graph
(``xfail(strict=True)`` where the bug is in SPA, with the diagnosis in ``reason``).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import build
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from random_graphs import GraphCase, graphs

import spa

_TOTAL = int(os.environ.get("SPA_RANDOM_GRAPHS", "0") or 0)
_DEFAULT_TOTAL = 200


def _settings(share: float):
    """Settings for a test that runs ``share`` of the graphs."""
    total = _TOTAL or _DEFAULT_TOTAL
    return settings(max_examples=max(1, round(total * share)), deadline=None, derandomize=not _TOTAL,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


# ---- running and comparing --------------------------------------------------------------
def proto_of(model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model


def ort_run(model, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto_of(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_close(got: list[np.ndarray], want: list[np.ndarray], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what}: output {i} has shape {g.shape}, expected {w.shape}"
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 + 1e-4 * scale, err_msg=f"{what}: output {i}")


def check_dense(case: GraphCase) -> list[np.ndarray]:
    """The generated model is valid and runs with the tracked shapes (else: a generator bug)."""
    onnx.checker.check_model(case.model, full_check=True)
    out = ort_run(case.model, case.feeds)
    assert [o.shape for o in out] == list(case.output_shapes.values())
    assert all(np.isfinite(o).all() for o in out)
    return out


def is_dynamic(case: GraphCase) -> bool:
    return not case.model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")


def load_and_lint(case: GraphCase):
    dense = check_dense(case)
    model = spa.load(case.model)
    assert_close(ort_run(model, case.feeds), dense, "canonicalized model vs input")
    dg = spa.dependency_graph(model)
    assert dg.lint() == []
    assert not dg.rule_errors, [f"{b.op} '{b.node}': {b.reason}" for b in dg.rule_errors]
    return dense, model, dg


def check_pruned(pruned: ir.Model, case: GraphCase, dense: list[np.ndarray]) -> list[np.ndarray]:
    """Valid (full checker), runs, same output shapes; at another batch size too if dynamic."""
    proto = ir.serde.serialize_model(pruned)
    onnx.checker.check_model(proto, full_check=True)
    got = ort_run(proto, case.feeds)
    assert [g.shape for g in got] == [d.shape for d in dense], "pruned output shapes differ from the dense ones"
    if is_dynamic(case):
        feeds = case.feeds_for(3)
        assert [g.shape for g in ort_run(proto, feeds)] == [d.shape for d in ort_run(case.model, feeds)]
    return got


# ---- the oracle: masked dense model -----------------------------------------------------
def in_members(g):
    return [m for m in g.members if m.role == "in"]


def maskable(g, model: ir.Model, dg) -> bool:
    """Every consumer of the group reads it through a weight the oracle can zero, or is a
    named node whose activation input the oracle can multiply by a 0/1 mask."""
    inits = model.graph.initializers
    nodes = {n.name for n in model.graph}
    for m in in_members(g):
        if dg.period(m.dim) is not None:
            return False
        if m.param is not None:
            if m.param not in inits or m.param_axis is None or \
                    inits[m.param].const_value.shape[m.param_axis] != m.size:
                return False
        elif m.node not in nodes or m.dim.value not in dg.values or dg.values[m.dim.value].shape is None:
            return False
    return True


def removed_indices(m, keep) -> np.ndarray:
    return np.setdiff1d(np.arange(m.size), m.kept_indices(np.asarray(keep, dtype=np.int64)))


def masked_dense(model: ir.Model, dg, plan: spa.Plan) -> onnx.ModelProto:
    """The dense model with each pruned group's removed channels zeroed where they are consumed:
    the input slices of consumer weights, or (a product of activations) the consumed tensor."""
    proto = ir.serde.serialize_model(model)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    groups = {g.key: g for g in dg.groups}
    arrays: dict[str, np.ndarray] = {}
    masks = []
    for gp in plan.pruned_groups:
        for m in in_members(groups[gp.key]):
            removed = removed_indices(m, gp.keep)
            if m.param is not None:
                arr = arrays.setdefault(m.param, onnx.numpy_helper.to_array(inits[m.param]).copy())
                index = [slice(None)] * arr.ndim
                index[m.param_axis] = removed
                arr[tuple(index)] = 0
            elif removed.size:
                rank = len(dg.values[m.dim.value].shape)
                mask = np.ones([m.size if a == m.dim.axis else 1 for a in range(rank)], np.float32)
                mask[(slice(None),) * m.dim.axis + (removed,)] = 0
                masks.append((m.node, m.dim.value, mask))
    for name, arr in arrays.items():
        inits[name].CopyFrom(onnx.numpy_helper.from_array(arr, name))
    for k, (node_name, value, mask) in enumerate(masks):
        index = next(i for i, n in enumerate(graph.node) if n.name == node_name)
        node = graph.node[index]
        mask_name, masked = f"oracle_mask_{k}", f"oracle_masked_{k}"
        graph.initializer.append(onnx.numpy_helper.from_array(mask, mask_name))
        for i, inp in enumerate(node.input):
            if inp == value:
                node.input[i] = masked
        graph.node.insert(index, onnx.helper.make_node("Mul", [value, mask_name], [masked], name=f"oracle_mul_{k}"))
    return proto


def check_param_shapes(pruned: ir.Model, dg, plan: spa.Plan) -> None:
    """Each pruned member's weight (where it kept its name) lost exactly the removed indices."""
    groups = {g.key: g for g in dg.groups}
    inits = pruned.graph.initializers
    for gp in plan.pruned_groups:
        for m in groups[gp.key].params:
            if m.param in inits and m.param_axis is not None and dg.period(m.dim) is None:
                want = len(m.kept_indices(np.asarray(gp.keep, dtype=np.int64)))
                got = inits[m.param].const_value.shape[m.param_axis]
                assert got == want, f"{m.param} axis {m.param_axis}: {got} entries, expected {want} ({gp.key})"


# ---- plans --------------------------------------------------------------------------------
def draw_keep(data, size: int) -> tuple[int, ...]:
    if size == 1 or data.draw(st.integers(0, 9), label="keep all") == 9:
        return tuple(range(size))
    n = data.draw(st.integers(1, size - 1), label="channels removed")
    removed = data.draw(st.lists(st.integers(0, size - 1), min_size=n, max_size=n, unique=True), label="removed")
    return tuple(sorted(set(range(size)) - set(removed)))


def complete(g, keep) -> tuple[int, ...]:
    """``keep`` plus, for each member it would empty (a Split output, a Concat input holding
    only some of the group's channels), that member's first channel: SPA refuses to empty a
    tensor (PlanError)."""
    keep = set(keep) or {0}
    for m in g.members:
        if m.size and not np.isin(m.channel, list(keep)).any():
            keep.add(int(m.channel[0]))
    return tuple(sorted(keep))


def draw_plan(data, dg, prunable) -> spa.Plan:
    keys = {g.key for g in prunable}
    return spa.Plan(tuple(spa.GroupPlan(g.key, g.size, complete(g, draw_keep(data, g.size)) if g.key in keys
                                        else tuple(range(g.size))) for g in dg.groups))


def note_groups(dg, plan) -> None:
    event(f"groups: {min(len(dg.groups), 5)}{'+' if len(dg.groups) >= 5 else ''}")
    event(f"pruned groups: {min(len(plan.pruned_groups), 3)}{'+' if len(plan.pruned_groups) >= 3 else ''}")
    for g in dg.groups:
        event(f"group kind: {g.kind}{'' if g.exact else ' (inexact)'}")


# ---- property tests -----------------------------------------------------------------------
@_settings(0.55)
@given(case=graphs(), data=st.data())
def test_random_graph_prunes_to_the_masked_dense_model(case, data):
    dense, model, dg = load_and_lint(case)
    plan = draw_plan(data, dg, [g for g in dg.groups if g.exact and maskable(g, model, dg)])
    note_groups(dg, plan)
    pruned = spa.apply_plan(model, plan)
    got = check_pruned(pruned, case, dense)
    check_param_shapes(pruned, dg, plan)
    if plan.pruned_groups:
        assert_close(got, ort_run(masked_dense(model, dg, plan), case.feeds), "pruned vs masked dense")
    else:
        assert_close(got, dense, "plan that keeps everything")


@_settings(0.2)
@given(case=graphs(), data=st.data())
def test_random_graph_any_plan_stays_valid(case, data):
    """Every group, exact or not (LayerNorm streams, unmaskable consumers): validity only."""
    dense, model, dg = load_and_lint(case)
    plan = draw_plan(data, dg, dg.groups)
    note_groups(dg, plan)
    pruned = spa.apply_plan(model, plan)
    check_pruned(pruned, case, dense)
    check_param_shapes(pruned, dg, plan)


@_settings(0.1)
@given(case=graphs(), seed=st.integers(0, 1000), ratio=st.sampled_from([0.25, 0.5, 0.75, 0.9]),
       global_pruning=st.booleans(), round_to=st.sampled_from([1, 1, 2]))
def test_random_graph_random_score_plan(case, seed, ratio, global_pruning, round_to):
    dense, model, dg = load_and_lint(case)
    plan = spa.make_plan(dg, spa.score(dg, "random", seed=seed), ratio=ratio, global_pruning=global_pruning,
                         round_to=round_to)
    assert [gp.key for gp in plan.groups] == [g.key for g in dg.groups]
    assert all(gp.keep for gp in plan.groups)
    pruned = spa.apply_plan(model, plan)
    check_pruned(pruned, case, dense)
    check_param_shapes(pruned, dg, plan)


@_settings(0.15)
@given(case=graphs(), criterion=st.sampled_from(["l1", "l2", "bn", "random", "wanda", "flap", "obspa"]),
       ratio=st.sampled_from([0.25, 0.5, 0.75]), global_pruning=st.booleans())
def test_random_graph_prune_pipeline(case, criterion, ratio, global_pruning):
    """spa.prune end to end (activation criteria and compensation included): valid, runs, same shapes."""
    dense = check_dense(case)
    result = spa.prune(case.model, ratio, criterion=criterion, global_pruning=global_pruning,
                       calibration_batches=2, device="cpu")
    event(f"criterion {criterion}: {'pruned' if result.plan.pruned_groups else 'nothing pruned'}")
    check_pruned(result.model, case, dense)
    if criterion not in ("flap", "obspa"):  # no compensation: the exact groups equal the masked model
        exact = [gp for gp in result.plan.pruned_groups if result.graph.group(gp.key).exact]
        if exact and len(exact) == len(result.plan.pruned_groups) and \
                all(maskable(result.graph.group(gp.key), result.dense, result.graph) for gp in exact):
            masked = masked_dense(result.dense, result.graph, result.plan)
            assert_close(ort_run(result.model, case.feeds), ort_run(masked, case.feeds), "pruned vs masked dense")


# ---- regression tests: shrunk failures of long runs ---------------------------------------
def _prune_and_compare(proto: onnx.ModelProto, keeps: dict, feeds: dict | None = None) -> None:
    """Prune groups ``keeps`` (key -> kept channels) of a fixed graph and run every check."""
    model = spa.load(proto)
    dg = spa.dependency_graph(model)
    assert dg.lint() == []
    plan = spa.Plan(tuple(spa.GroupPlan(g.key, g.size, tuple(keeps.get(g.key, range(g.size))))
                          for g in dg.groups))
    feeds = feeds or {"x": np.random.default_rng(0).standard_normal(
        [d.dim_value or 2 for d in proto.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)}
    dense = ort_run(proto, feeds)
    pruned = spa.apply_plan(model, plan)
    onnx.checker.check_model(ir.serde.serialize_model(pruned), full_check=True)
    got = ort_run(pruned, feeds)
    assert_close(got, ort_run(masked_dense(model, dg, plan), feeds), "pruned vs masked dense")
    assert [g.shape for g in got] == [d.shape for d in dense]


def test_build_helper_round_trips_generated_text():
    """GraphCase.text() is what regression tests pin; it must parse back through build()."""
    text = '''<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,6,6] x, float[8,3,3,3] w1, float[4,8,1,1] w2) => (float[N,4,6,6] y)
    { h = Conv <pads=[1,1,1,1], kernel_shape=[3,3]> (x, w1)  r = Relu(h)  y = Conv(r, w2) }'''
    _prune_and_compare(build(text), {"w1:0": (0, 3, 5)})


# Found by the random graphs (shrunk): the constant {2, 1} is both Split's sizes and Gather's
# indices (the generator shares equal constants, as exporters do). Group w2:1 holds the Gather
# output and its indices axis k[0] (spa/ops/slicing.py `gather` couples it); the Split rule
# frees its sizes input. ApplyPlanPass._slice (passes/apply_plan.py) slices the constant in
# place, for every reader: the Split gets sizes {1} for 2 outputs and the model is invalid.
GATHER_SPLIT_SHARED = '''<ir_version: 8, opset_import: ["" : 17]>
g (float[1,1,4,4] x, float[3,1,1,1] w1, float[1,2,1,1] w2) => (float[1,1,4,4] y)
{ h = Conv(x, w1)  k = Constant <value = int64[2] {2, 1}> ()  a, b = Split <axis=1> (h, k)
  c = Concat <axis=1> (a, b)  g = Gather <axis=1> (c, k)  y = Conv(g, w2) }'''


def test_gather_indices_shared_with_split_sizes():
    """Found by the random graphs: a constant sliced for the group (Gather indices) that another
    node reads untied (Split sizes) keeps its values for that node."""
    _prune_and_compare(build(GATHER_SPLIT_SHARED), {"w2:1": (1,)})


# Found by the random graphs: onnxruntime's symbolic inference named the ConvTranspose output's
# sizes after the op (``ConvTranspose_0_o0__d1``), which replaced the static channel count, and
# Max could not tell whether c's channel axis broadcasts. It blocked that input only, so group
# w1:0 still held Max's output and the pruned Max met 3 against 4 channels.
MAX_OF_UNSIZED_CHANNELS = '''<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,H,W] x, float[3,2,2,2] w0, float[4,4,1,1] w1, float[2,4,1,1] w2) => (float[1,2,?,?] y)
{ a = ConvTranspose <strides=[2,2]> (x, w0)  c = Concat <axis=1> (a, a)  b = Conv(c, w1)
  m = Max(b, c)  y = Conv(m, w2) }'''


def test_max_with_an_input_whose_channels_come_from_symbolic_inference():
    proto = build(MAX_OF_UNSIZED_CHANNELS)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 3, 5)).astype(np.float32)}
    dg = spa.dependency_graph(spa.load(proto))
    c = dg.values["c"]
    assert c.shape is not None and int(c.shape[1]) == 4, c.shape  # the static count is kept
    _prune_and_compare(proto, {g.key: tuple(range(g.size - 1)) for g in dg.groups}, feeds)


def test_max_with_an_input_of_symbolic_channels_blocks_the_output_too():
    """z's channel axis may be 4 or broadcast from 1: b's channels cannot be pruned alone."""
    proto = build('''<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,4,4] x, float[1,K,4,4] z, float[4,3,1,1] w1, float[2,4,1,1] w2) => (float[1,2,4,4] y)
    { b = Conv(x, w1)  m = Max(b, z)  y = Conv(m, w2) }''')
    dg = spa.dependency_graph(spa.load(proto))
    assert [g.key for g in dg.groups] == []
    blocked = {b.key: b.reason for b in dg.blocked_groups}
    assert "broadcasts in Max" in blocked["w1:0"]

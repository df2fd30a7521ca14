"""Analysis cost, counted rather than timed: shape completion reaches its fixed point, the full
shape-inference runs per load are bounded, the CLI counts MACs once per model without an
onnxruntime session, an ONNX prune never imports torch, and L1 scores are reduced once per
weight, lazily, with the same values as a per-index loop."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import spa
from spa import metrics, zoo
from spa.criteria import magnitude
from spa.passes import complete_shapes, symbolic_shapes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exports():
    """Two transformer exports whose shape completion used to loop to its cap: GPT-2 (dynamo;
    a solved ``batch*seq`` solved again each round) and BERT (TorchScript; sizes solved in one
    round forgotten in the next)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import transformer_models as trm

    import torch

    torch.manual_seed(0)
    return {"gpt2": trm.export(*trm.gpt2(), dynamo=True), "bert-ts": trm.export(*trm.bert(), dynamo=False)}


class _Runs:
    """Counts full shape-inference runs during a load: ONNX inference (InferShapesPass, the
    completion rounds) and onnxruntime's symbolic inference."""

    def __init__(self, monkeypatch):
        self.counts = Counter()
        self.completion: list[int] = []
        call = complete_shapes.CompleteShapesPass.call
        infer = complete_shapes.CompleteShapesPass._infer

        def counted_call(pass_, model):
            try:
                return call(pass_, model)
            finally:
                self.completion.append(pass_.inference_runs)

        def counted_infer(pass_, model):
            self.counts["completion"] += 1
            return infer(pass_, model)

        from spa.passes import infer_shapes

        first = infer_shapes.InferShapesPass.call
        sym = symbolic_shapes._symbolic_shape_inference

        def counted_first(pass_, model):
            self.counts["infer"] += 1
            return first(pass_, model)

        def counted_sym():
            self.counts["symbolic"] += 1
            return sym()

        monkeypatch.setattr(complete_shapes.CompleteShapesPass, "call", counted_call)
        monkeypatch.setattr(complete_shapes.CompleteShapesPass, "_infer", counted_infer)
        monkeypatch.setattr(infer_shapes.InferShapesPass, "call", counted_first)
        monkeypatch.setattr(symbolic_shapes, "_symbolic_shape_inference", counted_sym)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@pytest.mark.parametrize("name", ["gpt2", "bert-ts"])
def test_shape_completion_reaches_a_fixed_point_within_two_rounds(exports, name, monkeypatch):
    runs = _Runs(monkeypatch)
    model = spa.load(exports[name])
    assert runs.completion and max(runs.completion) <= 2
    # ONNX inference once, two completion rounds at most, symbolic inference where sizes stay unknown
    assert runs.total <= 4 and runs.counts["infer"] == 1, dict(runs.counts)
    again = complete_shapes.CompleteShapesPass()
    assert not again(model).modified and again.inference_runs == 0  # nothing left to solve
    groups = spa.dependency_graph(model).groups
    heads = [g for g in groups if g.kind == "heads"]
    assert len(heads) == 2 and all(g.heads.q_heads == 4 for g in heads)  # one per layer: sizes were solved
    assert any(g.kind == "hidden" for g in groups)


def test_solved_reshape_entry_is_not_solved_again():
    """A Reshape whose output already reads ``4*batch`` is a fixed point, not a new solution."""
    x = ir.Value(name="x", shape=ir.Shape(["batch", 4, 16]), type=ir.TensorType(ir.DataType.FLOAT))
    target = ir.Value(name="t", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.INT64))
    node = ir.Node("", "Reshape", [x, target], num_outputs=1)
    node.outputs[0].shape = ir.Shape(["4*batch", 16])
    assert complete_shapes._solve_reshape(node) is None
    node.outputs[0].shape = ir.Shape(["unk__3", 16])
    assert complete_shapes._solve_reshape(node) == ("unk__3", "4*batch")


def _onnx_mlp(path: Path) -> Path:
    onnx.save(zoo.resnet((1, 1), (8, 16), image=16, classes=5), path)
    return path


def test_onnx_prune_through_the_cli_never_imports_torch(tmp_path):
    model = _onnx_mlp(tmp_path / "net.onnx")
    code = (
        "import sys\n"
        "from spa.cli import main\n"
        f"assert main(['prune', {str(model)!r}, '-o', {str(tmp_path / 'small.onnx')!r}, '--ratio', '0.3']) == 0\n"
        f"assert main(['inspect', {str(model)!r}]) == 0\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "small.onnx").exists()
    assert onnx.load(tmp_path / "small.onnx").graph.node


def test_symbolic_shape_inference_is_read_without_onnxruntime_tools_package():
    cls = symbolic_shapes._symbolic_shape_inference()
    assert cls.__name__ == "SymbolicShapeInference" and hasattr(cls, "infer_shapes")


def test_cli_summary_counts_macs_once_per_model(tmp_path, monkeypatch, capsys):
    from spa.cli import main

    model = _onnx_mlp(tmp_path / "net.onnx")
    seen: list[int] = []
    count = metrics.count_macs

    def counted(m, shapes=None):
        seen.append(id(m))
        return count(m, shapes)

    monkeypatch.setattr(metrics, "count_macs", counted)
    assert main(["prune", str(model), "-o", str(tmp_path / "small.onnx"), "--ratio", "0.5"]) == 0
    assert len(seen) == 2 and seen[0] != seen[1]  # the dense model and the pruned one, once each
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("MACs"))
    before, after, ratio = row.split()[1:]
    assert int(after.replace(",", "")) < int(before.replace(",", "")) and float(ratio) < 1


def test_macs_of_a_dynamic_export_need_no_session_and_one_weightless_serialization(exports, monkeypatch):
    """The symbolic shapes loading inferred give the sizes ONNX inference cannot follow; the one
    serialization leaves the weights out. The count equals the one onnxruntime gives."""
    model = spa.load(exports["gpt2"])
    pruned = spa.prune(model, 0.5, kinds=["heads", "channels"], input_shapes={"batch": 1, "seq": 12}).model
    shapes = {"batch": 1, "seq": 12}
    sizes: list[int] = []
    serialize = ir.serde.serialize_model

    def counted(m):
        proto = serialize(m)
        sizes.append(proto.ByteSize())
        return proto

    sessions = []
    monkeypatch.setattr(ir.serde, "serialize_model", counted)
    monkeypatch.setattr(metrics, "_run_shapes", lambda *a: sessions.append(a) or {})
    fast = [metrics.count_macs(m, shapes) for m in (model, pruned)]
    assert len(sizes) == 2 and not sessions
    monkeypatch.undo()
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    assert sizes[0] < ir.serde.serialize_model(model).ByteSize() - 0.9 * weights
    monkeypatch.setattr(metrics, "_symbolic_shapes", lambda *a: {})
    assert fast == [metrics.count_macs(m, shapes) for m in (model, pruned)]
    assert fast[1] < fast[0]
    assert all(v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor)
               for v in model.graph.initializers.values())  # the weights are back


def _per_index_loop(arr: np.ndarray, axis: int, fn) -> np.ndarray:
    """The reference: one index at a time, in float64."""
    a = np.asarray(arr, dtype=np.float64)
    return np.array([fn(np.take(a, i, axis=axis).reshape(1, -1))[0] for i in range(a.shape[axis])])


def _reference_scores(group, array_of, fn, reduction="mean", normalization="mean"):
    total, count = np.zeros(group.size), np.zeros(group.size)
    for m in group.params:
        if m.role not in magnitude.MAGNITUDE_ROLES:
            continue
        per = _per_index_loop(array_of(m.param), m.param_axis, fn)
        for i, c in enumerate(m.channel):
            total[c] += per[i]
        count += np.bincount(m.channel, minlength=group.size) > 0
    total = total / np.maximum(count, 1)
    return magnitude.normalize(total, normalization)


@pytest.mark.parametrize("criterion,fn", [("l1", magnitude.abs_sum), ("l2", magnitude.square_sum)])
def test_vectorized_magnitude_scores_equal_a_per_index_loop(criterion, fn, monkeypatch):
    model = zoo.resnet((1, 1), (8, 16), image=16, classes=5)
    dg = spa.dependency_graph(model)
    monkeypatch.setattr(magnitude, "CHUNK", 7)  # blocks of rows, down to one row at a time
    scores = spa.score(dg, criterion)
    for g in dg.groups:
        want = _reference_scores(g, dg.weights, fn)
        np.testing.assert_allclose(scores[g.key], want, rtol=1e-12)


def test_per_index_in_blocks_equals_one_piece(monkeypatch):
    rng = np.random.default_rng(0)
    for shape, axis in (((37, 19), 0), ((37, 19), 1), ((5, 6, 7, 3), 1), ((64,), 0)):
        arr = rng.standard_normal(shape).astype(np.float32)
        whole = magnitude.per_index(arr, axis, magnitude.abs_sum)
        monkeypatch.setattr(magnitude, "CHUNK", 8)
        blocks = magnitude.per_index(arr, axis, magnitude.abs_sum)
        monkeypatch.undo()
        np.testing.assert_array_equal(whole, blocks)
        np.testing.assert_allclose(whole, _per_index_loop(arr, axis, magnitude.abs_sum), rtol=1e-12)


def test_scores_are_reduced_once_per_weight_and_only_for_groups_read(monkeypatch):
    model = zoo.resnet((1, 1), (8, 16), image=16, classes=5)
    dg = spa.dependency_graph(model)
    reads = Counter()
    per_index = magnitude.per_index

    def counted(arr, axis, fn):
        reads[(id(arr), axis)] += 1
        return per_index(arr, axis, fn)

    monkeypatch.setattr(magnitude, "per_index", counted)
    scores = spa.score(dg, "l1")
    assert not reads  # nothing is computed before a group's scores are read
    first = dg.groups[0]
    assert scores[first.key].shape == (first.size,)
    assert len(reads) == len({(m.param, m.param_axis) for m in first.params if m.role in magnitude.MAGNITUDE_ROLES})
    for g in dg.groups:
        assert scores[g.key] is scores[g.key]
    pairs = {(m.param, m.param_axis) for g in dg.groups for m in g.params if m.role in magnitude.MAGNITUDE_ROLES}
    assert len(reads) == len(pairs) and set(reads.values()) == {1}
    assert spa.make_plan(dg, scores, 0.5).pruned_groups


def test_groups_left_out_by_kinds_are_never_scored(exports, monkeypatch):
    dg = spa.dependency_graph(exports["gpt2"])
    scored = []
    group_scores = magnitude.group_scores

    def counted(group, *args, **kw):
        scored.append(group.kind)
        return group_scores(group, *args, **kw)

    monkeypatch.setattr(magnitude, "group_scores", counted)
    plan = spa.make_plan(dg, spa.score(dg, "l1"), 0.5, kinds=["heads", "channels"])
    hidden = [g for g in dg.groups if g.kind == "hidden"]
    assert hidden and "hidden" not in scored and set(scored) == {"heads", "channels"}
    kept = {p.key: p.removed for p in plan.groups}
    assert all(kept[g.key] == 0 for g in hidden) and plan.pruned_groups

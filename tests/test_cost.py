"""What a prune costs: work done once that used to be repeated (OBSPA's inverses), and copies of
the model that are no longer made (symbolic shape inference, the checks' sessions)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import spa

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bert_proto():
    import transformer_models as tm

    model, x = tm.bert()
    return tm.export(model.eval(), x)


def _shapes(model: ir.Model) -> dict:
    return {v.name: None if v.shape is None else [str(d) for d in v.shape] for n in model.graph for v in n.outputs}


def test_symbolic_shape_inference_reads_the_float_weights_by_reference(bert_proto, monkeypatch):
    from spa import io
    from spa.passes import symbolic_shapes

    seen = []
    real = symbolic_shapes._symbolic_shape_inference

    def spy():
        cls = real()

        class Spy(cls):
            @staticmethod
            def infer_shapes(proto, *args, **kwargs):
                seen.append(onnx.ModelProto.FromString(proto.SerializeToString()))  # as it was handed over
                out = cls.infer_shapes(proto, *args, **kwargs)
                seen.append(proto)
                return out

        return Spy

    monkeypatch.setattr(symbolic_shapes, "_symbolic_shape_inference", spy)
    lean = spa.load(bert_proto)
    assert seen, "the transformer needs symbolic shape inference"
    inits = {t.name: t for t in seen[0].graph.initializer}
    weights = [t for t in inits.values() if t.data_type == onnx.TensorProto.FLOAT
               and 4 * int(np.prod(t.dims)) >= io.BY_REFERENCE_BYTES]
    assert weights and all(t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data for t in weights)
    ints = [t for t in inits.values() if t.data_type == onnx.TensorProto.INT64]
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in ints)  # shape constants keep their values

    # the same shapes as from the whole model serialized with its weights
    monkeypatch.setattr(io, "skeleton", lambda model, floating_only=False: (ir.serde.serialize_model(model), {}, 0))
    full = spa.load(bert_proto)
    assert _shapes(lean) == _shapes(full)
    assert [g.key for g in spa.dependency_graph(lean).groups] == [g.key for g in spa.dependency_graph(full).groups]


def test_obspa_inverts_each_moment_once_per_prune(bert_proto, monkeypatch):
    from spa.criteria import obspa

    calls = []
    real = obspa.damped_inverse

    def counted(h):
        calls.append(np.asarray(h).shape)
        return real(h)

    monkeypatch.setattr(obspa, "damped_inverse", counted)
    result = spa.prune(bert_proto, 0.3, criterion="obspa", calibration="gaussian", calibration_batches=2)
    assert result.plan.pruned_groups and result.fidelity.cosine > 0.5
    stats_keys = spa.collect_stats(result.graph, "gaussian", 2).moments.keys()
    # scoring, the greedy selection and the final solve of a tall layer share one inverse per H
    assert 0 < len(calls) <= len(stats_keys)


def test_cached_inverses_are_fresh_copies():
    from spa.calibration.activations import Moments
    from spa.criteria.obspa import cached_inverse, damped_inverse

    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6))
    hs = Moments({"k": x.T @ x}, {})
    first = cached_inverse(hs, "k")
    np.testing.assert_allclose(first, damped_inverse(x.T @ x), rtol=1e-5)
    first[:] = 0  # the caller changes its copy (greedy downdates)
    again = cached_inverse(hs, "k")
    np.testing.assert_allclose(again, damped_inverse(x.T @ x), rtol=1e-5)
    again[:] = 0
    np.testing.assert_allclose(cached_inverse(hs, "k"), damped_inverse(x.T @ x), rtol=1e-5)
    hs["k"] = 2 * x.T @ x  # a new H drops its inverse
    np.testing.assert_allclose(cached_inverse(hs, "k"), damped_inverse(2 * x.T @ x), rtol=1e-5)


def test_loaded_weights_are_arrays_the_model_owns(bert_proto):
    model = spa.load(bert_proto.SerializeToString())
    tensors = [v.const_value for g in model.graphs() for v in g.initializers.values()]
    tensors += [a.value for g in model.graphs() for n in g for a in n.attributes.values()
                if a.type == ir.AttributeType.TENSOR]
    assert tensors and not any(type(t) is ir.serde.TensorProtoTensor for t in tensors)  # nothing keeps the proto
    big = max((t for t in tensors if t is not None), key=lambda t: t.nbytes)
    assert np.shares_memory(big.numpy(), big.numpy())  # every reader views one array, none copies it


def test_prune_sessions_hold_no_copy_of_the_weights(bert_proto, monkeypatch):
    import onnxruntime as ort

    seen = []
    real = ort.InferenceSession

    def spy(model, opts=None, providers=None, **kwargs):
        seen.append((opts.get_session_config_entry("session.disable_prepacking") if opts else "",
                     tuple(kwargs.get("disabled_optimizers", ()))))
        return real(model, opts, providers=providers, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    result = spa.prune(bert_proto, 0.3, criterion="obspa", calibration="gaussian", calibration_batches=2,
                       device="cpu")
    assert result.equivalence is not None and result.equivalence.skipped is None
    assert len(seen) >= 3  # the calibration blocks and the check's runs
    assert all(prepack == "1" and "ConstantFolding" in disabled for prepack, disabled in seen)

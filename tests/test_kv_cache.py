"""K/V caches as prunable state: an onnxruntime-genai builder decoder (Llama, GQA, 4 layers,
8 query heads over 4 K/V heads, head size 32) keeps its past/present graph inputs and outputs
in the K/V-head groups; pruning shrinks them together and reports the changed signature.

One fp32 builder model is built per session (~20 s); ``SPA_SLOW=1`` adds Qwen2, Qwen3 and
Phi-3 shaped builds and the int4 (MatMulNBits) build.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime_genai")

import spa  # noqa: E402
from spa import runtime  # noqa: E402
from spa.dims import Dim  # noqa: E402
from spa.equivalence import mask_groups  # noqa: E402
from spa.metrics import count_params  # noqa: E402
from spa.passes.verify import check_structure  # noqa: E402
from spa.report import inspect_dict, inspect_text, signature_changes  # noqa: E402
from tests import llm_models  # noqa: E402

SLOW = os.environ.get("SPA_SLOW") == "1"
PAST, SEQ, HEAD = 5, 4, 32


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    return llm_models.genai_llama(tmp_path_factory.mktemp("genai")) / "model.onnx"


def _feeds(kv_heads: int, layers: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(3, 1000, size=(1, SEQ)).astype(np.int64),
             "attention_mask": np.ones((1, PAST + SEQ), dtype=np.int64)}
    for i in range(layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal((1, kv_heads, PAST, HEAD)).astype(np.float32)
    return feeds


def _run(model, feeds):
    sess = runtime.session(model)
    names = [i.name for i in sess.get_inputs()]
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {k: feeds[k] for k in names})))


def test_inspect_finds_cache_pairs_in_kv_head_groups(llama):
    dg = spa.dependency_graph(llama)
    pairs = {(s.past, s.present) for s in dg.state_pairs}
    assert pairs == {(f"past_key_values.{i}.{k}", f"present.{i}.{k}") for i in range(4) for k in ("key", "value")}
    heads = [g for g in dg.groups if g.kind == "heads"]
    assert len(heads) == 4 and all(g.size == 4 for g in heads)
    for i, g in enumerate(sorted(heads, key=lambda g: g.key)):
        dims = {m.dim for m in g.members}
        for k in ("key", "value"):
            assert Dim(f"past_key_values.{i}.{k}", 1) in dims and Dim(f"present.{i}.{k}", 1) in dims
    # every other axis of the caches, and every other graph input/output, stays pinned
    assert dg.blocked_reason(Dim("past_key_values.0.key", 3))
    assert dg.blocked_reason(Dim("present.0.key", 2))
    assert dg.blocked_reason(Dim("logits", 2)) and dg.blocked_reason(Dim("input_ids", 1))
    assert not any(Dim("logits", 2) in {m.dim for m in g.members} for g in dg.groups)
    text = inspect_text(dg)
    assert "State (KV cache): 8" in text and "past_key_values.3.value -> present.3.value" in text
    assert len(inspect_dict(dg)["state"]) == 8


def test_prune_kv_heads_shrinks_caches_and_matches_masked_dense(llama, tmp_path):
    res = spa.prune(llama, ratio=0.5, kinds=["heads"], output=tmp_path / "model.onnx")
    assert len(res.equivalence.checked_groups) == 4 and res.equivalence.max_abs_diff <= res.equivalence.tolerance
    # onnx.checker rejects SimplifiedLayerNormalization (onnxruntime registers it): SPA's check skips it
    check_structure(spa.load(tmp_path / "model.onnx"))
    runtime.session(str(tmp_path / "model.onnx"))
    proto = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(proto.graph.input) + list(proto.graph.output)}
    assert shapes["past_key_values.2.key"] == ["batch_size", 2, "past_sequence_length", "kv_cache_dim"]
    assert shapes["present.0.value"] == ["batch_size", 2, "total_sequence_length", "kv_cache_dim"]
    assert shapes["logits"] == ["batch_size", "sequence_length", 1000]
    assert shapes["input_ids"] == ["batch_size", "sequence_length"]
    changes = {c["name"]: (c["before"], c["after"]) for c in signature_changes(res.dense, res.model)}
    assert len(changes) == 16 and "logits" not in changes
    assert changes["past_key_values.0.key"] == ("[batch_size, 4, past_sequence_length, kv_cache_dim]",
                                                "[batch_size, 2, past_sequence_length, kv_cache_dim]")
    assert count_params(res.model) < count_params(res.dense)
    # a past of length 5: the pruned logits equal the dense model's with the same K/V (and query) heads masked
    keys = [gp.key for gp in res.plan.pruned_groups]
    masked, unmasked = mask_groups(res.dense, res.graph, res.plan, keys)
    assert not unmasked
    groups = {g.key: g for g in res.graph.groups}
    dense_feeds, small_feeds = _feeds(4), _feeds(4)
    for gp in res.plan.pruned_groups:
        for m in groups[gp.key].members:
            if m.dim.value in small_feeds and m.dim.value.startswith("past"):
                small_feeds[m.dim.value] = dense_feeds[m.dim.value][:, m.kept_indices(np.asarray(gp.keep))]
    want, got = _run(masked, dense_feeds), _run(res.model, small_feeds)
    assert got["present.1.key"].shape == (1, 2, PAST + SEQ, HEAD)
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-4, rtol=1e-4)
    # and the pruned heads mattered: the unmasked dense model differs
    assert np.abs(_run(res.dense, dense_feeds)["logits"] - want["logits"]).max() > 1e-3


def test_prune_ffn_and_heads_together_passes_equivalence(llama):
    res = spa.prune(llama, ratio=0.25, kinds=["heads", "channels"])
    assert len(res.equivalence.checked_groups) == 8
    assert count_params(res.model) < count_params(res.dense)


def test_cli_prune_lists_signature(llama, tmp_path, capsys):
    from spa.cli import main

    main(["prune", str(llama), "-o", str(tmp_path / "m.onnx"), "--ratio", "0.5", "--kinds", "heads"])
    out = capsys.readouterr().out
    assert "changed graph inputs/outputs: 16" in out
    assert "past_key_values.0.key: [batch_size, 4, past_sequence_length, kv_cache_dim] -> " \
           "[batch_size, 2, past_sequence_length, kv_cache_dim]" in out
    # the API's report holds the same lines
    report = spa.prune(llama, ratio=0.5, kinds=["heads"], check_equivalence=False).report()
    printed = out[out.index("changed graph inputs/outputs: 16"):].splitlines()[1:17]
    assert report["signature_lines"] == [line.strip() for line in printed]
    assert len(report["signature"]) == 16
    assert {"name": "present.3.value", "kind": "output", "before": "[batch_size, 4, total_sequence_length, kv_cache_dim]",
            "after": "[batch_size, 2, total_sequence_length, kv_cache_dim]", "was": "present.3.value"} \
        in report["signature"]


@pytest.mark.skipif(not SLOW, reason="SPA_SLOW=1: more builder shapes")
@pytest.mark.parametrize("build,precision", [(llm_models.genai_qwen2, "fp32"), (llm_models.genai_qwen3, "fp32"),
                                             (llm_models.genai_phi3, "fp32"), (llm_models.genai_llama, "int4")])
def test_other_builder_outputs_prune_kv_heads(build, precision, tmp_path_factory):
    path = build(tmp_path_factory.mktemp("genai"), precision) / "model.onnx"
    res = spa.prune(path, ratio=0.5, kinds=["heads"])
    assert res.equivalence.checked_groups
    ins = {v.name: v for v in res.model.graph.inputs}
    assert ins["past_key_values.0.key"].shape[1] == 2


def test_renumber_closes_the_gaps_of_removed_layers():
    from spa.state import StatePair, renumber

    pairs = [StatePair(f"past_key_values.{i}.{kv}", f"present.{i}.{kv}", f"attn{i}", "GroupQueryAttention")
             for kv in ("key", "value") for i in range(4)]
    gone = {f"{p}.{i}.{kv}" for p in ("past_key_values", "present") for i in (0, 2) for kv in ("key", "value")}
    assert renumber(pairs, gone) == {"past_key_values.1.key": "past_key_values.0.key",
                                     "past_key_values.3.key": "past_key_values.1.key",
                                     "past_key_values.1.value": "past_key_values.0.value",
                                     "past_key_values.3.value": "past_key_values.1.value",
                                     "present.1.key": "present.0.key", "present.3.key": "present.1.key",
                                     "present.1.value": "present.0.value", "present.3.value": "present.1.value"}
    assert renumber(pairs, {"past_key_values.3.key", "present.3.key"}) == {}  # the last layer: nothing moves
    odd = [StatePair("cache_k", "cache_k_out", "a", "GroupQueryAttention")]
    assert renumber(odd, {"cache_k"}) == {}  # no layer number in the names: nothing to renumber

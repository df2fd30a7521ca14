"""Transformers from `transformers` configs: heads, GQA, FFN and the residual stream found in
the exported graph without being told anything, and pruned into valid, dynamic-shape models."""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import transformer_models as trm  # noqa: E402
from helpers import check_masked_equivalence, feeds_for, run, single_group_plan  # noqa: E402

import spa  # noqa: E402
from spa.metrics import count_params  # noqa: E402
from spa.report import inspect_text  # noqa: E402

# name: (builder, attention implementation, exporter is dynamo)
EXPORTS = {
    "bert": (trm.bert, "sdpa", True),
    "bert-eager-torchscript": (trm.bert, "eager", False),
    "llama-gqa": (trm.llama, "sdpa", True),
    "llama-gqa-eager": (trm.llama, "eager", True),
    "qwen3-qk-norm": (trm.qwen3, "sdpa", True),
    "gpt2-fused-qkv": (trm.gpt2, "sdpa", True),
    "vit": (trm.vit, "sdpa", True),
    "vit-eager-torchscript": (trm.vit, "eager", False),
}

# name: (layers, q heads, KV groups, head_dim, FFN channels)
EXPECTED = {
    "bert": (2, 4, 4, 16, 96),
    "llama-gqa": (2, 8, 2, 8, 80),
    "qwen3-qk-norm": (2, 8, 4, 16, 80),
    "gpt2-fused-qkv": (2, 4, 4, 16, 256),
    "vit": (2, 4, 4, 16, 96),
}


@functools.cache
def exported(name):
    builder, attn, dynamo = EXPORTS[name]
    torch.manual_seed(0)
    model, x = builder(attn)
    return trm.export(model, x, dynamo=dynamo)


@functools.cache
def graph(name):
    model = spa.load(exported(name))
    return model, spa.dependency_graph(model)


def _base(name):
    return name.split("-eager")[0]


@pytest.mark.parametrize("name", list(EXPORTS))
def test_heads_ffn_and_hidden_groups_found(name):
    _, dg = graph(name)
    layers, q_heads, kv, head_dim, ffn = EXPECTED[_base(name)]
    heads = [g for g in dg.groups if g.kind == "heads"]
    assert len(heads) == layers
    for g in heads:
        assert (g.heads.q_heads, g.heads.kv_groups, g.heads.head_dim) == (q_heads, kv, head_dim)
        assert g.size == kv and g.exact
    ffn_groups = [g for g in dg.groups if g.kind == "channels" and g.size == ffn]
    assert len(ffn_groups) == layers
    hidden = [g for g in dg.groups if g.kind == "hidden"]
    assert len(hidden) == 1 and hidden[0].size == 64 and not hidden[0].exact


def test_head_group_members_are_whole_heads_and_head_dim_is_blocked():
    _, dg = graph("bert")
    g = next(g for g in dg.groups if g.kind == "heads")
    by_param = {m.param: m for m in g.params}
    for proj in ("query", "key", "value"):
        m = by_param[f"model.bert.encoder.layer.0.attention.self.{proj}.weight"]
        assert m.role == "out" and m.param_axis == 0
        np.testing.assert_array_equal(m.channel, np.repeat(np.arange(4), 16))  # row r is head r // 16
    out = by_param["model.bert.encoder.layer.0.attention.output.dense.weight"]
    assert out.role == "in" and out.param_axis == 1
    np.testing.assert_array_equal(out.channel, np.repeat(np.arange(4), 16))


def test_gqa_couples_each_kv_head_with_its_query_heads():
    _, dg = graph("llama-gqa")
    g = next(g for g in dg.groups if g.kind == "heads")
    by_param = {m.param: m for m in g.params}
    q = by_param["model.model.layers.0.self_attn.q_proj.weight"]
    k = by_param["model.model.layers.0.self_attn.k_proj.weight"]
    v = by_param["model.model.layers.0.self_attn.v_proj.weight"]
    o = by_param["model.model.layers.0.self_attn.o_proj.weight"]
    # 8 q heads of 8 rows: q heads 0-3 read KV head 0, q heads 4-7 read KV head 1.
    np.testing.assert_array_equal(q.channel, np.repeat(np.arange(2), 32))
    np.testing.assert_array_equal(k.channel, np.repeat(np.arange(2), 8))
    np.testing.assert_array_equal(v.channel, k.channel)
    np.testing.assert_array_equal(o.channel, q.channel)


def test_residual_stream_spans_embeddings_norms_blocks_and_head():
    _, dg = graph("llama-gqa")
    hidden = next(g for g in dg.groups if g.kind == "hidden")
    params = {m.param for m in hidden.params}
    assert "model.model.embed_tokens.weight" in params and "model.lm_head.weight" in params
    assert {f"model.model.layers.{i}.{n}.weight" for i in range(2)
            for n in ("input_layernorm", "post_attention_layernorm", "self_attn.o_proj", "mlp.down_proj",
                      "self_attn.q_proj", "mlp.gate_proj")} <= params
    assert "model.model.norm.weight" in params


def test_qk_norm_over_head_dim_does_not_block_heads():
    _, dg = graph("qwen3-qk-norm")
    # q/k norms scale head_dim, which is never cut (blocked with the rotary tables) ...
    assert not any(m.param and "q_norm" in m.param for g in dg.groups for m in g.members)
    rotary = next(b for b in dg.blocked_groups if b.key == "model.model.rotary_emb.inv_freq:0")
    assert "not carried through Reshape" in rotary.reason
    # ... and the heads, which pass through them, stay prunable.
    assert [(g.heads.q_heads, g.heads.kv_groups) for g in dg.groups if g.kind == "heads"] == [(8, 4), (8, 4)]


@pytest.mark.parametrize("name", list(EXPORTS))
def test_masked_equivalence_of_heads_and_ffn_groups(name):
    groups = check_masked_equivalence(exported(name), input_shapes={"batch": 2, "seq": 9})
    kinds = sorted(g.kind for g in groups)
    assert kinds.count("heads") == 2 and kinds.count("channels") >= 2


@pytest.mark.parametrize("name", ["bert", "llama-gqa", "gpt2-fused-qkv", "vit", "bert-eager-torchscript"])
def test_hidden_size_pruning_is_valid_with_dynamic_shapes(name):
    model, dg = graph(name)
    hidden = next(g for g in dg.groups if g.kind == "hidden")
    pruned = spa.apply_plan(model, single_group_plan(dg, hidden, range(0, 64, 2)))
    for shapes in ({"batch": 1, "seq": 5}, {"batch": 3, "seq": 17}):
        feeds = feeds_for(model, shapes)
        want, got = run(model, feeds), run(pruned, feeds)
        assert [w.shape for w in want] == [o.shape for o in got]
        assert all(np.isfinite(o).all() for o in got)


def _heads_per_layer(model):
    dg = spa.dependency_graph(spa.load(model) if not hasattr(model, "graph") else model)
    return [(g.heads.q_heads, g.heads.kv_groups) for g in dg.groups if g.kind == "heads"]


def test_pruning_half_the_kv_groups_of_llama_keeps_gqa_and_dynamic_shapes():
    src = exported("llama-gqa")
    result = spa.prune(src, 0.5, kinds=["heads", "channels"])
    out = result.model
    inits = out.graph.initializers
    for i in range(2):  # 8 q / 2 KV heads of 8 rows -> 4 q / 1 KV head in each layer
        attn = f"model.model.layers.{i}.self_attn"
        assert inits[f"{attn}.q_proj.weight"].shape == (32, 64)
        assert inits[f"{attn}.k_proj.weight"].shape == (8, 64)
        assert inits[f"{attn}.v_proj.weight"].shape == (8, 64)
        assert inits[f"{attn}.o_proj.weight"].shape == (64, 32)
    ffn = [g for g in spa.dependency_graph(out).groups if g.kind == "channels"]
    assert sorted(g.size for g in ffn) == [40, 40]
    # The K/V repeat is rewritten: Expand to (batch, 1 KV head, 4 q per KV head, seq, head_dim).
    expands = [n for n in out.graph if n.op_type == "Expand" and n.outputs[0].shape is not None
               and len(n.outputs[0].shape) == 5]
    assert expands and all(n.outputs[0].shape[1] == 1 and n.outputs[0].shape[2] == 4 for n in expands)
    model = spa.load(src)
    for shapes in ({"batch": 1, "seq": 3}, {"batch": 4, "seq": 21}):
        feeds = feeds_for(model, shapes)
        assert run(out, feeds)[0].shape == (shapes["batch"], shapes["seq"], 97)
    before, after = count_params(model), count_params(out)
    assert after < 0.8 * before


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2-fused-qkv", "bert-eager-torchscript"])
def test_pruning_heads_halves_heads_in_every_layer(name):
    result = spa.prune(exported(name), 0.5, kinds=["heads", "channels"])
    assert _heads_per_layer(result.model) == [(2, 2), (2, 2)]
    assert result.verify_report.ran


def test_inspect_reports_heads_per_layer():
    _, dg = graph("llama-gqa")
    text = inspect_text(dg)
    assert "layer 0 attention: 8 q heads in 2 KV groups (4 q per KV head), head_dim 8; q heads prunable " \
           "within groups" in text
    assert "layer 1 attention:" in text
    _, dg = graph("bert")
    assert "layer 0 attention: 4 heads, head_dim 16" in inspect_text(dg)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_einsum_attention(dynamo):
    torch.manual_seed(0)
    proto = trm.export(trm.EinsumAttention(), torch.randn(2, 8, 32), dynamo=dynamo, dynamic=False)
    groups = check_masked_equivalence(proto)
    assert sorted((g.kind, g.size) for g in groups) == [("channels", 8), ("channels", 48), ("heads", 4)]
    dg = spa.dependency_graph(spa.load(proto))
    reasons = " ".join(b.reason for b in dg.blocked_groups)
    assert "contracted between two activations" in reasons  # Q·Kᵀ over head_dim is never cut


@pytest.mark.parametrize("name", ["llama-gqa", "llama-gqa-eager", "qwen3-qk-norm"])
def test_query_heads_pruned_within_kv_groups_equal_masking(name):
    model, dg = graph(name)
    feeds = feeds_for(model, {"batch": 2, "seq": 7})
    for g in (g for g in dg.groups if g.kind == "heads"):
        assert g.heads.slots == g.heads.q_per_group > 1
        slots = [g.heads.slots - 1]  # keep only the last query head of every K/V group
        pruned = spa.apply_plan(model, single_group_plan(dg, g, range(g.size), slots))
        want = run(trm_masked(model, g, range(g.size), slots), feeds)
        np.testing.assert_allclose(run(pruned, feeds)[0], want[0], atol=1e-4, rtol=1e-4)
        q = next(m for m in g.params if m.param.endswith("q_proj.weight"))
        assert pruned.graph.initializers[q.param].shape[0] == q.size // g.heads.slots


def trm_masked(model, group, keep, slots):
    from helpers import masked_model

    return masked_model(model, group, keep, slots)


def test_gqa_modes_prune_kv_groups_query_heads_or_both():
    src = exported("llama-gqa")
    q_only = spa.prune(src, 0.5, kinds=["heads"], gqa="q")
    attn = "model.model.layers.0.self_attn"
    inits = q_only.model.graph.initializers
    assert inits[f"{attn}.q_proj.weight"].shape == (32, 64)  # 2 KV groups x 2 q heads x 8
    assert inits[f"{attn}.k_proj.weight"].shape == (16, 64)  # every K/V head kept
    assert q_only.plan.meta["gqa"] == "q"
    assert all(gp.slots is not None and len(gp.slots) == 2 for gp in q_only.plan.pruned_groups)
    again = spa.Plan.from_json(q_only.plan.to_json())  # slots survive the JSON round trip
    assert [gp.slots for gp in again.groups] == [gp.slots for gp in q_only.plan.groups]
    model = spa.load(src)
    out = run(q_only.model, feeds_for(model, {"batch": 3, "seq": 5}))[0]
    assert out.shape == (3, 5, 97)
    with pytest.raises(spa.ArgumentError, match="gqa"):
        spa.prune(src, 0.5, gqa="heads")


def test_cli_inspect_and_prune_a_gqa_model(tmp_path, capsys):
    import json

    import onnx

    from spa.cli import main

    path = tmp_path / "llama.onnx"
    onnx.save(exported("llama-gqa"), path)
    assert main(["inspect", str(path), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "layer 1 attention: 8 q heads in 2 KV groups (4 q per KV head), head_dim 8" in out
    report = json.loads((tmp_path / "r.json").read_text())
    heads = [g for g in report["groups"] if g["kind"] == "heads"]
    assert [g["heads"] for g in heads] == [{"q_heads": 8, "kv_groups": 2, "head_dim": 8, "slots": 4}] * 2
    small = tmp_path / "small.onnx"
    assert main(["prune", str(path), "-o", str(small), "--ratio", "0.5", "--kinds", "heads,channels",
                 "--gqa", "q", "--input-shape", "seq=9"]) == 0
    pruned = spa.load(str(small))
    assert pruned.graph.initializers["model.model.layers.1.self_attn.q_proj.weight"].shape == (32, 64)
    assert pruned.graph.initializers["model.model.layers.1.mlp.up_proj.weight"].shape == (40, 64)
    assert pruned.graph.initializers["model.model.embed_tokens.weight"].shape == (97, 64)  # hidden kept
    assert main(["prune", str(path), "-o", str(small), "--ratio", "0.5", "--kinds", "heads,bogus"]) == 1
    assert "unknown group kind(s) bogus" in capsys.readouterr().err


@pytest.mark.parametrize("builder", [trm.bert, trm.llama], ids=["bert", "llama-gqa"])
def test_static_shape_exports_keep_heads_prunable(builder):
    """A static batch folds into the heads axis ([2, heads, s, d] -> [2*heads, s, d]) in SDPA."""
    torch.manual_seed(0)
    model, x = builder("sdpa")
    proto = trm.export(model, x, dynamic=False)
    groups = check_masked_equivalence(proto)
    assert sum(g.kind == "heads" for g in groups) == 2
    result = spa.prune(proto, 0.5, gqa="q" if builder is trm.llama else "kv")
    assert result.verify_report.ran


def test_optimized_export_with_shapes_shared_among_layers():
    """The exporter's optimizer computes one Reshape/Expand target for all layers; pruning one
    layer's heads gives that layer its own copy instead of changing the others'."""
    torch.manual_seed(0)
    model, x = trm.llama("sdpa")
    proto = trm.export(model, x, optimize=True)
    groups = check_masked_equivalence(proto, input_shapes={"batch": 2, "seq": 5})
    assert [g.kind for g in groups].count("heads") == 2
    result = spa.prune(proto, 0.5, gqa="q")
    assert run(result.model, feeds_for(spa.load(proto), {"batch": 3, "seq": 4}))[0].shape == (3, 4, 97)


@pytest.mark.parametrize("name,gqa,heads", [("bert", "kv", (2, 2)), ("llama-gqa", "kv", (4, 1)),
                                             ("llama-gqa", "q", (4, 2)), ("gpt2-fused-qkv", "kv", (2, 2)),
                                             ("vit", "kv", (2, 2))])
def test_pruned_transformers_module_updates_heads_config_and_runs(name, gqa, heads):
    builder, attn, _ = EXPORTS[name]
    torch.manual_seed(0)
    model, x = builder(attn)
    model.eval()
    result = spa.prune(model, x, ratio=0.5, gqa=gqa)
    small = result.module
    q, kv = heads
    assert small.config.num_attention_heads == q
    if hasattr(small.config, "num_key_value_heads"):
        assert small.config.num_key_value_heads == kv
    assert small.config.hidden_size == 32  # the residual stream was halved too
    if hasattr(small.config, "intermediate_size") and name != "gpt2-fused-qkv":
        assert small.config.intermediate_size == EXPECTED[_base(name)][4] // 2
    with torch.no_grad():
        got = small(x).logits.numpy()
        want = run(result.model, {result.model.graph.inputs[0].name: x.numpy()})[0]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
        other = x[:1, :5] if x.dtype == torch.int64 else x[:1]  # another batch and length, in eager
        assert small(other).logits.shape[0] == 1
    if name.startswith("llama"):
        attn_mod = small.model.layers[0].self_attn
        assert attn_mod.num_key_value_groups == q // kv
        assert attn_mod.q_proj.out_features == q * 8 and attn_mod.k_proj.out_features == kv * 8
    if name.startswith("gpt2"):
        assert small.lm_head.weight is small.transformer.wte.weight  # tied embeddings stay tied
        assert small.transformer.h[0].attn.split_size == q * 16

"""Depth pruning: residual blocks found in the graph, the removal invariant (removing a block
equals forcing its branch output to zero), scores, spa.prune / apply_plan / CLI with depth.

Exports are the slow part: the default run exports LLaMA (SDPA attention) and small torch
CNNs; ``SPA_SLOW=1`` adds LLaMA with eager attention and BERT, GPT-2 and ViT with both
attention implementations (each export takes 5-20 s on a small CPU).
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spa
from spa import depth, runtime
from spa.errors import PlanError, UnsupportedModelError
from spa.io import to_proto
from spa.metrics import count_params, param_elements
from spa.plan import BlockPlan, GroupPlan, Plan
from tests import transformer_models as tm
from tests.helpers import build, export_torch, feeds_for, run
from tests.torch_models import ResNet, randomize_norms

SLOW = os.environ.get("SPA_SLOW") == "1"
TRANSFORMERS = [("llama", "sdpa")]
if SLOW:
    TRANSFORMERS += [("llama", "eager")] + [(name, attn) for name in ("bert", "gpt2", "vit") for attn in ("sdpa", "eager")]
LAYER_PARAM = {"llama": "layers.{}.self_attn.q_proj.weight", "bert": "layer.{}.attention.self.query.weight",
               "gpt2": "h.{}.attn.c_attn.weight", "vit": "layers.{}.attention.q_proj.weight"}
FFN_PARAM = {"llama": "layers.{}.mlp.down_proj.weight", "bert": "layer.{}.output.dense.weight",
             "gpt2": "h.{}.mlp.c_proj.weight", "vit": "layers.{}.mlp.fc2.weight"}


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm over channels, MLP, layer scale: x + gamma * f(x)."""

    def __init__(self, d=16, gamma=0.5):
        super().__init__()
        self.dw = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.gamma = nn.Parameter(torch.full((d,), gamma))

    def forward(self, x):
        h = self.norm(self.dw(x).permute(0, 2, 3, 1))
        h = self.gamma * self.fc2(F.gelu(self.fc1(h)))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, gammas=(0.5, 0.6, 0.7), d=16):
        super().__init__()
        self.stem = nn.Conv2d(3, d, 4, stride=4)
        self.blocks = nn.Sequential(*(ConvNeXtBlock(d, g) for g in gammas))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


_EXPORTS: dict = {}


def _export(name, attn):
    if (name, attn) not in _EXPORTS:
        torch.manual_seed(0)
        model, x = tm.llama(attn, layers=3) if (name, attn) == ("llama", "sdpa") else getattr(tm, name)(attn)
        _EXPORTS[name, attn] = tm.export(model, x)
    return _EXPORTS[name, attn]


@pytest.fixture(scope="module", params=TRANSFORMERS, ids=lambda p: f"{p[0]}-{p[1]}")
def transformer(request):
    name, attn = request.param
    return name, spa.load(_export(name, attn))


def convnext(gammas=(0.5, 0.6, 0.7)):
    torch.manual_seed(0)
    return spa.load(export_torch(ConvNeXt(gammas).eval(), (torch.randn(1, 3, 32, 32),)))


@pytest.fixture(scope="module")
def llama3():
    return _export("llama", "sdpa")


def _assert_removal_invariant(model, blocks, feeds=None):
    """Removing ``blocks`` gives the dense model with their branches zeroed; the result is valid
    ONNX, runs, and lost exactly the blocks' weights."""
    feeds = feeds or feeds_for(model)
    shallow = depth.remove(spa.api.clone(model), blocks)
    onnx.checker.check_model(to_proto(shallow), full_check=True)
    want = run(depth.gated(model, blocks), feeds)
    got = run(shallow, feeds)
    for w, g in zip(want, got):
        assert w.shape == g.shape
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    sizes = param_elements(model)
    gone = sum(sizes[p] for b in blocks for p in b.params)
    assert gone > 0 and count_params(model) - count_params(shallow) >= gone
    assert not set(p for b in blocks for p in b.params) & set(shallow.graph.initializers)
    return shallow


# ---- discovery ----------------------------------------------------------------------------
def test_transformer_layers_found_and_each_sublayer_removes_exactly(transformer):
    name, model = transformer
    blocks = {b.key: b for b in depth.find_blocks(model)}
    n = 3 if "layer2" in blocks else 2
    assert sorted(blocks) == sorted(f"layer{i}{s}" for i in range(n) for s in ("", ".attention", ".ffn"))
    assert all(b.removable and b.reason is None for b in blocks.values())
    for layer in (0, 1):
        att, ffn, whole = blocks[f"layer{layer}.attention"], blocks[f"layer{layer}.ffn"], blocks[f"layer{layer}"]
        assert (att.kind, ffn.kind, whole.kind) == ("attention", "ffn", "layer")
        assert att.layer == ffn.layer == whole.layer == layer and att.index < ffn.index
        assert any(p.endswith(LAYER_PARAM[name].format(layer)) for p in att.params), att.params
        assert any(p.endswith(FFN_PARAM[name].format(layer)) for p in ffn.params), ffn.params
        assert not any(p.endswith(LAYER_PARAM[name].format(layer + 1)) for p in whole.params)
        assert set(whole.params) == set(att.params) | set(ffn.params) and whole.add == ffn.add
    feeds = feeds_for(model)
    for key in ("layer0.attention", "layer1.ffn", "layer0"):
        _assert_removal_invariant(model, [blocks[key]], feeds)


def test_convnext_blocks_with_layer_scale():
    model = convnext()
    blocks = depth.find_blocks(model)
    assert [b.key for b in blocks] == ["block0", "block1", "block2"]
    assert all(b.kind == "block" and b.layer is None and b.removable for b in blocks)
    assert any(p.endswith("blocks.1.gamma") for p in blocks[1].params)
    assert any(p.endswith("blocks.1.dw.weight") for p in blocks[1].params)
    _assert_removal_invariant(model, [blocks[1]])
    _assert_removal_invariant(model, [blocks[0], blocks[2]])


def test_resnet_projection_shortcut_is_not_removable():
    torch.manual_seed(0)
    model = spa.load(export_torch(randomize_norms(ResNet()), (torch.randn(1, 3, 32, 32),)))
    blocks = depth.find_blocks(model)
    assert [(b.key, b.removable) for b in blocks] == [("block0", True), ("block1", False), ("block2", True)]
    assert "projection shortcut" in blocks[1].reason and "Conv" in blocks[1].reason
    assert "(1, 16, 32, 32) -> (1, 32, 16, 16)" in blocks[1].reason
    _assert_removal_invariant(model, [blocks[0], blocks[2]])
    with pytest.raises(PlanError, match="projection shortcut"):
        depth.remove(spa.api.clone(model), [blocks[1]])
    result = spa.prune(model, 0.0, depth=1)
    assert len(result.plan.blocks) == 1 and result.plan.blocks[0].key in ("block0", "block2")


def test_bottleneck_resnet_from_onnx_builder():
    from spa import zoo

    # the stem gives 64 channels = 16 * 4: the first bottleneck keeps the identity shortcut
    model = spa.load(zoo.resnet((2, 2), (16, 32), bottleneck=True, image=32, classes=10))
    blocks = depth.find_blocks(model)
    assert [b.removable for b in blocks] == [True, True, False, True]
    assert "projection shortcut" in blocks[2].reason
    text = spa.report.block_lines(blocks)
    assert text[2].startswith("  block 2 (") and "not removable: projection shortcut" in text[2]
    assert text[1].startswith("  block 1 (") and ": removable" in text[1]
    _assert_removal_invariant(model, [blocks[1], blocks[3]])


def test_branch_value_read_outside_is_not_removable():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 8] x) => (float[2, 8] y, float[2, 8] h) {
        h = MatMul(x, w1)
        r = Relu(h)
        f = MatMul(r, w2)
        y = Add(x, f)
    }"""
    text = text.replace("(float[2, 8] x)", "(float[2, 8] x, float[8, 8] w1, float[8, 8] w2)")
    blocks = depth.find_blocks(spa.load(build(text)))
    assert len(blocks) == 1 and not blocks[0].removable and "graph output" in blocks[0].reason


def test_inner_residual_is_not_a_separate_block():
    """A residual inside a branch (the tanh GELU's x + c*x^3) belongs to the outer block."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 8] x, float[8, 8] w1, float[8, 8] w2, float c) => (float[2, 8] y) {
        h = MatMul(x, w1)
        h3 = Mul(h, h)
        t = Mul(h3, c)
        u = Add(h, t)
        f = MatMul(u, w2)
        y = Add(f, x)
    }"""
    model = spa.load(build(text))
    blocks = depth.find_blocks(model)
    assert [(b.key, b.kind, b.removable) for b in blocks] == [("block0", "ffn", True)]
    _assert_removal_invariant(model, blocks)


# ---- scores -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["bi", "angular", "greedy"])
def test_scores_pick_the_block_that_barely_moves_the_stream(method):
    model = convnext(gammas=(0.5, 1e-4, 0.6))
    feeds = [feeds_for(model, seed=s) for s in range(2)]
    chosen = depth.select(model, 1, "layer", method, feeds)
    assert [b.key for b in chosen] == ["block1"]


def test_angular_removes_a_contiguous_span(llama3):
    model = spa.load(llama3)
    chosen = depth.select(model, 2, "layer", "angular", [feeds_for(model)])
    assert len(chosen) == 2 and chosen[1].layer == chosen[0].layer + 1


def test_depth_counts():
    assert depth.count(0.25, 8) == 2 and depth.count(0.01, 8) == 1 and depth.count(3, 8) == 3
    with pytest.raises(spa.errors.ArgumentError):
        depth.count(8, 8)
    with pytest.raises(spa.errors.ArgumentError):
        depth.count(1.5, 8)


# ---- spa.prune / apply_plan / plans -------------------------------------------------------
def test_prune_depth_on_onnx_removes_the_layer_weights(llama3):
    dense = spa.load(llama3)
    result = spa.prune(llama3, 0.0, depth=0.25)
    (bp,) = result.plan.blocks
    assert bp.kind == "layer" and bp.key == f"layer{bp.layer}"
    assert any(p.endswith(f"layers.{bp.layer}.mlp.up_proj.weight") for p in bp.params)
    sizes = param_elements(dense)
    assert count_params(dense) - count_params(result.model) == sum(sizes[p] for p in bp.params)
    assert count_params(result.dense) == count_params(dense)
    assert any("equals the dense model with the removed branches zeroed" in n for n in result.notes)
    onnx.checker.check_model(result.proto, full_check=True)
    sess = runtime.session(result.proto)
    assert sess.get_inputs()[0].shape[:2] == ["batch", "seq"]  # dynamic axes kept
    out = sess.run(None, runtime.random_feeds(sess, {"batch": 1, "seq": 5}))[0]
    assert out.shape == (1, 5, 97)


def test_width_and_depth_in_one_plan(llama3, tmp_path):
    result = spa.prune(llama3, 0.3, depth=1, depth_unit="sublayer", depth_score="greedy", plan_out=tmp_path / "p.json")
    assert len(result.plan.blocks) == 1 and result.plan.blocks[0].kind in ("attention", "ffn")
    assert result.plan.pruned_groups and result.equivalence.checked_groups
    assert result.equivalence.max_abs_diff <= result.equivalence.tolerance
    assert result.plan.meta["depth_score"] == "greedy"
    assert result.report()["blocks_removed"] == [{"key": result.plan.blocks[0].key, "kind": result.plan.blocks[0].kind,
                                                  "layer": result.plan.blocks[0].layer}]
    plan = Plan.from_json(tmp_path / "p.json")
    assert plan == result.plan
    again = spa.apply_plan(llama3, plan)
    assert count_params(again) == count_params(result.model) < count_params(result.dense)
    feeds = feeds_for(result.model)
    np.testing.assert_allclose(run(again, feeds)[0], run(result.model, feeds)[0], atol=1e-5)


def test_plan_json_round_trip_with_blocks():
    plan = Plan((GroupPlan("g", 4, (0, 2)),), {"criterion": "l1"},
                (BlockPlan("layer3", "layer", 3, ("a.weight", "b.weight")), BlockPlan("block1", "block")))
    data = json.loads(plan.to_json())
    assert data["blocks"][0] == {"key": "layer3", "kind": "layer", "layer": 3, "params": ["a.weight", "b.weight"]}
    assert Plan.from_json(plan.to_json()) == plan
    old = {k: v for k, v in data.items() if k != "blocks"}
    assert Plan.from_dict(old).blocks == () and "blocks" not in Plan.from_dict(old).to_dict()
    with pytest.raises(PlanError, match="block"):
        Plan.from_dict({**data, "blocks": [{"key": 3}]})
    with pytest.raises(PlanError, match="repeat"):
        Plan.from_dict({**data, "blocks": [data["blocks"][0]] * 2})


def test_plan_block_missing_from_the_model_is_refused():
    model = convnext()
    plan = Plan((), {}, (BlockPlan("layer7", "layer", 7),))
    with pytest.raises(PlanError, match="layer7"):
        spa.apply_plan(model, plan)


# ---- CLI ----------------------------------------------------------------------------------
def test_cli_prune_depth_end_to_end(tmp_path, capsys):
    from spa.cli import main

    src, out, plan = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "plan.json"
    torch.manual_seed(0)
    onnx.save(export_torch(ConvNeXt((0.5, 0.6, 0.7, 0.8)).eval(), (torch.randn(1, 3, 32, 32),)), src)
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "Residual blocks (depth pruning units): 4" in text and "block 2 (" in text
    assert main(["prune", str(src), "-o", str(out), "--depth", "0.25", "--ratio", "0.25",
                 "--plan-out", str(plan)]) == 0
    text = capsys.readouterr().out
    assert "depth: removed 1 residual layers (bi): block" in text
    saved = Plan.from_json(plan)
    assert len(saved.blocks) == 1 and saved.pruned_groups
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    assert count_params(spa.load(pruned)) < count_params(spa.load(src))
    again = tmp_path / "again.onnx"
    assert main(["apply", str(src), str(plan), "-o", str(again)]) == 0
    assert count_params(spa.load(again)) == count_params(spa.load(pruned))
    assert main(["prune", str(src), "-o", str(tmp_path / "x.onnx")]) == 1
    assert "--ratio" in capsys.readouterr().err


# ---- nn.Module ----------------------------------------------------------------------------
def _has_torch_depth() -> bool:
    try:
        import spa.frontends.torch_depth  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_has_torch_depth(), reason="spa.frontends.torch_depth is installed")
def test_module_depth_without_the_module_stage_is_refused_clearly():
    with pytest.raises(UnsupportedModelError, match="torch_depth"):
        spa.prune(ConvNeXt().eval(), torch.randn(1, 3, 32, 32), 0.0, depth=1)


@pytest.mark.skipif(not _has_torch_depth(), reason="spa.frontends.torch_depth is not installed")
def test_module_depth_prunes_the_module():
    torch.manual_seed(0)
    module, x = tm.llama("sdpa", layers=4)
    result = spa.prune(module.eval(), x, 0.0, depth=1)
    assert result.module.config.num_hidden_layers == 3
    with torch.no_grad():
        got = result.module(x).logits.numpy()
    want = run(result.model, {result.model.graph.inputs[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


class ParallelLayer(nn.Module):
    """x + attn(ln(x)) + mlp(ln(x)), summed in either order."""

    def __init__(self, d=16, heads=2, stream_first=True):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.heads, self.stream_first = heads, stream_first

    def forward(self, x):
        h = self.ln(x)
        b, t, d = x.shape
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(h).chunk(3, -1))
        a = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
        a = self.o(a.transpose(1, 2).reshape(b, t, d))
        m = self.down(F.gelu(self.up(h)))
        return (x + a) + m if self.stream_first else x + (a + m)


class ParallelNet(nn.Module):
    def __init__(self, stream_first=True):
        super().__init__()
        self.layers = nn.Sequential(*(ParallelLayer(stream_first=stream_first) for _ in range(3)))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.layers(x))


@pytest.mark.parametrize("stream_first", [True, False], ids=["x+a+m", "x+(a+m)"])
def test_parallel_attention_and_ffn_is_one_layer(stream_first):
    torch.manual_seed(0)
    model = spa.load(export_torch(ParallelNet(stream_first).eval(), (torch.randn(1, 6, 16),)))
    blocks = depth.find_blocks(model)
    assert [(b.key, b.kind, b.layer, b.removable) for b in blocks] == [
        (f"layer{i}", "layer", i, True) for i in range(3)]
    assert any(p.endswith("layers.1.qkv.bias") for p in blocks[1].params)
    assert any(p.endswith("layers.1.down.bias") for p in blocks[1].params)
    assert depth.units(blocks, "sublayer") == blocks
    _assert_removal_invariant(model, [blocks[1]])
    assert len(depth.select(model, 1, "layer", "greedy", [feeds_for(model)])) == 1

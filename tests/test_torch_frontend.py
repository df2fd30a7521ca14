"""nn.Module in, smaller nn.Module out: same classes, sliced parameters and buffers, updated
attributes, outputs equal to the ONNX model pruned with the same plan; gradient criteria."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_models as tm  # noqa: E402
from helpers import run  # noqa: E402
from torch import nn  # noqa: E402

import spa  # noqa: E402
from spa.frontends import torch as tf  # noqa: E402
from spa.frontends.gradients import gradient_importance  # noqa: E402

CNNS = {
    "resnet": (tm.ResNet, (2, 3, 16, 16)),
    "mobilenetv2": (tm.MobileNetV2, (2, 3, 16, 16)),
    "densenet": (tm.DenseNet, (2, 3, 16, 16)),
    "unet": (tm.UNet, (2, 3, 16, 16)),
    "senet": (tm.SENet, (2, 3, 16, 16)),
    "conv_mlp": (tm.ConvMLP, (2, 1, 8, 8)),
    "acts_and_norms": (tm.ActsAndNorms, (2, 3, 8, 8)),
}


def _build(name):
    ctor, shape = CNNS[name]
    torch.manual_seed(0)
    return tm.randomize_norms(ctor()).eval(), torch.randn(*shape)


def _onnx_outputs(model, x):
    return run(model, {model.graph.inputs[0].name: x.numpy()})


@pytest.mark.parametrize("name", list(CNNS))
def test_pruned_module_matches_pruned_onnx_and_exports_again(name):
    module, x = _build(name)
    result = spa.prune(module, x, ratio=0.5)
    small = result.module
    assert [type(m) for m in small.modules()] == [type(m) for m in module.modules()]
    assert sum(p.numel() for p in small.parameters()) < 0.6 * sum(p.numel() for p in module.parameters())
    with torch.no_grad():
        got = small(x).numpy()
    np.testing.assert_allclose(got, _onnx_outputs(result.model, x)[0], atol=1e-4, rtol=1e-4)
    for m in small.modules():  # attributes agree with the sliced tensors
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[0] == m.out_channels and m.weight.shape[1] * m.groups == m.in_channels
        elif isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features)
        elif isinstance(m, nn.BatchNorm2d):
            assert m.running_mean.shape == m.running_var.shape == m.weight.shape == (m.num_features,)
    again = spa.load(tf.export(small, x))  # the small module exports and prunes again
    assert spa.dependency_graph(again).groups


def test_batchnorm_running_stats_follow_the_kept_channels():
    module, x = _build("resnet")
    result = spa.prune(module, x, ratio=0.5)
    group = next(g for g in result.graph.groups if g.key == "stem.0.weight:0")
    keep = next(gp.keep for gp in result.plan.groups if gp.key == group.key)
    np.testing.assert_array_equal(result.module.stem[1].running_mean.numpy(),
                                  module.stem[1].running_mean.numpy()[list(keep)])
    assert result.module.stem[0].weight.requires_grad


def test_one_plan_prunes_both_forms(tmp_path):
    module, x = _build("mobilenetv2")
    result = spa.prune(module, x, ratio=0.3)
    path = spa.export_plan(result.plan, tmp_path / "plan.json")
    plan = spa.Plan.from_json(path)
    small = spa.apply_plan(module, plan, example_inputs=x)
    onnx_small = spa.apply_plan(spa.load(tf.export(module, x)), plan)
    with torch.no_grad():
        np.testing.assert_allclose(small(x).numpy(), _onnx_outputs(onnx_small, x)[0], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(small(x).numpy(), result.module(x).numpy(), atol=1e-6)


def test_tied_parameters_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.fc = nn.Linear(16, 32)
            self.back = nn.Linear(32, 16)
            self.norm = nn.LayerNorm(16)
            self.out = nn.Linear(16, 20, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            h = self.emb(ids)
            h = h + self.back(torch.relu(self.fc(h)))
            return self.out(self.norm(h))

    torch.manual_seed(0)
    module, ids = Tied().eval(), torch.randint(0, 20, (2, 5))
    result = spa.prune(module, ids, ratio=0.5)
    small = result.module
    assert small.out.weight is small.emb.weight and small.emb.weight.shape == (20, 8)
    assert small.emb.embedding_dim == 8 and small.norm.normalized_shape == (8,) and small.fc.out_features == 16


def test_multihead_attention_module_stays_valid():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.fc = nn.Linear(32, 64)
            self.head = nn.Linear(64, 3)

        def forward(self, x):
            return self.head(torch.relu(self.fc(self.attn(x, x, x, need_weights=False)[0])))

    torch.manual_seed(0)
    module, x = Block().eval(), torch.randn(2, 5, 32)
    result = spa.prune(module, x, ratio=0.5)
    assert result.module.attn.out_proj.weight.shape[0] == 16 and result.module.fc.in_features == 16
    with torch.no_grad():
        np.testing.assert_allclose(result.module(x).numpy(), _onnx_outputs(result.model, x)[0], atol=1e-4)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("criterion", ["taylor", "snip", "grasp"])
def test_gradient_criteria_map_onto_groups_by_name(criterion):
    module = _mlp()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    imp = gradient_importance(module, criterion, [(x, y)])
    assert set(imp) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    dg = spa.dependency_graph(spa.load(tf.export(module, x)))
    scores = spa.score(dg, criterion, reduction="mean", normalization="none", arrays=imp)
    group = dg.groups[0]
    # Channel c: mean over the producer row and the consumer column of the per-element importance.
    want = (imp["0.weight"].sum(axis=1) + imp["2.weight"].sum(axis=0)) / 2
    np.testing.assert_allclose(scores[group.key], want, rtol=1e-6)
    if criterion == "taylor":  # |w * g| with g the gradient of the loss
        module.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        np.testing.assert_allclose(imp["0.weight"], (module[0].weight * module[0].weight.grad).abs().detach().numpy(),
                                   rtol=1e-5, atol=1e-7)
    result = spa.prune(module, x, ratio=0.5, criterion=criterion, data=[(x, y)], normalization="none")
    kept = next(gp.keep for gp in result.plan.groups)
    assert set(kept) == set(np.argsort(-want, kind="stable")[:4].tolist())


def test_errors_name_the_problem():
    module = _mlp()
    with pytest.raises(spa.FrontendError, match="example_inputs"):
        spa.prune(module, ratio=0.5)
    with pytest.raises(spa.ArgumentError, match="needs gradients"):
        spa.prune(tf.export(module, torch.randn(2, 6)), 0.5, criterion="taylor")
    with pytest.raises(spa.ArgumentError, match="needs data"):
        spa.prune(module, torch.randn(2, 6), ratio=0.5, criterion="snip")

    class DataDependent(nn.Module):
        def forward(self, x):
            return x.nonzero().float().sum() if x.sum() > 0 else x

    with pytest.raises(spa.FrontendError, match="cannot export DataDependent"):
        spa.prune(DataDependent(), torch.randn(3), ratio=0.5)


def test_literal_sizes_in_forward_are_blamed_on_their_group():
    torch.manual_seed(0)
    module, x = tm.randomize_norms(tm.Inception()).eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(spa.ValidationError, match=r"group 'shared\.0\.weight:0' breaks the module.*literal"):
        spa.prune(module, x, ratio=0.5)
    small = spa.prune(module, x, ratio=0.5, protect=["shared.0.weight"]).module
    assert small.shared[0].out_channels == 24


def test_a_parameter_that_cannot_be_mapped_back_is_named():
    module = _mlp()
    x = torch.randn(2, 6)
    proto = tf.export(module, x)
    for init in proto.graph.initializer:  # as if an exporter had renamed the weight
        if init.name == "0.weight":
            init.name = "renamed_weight"
    for node in proto.graph.node:
        node.input[:] = ["renamed_weight" if i == "0.weight" else i for i in node.input]
    dg = spa.dependency_graph(spa.load(proto))
    plan = spa.make_plan(dg, spa.score(dg), 0.5)
    with pytest.raises(spa.UnsupportedModelError, match="renamed_weight.*cannot be mapped back"):
        tf.slice_module(module, dg, plan, {i.name for i in proto.graph.initializer})

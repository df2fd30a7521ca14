"""Masked equivalence for every group of real exported architectures (both torch exporters)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from helpers import check_masked_equivalence, export_torch  # noqa: E402

import spa  # noqa: E402
import torch_models as tm  # noqa: E402

ARCHS = {
    # name: (constructor, input shape, expected prunable group sizes)
    "resnet": (tm.ResNet, (1, 3, 16, 16), [16, 16, 32, 32, 32]),
    "mobilenetv2": (tm.MobileNetV2, (1, 3, 16, 16), [16, 32, 48, 24, 72, 64]),
    "densenet": (tm.DenseNet, (1, 3, 16, 16), [40, 24]),
    "inception": (tm.Inception, (1, 3, 8, 8), [32, 40, 12, 24, 16]),
    "unet": (tm.UNet, (1, 3, 16, 16), [40, 56, 32, 16]),
    "senet": (tm.SENet, (1, 3, 16, 16), [16, 4, 32, 8]),
    "conv_mlp": (tm.ConvMLP, (1, 1, 8, 8), [8, 16, 64, 32]),
    "acts_and_norms": (tm.ActsAndNorms, (1, 3, 8, 8), [4]),
}


def _export(name, dynamo, dynamic_batch=False):
    ctor, shape, _ = ARCHS[name]
    torch.manual_seed(0)
    return export_torch(tm.randomize_norms(ctor()), (torch.randn(*shape),), dynamo=dynamo,
                        dynamic_batch=dynamic_batch)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_masked_equivalence_of_every_group(name, dynamo):
    groups = check_masked_equivalence(_export(name, dynamo))
    assert sorted(g.size for g in groups) == sorted(ARCHS[name][2])


@pytest.mark.parametrize("name", ["resnet", "unet", "acts_and_norms"])
def test_dynamic_batch_exports(name):
    groups = check_masked_equivalence(_export(name, True, dynamic_batch=True), input_shapes={"batch": 3})
    assert sorted(g.size for g in groups) == sorted(ARCHS[name][2])


def test_densenet_concat_group_spans_every_producer():
    dg = spa.dependency_graph(spa.load(_export("densenet", True)))
    g = max(dg.groups, key=lambda g: g.size)
    producers = [m.node for m in g.params if m.role == "out"]
    assert g.size == 40 and len(producers) == 4  # the stem and the three dense layers


def test_full_prune_of_each_architecture_is_valid():
    for name in ARCHS:
        result = spa.prune(_export(name, True), 0.5, round_to=2)
        assert result.verify_report.ran and result.verify_report.checker, name
        assert len(result.plan.pruned_groups) == len(ARCHS[name][2]), name

"""Torch-Pruning (DepGraph) as an oracle: on architectures both tools support, SPA's groups and
pruned parameter counts at the same ratio are compared with Torch-Pruning's. Where they
differ, the test says why (and what SPA finds that Torch-Pruning does not)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
tp = pytest.importorskip("torch_pruning")

import torch_models as tm  # noqa: E402
import transformer_models as trm  # noqa: E402

import spa  # noqa: E402


def nparams(m) -> int:
    return sum(p.numel() for p in m.parameters())


def tp_prune(model, x, ratio, **kw):
    """Torch-Pruning's MetaPruner, L1 magnitude, uniform ratio, the output layer ignored."""
    model = copy.deepcopy(model)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    ignored = kw.pop("ignored_layers", [layers[-1]])
    if callable(ignored):
        ignored = ignored(model)
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=ignored, **kw)
    pruner.step()
    return model


def tp_groups(model, x) -> int:
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    return len(list(dg.get_all_groups(ignored_layers=[layers[-1]], root_module_types=[torch.nn.Conv2d, torch.nn.Linear])))


def _cnn(ctor, shape):
    torch.manual_seed(0)
    return tm.randomize_norms(ctor()).eval(), torch.randn(*shape)


@pytest.mark.parametrize("ctor,shape", [(tm.ResNet, (1, 3, 16, 16)), (tm.MobileNetV2, (1, 3, 16, 16)),
                                        (tm.SENet, (1, 3, 16, 16)), (tm.ConvMLP, (1, 1, 8, 8))],
                         ids=["resnet", "mobilenetv2", "senet", "conv_mlp"])
def test_cnn_groups_and_pruned_params_equal_torch_pruning(ctor, shape):
    model, x = _cnn(ctor, shape)
    result = spa.prune(model, x, ratio=0.5)
    assert len(result.graph.groups) == tp_groups(model, x)
    assert nparams(result.module) == nparams(tp_prune(model, x, 0.5))


@pytest.mark.parametrize("ctor", [tm.DenseNet, tm.UNet], ids=["densenet", "unet"])
def test_concat_groups_are_one_group_in_spa(ctor):
    """A Concat whose output feeds one consumer couples its producers: Torch-Pruning keeps one
    group per producing conv (each pruned at the ratio), SPA one group over all of them (ranked
    together, every producer keeping at least one channel). Both remove the same share of the
    concatenated channels; which producer loses how many differs, hence the parameter counts."""
    model, x = _cnn(ctor, (1, 3, 16, 16))
    result = spa.prune(model, x, ratio=0.5)
    assert len(result.graph.groups) < tp_groups(model, x)
    concat_groups = [g for g in result.graph.groups if len({m.node for m in g.params if m.role == "out"}) > 1]
    assert concat_groups
    ours, theirs = nparams(result.module), nparams(tp_prune(model, x, 0.5))
    assert abs(ours - theirs) / theirs < 0.15


def test_literal_split_sizes_torch_pruning_crashes_spa_names_the_group():
    model, x = _cnn(tm.Inception, (1, 3, 8, 8))
    with pytest.raises(IndexError):  # Torch-Pruning prunes across torch.split([8, 16]) and breaks
        tp_prune(model, x, 0.5)
    with pytest.raises(spa.ValidationError, match="shared.0.weight"):
        spa.prune(model, x, ratio=0.5)


def _heads_config(model):
    """What Torch-Pruning must be told by hand: the head count of every q/k/v projection."""
    cfg = model.config
    heads = {}
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("query", "key", "value", "q_proj"):
            heads[mod] = cfg.num_attention_heads
        elif leaf in ("k_proj", "v_proj"):
            heads[mod] = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    return heads


def _keep_hidden(model):
    """Torch-Pruning prunes the hidden size unless the residual stream's producers are ignored."""
    ends = ("attention.output.dense", "output.dense", "o_proj", "down_proj", "mlp.fc2", "patch_embeddings.projection",
            "classifier", "lm_head")
    return [m for n, m in model.named_modules() if n.endswith(ends)]


@pytest.mark.parametrize("builder", [trm.bert, trm.vit], ids=["bert", "vit"])
def test_heads_and_ffn_params_equal_torch_pruning(builder):
    torch.manual_seed(0)
    model, x = builder("sdpa")
    model.eval()
    ours = spa.prune(model, x, ratio=0.5, kinds=["heads", "channels"]).module  # heads found, not told
    theirs = tp_prune(model, x, 0.5, num_heads=_heads_config(model), prune_num_heads=True, prune_head_dims=False,
                      head_pruning_ratio=0.5, ignored_layers=_keep_hidden, output_transform=lambda o: o.logits)
    assert nparams(ours) == nparams(theirs)


def test_gqa_torch_pruning_breaks_the_kv_grouping_spa_keeps_it():
    """Told 8 q and 2 K/V heads, Torch-Pruning prunes q and K/V heads independently: 7 q heads are
    left over 1 K/V head, so query heads of the removed K/V group now read another group's keys.
    SPA removes a K/V head together with the 4 query heads that read it (or, with gqa="q", the
    same query positions in every group) and keeps the repeat consistent."""
    torch.manual_seed(0)
    model, x = trm.llama("sdpa")
    model.eval()
    theirs = tp_prune(model, x, 0.5, num_heads=_heads_config(model), prune_num_heads=True, prune_head_dims=False,
                      head_pruning_ratio=0.5, ignored_layers=_keep_hidden, output_transform=lambda o: o.logits)
    a = theirs.model.layers[0].self_attn
    assert (a.q_proj.out_features // 8, a.k_proj.out_features // 8) == (7, 1)  # 7 q heads on 1 K/V head
    ours = spa.prune(model, x, ratio=0.5, kinds=["heads", "channels"]).module.model.layers[0].self_attn
    assert (ours.q_proj.out_features // 8, ours.k_proj.out_features // 8, ours.num_key_value_groups) == (4, 1, 4)
    within = spa.prune(model, x, ratio=0.5, kinds=["heads", "channels"], gqa="q").module.model.layers[0].self_attn
    assert (within.q_proj.out_features // 8, within.k_proj.out_features // 8, within.num_key_value_groups) == (4, 2, 2)

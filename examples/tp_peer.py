"""Torch-Pruning (``torch_pruning``) as a peer of SPA's criteria in the quality benchmarks: its
importances (magnitude L1/L2, Taylor, Hessian/OBD), uniform per layer like SPA's default, with
its ``pruning_ratio`` searched (bisection) so the pruned module has as many parameters as SPA's
plan at the same ratio."""

from __future__ import annotations

import copy

import torch

#: label -> (importance factory, whether it needs gradients: "taylor" one backward of the batch
#: loss, "hessian" per-sample gradients accumulated)
IMPORTANCES = {
    "TP L1": (lambda tp: tp.importance.GroupMagnitudeImportance(p=1), None),
    "TP L2": (lambda tp: tp.importance.GroupMagnitudeImportance(p=2), None),
    "TP Taylor": (lambda tp: tp.importance.GroupTaylorImportance(), "taylor"),
    "TP Hessian (OBD)": (lambda tp: tp.importance.GroupHessianImportance(), "hessian"),
}


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def primed(model, importance: str, loss_fn, data):
    """A copy of ``model`` with what ``IMPORTANCES[importance]`` reads (``.grad`` for Taylor,
    accumulated per-sample gradients for Hessian), and the importance: deep-copied together for
    each pruning, so the gradients are computed once per importance, not once per ratio tried."""
    import torch_pruning as tp

    make, grads = IMPORTANCES[importance]
    m = copy.deepcopy(model)
    imp = make(tp)
    with torch.enable_grad():
        if grads == "taylor":
            m.zero_grad()
            for batch in data:
                loss_fn(m, batch).backward()
        elif grads == "hessian":
            imp.zero_grad()
            for batch in data[:2]:
                for k in range(min(len(batch[0]), 32)):
                    m.zero_grad()
                    loss_fn(m, tuple(b[k:k + 1] for b in batch)).backward()
                    imp.accumulate_grad(m)
    return m, imp


def tp_prune(prime, example, ratio: float, configure):
    """A pruned copy of the ``primed`` model at ``pruning_ratio=ratio``; ``configure(copy, ratio)``
    gives the pruner's other keywords (``ignored_layers``, heads) and ``configure.after(copy)``,
    where it exists, fixes the module up after pruning."""
    import torch_pruning as tp

    m, imp = copy.deepcopy(prime)
    for new, old in zip(m.parameters(), prime[0].parameters()):  # deepcopy leaves .grad behind
        if old.grad is not None:
            new.grad = old.grad.clone()
    pruner = tp.pruner.MetaPruner(m, example, importance=imp, pruning_ratio=ratio, **configure(m, ratio))
    with torch.enable_grad():
        pruner.step()
    m.zero_grad(set_to_none=True)
    if hasattr(configure, "after"):
        configure.after(m)
    return m.eval()


def tp_matched(prime, example, target_params: int, configure, iters: int = 8):
    """``tp_prune`` with ``pruning_ratio`` bisected until the parameter count is the closest to
    ``target_params``: (module, parameters, pruning_ratio)."""
    lo, hi = 0.0, 0.95
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        m = tp_prune(prime, example, mid, configure)
        n = params(m)
        if best is None or abs(n - target_params) < abs(best[1] - target_params):
            best = (m, n, mid)
        if n > target_params:
            lo = mid
        else:
            hi = mid
    return best


def ignore_last_linear(model):
    """``configure`` for a classifier: everything prunable but its last Linear (the classes)."""
    from torch import nn

    index = list(model.modules()).index([m for m in model.modules() if isinstance(m, nn.Linear)][-1])
    return lambda m, _ratio: {"ignored_layers": [list(m.modules())[index]]}


class LlamaHeads:
    """``configure`` for a ``transformers`` LLaMA: attention heads (query and key/value heads by
    their counts, whole heads) and FFN channels at the same ratio, embeddings, norms and the LM head
    kept; after pruning, each attention's head counts are brought in line with its projections."""

    def __call__(self, m, ratio):
        cfg, heads = m.config, {}
        for layer in m.model.layers:
            a = layer.self_attn
            heads[a.q_proj] = cfg.num_attention_heads
            heads[a.k_proj] = heads[a.v_proj] = cfg.num_key_value_heads
        return {"ignored_layers": [m.lm_head], "num_heads": heads, "prune_num_heads": True,
                "prune_head_dims": False, "head_pruning_ratio": ratio}

    @staticmethod
    def after(m):
        for layer in m.model.layers:
            a = layer.self_attn
            q, kv = a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim
            a.num_key_value_groups = q // max(kv, 1)

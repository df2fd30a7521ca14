"""Gradient-based importance of an nn.Module's parameters, computed with autograd and keyed by
parameter name (the names of the export's initializers), so group scores read them like
weights: Taylor (first order, |w·g|), SNIP (connection sensitivity |w·g| at initialization,
normalized over the network) and GraSP (w·Hg, the Hessian-gradient product: a high value
means removing the weight would reduce gradient flow, so it is kept)."""

from __future__ import annotations

import numpy as np

from spa.errors import ArgumentError


def _default_loss(module, batch):
    import torch.nn.functional as F

    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ArgumentError("the default loss needs (inputs, targets) batches; pass loss_fn(module, batch) otherwise")
    x, y = batch
    out = module(x)
    out = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(out, y)


def gradient_importance(module, criterion: str, data, loss_fn=None) -> dict[str, np.ndarray]:
    """Per-element importance of every parameter (name -> array of its shape)."""
    import torch

    if data is None:
        raise ArgumentError(f"criterion '{criterion}' needs data: an iterable of batches (e.g. [(x, y)])")
    loss_fn = loss_fn or _default_loss
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if not params:
        raise ArgumentError("the module has no trainable parameters to take gradients of")
    was_training = module.training
    module.eval()
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = list(data)
    if not batches:
        raise ArgumentError("data holds no batch")
    try:
        for batch in batches:
            loss = loss_fn(module, batch)
            g = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), gi in zip(params.items(), g):
                if gi is not None:
                    grads[n] += gi.detach() / len(batches)
        if criterion == "grasp":
            hg = {n: torch.zeros_like(p) for n, p in params.items()}
            for batch in batches:
                loss = loss_fn(module, batch)
                g = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
                z = sum((gi * grads[n]).sum() for (n, _), gi in zip(params.items(), g) if gi is not None)
                h = torch.autograd.grad(z, list(params.values()), allow_unused=True)
                for (n, _), hi in zip(params.items(), h):
                    if hi is not None:
                        hg[n] += hi.detach() / len(batches)
            out = {n: (p.detach() * hg[n]).cpu().numpy() for n, p in params.items()}
        else:
            out = {n: (p.detach() * grads[n]).abs().cpu().numpy() for n, p in params.items()}
            if criterion == "snip":
                total = sum(float(a.sum()) for a in out.values()) or 1.0
                out = {n: a / total for n, a in out.items()}
    finally:
        module.zero_grad(set_to_none=True)
        module.train(was_training)
    return out

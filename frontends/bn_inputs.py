"""Data-free calibration inputs for a module, optimized from Gaussian noise with Adam, no labels:

  * ``bn``: every BatchNorm layer's batch mean and variance match its running statistics (the
    statistics of the training data it saw), as in DeepInversion;
  * ``filters`` (modules without BatchNorm): in the first ``FILTER_LAYERS`` Conv/Linear layers
    (in execution order), every output channel's pre-activation has batch mean 0 and standard
    deviation ``||w_c||`` (its response to whitened unit-variance input): each unit sits at its
    threshold and fires on part of the inputs, as trained units do on natural inputs, where noise
    leaves many of them always on or always off by their biases.
"""

from __future__ import annotations

import numpy as np

from spa.errors import ArgumentError

#: How many Conv/Linear layers (from the input on) the ``filters`` source matches.
FILTER_LAYERS = 2


def _optimized(module, example_inputs, layers, loss_of, what: str, n_batches: int, batch: int, steps: int,
               lr: float, seed: int) -> list[np.ndarray]:
    """Batches of one float input, each optimized from noise so that the sum of ``loss_of(layer,
    input, output)`` over forward hooks on ``layers`` falls."""
    import torch

    from spa.frontends.torch import as_args

    args = as_args(example_inputs)
    if len(args) != 1 or not args[0].is_floating_point():
        raise ArgumentError(f"calibration='{what}' needs a module with one floating-point input")
    losses = []
    handles = [m.register_forward_hook(lambda mod, inp, out: losses.append(loss_of(mod, inp[0], out)))
               for m in layers]
    was_training = module.training
    module.eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    try:
        for _ in range(n_batches):
            x = torch.randn((batch, *args[0].shape[1:]), generator=gen).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            for _ in range(steps):
                losses.clear()
                opt.zero_grad()
                module(x)
                torch.stack(losses).sum().backward()
                opt.step()
            out.append(x.detach().numpy().astype(np.float32))
    finally:
        for h in handles:
            h.remove()
        module.zero_grad(set_to_none=True)
        module.train(was_training)
    return out


def bn_matched_inputs(module, example_inputs, n_batches: int = 8, batch: int = 16, steps: int = 200,
                      lr: float = 0.1, seed: int = 0) -> list[np.ndarray]:
    from torch import nn

    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        raise ArgumentError("calibration='bn' needs BatchNorm layers with running statistics; use 'gaussian' "
                            "or 'filters'")

    def loss(mod, x, _out):
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        return ((mean - mod.running_mean) ** 2).mean() + ((var - mod.running_var) ** 2).mean()

    return _optimized(module, example_inputs, bns, loss, "bn", n_batches, batch, steps, lr, seed)


def first_layers(module, example_inputs, count: int = FILTER_LAYERS) -> list:
    """The first ``count`` Conv/Linear modules ``module`` runs on ``example_inputs``."""
    import torch
    from torch import nn

    from spa.frontends.torch import as_args

    order, kinds = [], (nn.modules.conv._ConvNd, nn.Linear)
    handles = [m.register_forward_hook(lambda mod, *_: order.append(mod))
               for m in module.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            module(*as_args(example_inputs))
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))[:count]


def filter_matched_inputs(module, example_inputs, n_batches: int = 8, batch: int = 16, steps: int = 100,
                          lr: float = 0.1, seed: int = 0, layers: int = FILTER_LAYERS) -> list[np.ndarray]:
    """Inputs whose first ``layers`` Conv/Linear layers respond per channel with mean 0 and
    standard deviation ``||w_c||`` (see the module docstring)."""
    from torch import nn

    found = first_layers(module, example_inputs, layers)
    if not found:
        raise ArgumentError("calibration='filters' needs a module whose input reaches a Conv or Linear layer; "
                            "use 'gaussian'")
    targets = {id(m): m.weight.detach().flatten(1).norm(dim=1) for m in found}

    def loss(mod, _x, out):
        axis = 1 if isinstance(mod, nn.modules.conv._ConvNd) else out.dim() - 1
        z = out.movedim(axis, -1).reshape(-1, out.shape[axis])
        sd = targets[id(mod)]
        return ((z.mean(0) / sd) ** 2).mean() + ((z.std(0, unbiased=False) / sd - 1) ** 2).mean()

    return _optimized(module, example_inputs, found, loss, "filters", n_batches, batch, steps, lr, seed)

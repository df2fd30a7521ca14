"""Data-free calibration inputs for a module with BatchNorm: start from Gaussian noise and
optimize the inputs so that every BatchNorm layer's batch mean and variance match its running
statistics (the statistics of the training data it saw), as in DeepInversion, without labels."""

from __future__ import annotations

import numpy as np

from spa.errors import ArgumentError


def bn_matched_inputs(module, example_inputs, n_batches: int = 8, batch: int = 16, steps: int = 200,
                      lr: float = 0.1, seed: int = 0) -> list[np.ndarray]:
    import torch
    from torch import nn

    from spa.frontends.torch import as_args

    args = as_args(example_inputs)
    if len(args) != 1 or not args[0].is_floating_point():
        raise ArgumentError("calibration='bn' needs a module with one floating-point input")
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        raise ArgumentError("calibration='bn' needs BatchNorm layers with running statistics; use 'gaussian'")
    losses = []

    def hook(mod, inp, _out):
        x = inp[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        losses.append(((mean - mod.running_mean) ** 2).mean() + ((var - mod.running_var) ** 2).mean())

    handles = [m.register_forward_hook(hook) for m in bns]
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

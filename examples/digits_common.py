"""Shared by the pruning-at-any-time examples: scikit-learn's bundled digits (8x8 images, 10
classes; nothing downloaded), a small CNN, training, accuracy, and params/MACs of a module."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import spa
from spa.frontends.torch import export
from spa.metrics import count_macs


def data(seed: int = 0):
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.3, random_state=seed,
                                              stratify=digits.target)
    t = torch.as_tensor
    return t(x_tr), t(y_tr), t(x_te), t(y_te)


class SmallCNN(nn.Module):
    """Three 3x3 convs (each followed by BatchNorm unless ``bn=False``), ReLU, two max-pools, an MLP head."""

    def __init__(self, width: int = 32, bn: bool = True):
        super().__init__()
        w = width

        def norm(c):
            return [nn.BatchNorm2d(c)] if bn else []

        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), *norm(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), *norm(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), *norm(2 * w), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 4, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def batches(x, y, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(x), size)]


def train(model: nn.Module, x, y, epochs: int, lr: float = 2e-3, seed: int = 0) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        for xb, yb in batches(x, y, seed=seed + epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def size(model: nn.Module, example) -> tuple[int, int]:
    """(parameters, MACs of one 8x8 image)."""
    params = sum(p.numel() for p in model.parameters())
    return params, count_macs(spa.load(export(model, example)))


def row(name: str, model: nn.Module, x_te, y_te, example) -> list:
    p, m = size(model, example)
    return [name, f"{accuracy(model, x_te, y_te):.3f}", f"{p:,}", f"{m:,}"]


def trained_cnn(epochs: int, seed: int = 0):
    """The digits split and a SmallCNN trained on it: (model, x_tr, y_tr, x_te, y_te, example)."""
    x_tr, y_tr, x_te, y_te = data()
    torch.manual_seed(seed)
    return train(SmallCNN(), x_tr, y_tr, epochs), x_tr, y_tr, x_te, y_te, x_tr[:2]

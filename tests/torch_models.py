"""Small torch architectures for the tests (random init; BN statistics randomised so that
masked equivalence is a real check)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def randomize_norms(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return module.eval()


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, act=False))
        self.short = conv_bn(cin, cout, 1, stride, act=False) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


class ResNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.layers = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1, 2), InvertedResidual(16, 24, 2, 3),
                                    InvertedResidual(24, 24, 1, 3))
        self.head = nn.Sequential(nn.Conv2d(24, 64, 1), nn.Hardswish())
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


class DenseNet(nn.Module):
    """Each layer's output is concatenated onto the running feature map."""

    def __init__(self, growth=8, layers=3, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16)
        c = 16
        self.layers = nn.ModuleList()
        for _ in range(layers):
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1)))
            c += growth
        self.trans = conv_bn(c, 24, 1)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        x = F.avg_pool2d(self.trans(x), 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Inception(nn.Module):
    """Branches concatenated; one branch's input is a channel split of a shared conv."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.b1 = conv_bn(32, 16, 1)
        self.b2 = nn.Sequential(conv_bn(32, 12, 1), conv_bn(12, 16, 3))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(32, 8, 1))
        self.shared = conv_bn(40, 24, 1)
        self.left, self.right = conv_bn(8, 8, 3), conv_bn(16, 8, 3)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1)
        a, b = torch.split(self.shared(x), [8, 16], dim=1)
        x = torch.cat([self.left(a), self.right(b)], 1)
        return self.fc(x.mean(dim=(2, 3)))


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1, self.enc2 = conv_bn(3, 16), conv_bn(16, 32, stride=2)
        self.bottom = conv_bn(32, 32, stride=2)
        self.up1 = nn.ConvTranspose2d(32, 24, 2, stride=2)
        self.dec1 = conv_bn(24 + 32, 24)
        self.dec0 = conv_bn(24 + 16, 16)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        b = self.bottom(e2)
        d1 = self.dec1(torch.cat([self.up1(b), e2], 1))
        d0 = self.dec0(torch.cat([F.interpolate(d1, scale_factor=2.0, mode="nearest"), e1], 1))
        return self.out(d0)


class SEBlock(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, c // r), nn.Linear(c // r, c)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1).flatten(1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s[:, :, None, None]


class SENet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.c1, self.se1 = conv_bn(3, 16), SEBlock(16)
        self.c2 = conv_bn(16, 32, stride=2)
        self.se2 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(32, 8, 1), nn.SiLU(), nn.Conv2d(8, 32, 1),
                                 nn.Hardsigmoid())
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.se1(self.c1(x))
        x = self.c2(x)
        x = x * self.se2(x)
        return self.fc(x.mean(dim=(2, 3)))


class ConvMLP(nn.Module):
    """Conv features flattened (C x H x W) into an MLP."""

    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(conv_bn(1, 8), nn.MaxPool2d(2), conv_bn(8, 16), nn.MaxPool2d(2))
        self.mlp = nn.Sequential(nn.Linear(16 * 2 * 2, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 32),
                                 nn.PReLU(32), nn.Linear(32, classes))

    def forward(self, x):
        return self.mlp(torch.flatten(self.features(x), 1))


class ActsAndNorms(nn.Module):
    """Activations (incl. decomposed ones) and per-channel normalizations."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(16, affine=True)
        self.c3 = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.prelu = nn.PReLU(24)
        self.c4 = nn.Conv2d(24, 8, 1)

    def forward(self, x):
        x = F.hardswish(self.gn(self.c1(x)))
        x = F.elu(self.inorm(self.c2(x))) + F.leaky_relu(x, 0.1)
        x = x * F.hardsigmoid(x) + torch.tanh(x) * 0.5
        x = self.prelu(self.c3(F.gelu(x, approximate="tanh")))
        x = torch.clamp(x, -2, 2) ** 2 / (1 + x.abs())
        return self.c4(F.softplus(x))

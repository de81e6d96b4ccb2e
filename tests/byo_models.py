"""Small networks of a user's own, for `module:byo_models:FACTORY` specs in tests (tests/ is on sys.path)."""
from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    """conv-bn-relu-conv-bn plus the input: a skip connection crosses every layer inside it."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = nn.Identity() if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.short(x))


class SmallNet(nn.Module):
    """A stem, three residual blocks, global pooling and a classifier; not an nn.Sequential."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = Residual(8, 8)
        self.block2 = Residual(8, 16, 2)
        self.block3 = Residual(16, 32, 2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, the children of a Sequential still cut."""

    def forward(self, x):
        return x if bool(x.mean() > -1e9) else -x


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return SmallNet()


def small_sequential() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), Gate(),
        nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(32, 10))


def not_a_model():
    return "a string"

"""The built-in CIFAR-sized ResNet family (32×32 input), cut into stages for early exits.

Read top to bottom: building block, stage assembly, the private builder, the public builders.
"""
from __future__ import annotations

from torch import nn

from ._base import InputPreset, StagedBackbone, Tap, register_backbone

CIFAR_PRESET = InputPreset(crop=32, resize=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


class PadShortcut(nn.Module):
    """The parameter-free shortcut ("option A" in He et al. 2016, as in the published CIFAR-10
    checkpoints): subsample by `stride` and zero-pad the new channels, half on each side."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, (c_out - c_in) // 2
        if c_out - c_in != 2 * self.pad:
            raise ValueError(f"option-A shortcut needs an even channel increase, not {c_in} -> {c_out}")

    def forward(self, x):  # (batch, c_in, h, w) -> (batch, c_out, h / stride, w / stride)
        x = x[:, :, ::self.stride, ::self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (He et al. 2016). Where the shape changes the
    shortcut is a 1×1 convolution + BN (`shortcut="conv"`) or parameter-free (`"pad"`, option A)."""

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str = "conv"):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if (stride != 1 or c_in != c_out) and shortcut == "pad":
            self.shortcut = PadShortcut(c_in, c_out, stride)
        elif stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class PoolLinear(nn.Sequential):
    """Global average pool + linear: the classifier of the built-in family."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, num_classes))


def _split(n: int, parts: int) -> list[int]:
    """Split n blocks into `parts` near-equal consecutive chunks (larger ones first)."""
    parts = max(1, min(parts, n))
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _cifar_resnet(*, blocks: tuple[int, ...], widths: tuple[int, ...], stages_per_group: int,
                  num_classes: int, weights: str | None, name: str, shortcut: str = "conv",
                  preset: InputPreset = CIFAR_PRESET, kwargs: dict | None = None) -> StagedBackbone:
    if weights is not None:
        raise ValueError(f"backbone {name!r} has no published weights; train it with "
                         "`offramp train-backbone` or load a bundle that contains it")
    if len(blocks) != len(widths):
        raise ValueError(f"blocks {blocks} and widths {widths} must have the same length")
    stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
    stages: list[nn.Module] = []
    taps: list[Tap] = []
    c_in, stride = widths[0], 1
    for g, (n, width) in enumerate(zip(blocks, widths)):
        chunks = _split(n, stages_per_group)
        for part, size in enumerate(chunks):
            layers: list[nn.Module] = [stem] if not stages else []
            for b in range(size):
                s = 2 if (g > 0 and part == 0 and b == 0) else 1
                layers.append(BasicBlock(c_in, width, s, shortcut))
                c_in, stride = width, stride * s
            stages.append(nn.Sequential(*layers))
            taps.append(Tap(name=f"group{g + 1}.{part}", channels=width, stride=stride))
    spec = {"name": name, "kwargs": {"num_classes": num_classes, **(kwargs or {})}}
    return StagedBackbone(stages, taps, PoolLinear(c_in, num_classes), preset, spec)


def _variant(name: str, blocks: tuple[int, ...], widths: tuple[int, ...], stages_per_group: int, doc: str):
    @register_backbone(name, family="cifar", description=doc)
    def build(*, weights: str | None = None, num_classes: int = 10) -> StagedBackbone:
        return _cifar_resnet(blocks=blocks, widths=widths, stages_per_group=stages_per_group,
                             num_classes=num_classes, weights=weights, name=name)

    build.__name__ = name
    build.__doc__ = doc
    return build


cifar_resnet20 = _variant("cifar_resnet20", (3, 3, 3), (16, 32, 64), 2,
                          "ResNet-20 for 32×32 images (0.27 M parameters), 6 stages")
cifar_resnet56 = _variant("cifar_resnet56", (9, 9, 9), (16, 32, 64), 3,
                          "ResNet-56 for 32×32 images (0.85 M parameters), 9 stages")
cifar_resnet_wide = _variant("cifar_resnet_wide", (2, 2, 2, 2), (64, 128, 256, 512), 2,
                             "ResNet-18-style 4-group network for 32×32 images (11 M parameters), 8 stages")
cifar_resnet10 = _variant("cifar_resnet10", (1, 1, 1, 1), (16, 32, 64, 128), 1,
                           "A narrow 4-group ResNet-10 for 32×32 images (0.3 M parameters), 4 stages")
cifar_resnet_small = _variant("cifar_resnet_small", (1, 1, 1), (16, 32, 64), 1,
                              "A tiny 3-stage ResNet for 32×32 images (tests and quick demos)")


# -- the published variant: option-A shortcuts and the normalisation its weights were trained with ---
# (akamaster/pytorch_resnet_cifar10, BSD-2-Clause; engine.backbones.published loads its checkpoints)
PUBLISHED_PRESET = InputPreset(crop=32, resize=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _published(name: str, depth: int, default_stages_per_group: int):
    n = (depth - 2) // 6

    @register_backbone(name, family="cifar", description=f"ResNet-{depth} as published for CIFAR-10 (option-A "
                       f"shortcuts, {n} blocks per group); published weights: offramp train-backbone --init")
    def build(*, weights: str | None = None, num_classes: int = 10,
              stages_per_group: int = default_stages_per_group) -> StagedBackbone:
        if not 1 <= int(stages_per_group) <= n:
            raise ValueError(f"stages_per_group must be 1..{n} for {name}, not {stages_per_group}")
        return _cifar_resnet(blocks=(n, n, n), widths=(16, 32, 64), stages_per_group=int(stages_per_group),
                             num_classes=num_classes, weights=weights, name=name, shortcut="pad",
                             preset=PUBLISHED_PRESET, kwargs={"stages_per_group": int(stages_per_group)})

    build.__name__ = name
    return build


cifar_resnet20a = _published("cifar_resnet20a", 20, 3)
cifar_resnet32a = _published("cifar_resnet32a", 32, 3)
cifar_resnet44a = _published("cifar_resnet44a", 44, 3)
cifar_resnet56a = _published("cifar_resnet56a", 56, 3)

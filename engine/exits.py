"""Exit heads. Each head is `post(pre(features))`: `pre` is what a feature cache stores, so
retraining a head never re-runs the frozen backbone; `post` is what training updates.
Heads size themselves from the tap they attach to; nothing hard-codes a width.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .backbones import Tap

HEAD_KINDS = ("linear", "conv", "deep", "original")
MAP_HEADS = ("conv", "deep")  # heads that read (and a feature cache stores) the whole feature map


@dataclass(frozen=True)
class ExitSpec:
    """What rebuilds one exit head: where it sits and how it is made."""

    stage: int  # index of the stage whose output (tap) the head reads
    kind: str  # "linear" (pool + linear), "conv" (DyCE-style conv + pool + MLP), "deep" (strided convs), "original"
    channels: int
    num_classes: int
    hidden: int = 0  # width of a conv head, the last width of a deep one; 0 for others

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ExitSpec":
        return cls(**{k: d[k] for k in ("stage", "kind", "channels", "num_classes", "hidden")})


class ExitHead(nn.Module):
    """`pre_is_pooled`: `pre` gives the tap's pooled features (engine.policies.pooled_features), so a
    feature cache stores them once; false for a head that reads the class token."""

    def __init__(self, spec: ExitSpec, pre: nn.Module, post: nn.Module, pre_is_pooled: bool = True):
        super().__init__()
        self.spec = spec
        self.pre = pre
        self.post = post
        self.pre_is_pooled = pre_is_pooled

    def forward(self, x):  # (batch, channels, h, w), (batch, tokens, channels) or (batch, channels) -> (batch, K)
        return self.post(self.pre(x))


class TokenPool(nn.Module):
    """(batch, tokens, channels) -> (batch, channels): the class token (the first) or the mean of all."""

    def __init__(self, how: str):
        super().__init__()
        assert how in ("cls", "mean"), how
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.how == "cls" else x.mean(dim=1)


def _pool() -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def _linear_exit(tap: Tap, stage: int, num_classes: int) -> ExitHead:
    """Pool + Linear on a map, class token or mean + LayerNorm + Linear on tokens (a transformer's
    tokens before its last blocks are not normalised), Linear on a vector."""
    spec = ExitSpec(stage, "linear", tap.channels, num_classes)
    linear = nn.Linear(tap.channels, num_classes)
    if tap.layout == "tokens":
        return ExitHead(spec, TokenPool(tap.pool), nn.Sequential(nn.LayerNorm(tap.channels), linear),
                        pre_is_pooled=tap.pool == "mean")
    return ExitHead(spec, _pool() if tap.layout == "map" else nn.Identity(), linear)


def make_exit(tap: Tap, stage: int, kind: str, num_classes: int, hidden: int | None = None) -> ExitHead:
    """A new exit head of `kind` for `tap`. Raises ValueError for an unknown kind, or a conv head
    on a tap that is not a feature map."""
    if kind == "linear":
        return _linear_exit(tap, stage, num_classes)
    if kind in MAP_HEADS and tap.layout != "map":
        raise ValueError(f"a conv exit head reads a feature map, but {tap.name!r} gives {tap.layout}; "
                         "use linear exit heads there")
    if kind == "conv":
        h = hidden or min(max(tap.channels, 32), 256)
        spec = ExitSpec(stage, kind, tap.channels, num_classes, h)
        return ExitHead(spec, nn.Identity(), nn.Sequential(
            nn.Conv2d(tap.channels, h, 3, stride=2 if tap.stride < 8 else 1, padding=1, bias=False),
            nn.BatchNorm2d(h), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
            nn.Linear(h, h), nn.ReLU(inplace=True), nn.Linear(h, num_classes)))
    if kind == "deep":
        return _deep_exit(tap, stage, num_classes, hidden or tap.channels)
    raise ValueError(f"unknown exit head kind {kind!r}; choose 'linear', 'conv' or 'deep'")


def _deep_exit(tap: Tap, stage: int, num_classes: int, width: int) -> ExitHead:
    """A small tail of the network in miniature, for early taps whose features are still local:
    3×3 convolutions (+ BN + ReLU) of stride 2 that double the channels while doubling stays within
    `width` (a tap at the last stage's width gets one convolution of stride 1), then pool + Linear.
    E.g. on a CIFAR ResNet-56 with width 64: 16 → 32 → 64 channels after the first stage (1.9 % of
    the network's FLOPs), 32 → 64 after the second, 64 → 64 after the third."""
    layers, c = [], tap.channels
    while c * 2 <= width:
        layers += [nn.Conv2d(c, c * 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c * 2), nn.ReLU(inplace=True)]
        c *= 2
    if not layers:
        layers = [nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
    spec = ExitSpec(stage, "deep", tap.channels, num_classes, width)
    return ExitHead(spec, nn.Identity(), nn.Sequential(*layers, *_pool(), nn.Linear(c, num_classes)))


def original_exit(classifier: nn.Module, tap: Tap, stage: int, num_classes: int) -> ExitHead:
    """Wrap a backbone's own classifier (it must start with global pooling) as the last exit."""
    spec = ExitSpec(stage, "original", tap.channels, num_classes)
    pre, post = split_pool(classifier)
    return ExitHead(spec, pre, post)


def split_pool(classifier: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split a pool-first classifier into (pool + flatten, rest) so its input can be cached."""
    layers = list(classifier.children()) if isinstance(classifier, nn.Sequential) else [classifier]
    if layers and isinstance(layers[0], (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        rest = layers[1:]
        if rest and isinstance(rest[0], nn.Flatten):
            rest = rest[1:]
        return nn.Sequential(layers[0], nn.Flatten(1)), nn.Sequential(*rest)
    return nn.Identity(), classifier


def head_input_shape(spec: ExitSpec, tap_hw: tuple[int, int]) -> tuple[int, ...]:
    """Shape of one sample's cached `pre` output for this head, given the tap's spatial size."""
    if spec.kind in MAP_HEADS:
        return (spec.channels, *tap_hw)
    return (spec.channels,)


@torch.no_grad()
def reset_parameters(module: nn.Module) -> None:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()

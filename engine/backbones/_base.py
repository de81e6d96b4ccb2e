"""What every backbone declares: ordered stages, a tap after each, an input preset, a registry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

LAYOUTS = ("map", "tokens", "vector")


@dataclass(frozen=True)
class Tap:
    """Where an exit can attach: the output of one stage, and how an exit head reads it.

    `layout` "map": (batch, channels, h, w); "tokens": (batch, tokens, channels), read through the
    class token (`pool` "cls") or the mean of the tokens (`pool` "mean"); "vector": (batch, channels).
    """

    name: str  # module name in the original model, e.g. "layer3"
    channels: int
    stride: int  # total reduction relative to the input image; 0 when the tap is not a map
    layout: str = "map"
    pool: str = "mean"  # tokens only: "cls" or "mean"

    def __post_init__(self):
        assert self.layout in LAYOUTS and self.pool in ("cls", "mean"), f"bad tap {self}"


@dataclass(frozen=True)
class InputPreset:
    """How an image becomes the tensor the backbone expects (as torchvision's transforms do)."""

    crop: int  # final square side in pixels
    resize: int  # shorter side before the centre crop
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def to_json(self) -> dict:
        return {"crop": self.crop, "resize": self.resize, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, d: dict) -> "InputPreset":
        return cls(crop=int(d["crop"]), resize=int(d["resize"]), mean=tuple(d["mean"]), std=tuple(d["std"]))


class StagedBackbone(nn.Module):
    """A model cut into sequential stages; `taps[k]` describes the output of `stages[k]`.

    `classifier` is the model's own head (pooling included) on the last tap, or None.
    `spec` holds the registry name and keyword arguments that rebuild this backbone.
    """

    def __init__(self, stages: list[nn.Module], taps: list[Tap], classifier: nn.Module | None,
                 preset: InputPreset, spec: dict):
        super().__init__()
        if len(stages) != len(taps):
            raise ValueError(f"{len(stages)} stages but {len(taps)} taps")
        self.stages = nn.ModuleList(stages)
        self.taps = tuple(taps)
        self.classifier = classifier
        self.preset = preset
        self.spec = spec

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return self.classifier(x) if self.classifier is not None else x


@dataclass
class _Entry:
    builder: Callable[..., StagedBackbone]
    family: str
    description: str = field(default="")


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(name: str, *, family: str, description: str = ""):
    """Decorator: add a builder to the registry under `name`; a duplicate name is an error."""

    def wrap(fn: Callable[..., StagedBackbone]):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = _Entry(fn, family, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return wrap


def list_backbones(family: str | None = None) -> list[str]:
    """Names of the registered backbones, sorted; optionally only one family ('cifar', 'torchvision')."""
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)


def backbone_family(name: str) -> str:
    return _lookup(name).family


def _lookup(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}") from None


def build_backbone(name: str, *, weights: str | None = None, **kwargs) -> StagedBackbone:
    """Build the registered backbone `name` cut into stages.

    `weights` is None (random init, always works), "DEFAULT" or a torchvision weights name.
    Raises ValueError for an unknown name, WeightsUnavailable when weights cannot be had offline.
    """
    return _lookup(name).builder(weights=weights, **kwargs)


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but are neither cached nor downloadable."""

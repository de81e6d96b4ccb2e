"""Backbones cut into stages with declared taps; `build_backbone(name)` is the way in."""
from ._base import (InputPreset, StagedBackbone, Tap, WeightsUnavailable, backbone_family, build_backbone,
                    list_backbones, register_backbone)
from . import cifar  # noqa: F401  (registers the built-in family)
from . import torchvision_models  # noqa: F401  (registers the torchvision family)
from . import generic  # noqa: F401  (registers "cut": any model cut at named layers)

__all__ = ["InputPreset", "StagedBackbone", "Tap", "WeightsUnavailable", "backbone_family", "build_backbone",
           "list_backbones", "register_backbone"]

"""torchvision ImageNet classifiers cut into stages for early exits (family "torchvision").

Each family builder builds the unchanged torchvision model, loads its weights when asked, and cuts it
into sequential stages by module name; the stages followed by the classifier compute exactly what the
original model computes. Read top to bottom: shared pieces, weights, one builder per family, the
public builders.
"""
from __future__ import annotations

import contextlib
import os
import socket
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models import WeightsEnum

from ._base import InputPreset, StagedBackbone, Tap, WeightsUnavailable, register_backbone

IMAGENET_CLASSES = 1000
STANDARD_PRESET = InputPreset(crop=224, resize=256)  # the usual ImageNet evaluation transform
DOWNLOAD_TIMEOUT_S = 30  # without a timeout an unreachable server makes urlopen wait forever

# (torchvision module names that form the stage, channels at its output, stride at its output)
StageTable = list[tuple[list[str], int, int]]


# -- shared pieces --------------------------------------------------------------------------------
def _take(model: nn.Module, names: list[str]) -> nn.Sequential:
    """The named submodules of `model`, in order, as one stage ("features.3" is kept as "features_3")."""
    return nn.Sequential(OrderedDict((n.replace(".", "_"), model.get_submodule(n)) for n in names))


def _features(spans: list[tuple[int, int, int]]) -> StageTable:
    """Stages over a `features` Sequential from (last block index, channels, stride), blocks in order."""
    table, start = [], 0
    for last, channels, stride in spans:
        table.append(([f"features.{i}" for i in range(start, last + 1)], channels, stride))
        start = last + 1
    return table


def _pool_head(*rest: nn.Module) -> nn.Sequential:
    """The classifier as exits.split_pool expects it: pool, flatten, then layers that work on (batch, channels)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), *rest)


def _channel_norm(norm2d: nn.LayerNorm) -> nn.LayerNorm:
    """ConvNeXt's LayerNorm2d on a pooled (batch, channels, 1, 1) map is a LayerNorm over channels
    of the flattened vector; same weights, same eps."""
    norm = nn.LayerNorm(norm2d.normalized_shape, eps=norm2d.eps, elementwise_affine=norm2d.elementwise_affine,
                        device=norm2d.weight.device if norm2d.weight is not None else None)
    if norm2d.weight is not None:
        with torch.no_grad():
            norm.weight.copy_(norm2d.weight)
            norm.bias.copy_(norm2d.bias)
    return norm


def _preset(weights: WeightsEnum | None) -> InputPreset:
    """The evaluation transform the weights were measured with; the standard 256/224 without weights."""
    if weights is None:
        return STANDARD_PRESET
    t = weights.transforms()
    return InputPreset(crop=int(t.crop_size[0]), resize=int(t.resize_size[0]), mean=tuple(t.mean), std=tuple(t.std))


# -- weights --------------------------------------------------------------------------------------
def _resolve_weights(name: str, weights: str | None) -> WeightsEnum | None:
    """None, "DEFAULT" or a member name of the model's weights enum; ValueError listing the choices."""
    if weights is None:
        return None
    enum = tvm.get_model_weights(name)
    if weights == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[weights]
    except KeyError:
        choices = ", ".join(["DEFAULT"] + [w.name for w in enum])
        raise ValueError(f"{name} has no weights {weights!r}; choose one of: {choices}") from None


def weights_file(weights: WeightsEnum) -> Path:
    """Where torchvision's cache keeps (or would keep) the file of `weights`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """torch.hub offers no timeout, so the process-wide default is set for the download and restored."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _load_state_dict(name: str, weights: WeightsEnum) -> dict:
    """The weights' tensors from torchvision's cache, downloading them first when they are not there.

    Raises WeightsUnavailable when the file is neither cached nor downloadable, or cannot be read.
    """
    file = weights_file(weights)
    if not file.exists():
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                torch.hub.download_url_to_file(weights.url, str(file), progress=False)
        except OSError as err:  # URLError, timeouts and refused connections are all OSErrors
            raise WeightsUnavailable(
                f"the {name} weights {weights.name} could not be downloaded ({err}); put {file.name} "
                f"(from {weights.url}) into the folder {file.parent} and try again") from err
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file; torch raises several kinds
        raise WeightsUnavailable(f"the weights file {file} cannot be read ({err}); delete it and put an intact "
                                 f"copy of {file.name} (from {weights.url}) there") from err


def torchvision_categories(name: str, weights: str = "DEFAULT") -> list[str]:
    """The class names the pretrained weights of `name` predict (no download needed)."""
    return list(_resolve_weights(name, weights).meta["categories"])


def _torchvision_model(name: str, weights: str | None) -> tuple[nn.Module, WeightsEnum | None]:
    """The unchanged torchvision model with its 1000-class head, weights loaded when asked."""
    enum_weights = _resolve_weights(name, weights)
    # Always weights=None here: loading ourselves keeps torchvision from downloading on its own, without a timeout.
    model = tvm.get_model(name, weights=None, num_classes=IMAGENET_CLASSES)
    if enum_weights is not None:
        model.load_state_dict(_load_state_dict(name, enum_weights))
    return model, enum_weights


def _staged(name: str, model: nn.Module, table: StageTable, head: nn.Sequential, weights: WeightsEnum | None,
            num_classes: int) -> StagedBackbone:
    """Cut `model` by `table`; a head for another number of classes gets a new (untrained) final Linear."""
    final = head[-1]
    assert isinstance(final, nn.Linear), f"{name}: the head must end with its Linear, found {type(final).__name__}"
    if final.out_features != num_classes:
        head[-1] = nn.Linear(final.in_features, num_classes, device=final.weight.device)
    stages = [_take(model, names) for names, _, _ in table]
    taps = [Tap(names[-1], channels, stride) for names, channels, stride in table]
    spec = {"name": name, "kwargs": {"num_classes": num_classes}}
    return StagedBackbone(stages, taps, head, _preset(weights), spec)


# -- one builder per family -----------------------------------------------------------------------
def _resnet(name: str, *, weights: str | None, num_classes: int) -> StagedBackbone:
    """ResNet: the stem goes with layer1, then layer2, layer3, layer4."""
    model, w = _torchvision_model(name, weights)
    c = 64 * model.layer1[0].expansion  # 64 for BasicBlock, 256 for Bottleneck
    table = [(["conv1", "bn1", "relu", "maxpool", "layer1"], c, 4),
             (["layer2"], 2 * c, 8),
             (["layer3"], 4 * c, 16),
             (["layer4"], 8 * c, 32)]
    return _staged(name, model, table, _pool_head(model.fc), w, num_classes)


_MOBILENET_V3_SPANS = {  # a stage ends where the stride or the width changes; the last holds the final conv
    "mobilenet_v3_small": [(1, 16, 4), (3, 24, 8), (6, 40, 16), (8, 48, 16), (12, 576, 32)],
    "mobilenet_v3_large": [(3, 24, 4), (6, 40, 8), (10, 80, 16), (12, 112, 16), (16, 960, 32)],
}


def _mobilenet_v3(name: str, *, weights: str | None, num_classes: int) -> StagedBackbone:
    """MobileNetV3: `features` grouped into 5 stages; head = Linear, Hardswish, Dropout, Linear."""
    model, w = _torchvision_model(name, weights)
    head = _pool_head(*model.classifier)
    return _staged(name, model, _features(_MOBILENET_V3_SPANS[name]), head, w, num_classes)


def _efficientnet(name: str, *, weights: str | None, num_classes: int) -> StagedBackbone:
    """EfficientNet-B0: `features` grouped into 5 stages like MobileNetV3; head = Dropout, Linear."""
    model, w = _torchvision_model(name, weights)
    table = _features([(2, 24, 4), (3, 40, 8), (4, 80, 16), (5, 112, 16), (8, 1280, 32)])
    return _staged(name, model, table, _pool_head(*model.classifier), w, num_classes)


def _convnext(name: str, *, weights: str | None, num_classes: int) -> StagedBackbone:
    """ConvNeXt-Tiny: (downsample, blocks) pairs, 4 stages; head = LayerNorm over channels, Linear."""
    model, w = _torchvision_model(name, weights)
    table = _features([(1, 96, 4), (3, 192, 8), (5, 384, 16), (7, 768, 32)])
    norm2d, flatten, linear = model.classifier  # LayerNorm2d, Flatten, Linear
    return _staged(name, model, table, _pool_head(_channel_norm(norm2d), linear), w, num_classes)


def _regnet(name: str, *, weights: str | None, num_classes: int) -> StagedBackbone:
    """RegNetY-400MF: the stem goes with block1, then block2, block3, block4."""
    model, w = _torchvision_model(name, weights)
    table = [(["stem", "trunk_output.block1"], 48, 4),
             (["trunk_output.block2"], 104, 8),
             (["trunk_output.block3"], 208, 16),
             (["trunk_output.block4"], 440, 32)]
    return _staged(name, model, table, _pool_head(model.fc), w, num_classes)


# -- public builders ------------------------------------------------------------------------------
def _register(name: str, family_builder, title: str, num_stages: int):
    meta = tvm.get_model_weights(name).DEFAULT.meta
    doc = (f"{title} (torchvision, ImageNet; {meta['num_params'] / 1e6:.1f} M parameters, "
           f"{meta['_ops']:.2f} GMACs at 224×224), {num_stages} stages")

    @register_backbone(name, family="torchvision", description=doc)
    def build(*, weights: str | None = None, num_classes: int = IMAGENET_CLASSES) -> StagedBackbone:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, not {num_classes!r}")
        return family_builder(name, weights=weights, num_classes=num_classes)

    build.__name__ = name
    build.__doc__ = doc
    return build


resnet18 = _register("resnet18", _resnet, "ResNet-18", 4)
resnet34 = _register("resnet34", _resnet, "ResNet-34", 4)
resnet50 = _register("resnet50", _resnet, "ResNet-50", 4)
resnet101 = _register("resnet101", _resnet, "ResNet-101", 4)
resnet152 = _register("resnet152", _resnet, "ResNet-152", 4)
mobilenet_v3_small = _register("mobilenet_v3_small", _mobilenet_v3, "MobileNetV3-Small", 5)
mobilenet_v3_large = _register("mobilenet_v3_large", _mobilenet_v3, "MobileNetV3-Large", 5)
efficientnet_b0 = _register("efficientnet_b0", _efficientnet, "EfficientNet-B0", 5)
convnext_tiny = _register("convnext_tiny", _convnext, "ConvNeXt-Tiny", 4)
regnet_y_400mf = _register("regnet_y_400mf", _regnet, "RegNetY-400MF", 4)

"""Backbones: the registry, declared taps against real shapes, staged == original, weights offline."""
from __future__ import annotations

import copy
import itertools
from urllib.error import URLError

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from engine.backbones import (InputPreset, WeightsUnavailable, backbone_family, build_backbone, list_backbones,
                              register_backbone, torchvision_models)

TORCHVISION = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v3_small",
               "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf"]
# RegNet's builder reads tensor values while choosing widths, which the meta device cannot give.
META_UNSAFE = {"regnet_y_400mf"}


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores shared by several people: spinning OpenMP threads make every forward many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def skeleton(name: str, **kwargs):
    """The backbone with every tensor zero: built on the meta device (no random init, instant), then given
    CPU memory. Right shapes and FLOPs, meaningless values."""
    if name in META_UNSAFE or backbone_family(name) == "cifar":
        return build_backbone(name, **kwargs)
    with torch.device("meta"):
        backbone = build_backbone(name, **kwargs)
    backbone = backbone.to_empty(device="cpu")
    with torch.no_grad():
        for t in itertools.chain(backbone.parameters(), backbone.buffers()):
            t.zero_()
    return backbone


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch.hub folder and no network: every download fails as it would offline."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))

    def no_network(url, dst, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


# -- registry -------------------------------------------------------------------------------------
def test_registry_lists_every_family():
    assert list_backbones("torchvision") == sorted(TORCHVISION)
    assert "cifar_resnet_small" in list_backbones("cifar")
    assert list_backbones("any") == ["cut"]  # any model cut at named layers: tests/test_any_model.py
    assert list_backbones() == sorted(TORCHVISION + list_backbones("cifar") + ["cut"])


def test_registry_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet18", family="torchvision")(lambda **kw: None)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown backbone 'resnet9'.*cifar_resnet20.*resnet18"):
        build_backbone("resnet9")


def test_unknown_weights_name_lists_the_choices():
    with pytest.raises(ValueError, match="DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"):
        build_backbone("resnet50", weights="IMAGENET9K")


# -- declarations against reality ------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in list_backbones() if backbone_family(n) != "any"])
@torch.no_grad()
def test_declared_taps_match_real_shapes(name):
    backbone = skeleton(name)
    size = 32 if backbone_family(name) == "cifar" else 64
    x = torch.zeros(1, 3, size, size)
    assert backbone.num_stages == len(backbone.taps) >= 3
    for stage, tap in zip(backbone.stages, backbone.taps):
        x = stage(x)  # (1, channels, h, w)
        assert x.shape[1] == tap.channels, f"{name} {tap.name}: declared {tap.channels} channels, got {x.shape[1]}"
        assert (size // x.shape[2], size // x.shape[3]) == (tap.stride, tap.stride), f"{name} {tap.name}: stride"
    assert backbone.classifier(x).shape == (1, backbone.spec["kwargs"]["num_classes"])
    if backbone_family(name) == "torchvision":
        check_torchvision_declaration(name, backbone)


def check_torchvision_declaration(name, backbone):
    """Taps name the torchvision module that ends their stage; the head is pool-first; no weights, no preset."""
    for stage, tap in zip(backbone.stages, backbone.taps):
        assert list(stage.named_children())[-1][0] == tap.name.replace(".", "_")
    assert backbone.taps[-1].stride == 32
    head = list(backbone.classifier.children())
    assert isinstance(head[0], nn.AdaptiveAvgPool2d) and isinstance(head[1], nn.Flatten)
    assert backbone.spec == {"name": name, "kwargs": {"num_classes": 1000}}
    assert backbone.preset == InputPreset(crop=224, resize=256)  # no weights: the standard transform


QUICK_EQUALITY = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf"]


@pytest.mark.parametrize("name", QUICK_EQUALITY + [pytest.param(n, marks=pytest.mark.slow)
                                                   for n in TORCHVISION if n not in QUICK_EQUALITY])
def test_staged_model_computes_what_the_original_computes(name, monkeypatch):
    torch.manual_seed(0)
    original = tvm.get_model(name, weights=None).eval()
    for m in original.modules():  # non-trivial norms, so a lost or misplaced norm weight shows
        if isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    # The builder cuts exactly this model (a copy of it) instead of a fresh random one.
    monkeypatch.setattr(torchvision_models.tvm, "get_model", lambda *a, **kw: copy.deepcopy(original))
    staged = build_backbone(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(staged(x), original(x), atol=1e-5, rtol=1e-4)


def test_other_number_of_classes_without_weights():
    backbone = skeleton("convnext_tiny", num_classes=7)
    with torch.no_grad():
        out = backbone(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 7)
    assert backbone.spec == {"name": "convnext_tiny", "kwargs": {"num_classes": 7}}
    with pytest.raises(ValueError, match="num_classes"):
        build_backbone("resnet18", num_classes=0)


# -- weights --------------------------------------------------------------------------------------
def test_weights_unavailable_names_the_file_and_the_folder(offline_hub):
    with pytest.raises(WeightsUnavailable) as err:
        build_backbone("resnet18", weights="DEFAULT")
    message = str(err.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(offline_hub / "checkpoints") in message
    assert not list((offline_hub / "checkpoints").iterdir())  # nothing half-written left behind


def test_cached_weights_load_without_network(offline_hub):
    weights = tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V2
    torch.manual_seed(1)
    reference = tvm.mobilenet_v3_large(weights=None).state_dict()
    file = torchvision_models.weights_file(weights)
    file.parent.mkdir(parents=True)
    torch.save(reference, file)

    backbone = build_backbone("mobilenet_v3_large", weights="IMAGENET1K_V2")
    first_conv = backbone.stages[0][0][0].weight  # features.0: Conv2dNormActivation -> Conv2d
    assert torch.equal(first_conv, reference["features.0.0.weight"])
    assert torch.equal(backbone.classifier[-1].weight, reference["classifier.3.weight"])
    assert backbone.preset == InputPreset(crop=224, resize=232)  # from the weights' own transform

    ten = build_backbone("mobilenet_v3_large", weights="IMAGENET1K_V2", num_classes=10)
    assert ten.classifier[-1].out_features == 10  # a new final Linear, the rest pretrained
    assert torch.equal(ten.classifier[2].weight, reference["classifier.0.weight"])


def test_damaged_weights_file_says_what_to_do(offline_hub):
    file = torchvision_models.weights_file(tvm.ResNet18_Weights.DEFAULT)
    file.parent.mkdir(parents=True)
    file.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailable, match="delete it"):
        build_backbone("resnet18", weights="DEFAULT")


def test_categories_come_without_download(offline_hub):
    names = torchvision_models.torchvision_categories("resnet18")
    assert len(names) == 1000 and names[0] == "tench"

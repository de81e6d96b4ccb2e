"""engine.preprocess: one function takes an image to the tensor a backbone sees, live and in
evaluation, so thresholds and policies calibrated on a dataset meet the same tensors in the app."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image
from synth import build_tiny_model

from engine.backbones import InputPreset
from engine.backbones.cifar import CIFAR_PRESET
from engine.bundle import Bundle
from engine.cost import measure_costs
from engine.data.folders import open_dataset
from engine.images import read_rgb
from engine.policies import ThresholdPolicy
from engine.preprocess import eval_transform, normalise, preprocess, train_transform
from engine.runtime import Engine


def _frame(h=48, w=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image with some noise: what a camera gives, so resampling matters."""
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([np.sin(xx / 40) + 1, np.cos(yy / 30) + 1, (xx + yy) / (h + w)], -1) * 110
    noise = np.random.default_rng(seed).normal(0, 8, (h, w, 3))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A labelled folder of files that need every kind of preprocessing: large (resampled), small
    and not square (only cropped), grey, with transparency, JPEG and PNG."""
    root = tmp_path_factory.mktemp("photos")
    (root / "a").mkdir()
    (root / "b").mkdir()
    Image.fromarray(_photo(480, 640)).save(root / "a" / "camera.jpg", quality=92)
    Image.fromarray(_photo(300, 200, seed=1)).save(root / "a" / "portrait.png")
    Image.fromarray(_frame(32, 40)).save(root / "b" / "small.png")
    Image.fromarray(_photo(120, 90, seed=2)[..., 0]).save(root / "b" / "grey.png")
    rgba = np.concatenate([_photo(64, 64, seed=3), np.full((64, 64, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(root / "b" / "alpha.png")
    return root


@pytest.fixture(scope="module")
def engine() -> Engine:
    model = build_tiny_model()
    policy = ThresholdPolicy([0.5, 0.5, None])
    bundle = Bundle(model, {"threshold": policy}, "threshold", measure_costs(model, policy), {})
    return Engine(bundle, device="cpu", latency_repeats=1)


# -- the evaluation transform is the live path ------------------------------------------------------
def test_a_dataset_image_and_the_same_image_live_give_the_same_tensor(photos, engine):
    ds = open_dataset(photos, transform=eval_transform(engine.preset))
    assert engine.preset == CIFAR_PRESET and len(ds) == 5
    for i, (path, _) in enumerate(ds.samples):
        x = ds[i][0]  # decoded by the dataset, through the evaluation transform
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert torch.equal(x, engine.preprocess(path)[0])  # `offramp run FILE`, the app's image source
        rgb = read_rgb(path)
        assert torch.equal(x, engine.preprocess(rgb, rgb=True)[0])
        assert torch.equal(x, engine.preprocess(np.ascontiguousarray(rgb[..., ::-1]))[0])  # a BGR camera frame


@pytest.mark.parametrize("preset", [InputPreset(224, 256), InputPreset(56, 64), InputPreset(32, 36)])
def test_every_preset_evaluates_as_it_runs_live(photos, preset):
    ds = open_dataset(photos, transform=eval_transform(preset))
    for i, (path, _) in enumerate(ds.samples):
        assert torch.equal(ds[i][0], preprocess(path, preset)[0])


def test_decoded_batches_normalise_as_the_live_path():
    # train-backbone decodes its (CIFAR-sized) images to uint8 once and normalises batches on the device
    from engine.train.network import decode_dataset
    img = Image.fromarray(_frame(32, 32))
    batch, _ = decode_dataset([(img, 0)], 32)
    assert torch.equal(normalise(batch, CIFAR_PRESET.mean, CIFAR_PRESET.std)[0], eval_transform(CIFAR_PRESET)(img))


def test_transforms_shapes():
    img = Image.new("RGB", (50, 40), (10, 200, 30))
    for make in (eval_transform, train_transform):
        assert make(CIFAR_PRESET)(img).shape == (3, 32, 32)
        assert make(InputPreset(crop=56, resize=64))(img).shape == (3, 56, 56)
        assert make(InputPreset(crop=96, resize=110))(img).shape == (3, 96, 96)
    x = eval_transform(CIFAR_PRESET)(Image.new("RGB", (32, 32), (255, 255, 255)))
    assert torch.allclose(x[:, 0, 0], (1 - torch.tensor(CIFAR_PRESET.mean)) / torch.tensor(CIFAR_PRESET.std))


# -- the live path against torchvision --------------------------------------------------------------
def test_preprocess_matches_torchvision_without_resampling():
    from torchvision import transforms as T

    rgb = _frame(32, 40)
    preset = InputPreset(crop=32, resize=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    ref = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize(preset.mean, preset.std)])
    assert torch.equal(preprocess(rgb, preset, rgb=True), ref(Image.fromarray(rgb)).unsqueeze(0))


def test_preprocess_is_close_to_torchvision_when_resizing():
    from torchvision import transforms as T

    yy, xx = np.mgrid[0:480, 0:640]
    smooth = np.stack([np.sin(xx / 40) + 1, np.cos(yy / 30) + 1, (xx + yy) / 1120], -1) * 120
    rgb = smooth.astype(np.uint8)
    for preset in (InputPreset(32, 32), InputPreset(224, 256)):
        ref = T.Compose([T.Resize(preset.resize), T.CenterCrop(preset.crop), T.ToTensor(),
                         T.Normalize(preset.mean, preset.std)])(Image.fromarray(rgb)).unsqueeze(0)
        got = preprocess(rgb, preset, rgb=True)
        assert got.shape == ref.shape == (1, 3, preset.crop, preset.crop) and got.dtype == torch.float32
        diff = (got - ref).abs() * torch.tensor(preset.std).view(1, 3, 1, 1) * 255  # in grey levels
        assert diff.mean() < 3 and diff.max() < 16


def test_preprocess_is_fast():
    frame, preset = _frame(480, 640), InputPreset(32, 32)
    times = []
    for _ in range(30):
        start = time.perf_counter()
        preprocess(frame, preset)
        times.append(time.perf_counter() - start)
    assert sorted(times)[len(times) // 2] < 0.005  # ~0.3 ms on an idle core; lenient for shared machines



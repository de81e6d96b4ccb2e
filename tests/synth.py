"""Small generated image data for tests: class folders whose class is easy to learn (each class
has its own colour; images add brightness jitter, noise and a random patch), so a few epochs of
exit training on a random backbone must beat chance clearly; and the tiny model the tests train.
Never touches ../shared."""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from engine.backbones import build_backbone
from engine.model import MultiExitNet

COLOUR_NAMES = ("red", "green", "blue", "yellow", "purple", "cyan", "orange", "grey")
SYNTH_CLASSES = COLOUR_NAMES[:4]


def class_colour(i: int, k: int) -> np.ndarray:
    """An RGB colour in 0..255 for class i of k, evenly spread in hue."""
    r, g, b = colorsys.hsv_to_rgb(i / k, 0.85, 0.85)
    return np.array([r, g, b]) * 255


def make_image(rng: np.random.Generator, colour: np.ndarray, size: int = 32) -> Image.Image:
    """One noisy image of the class with mean colour `colour`."""
    img = colour * rng.uniform(0.7, 1.15) + rng.normal(0, 18, (size, size, 3))
    s = size // 3
    y, x = rng.integers(0, size - s, 2)
    img[y:y + s, x:x + s] = 255 - colour  # a patch of the complementary colour somewhere
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_image_folder(root: str | Path, classes: int | Sequence[str], per_class: int, size: int = 32,
                      seed: int = 0) -> Path:
    """Write `per_class` images of `size`² pixels into root/<class>/ for every class (PNG and JPEG
    alternate) and return root. `classes` is a count (named after colours) or a list of names."""
    names = list(COLOUR_NAMES[:classes]) if isinstance(classes, int) else list(classes)
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        colour = class_colour(i, len(names))
        for j in range(per_class):
            img = make_image(rng, colour, size)
            if j % 2:
                img.save(folder / f"{j:04d}.jpg", quality=90)
            else:
                img.save(folder / f"{j:04d}.png")
    return root


def build_tiny_model(head: str = "linear", seed: int = 0) -> MultiExitNet:
    """cifar_resnet_small (3 stages) with `head` exits after stages 0 and 1 and its own (random)
    classifier as the last exit, predicting SYNTH_CLASSES; eval mode. Same seed, same weights."""
    torch.manual_seed(seed)
    backbone = build_backbone("cifar_resnet_small", num_classes=len(SYNTH_CLASSES))
    return MultiExitNet.attach(backbone, class_names=list(SYNTH_CLASSES), head=head).eval()

"""Image -> the tensor a backbone expects, in one place, as the bundle's `InputPreset` says (size,
mean/std):

  preprocess       the live path: a frame, array, PIL image or file -> (1, 3, crop, crop); what
                   `Engine` runs on every frame
  eval_transform   the same function for dataset items -> (3, crop, crop): evaluation, calibration,
                   the threshold search and every policy see exactly the tensors the app feeds
  train_transform  augmented PIL images for training (random crops, flips)
  augment, normalise   the same augmentation and arithmetic on decoded uint8 batches (B, 3, H, W),
                   for training a whole network on the training device

Resizing: the shorter side to `preset.resize`, then the centre `preset.crop` square, as
torchvision's Resize + CenterCrop (to a fraction of a pixel, and exactly when no resampling is
needed); then ToTensor + Normalize's arithmetic.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backbones import InputPreset
from .images import pil_to_rgb, read_rgb

# OpenCV's own thread pool gains nothing on one small image, and a pool that exists when a
# DataLoader forks its workers leaves them waiting forever on its lock (seen: a worker hung after
# threads had resized images). Sequential OpenCV everywhere: no pool is ever made.
cv2.setNumThreads(0)

Frame = Union[np.ndarray, Image.Image, str, os.PathLike, torch.Tensor]


# -- the live path (and evaluation) ---------------------------------------------------------------
def load_frame(path: str | os.PathLike) -> np.ndarray:
    """An image file as an HxWx3 uint8 RGB array, decoded by the one decoder training, `offramp run`
    and the app use (`engine.images`). Raises ImageError (a ValueError) naming the file when it is
    missing, not a readable image, or over the size limit."""
    return read_rgb(path)


def _as_array(frame: Frame, rgb: bool) -> tuple[np.ndarray, bool]:
    """(HxW or HxWxC uint8 array, whether its first three channels are BGR)."""
    if isinstance(frame, (str, os.PathLike)):
        return load_frame(frame), False
    if isinstance(frame, Image.Image):
        return pil_to_rgb(frame), False  # any mode, converted as image files are
    if not isinstance(frame, np.ndarray):
        raise TypeError(f"cannot use a {type(frame).__name__} as a frame; give a numpy array, a PIL image or a path")
    if frame.dtype != np.uint8:
        if not np.issubdtype(frame.dtype, np.floating):
            raise ValueError(f"frames must be uint8 (0..255) or float (0..1), not {frame.dtype}")
        frame = (np.clip(frame, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] in (3, 4))) or 0 in frame.shape[:2]:
        raise ValueError(f"a frame must be HxW (grey), HxWx3 or HxWx4, not shape {frame.shape}")
    return frame, not rgb


def _resize_crop(img: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """Shorter side to `resize`, then the centre `crop`x`crop`, as torchvision's Resize + CenterCrop.

    Only the window that survives the crop is resampled: first area-averaging by a whole factor k
    (antialiased, and OpenCV's fast path), then bilinear sampling of the exact window for the last
    factor below 2, so the geometry matches torchvision's to a fraction of a pixel.
    """
    h, w = img.shape[:2]
    if min(h, w) == resize:
        new_h, new_w = h, w
    elif h <= w:
        new_h, new_w = resize, int(resize * w / h)
    else:
        new_h, new_w = int(resize * h / w), resize
    top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
    if (new_h, new_w) == (h, w) and 0 <= top and 0 <= left:  # no resampling: a plain crop, exact
        return img[top: top + crop, left: left + crop]
    sy, sx = h / new_h, w / new_w  # source pixels per output pixel
    y0, x0 = top * sy, left * sx  # the window's corner in source pixels
    k = int(min(sy, sx))
    oy = ox = 0
    if k >= 2:  # average whole k-by-k blocks of the window's neighbourhood
        oy, ox = int(y0 // k) * k, int(x0 // k) * k
        ny = min(math.ceil((y0 + crop * sy - oy) / k), (h - oy) // k)
        nx = min(math.ceil((x0 + crop * sx - ox) / k), (w - ox) // k)
        img = cv2.resize(img[oy: oy + ny * k, ox: ox + nx * k], (nx, ny), interpolation=cv2.INTER_AREA)
    else:
        k = 1
    # output pixel (u, v) samples its centre: x = ((x0 + (u + 0.5) * sx) - ox) / k - 0.5 in `img`
    m = np.array([[sx / k, 0.0, (x0 - ox + 0.5 * sx) / k - 0.5],
                  [0.0, sy / k, (y0 - oy + 0.5 * sy) / k - 0.5]])
    return cv2.warpAffine(img, m, (crop, crop), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def preprocess(frame: Frame, preset: InputPreset, rgb: bool = False) -> torch.Tensor:
    """The (1, 3, crop, crop) float32 CPU tensor the backbone expects for one frame.

    `frame`: numpy HxWx3 uint8 (BGR as OpenCV gives it, RGB when `rgb`), HxW grey, HxWx4 (alpha
    dropped), float arrays in 0..1, a PIL image, or an image path. A 4-D or 3-D float tensor is
    taken as already preprocessed. Raises ValueError for unreadable files and unusable arrays.
    """
    if isinstance(frame, torch.Tensor):
        return frame if frame.dim() == 4 else frame.unsqueeze(0)
    img, bgr = _as_array(frame, rgb)
    img = _resize_crop(img, preset.resize, preset.crop)
    if img.ndim == 2:
        chw = np.broadcast_to(img, (3, *img.shape))
    else:
        chw = img.transpose(2, 0, 1)[:3]  # (channels, h, w), alpha dropped
        if bgr:
            chw = chw[::-1]
    x = np.ascontiguousarray(chw, dtype=np.float32)
    std = np.asarray(preset.std, dtype=np.float32)[:, None, None]
    mean = np.asarray(preset.mean, dtype=np.float32)[:, None, None]
    # the same arithmetic as torchvision's ToTensor + Normalize, so training and live inference agree
    x /= 255.0
    x -= mean
    x /= std
    return torch.from_numpy(x).unsqueeze(0)




def eval_transform(preset: InputPreset) -> Callable[[Frame], torch.Tensor]:
    """The evaluation transform of a dataset: image (PIL, RGB array or path) -> (3, crop, crop)
    float32 tensor, by `preprocess` itself, so a dataset's image and the same image as a live frame
    give the same tensor. Picklable (loader workers). The function raises as `preprocess` does."""
    return functools.partial(_one_image, preset=preset)


def _one_image(image: Frame, preset: InputPreset) -> torch.Tensor:
    return preprocess(image, preset, rgb=True)[0]


# -- training ---------------------------------------------------------------------------------------
def train_transform(preset: InputPreset) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> augmented, normalised (3, crop, crop) tensor: for small (CIFAR-sized) presets a
    padded random crop and a flip, otherwise a random resized crop and a flip."""
    from torchvision import transforms as T
    tail = [T.ToTensor(), T.Normalize(preset.mean, preset.std)]
    if preset.crop <= 64:
        return T.Compose([T.Resize(preset.resize), T.RandomCrop(preset.crop, padding=preset.crop // 8),
                          T.RandomHorizontalFlip(), *tail])
    return T.Compose([T.RandomResizedCrop(preset.crop), T.RandomHorizontalFlip(), *tail])


def augment(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding `pad`) and horizontal flip of a uint8 batch (B, 3, H, W)."""
    b, _, h, w = images.shape
    if pad:
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(images.device)
        rows = (torch.arange(h, device=images.device)[None, :] + dy[:, None])[:, None, :, None]
        cols = (torch.arange(w, device=images.device)[None, :] + dx[:, None])[:, None, None, :]
        images = padded[torch.arange(b, device=images.device)[:, None, None, None],
                        torch.arange(3, device=images.device)[None, :, None, None], rows, cols]
    flip = (torch.rand(b, generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """A uint8 batch (B, 3, H, W) -> float32, scaled to 0..1 and normalised by `mean`, `std`: the
    arithmetic of `preprocess`, so a decoded image gives the tensor the live path gives."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


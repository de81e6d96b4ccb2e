"""Corrupted copies of images, CIFAR-10-C style (Hendrycks & Dietterich, ICLR 2019, "Benchmarking
Neural Network Robustness to Common Corruptions and Perturbations"), to measure how exits and
policies behave under shift.

Four kinds, each with severities 1..5, their parameters those of the paper's CIFAR-10-C script
(`make_cifar_c.py`, written for 32×32 images; the same numbers are used at any size):
  gaussian_noise    x + N(0, σ²) in 0..1, σ = 0.04, 0.06, 0.08, 0.09, 0.10
  gaussian_blur     Gaussian filter of σ = 0.4, 0.6, 0.7, 0.8, 1.0 pixels (edges repeated, radius 4σ)
  contrast          (x − channel mean) · c + channel mean, c = 0.75, 0.5, 0.4, 0.3, 0.15
  jpeg_compression  re-encoded as JPEG of quality 80, 65, 58, 50, 40
Results are clipped to 0..1 and floored to 8 bits, as the script's `np.uint8` does.

Deterministic: `corrupt(image, kind, severity, seed=, key=)` draws its noise from (seed, key) only
(`key`: e.g. `image_key(name)`), so one image gets the same noise pattern at every severity, only
scaled: a higher severity never changes an image less.

`write_corrupted` writes, for each kind and severity, a copy of a dataset's test split in the same
layout (OUT/<kind>-<severity>/test/<class>/<name>.png): lossless PNG, so the corruption is exactly
what was generated, except for jpeg_compression, whose JPEG bytes ARE the corruption (.jpg).
"""
from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image

from .images import read_rgb
from .progress import CancelFlag, ProgressFn, report

SEVERITIES = (1, 2, 3, 4, 5)
NOISE_SIGMA = (0.04, 0.06, 0.08, 0.09, 0.10)  # standard deviation of the added noise, image in 0..1
BLUR_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)  # pixels
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # factor on each pixel's difference from its channel's mean
JPEG_QUALITY = (80, 65, 58, 50, 40)


def _unit(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """0..1 floats clipped and floored to 8 bits (make_cifar_c.py's np.uint8(clip(x) * 255))."""
    return (np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(image.shape)  # the same draw at every severity, only scaled
    return _to_uint8(_unit(image) + NOISE_SIGMA[severity - 1] * noise)


def gaussian_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = BLUR_SIGMA[severity - 1]
    size = 2 * int(4.0 * sigma + 0.5) + 1  # scipy's (and so skimage's) kernel: radius = truncate 4 · σ
    blurred = cv2.GaussianBlur(_unit(image), (size, size), sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)
    return _to_uint8(blurred.reshape(image.shape))


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    x = _unit(image)
    means = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((x - means) * CONTRAST[severity - 1] + means)


def jpeg_bytes(image: np.ndarray, severity: int) -> bytes:
    """The image re-encoded as JPEG at severity's quality (Pillow's default 4:2:0 chroma, as the
    paper's script)."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, "JPEG", quality=JPEG_QUALITY[severity - 1])
    return buf.getvalue()


def jpeg_compression(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return read_rgb(jpeg_bytes(image, severity), name="<re-encoded JPEG>")


CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise, "gaussian_blur": gaussian_blur, "contrast": contrast,
    "jpeg_compression": jpeg_compression}
KINDS = tuple(CORRUPTIONS)


def check_kind(kind: str) -> str:
    """`kind` itself; ValueError naming it and the known kinds otherwise."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose from {', '.join(KINDS)}")
    return kind


def check_severity(severity: int) -> int:
    """`severity` itself when it is 1..5; ValueError naming it otherwise."""
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"severity {severity!r} is not one of 1, 2, 3, 4, 5")
    return int(severity)


def image_key(name: str) -> int:
    """A stable number for an image's name (CRC-32), to key its noise by: the same file gets the
    same noise in every run, whatever else is corrupted with it."""
    return zlib.crc32(name.encode("utf-8", "surrogatepass"))


def corrupt(image: np.ndarray, kind: str, severity: int, *, seed: int = 0, key: int = 0) -> np.ndarray:
    """A corrupted copy of `image` ((h, w, 3) uint8 RGB): same shape and dtype. Deterministic in
    (seed, key). Raises ValueError for an unknown kind, a severity outside 1..5 or an array that is
    not an RGB image."""
    check_kind(kind)
    severity = check_severity(severity)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"an image to corrupt must be an (h, w, 3) uint8 array, not {getattr(image, 'shape', image)!r}")
    rng = np.random.default_rng([int(seed), int(key)])
    return CORRUPTIONS[kind](image, severity, rng)


def encoded(image: np.ndarray, kind: str, severity: int, *, seed: int = 0, key: int = 0) -> tuple[bytes, str]:
    """(file bytes, suffix) of the corrupted image as `write_corrupted` stores it: PNG (lossless),
    or for jpeg_compression the re-encoded JPEG itself."""
    if kind == "jpeg_compression":
        return jpeg_bytes(image, check_severity(severity)), ".jpg"
    buf = io.BytesIO()
    Image.fromarray(corrupt(image, kind, severity, seed=seed, key=key), "RGB").save(buf, "PNG")
    return buf.getvalue(), ".png"


def set_name(kind: str, severity: int) -> str:
    """The folder of one corrupted set: "<kind>-<severity>", e.g. gaussian_noise-3."""
    return f"{check_kind(kind)}-{check_severity(severity)}"


def parse_set_name(name: str) -> tuple[str, int] | None:
    """(kind, severity) of a folder named by `set_name`, else None."""
    kind, _, sev = name.rpartition("-")
    return (kind, int(sev)) if kind in CORRUPTIONS and sev.isdigit() and int(sev) in SEVERITIES else None


# -- writing corrupted copies of a dataset ------------------------------------------------------------
@dataclass
class CorruptReport:
    """What `write_corrupted` wrote: the sets (folder names), images per set, files skipped."""

    out: str
    source: str
    sets: list[str]
    images: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


def source_images(data: str | Path, split: str = "test", *, limit: int | None = None,
                  on_skipped: Callable[[str, str], None] | None = None):
    """(dataset of PIL images, its FolderReport, the sample indices to corrupt) of `split` of
    `data` (a plain class folder: all of it), checked first: unreadable files go to
    `on_skipped(path, reason)` and are left out. With `limit`, at most that many images, every
    class in proportion (the same ones every time). Raises ValueError naming `data`."""
    from .data.folders import open_dataset
    from .splits import dataset_splits, open_labelled_part, split_indices
    part = split if split in dataset_splits(data) else None
    classes = open_dataset(data, part).classes  # the folder's own classes, in label order
    ds, check = open_labelled_part(data, split, classes=classes, on_skipped=on_skipped)
    ds.transform = None  # PIL images
    indices = list(range(len(ds)))
    if limit is not None and limit < len(ds):
        _, indices = split_indices(ds.targets, val_fraction=limit / len(ds), seed=0)
        indices = indices[:limit]
    return ds, check, indices


def write_corrupted(data: str | Path, out: str | Path, kinds: Sequence[str] = KINDS,
                    severities: Sequence[int] = SEVERITIES, *, split: str = "test", limit: int | None = None,
                    seed: int = 0, on_skipped: Callable[[str, str], None] | None = None,
                    progress: ProgressFn | None = None, cancel: CancelFlag | None = None) -> CorruptReport:
    """Write corrupted copies of `split` of `data` (the CIFAR-10 zip or folder, or a class folder)
    under `out`: out/<kind>-<severity>/test/<class>/<name>.png (.jpg for jpeg_compression), one
    folder per kind and severity, each readable as a dataset with a test split (`offramp evaluate
    BUNDLE --data out/gaussian_noise-3`). Unreadable source images are reported through
    `on_skipped` and left out. Raises ValueError for an unknown kind, a bad severity or unusable
    data, Cancelled when `cancel` is set."""
    kinds = [check_kind(k) for k in kinds]
    severities = [check_severity(s) for s in severities]
    if not kinds or not severities:
        raise ValueError("give at least one corruption kind and one severity")
    ds, check, indices = source_images(data, split, limit=limit, on_skipped=on_skipped)
    out = Path(out)
    sets = [set_name(k, s) for k in kinds for s in severities]
    taken: set[Path] = set()
    written = 0
    for n, i in enumerate(indices):
        report(progress, cancel, "corrupting images", n, len(indices))
        img, label = ds[i]
        if label < 0:  # failed after the check passed it (the dataset gave another image in its place)
            continue
        src = ds.samples[i][0]
        rgb = np.asarray(img)
        stem = _unique(Path(ds.classes[label]) / Path(src).stem, Path(src).suffix, taken)
        for kind in kinds:
            for sev in severities:
                data_bytes, suffix = encoded(rgb, kind, sev, seed=seed, key=image_key(ds._name(src)))
                path = out / set_name(kind, sev) / "test" / stem.parent / (stem.name + suffix)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data_bytes)
        written += 1
    report(progress, cancel, "corrupting images", len(indices), len(indices))
    skipped = list(check.skipped) + [(ds._name(src), why) for src, why in ds.bad.items()]
    return CorruptReport(str(out), str(data), sets, written, skipped)


def _unique(stem: Path, suffix: str, taken: set[Path]) -> Path:
    """`stem` (class/name), or class/name-<ext> when another file of the class had that name."""
    if stem in taken:
        stem = stem.with_name(f"{stem.name}-{suffix.lstrip('.').lower()}")
    taken.add(stem)
    return stem


__all__ = ["CORRUPTIONS", "KINDS", "SEVERITIES", "CorruptReport", "check_kind", "check_severity", "corrupt",
           "encoded", "image_key", "jpeg_bytes", "parse_set_name", "set_name", "source_images", "write_corrupted"]

"""Reading frames from image files, folders and videos as OpenCV gives them (HxWx3 uint8 BGR).

Shared by `offramp run` and the app's sources, so both accept the same files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


class MediaError(ValueError):
    """A file that cannot be read as an image or video; the message names it."""


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def list_images(folder: str | Path) -> list[Path]:
    """Image files in `folder` and its sub-folders, sorted, hidden files left out."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file() and is_image(p)
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def read_image(path: str | Path) -> np.ndarray:
    """An image file as HxWx3 uint8 BGR (grey, 16-bit and alpha images converted). Raises MediaError."""
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    if data is None:
        raise MediaError(f"{path} does not exist")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise MediaError(f"{path} is not a readable image (corrupt or unsupported format)")
    if img.dtype != np.uint8:  # 16-bit or float images
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        img = (img[:, :, :3].astype(np.float32) * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    return img


def iter_video(path: str | Path) -> Iterator[np.ndarray]:
    """Frames of a video file. Raises MediaError when it cannot be opened or has no frames."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise MediaError(f"{path} cannot be opened as a video")
        n = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            n += 1
            yield frame
        if n == 0:
            raise MediaError(f"{path} has no readable video frames")
    finally:
        cap.release()


def iter_frames(paths, on_error: Callable[[str], None] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(source name, BGR frame) for every image, every image in a folder, every video frame.

    A bad file is reported through `on_error` and skipped; without `on_error` it raises MediaError.
    """
    def fail(msg: str):
        if on_error is None:
            raise MediaError(msg)
        on_error(msg)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = list_images(path)
            if not files:
                fail(f"{path} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
            for f in files:
                try:
                    yield str(f), read_image(f)
                except MediaError as exc:
                    fail(str(exc))
        elif is_video(path):
            try:
                for i, frame in enumerate(iter_video(path)):
                    yield f"{path}#{i}", frame
            except MediaError as exc:
                fail(str(exc))
        elif not path.exists():
            fail(f"{path} does not exist")
        else:
            try:
                yield str(path), read_image(path)
            except MediaError as exc:
                fail(str(exc))

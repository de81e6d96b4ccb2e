"""Reading frames from image files, folders and videos, for `offramp run` and the app's sources,
so both accept the same files and see the same pixels as training (`engine.images` decodes every
image file; `engine.walk` lists every folder).

`iter_frames` hands out (h, w, 3) uint8 RGB arrays; `read_image` gives OpenCV's BGR order, the
layout the app's frames use, with the same pixel values.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from . import images
from .walk import BROKEN_LINK, LINK_LOOP, NOT_REGULAR, TreeWalker

IMAGE_EXTENSIONS = images.IMAGE_EXTENSIONS
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


class MediaError(ValueError):
    """A file that cannot be read as an image or video; the message names it."""


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def list_images(folder: str | Path, on_problem: Callable[[str], None] | None = None) -> list[Path]:
    """Image files in `folder` and its sub-folders, sorted, hidden files left out; each real file
    once, links followed but never round a loop (`engine.walk`). An entry named like an image that
    the walk left out (a broken link, a link loop, a FIFO or device) is told to `on_problem` in one
    sentence naming it, as an unreadable image would be: a caller that promises every image was
    read must know of it. Links to folders it did not follow are not problems: nothing is missed."""
    walker = TreeWalker(folder)
    files = walker.files()
    if on_problem is not None:
        for path, why in walker.problems:
            if why in (BROKEN_LINK, LINK_LOOP, NOT_REGULAR) and is_image(path):
                on_problem(str(images.ImageError(path, why)))
    return sorted(Path(p) for p, _ in files if is_image(p))


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as (h, w, 3) uint8 RGB, decoded by `engine.images`. Raises MediaError naming it."""
    try:
        return images.read_rgb(path)
    except images.ImageError as e:
        raise MediaError(str(e)) from None


def read_image(path: str | Path) -> np.ndarray:
    """An image file as (h, w, 3) uint8 BGR: `read_rgb` in OpenCV's channel order. Raises MediaError."""
    return images.to_bgr(read_rgb(path))


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


def _missing(path: Path) -> str:
    """Why `path`, which does not exist as far as `Path.exists` can tell, cannot be read: a link
    that leads nowhere or round a loop is named as such, since the link itself is right there."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a link loop (a link that leads back to itself)"
        if os.path.islink(path):
            return f"is a broken link (it points to {os.readlink(path)}, which does not exist)"
        if err.errno != errno.ENOENT:
            return f"is unreadable ({err.strerror or err})"
    return "does not exist"


def iter_frames(paths, on_error: Callable[[str], None] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(source name, (h, w, 3) uint8 RGB frame) for every image, every image in a folder, every
    video frame (converted by `images.from_opencv`, as the image files are decoded).

    A bad file is reported through `on_error` and skipped; without `on_error` it raises MediaError.
    Image-named entries a folder walk left out (broken links, link loops, FIFOs) are reported
    through `on_error` too; without it they are left out, as `list_images` leaves them out.
    """
    def fail(msg: str):
        if on_error is None:
            raise MediaError(msg)
        on_error(msg)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = list_images(path, on_problem=on_error)
            if not files:
                fail(f"{path} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
            for f in files:
                try:
                    yield str(f), read_rgb(f)
                except MediaError as exc:
                    fail(str(exc))
        elif not path.exists():
            fail(f"{path} {_missing(path)}")
        elif is_video(path):
            if not path.is_file():  # a FIFO or a device: opening it would wait forever
                fail(f"{path} is not a regular file")
                continue
            try:
                for i, frame in enumerate(iter_video(path)):
                    yield f"{path}#{i}", images.from_opencv(frame)
            except MediaError as exc:
                fail(str(exc))
        else:
            try:
                yield str(path), read_rgb(path)
            except MediaError as exc:
                fail(str(exc))

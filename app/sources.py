"""Where frames come from: a camera, a video file, an image file, or a folder of images played as a
slideshow. Plain Python + OpenCV, no Qt, so it is tested without a window.

Every source hands out `Frame`s whose image is an (height, width, 3) uint8 BGR array, the layout
OpenCV reads and `Engine.infer` takes by default.
"""
from __future__ import annotations

import glob
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from engine import images, media

log = logging.getLogger(__name__)

# the same files `offramp run` accepts
IMAGE_SUFFIXES = media.IMAGE_EXTENSIONS
VIDEO_SUFFIXES = media.VIDEO_EXTENSIONS
CAMERA_PREFIX = "camera:"
CAMERA_FAILURES = 5  # consecutive failed reads before a camera counts as gone


class SourceError(RuntimeError):
    """A source cannot be opened or stopped delivering frames; the message is for the user."""


@dataclass(frozen=True)
class SourceSpec:
    """What to open: kind is "camera", "video", "image" or "folder"; target a path or camera index."""

    kind: str
    target: str
    width: int | None = None  # camera resolution asked for (None = the camera's default)
    height: int | None = None

    @classmethod
    def from_text(cls, text: str) -> "SourceSpec":
        """Parse "camera:N" or a path; raises SourceError for a path that is missing or of an unknown type."""
        text = str(text).strip()
        if text.startswith(CAMERA_PREFIX):
            index = text[len(CAMERA_PREFIX):]
            if not index.isdigit():
                raise SourceError(f"camera source {text!r} must be camera:N with N a number, e.g. camera:0")
            return cls("camera", index)
        path = Path(text).expanduser()
        if not path.exists():
            raise SourceError(f"{path} does not exist; give an image, a video, a folder of images or camera:N")
        if path.is_dir():
            return cls("folder", str(path))
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            return cls("image", str(path))
        if suffix in VIDEO_SUFFIXES:
            return cls("video", str(path))
        raise SourceError(f"{path} is neither an image ({', '.join(IMAGE_SUFFIXES[:4])}, …) nor a video "
                          f"({', '.join(VIDEO_SUFFIXES[:4])}, …)")

    def to_text(self) -> str:
        return f"{CAMERA_PREFIX}{self.target}" if self.kind == "camera" else self.target

    @property
    def display(self) -> str:
        return f"camera {self.target}" if self.kind == "camera" else Path(self.target).name or self.target


@dataclass(frozen=True)
class Frame:
    """One frame: `image` (h, w, 3) uint8 BGR; `index` of `count` frames (count None = live)."""

    image: np.ndarray
    index: int
    count: int | None
    name: str
    time: float  # time.perf_counter() when it was read


class FrameSource:
    """Base: `read()` returns the next Frame or None at the end; `seek(i)` moves to frame i."""

    live = False  # a camera: frames keep coming, old ones are worthless
    seekable = False
    interval = 0.0  # seconds per frame the source itself suggests (video fps), 0 = none

    def __init__(self, spec: SourceSpec, loop: bool = False):
        self.spec = spec
        self.loop = loop

    @property
    def count(self) -> int | None:
        return None

    def read(self) -> Frame | None:
        raise NotImplementedError

    def seek(self, index: int) -> None:
        pass

    def close(self) -> None:
        pass


class CameraSource(FrameSource):
    live = True

    def __init__(self, spec: SourceSpec, loop: bool = False):
        super().__init__(spec, loop)
        self.index = int(spec.target)
        self._cap = cv2.VideoCapture(self.index)
        if not self._cap.isOpened():
            self._cap.release()
            raise SourceError(f"camera {self.index} could not be opened: it is missing or used by another program")
        if spec.width and spec.height:
            self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, spec.width)
            self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, spec.height)
        self._n = 0

    def read(self) -> Frame | None:
        for _ in range(CAMERA_FAILURES):
            ok, image = self._cap.read()
            if ok and image is not None:
                self._n += 1
                return Frame(_as_bgr(image), self._n - 1, None, f"camera {self.index}", time.perf_counter())
            time.sleep(0.05)
        raise SourceError(f"camera {self.index} stopped delivering frames (unplugged or taken by another program)")

    def close(self) -> None:
        self._cap.release()


class VideoSource(FrameSource):
    seekable = True

    def __init__(self, spec: SourceSpec, loop: bool = False):
        super().__init__(spec, loop)
        self.path = spec.target
        self._cap = cv2.VideoCapture(self.path)
        ok, first = self._cap.read() if self._cap.isOpened() else (False, None)
        if not ok or first is None:
            self._cap.release()
            raise SourceError(f"cannot read video {self.path}: the file is corrupt or its format is not supported")
        self._count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.interval = 1.0 / fps if fps and 1.0 <= fps <= 240.0 else 1.0 / 25.0
        self._pending: np.ndarray | None = first  # already read while checking the file
        self._pos = 0

    @property
    def count(self) -> int | None:
        return self._count

    def read(self) -> Frame | None:
        if self._pending is not None:
            image, self._pending = self._pending, None
        else:
            ok, image = self._cap.read()
            if not ok or image is None:
                if not self.loop or self._pos == 0:
                    return None
                self.seek(0)
                return self.read()
        self._pos += 1
        return Frame(_as_bgr(image), self._pos - 1, self._count, Path(self.path).name, time.perf_counter())

    def seek(self, index: int) -> None:
        index = max(0, index if self._count is None else min(index, self._count - 1))
        self._cap.set(cv2.CAP_PROP_POS_FRAMES, index)
        self._pending, self._pos = None, index

    def close(self) -> None:
        self._cap.release()


class ImageListSource(FrameSource):
    """A single image (a still) or every image under a folder (a slideshow, in name order)."""

    seekable = True

    def __init__(self, spec: SourceSpec, loop: bool = False):
        super().__init__(spec, loop)
        if spec.kind == "folder":
            self.files = [str(p) for p in media.list_images(spec.target)]
            if not self.files:
                raise SourceError(f"folder {spec.target} contains no images ({', '.join(IMAGE_SUFFIXES[:5])}, …)")
        else:
            self.files = [spec.target]
        self.skipped: list[tuple[str, str]] = []  # (file, why) of images that could not be read, each once
        self._pos = 0
        if spec.kind == "image":
            self._first = read_image(spec.target)  # raises SourceError: a still that cannot be read is fatal

    @property
    def count(self) -> int:
        return len(self.files)

    def read(self) -> Frame | None:
        for _ in range(len(self.files)):
            if self._pos >= len(self.files):
                if not self.loop:
                    return None
                self._pos = 0
            path, index = self.files[self._pos], self._pos
            self._pos += 1
            try:
                image = self._first if self.spec.kind == "image" else read_image(path)
            except SourceError as e:
                if not any(f == path for f, _ in self.skipped):  # a looping slideshow meets it every pass
                    self.skipped.append((path, str(e)))
                continue
            return Frame(image, index, len(self.files), Path(path).name, time.perf_counter())
        if self.spec.kind != "image" and not Path(self.spec.target).is_dir():  # e.g. deleted while it played
            raise SourceError(f"the folder {self.spec.target} is gone (removed or renamed while it played)")
        raise SourceError(f"none of the {len(self.files)} images in {self.spec.target} could be read")

    def seek(self, index: int) -> None:
        self._pos = index % len(self.files)


def open_source(spec: SourceSpec, loop: bool = False) -> FrameSource:
    """Open `spec`; raises SourceError (one sentence naming the source) when it cannot be read."""
    if spec.kind == "camera":
        return CameraSource(spec, loop)
    if spec.kind == "video":
        return VideoSource(spec, loop)
    if spec.kind in ("image", "folder"):
        return ImageListSource(spec, loop)
    raise SourceError(f"unknown source kind {spec.kind!r}")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as (h, w, 3) uint8 BGR, decoded as training and `offramp run` decode it
    (`engine.images`: EXIF orientation, 16-bit scaling, the size limit); SourceError naming the
    file when it cannot be read."""
    try:
        return media.read_image(path)
    except media.MediaError as e:
        raise SourceError(str(e)) from None


def _as_bgr(image: np.ndarray) -> np.ndarray:
    """Camera and video frames as (h, w, 3) uint8 BGR (some drivers hand out grey, BGRA or 16-bit),
    converted by the rules image files follow (`engine.images.opencv_bgr`)."""
    return images.opencv_bgr(image)


def list_cameras() -> list[tuple[int, str]]:
    """(index, name) of the cameras this machine seems to have, without opening any.

    Names come from Qt Multimedia when it is installed, else from Linux's /sys; without either the
    first two indices are offered, as OpenCV numbers cameras from 0.
    """
    names = _qt_camera_names()
    if names:
        return list(enumerate(names))
    if sys.platform.startswith("linux"):
        found = []
        for dev in sorted(glob.glob("/dev/video*"), key=lambda d: int("0" + "".join(filter(str.isdigit, d)))):
            idx = int("0" + "".join(filter(str.isdigit, Path(dev).name)))
            try:
                name = Path(f"/sys/class/video4linux/video{idx}/name").read_text().strip()
            except OSError:
                name = ""
            found.append((idx, name or f"Camera {idx}"))
        return found
    return [(0, "Camera 0"), (1, "Camera 1")]


def _qt_camera_names() -> list[str]:
    """Camera descriptions from QMediaDevices, [] when Qt Multimedia is not installed (PySide6-Essentials)."""
    try:
        from PySide6.QtMultimedia import QMediaDevices  # optional: only in the full PySide6
    except ImportError:
        return []
    try:
        return [d.description() for d in QMediaDevices.videoInputs()]
    except Exception:  # noqa: BLE001 - a broken multimedia backend must not stop the app
        log.debug("Qt Multimedia could not list the cameras", exc_info=True)
        return []

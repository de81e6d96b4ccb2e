"""A labelled dataset folder built from frames: FOLDER/CLASS/CLASS_00001.jpg, the layout the
retraining panel and `offramp` read (one sub-folder per class). Plain Python + OpenCV, no Qt:
checking class names, counting the images already there, writing one frame without ever
overwriting a file. The app's `FrameWriter` calls `write_frame` off the GUI thread."""
from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import numpy as np

from engine import media
from engine.walk import TreeWalker, real_first

FORMATS = {"JPEG": ".jpg", "PNG": ".png"}  # shown name -> file suffix
JPEG_QUALITY = 95
PNG_COMPRESSION = 3  # 0..9: the default 3 is already 30-200 ms a frame; higher buys little
# names a folder cannot have on Windows (a dataset moves between machines), whatever the case
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_SPLITS = {"train", "test", "val"}  # engine.data.layout reads a folder with these sub-folders as splits
_REFUSED = set('<>:"|?*')
MAX_NAME_BYTES = 200  # leaves room for "_00001.jpg" within the usual 255-byte file-name limit


class DatasetError(ValueError):
    """A class name or folder that cannot take frames; the message (one sentence) names it."""


def check_class_name(name: str) -> str:
    """`name` without surrounding spaces, as a class folder name; raises DatasetError naming the
    value when a file system would refuse it or training would not read it as a class."""
    clean = str(name).strip()
    shown = repr(str(name))
    if not clean:
        raise DatasetError("the class name is empty: type a name such as 'cat' first")
    if "/" in clean or "\\" in clean or os.sep in clean:
        raise DatasetError(f"class name {shown} contains a path separator: use a plain name such as 'cat'")
    if clean in (".", ".."):
        raise DatasetError(f"class name {shown} is not a folder name: use a plain name such as 'cat'")
    bad = sorted({c for c in clean if c in _REFUSED or ord(c) < 32})
    if bad:
        chars = " ".join(repr(c) for c in bad)
        raise DatasetError(f"class name {shown} contains {chars}, which file systems refuse: leave them out")
    if clean.startswith("."):
        raise DatasetError(f"class name {shown} starts with a dot, so training would skip it as a hidden folder")
    if clean.endswith("."):
        raise DatasetError(f"class name {shown} ends with a dot, which Windows refuses: leave the dot out")
    if clean.split(".")[0].lower() in _RESERVED:
        raise DatasetError(f"class name {shown} is a device name on Windows: choose another name")
    if clean.lower() in _SPLITS:
        raise DatasetError(f"class name {shown} is reserved: a folder with a {clean}/ sub-folder is read as a "
                           "dataset split, so choose another name")
    if len(clean.encode("utf-8")) > MAX_NAME_BYTES:
        raise DatasetError(f"class name {clean[:20]!r}… is longer than {MAX_NAME_BYTES} bytes: use a shorter name")
    return clean


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def class_counts(folder: str | os.PathLike) -> dict[str, int]:
    """Image files (by extension) in each class sub-folder of `folder`, sorted by class name; {} for a
    folder that does not exist yet. Hidden folders and files are left out, as training leaves them."""
    root = Path(folder)
    if not root.is_dir():
        return {}
    try:
        with os.scandir(root) as it:
            classes = sorted(e.name for e in it if e.is_dir() and not _hidden(e.name))
    except OSError:
        return {}
    walker = TreeWalker(root)  # the walk training does: links followed, never round a loop, each file once
    counts = {Path(f).name: sum(1 for path, _ in walker.files(f) if media.is_image(path))
              for f in real_first([str(root / cls) for cls in classes])}
    return {cls: counts[cls] for cls in classes}


def writable_problem(folder: str | os.PathLike) -> str | None:
    """Why frames cannot be saved under `folder` (one sentence naming it), or None when they can as
    far as can be told without writing: the folder, or the nearest existing folder above it, must
    be a writable folder."""
    path = Path(folder).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"cannot save into {path}: {probe} is a file, not a folder; choose another dataset folder"
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        return f"cannot save into {path}: {probe} is not writable; choose a folder you can write to"
    return None


def encode(image: np.ndarray, suffix: str) -> bytes:
    """A (h, w, 3) uint8 BGR frame as JPEG or PNG file bytes."""
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if suffix == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION,
                                                                                 PNG_COMPRESSION]
    ok, buf = cv2.imencode(suffix, image, params)
    if not ok:
        raise DatasetError(f"the frame ({image.shape}) could not be encoded as {suffix}")
    return buf.tobytes()


class FolderWriter:
    """Writes frames into FOLDER/CLASS/CLASS_NNNNN.suffix, numbering on from the files already
    there. A name is taken with an exclusive create, so nothing is ever overwritten, whoever else
    writes into the folder. One instance per writing thread."""

    def __init__(self):
        self._next: dict[Path, int] = {}  # class folder -> next number to try

    def write(self, image: np.ndarray, folder: str | os.PathLike, cls: str, suffix: str = ".jpg") -> Path:
        """Save `image` (h, w, 3 uint8 BGR) for class `cls`; returns the file written. Raises
        DatasetError (naming the class or the folder) when it cannot be written."""
        cls = check_class_name(cls)
        folder = Path(folder).expanduser()
        target = folder / cls
        data = encode(image, suffix)
        try:
            target.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # mkdir's "File exists" would not say which is in the way, or why it matters
            blocker = target if target.exists() else next((p for p in target.parents if p.exists() and not p.is_dir()), target)
            raise DatasetError(f"{blocker} is a file, not a folder, so the class folder {target} cannot be made; "
                               "move that file or choose another folder") from None
        except OSError as e:
            raise DatasetError(f"cannot create {target}: {e.strerror or e}; choose a folder you can write to") from None
        n = self._next.get(target) or _first_number(target, cls)
        while True:
            path = target / f"{cls}_{n:05d}{suffix}"
            try:
                f = open(path, "xb")  # noqa: SIM115 - exclusive create: fails rather than overwrite
            except FileExistsError:
                n += 1
                continue
            except OSError as e:
                raise DatasetError(f"cannot save into {target}: {e.strerror or e}; choose a folder you can "
                                   "write to") from None
            try:
                with f:
                    f.write(data)
            except OSError as e:
                path.unlink(missing_ok=True)  # no half-written image left for training to trip on
                raise DatasetError(f"cannot save into {target}: {e.strerror or e}; free some space or choose "
                                   "another folder") from None
            self._next[target] = n + 1
            return path


def _first_number(folder: Path, cls: str) -> int:
    """One past the highest CLASS_NNNNN number in `folder` (1 for none)."""
    pattern = re.compile(re.escape(cls) + r"_(\d+)\.[A-Za-z]+$")
    try:
        numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := pattern.match(name))]
    except OSError:
        numbers = []
    return max(numbers, default=0) + 1

"""Where the images of a dataset are: a folder on disk or a member prefix inside a zip, the splits
("train", "test", "val") of its layout, its class folders and the image files in each, found by
extension (decoding is `engine.images`). What cannot be listed is reported, never raised."""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..bundle_checks import class_name_problem
from ..images import IMAGE_EXTENSIONS
from ..walk import TreeWalker, hidden, real_first
from .zips import zip_members

SPLITS = ("train", "test", "val")


def is_image_name(name: str) -> bool:
    """True when `name` ends in an image extension Offramp reads (`engine.images.IMAGE_EXTENSIONS`, any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class Location:
    """A class-folder tree: a directory on disk, or a member prefix inside a zip archive."""

    root: str  # directory path, or the member prefix ("" or "train/") inside `archive`
    archive: str | None = None

    @property
    def display(self) -> str:
        if self.archive is None:
            return self.root
        return f"{self.archive}:{self.root.rstrip('/')}" if self.root else self.archive

    def name(self, src: str) -> str:
        """How a file is named in reports: its path, or archive:member."""
        return f"{self.archive}:{src}" if self.archive else src


@dataclass
class Listing:
    """The class folders of a tree and their image files, and what was left out of them."""

    files: dict[str, list[tuple[str, int]]]  # class -> [(src, size in bytes)]
    loose: int = 0  # image files directly in the root (not in a class folder)
    ignored: list[str] = field(default_factory=list)  # files without an image extension
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): links not followed, broken ones


def list_classes(loc: Location) -> Listing:
    """The class folders under `loc` (sorted) and their image files (sorted, sub-folders included).
    Raises ValueError naming the folder when it cannot be read."""
    out = Listing({})
    if loc.archive is None:
        walker = TreeWalker(loc.root)
        try:
            with os.scandir(loc.root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            raise ValueError(f"{loc.root} cannot be read ({err.strerror or err}); choose a folder you can read.") from None
        folders = {e.path: e.name for e in entries if not hidden(e.name) and _is_dir(e)}
        out.loose = sum(1 for e in entries if not hidden(e.name) and e.path not in folders and is_image_name(e.name))
        for path in real_first(list(folders)):  # a class folder linked in twice is read under its own name
            out.files[folders[path]] = _images_of(walker.files(path), out.ignored)
        out.files = {c: out.files[c] for c in sorted(out.files)}
        out.problems = _reportable(walker.problems)
        return out
    for info in zip_members(loc.archive).values():
        if not info.filename.startswith(loc.root):
            continue
        parts = info.filename[len(loc.root):].rstrip("/").split("/")
        if not parts[0] or any(hidden(p) for p in parts):
            continue
        if info.is_dir() or len(parts) > 1:
            files = out.files.setdefault(parts[0], [])
            if info.is_dir():
                continue
            if is_image_name(parts[-1]):
                files.append((info.filename, info.file_size))
            else:
                out.ignored.append(info.filename)
        elif is_image_name(parts[0]):
            out.loose += 1
    out.files = {c: sorted(out.files[c]) for c in sorted(out.files)}
    return out


def all_images(loc: Location, ignored: list[str], problems: list | None = None) -> list[tuple[str, int]]:
    """Every image file under `loc` as (src, size), sub-folders included, in a stable order; files
    without an image extension go to `ignored`, what the walk left out to `problems` (path, reason)."""
    if loc.archive is None:
        walker = TreeWalker(loc.root)
        found = _images_of(walker.files(), ignored)
        if problems is not None:
            problems += _reportable(walker.problems)
        return found
    found = []
    for info in zip_members(loc.archive).values():
        rest = info.filename[len(loc.root):]
        if info.is_dir() or not info.filename.startswith(loc.root) or any(hidden(p) for p in rest.split("/")):
            continue
        if is_image_name(rest):
            found.append((info.filename, info.file_size))
        else:
            ignored.append(info.filename)
    return sorted(found)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


def _images_of(files: list[tuple[str, int]], ignored: list[str]) -> list[tuple[str, int]]:
    """The image files of a walk (by extension); the others go to `ignored`."""
    found = []
    for path, size in files:
        (found.append((path, size)) if is_image_name(path) else ignored.append(path))
    return found


def _reportable(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A walk's problems worth reporting: every folder left out, and files with an image's name."""
    return [(p, why) for p, why in problems if "folder" in why or is_image_name(p)]


def locate(path: str | os.PathLike, split: str | None) -> tuple[Location, list[Location]]:
    """(the tree to read, every split tree of the same layout) — or ValueError naming the path."""
    p = Path(path)
    splits, whole, make = _layout(p)
    if split is None:
        if "train" in splits:
            raise ValueError(f"{p} holds the splits {', '.join(splits)}; open one with split='train' or split='test'.")
        return whole, [whole]
    if split not in splits:
        raise ValueError(f"{p} has no {split!r} split (found: {', '.join(splits) or 'none'}); "
                         "use split=None for a plain folder of class sub-folders.")
    return make(split), [make(s) for s in splits]


def dataset_splits(path: str | os.PathLike) -> list[str]:
    """The splits ("train", "test", "val") of a dataset folder or zip; [] for a plain class folder.
    Raises ValueError naming the path when it is missing or neither a folder nor a zip."""
    return _layout(path)[0]


def _layout(path: str | os.PathLike) -> tuple[list[str], Location, Callable[[str], Location]]:
    """(the splits found, the whole tree, split name -> its tree) — or ValueError naming the path."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p} does not exist; choose a folder with one sub-folder per class, or a dataset zip.")
    if p.is_dir():
        return [s for s in SPLITS if (p / s).is_dir()], Location(str(p)), (lambda s: Location(str(p / s)))
    if p.is_file() and zipfile.is_zipfile(p):  # a regular file: opening a FIFO would wait forever
        names = list(zip_members(str(p)))
        base = _zip_base(names)
        splits = [s for s in SPLITS if any(n.startswith(f"{base}{s}/") for n in names)]
        return splits, Location(base, str(p)), (lambda s: Location(f"{base}{s}/", str(p)))
    raise ValueError(f"{p} is neither a folder nor a zip archive; choose a folder of class sub-folders or a zip.")


def _zip_base(names: list[str]) -> str:
    """'' or 'top/' when the whole archive sits in one top folder (a zipped dataset folder)."""
    names = [n for n in names if not hidden(n.split("/", 1)[0])]
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1 or not all("/" in n for n in names):
        return ""
    top = tops.pop()
    # top/<class>/<image>: the classes sit one level down (a single class at the top is no dataset)
    nested = any(n.count("/") >= 2 and not n.endswith("/") for n in names)
    return f"{top}/" if nested else ""


def check_class_folders(folder: str, names) -> None:
    """Raise ValueError naming `folder` and the class folder whose name cannot be a class name
    (`engine.bundle_checks.class_name_problem`: control characters, an empty name...): a bundle
    trained on it would be refused, and its name would break every line that prints it."""
    for name in names:
        problem = class_name_problem(name)
        if problem is not None:
            raise ValueError(f"{folder} has the class folder {ascii(name)}, whose name cannot be a class name "
                             f"({problem}); rename the folder.")


def class_names(listings: list[Listing], split_layout: bool) -> list[str]:
    """Class names in index order. Splits share the union of their class folders so that label
    indices agree between train and test; a plain folder drops class folders without images."""
    if split_layout:
        return sorted({c for lst in listings for c in lst.files})
    return [c for c, files in listings[0].files.items() if any(size > 0 for _, size in files)]

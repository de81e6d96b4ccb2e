"""Labelled images: class folders (torchvision ImageFolder layout), the CIFAR-10 JPEG zip read in
place, folder checks that report bad files instead of crashing, stratified splits, and the
transforms that turn an image into what a backbone expects.

Layouts `open_dataset` understands:
  folder/<class>/**/<image>                 a plain labelled folder (split=None)
  folder/{train,test}/<class>/**/<image>    an extracted split layout (split="train" or "test")
  archive.zip with either layout inside     read directly from the zip, never extracted
"""
from __future__ import annotations

import functools
import os
import struct
import threading
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS

from . import images
from .backbones import InputPreset
from .images import ImageError
from .progress import CancelFlag, ProgressFn, report
from .walk import TreeWalker, hidden as _hidden, real_first

SPLITS = ("train", "test", "val")
SKIPPED = -100  # the label of an item whose own file could not be read (see ImageFolderData)
ImageSource = images.ImageSource


# -- images -------------------------------------------------------------------------------------
# One decoder for every path that reads an image (engine.images): RGB, EXIF orientation applied,
# 16-bit scaled one way, one size limit. Re-exported here, where the data code has always had it.
load_image = images.load_image


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


# -- where the images are -----------------------------------------------------------------------
def _zip_members(archive: str) -> dict[str, zipfile.ZipInfo]:
    """Member name -> ZipInfo, parsed once per archive version (60,000 entries take a second)."""
    st = os.stat(archive)
    return _zip_index(os.path.realpath(archive), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _zip_index(archive: str, mtime_ns: int, size: int) -> dict[str, zipfile.ZipInfo]:
    with zipfile.ZipFile(archive) as zf:
        return {info.filename: info for info in zf.infolist()}


_Entry = tuple[int, int, int, int]  # (local header offset, compressed size, compression, CRC-32)


def _entry(info: zipfile.ZipInfo) -> _Entry:
    return info.header_offset, info.compress_size, info.compress_type, info.CRC


def _read_member(fp: BinaryIO, entry: _Entry, archive: str, name: str) -> bytes:
    """One member's bytes through a plain file handle, so every thread or worker can have its own
    handle without re-parsing the archive's directory. Raises zipfile.BadZipFile when damaged."""
    offset, size, method, crc = entry
    if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        with zipfile.ZipFile(archive) as zf:  # rare compressions: the slow, general way
            if zf.getinfo(name).file_size > MAX_MEMBER_BYTES:  # zipfile reads no more than it declares
                raise ImageError(f"{archive}:{name}", _member_too_large())
            return zf.read(name)
    fp.seek(offset)
    head = fp.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {name}")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    fp.seek(offset + 30 + name_len + extra_len)
    data = fp.read(min(size, MAX_MEMBER_BYTES + 1))
    if len(data) > MAX_MEMBER_BYTES:
        raise ImageError(f"{archive}:{name}", _member_too_large())
    if method == zipfile.ZIP_DEFLATED:  # bounded: a small member must not inflate to gigabytes (a zip bomb)
        inflate = zlib.decompressobj(-15)
        data = inflate.decompress(data, MAX_MEMBER_BYTES + 1)
        if len(data) > MAX_MEMBER_BYTES:
            raise ImageError(f"{archive}:{name}", _member_too_large())
    if zlib.crc32(data) != crc:
        raise zipfile.BadZipFile(f"CRC mismatch in {name}")
    return data


MAX_MEMBER_BYTES = 512 * 2**20  # an image inside a zip: more than any image within the pixel limit needs


def _member_too_large() -> str:
    return f"too large (more than {MAX_MEMBER_BYTES // 2**20} MB uncompressed)"


@dataclass(frozen=True)
class _Location:
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
class _Listing:
    files: dict[str, list[tuple[str, int]]]  # class -> [(src, size in bytes)]
    loose: int = 0  # image files directly in the root (not in a class folder)
    ignored: list[str] = field(default_factory=list)  # files without an image extension
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): links not followed, broken ones


def _list(loc: _Location) -> _Listing:
    out = _Listing({})
    if loc.archive is None:
        walker = TreeWalker(loc.root)
        try:
            with os.scandir(loc.root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            raise ValueError(f"{loc.root} cannot be read ({err.strerror or err}); choose a folder you can read.") from None
        folders = {e.path: e.name for e in entries if not _hidden(e.name) and _is_dir(e)}
        out.loose = sum(1 for e in entries if not _hidden(e.name) and e.path not in folders and _is_image_name(e.name))
        for path in real_first(list(folders)):  # a class folder linked in twice is read under its own name
            out.files[folders[path]] = _images_of(walker.files(path), out.ignored)
        out.files = {c: out.files[c] for c in sorted(out.files)}
        out.problems = _reportable(walker.problems)
        return out
    for info in _zip_members(loc.archive).values():
        if not info.filename.startswith(loc.root):
            continue
        parts = info.filename[len(loc.root):].rstrip("/").split("/")
        if not parts[0] or any(_hidden(p) for p in parts):
            continue
        if info.is_dir() or len(parts) > 1:
            files = out.files.setdefault(parts[0], [])
            if info.is_dir():
                continue
            if _is_image_name(parts[-1]):
                files.append((info.filename, info.file_size))
            else:
                out.ignored.append(info.filename)
        elif _is_image_name(parts[0]):
            out.loose += 1
    out.files = {c: sorted(out.files[c]) for c in sorted(out.files)}
    return out


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


def _images_of(files: list[tuple[str, int]], ignored: list[str]) -> list[tuple[str, int]]:
    """The image files of a walk (by extension); the others go to `ignored`."""
    found = []
    for path, size in files:
        (found.append((path, size)) if _is_image_name(path) else ignored.append(path))
    return found


def _reportable(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A walk's problems worth reporting: every folder left out, and files with an image's name."""
    return [(p, why) for p, why in problems if "folder" in why or _is_image_name(p)]


def _locate(path: str | os.PathLike, split: str | None) -> tuple[_Location, list[_Location]]:
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


def _layout(path: str | os.PathLike) -> tuple[list[str], _Location, Callable[[str], _Location]]:
    """(the splits found, the whole tree, split name -> its tree) — or ValueError naming the path."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p} does not exist; choose a folder with one sub-folder per class, or a dataset zip.")
    if p.is_dir():
        return [s for s in SPLITS if (p / s).is_dir()], _Location(str(p)), (lambda s: _Location(str(p / s)))
    if p.is_file() and zipfile.is_zipfile(p):  # a regular file: opening a FIFO would wait forever
        names = list(_zip_members(str(p)))
        base = _zip_base(names)
        splits = [s for s in SPLITS if any(n.startswith(f"{base}{s}/") for n in names)]
        return splits, _Location(base, str(p)), (lambda s: _Location(f"{base}{s}/", str(p)))
    raise ValueError(f"{p} is neither a folder nor a zip archive; choose a folder of class sub-folders or a zip.")


def _zip_base(names: list[str]) -> str:
    """'' or 'top/' when the whole archive sits in one top folder (a zipped dataset folder)."""
    names = [n for n in names if not _hidden(n.split("/", 1)[0])]
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1 or not all("/" in n for n in names):
        return ""
    top = tops.pop()
    # top/<class>/<image>: the classes sit one level down (a single class at the top is no dataset)
    nested = any(n.count("/") >= 2 and not n.endswith("/") for n in names)
    return f"{top}/" if nested else ""


def _classes(listings: list[_Listing], split_layout: bool) -> list[str]:
    """Class names in index order. Splits share the union of their class folders so that label
    indices agree between train and test; a plain folder drops class folders without images."""
    if split_layout:
        return sorted({c for lst in listings for c in lst.files})
    return [c for c, files in listings[0].files.items() if any(size > 0 for _, size in files)]


# -- the dataset --------------------------------------------------------------------------------
class ImageFolderData(Dataset):
    """Labelled images from a folder or a zip. Items are (transform(image), label).

    `.samples` [(path or zip member, label)], `.targets`, `.classes`, `.transform` (settable; None
    yields PIL images). An image that fails to load is skipped with a warning, so one corrupt file
    never ends a long run: its item is the next readable image with the label SKIPPED, which keeps
    a batch's shape while every consumer drops it (`record_outputs`, `cache_features`,
    `decode_dataset`; cross-entropy ignores -100), so no image is ever counted twice.
    """

    def __init__(self, samples: list[tuple[str, int]], classes: Sequence[str], *, root: str,
                 archive: str | None = None, split: str | None = None, transform: Callable | None = None):
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.root = root
        self.archive = archive
        self.split = split
        self.transform = transform
        self.bad: dict[str, str] = {}  # src -> reason, filled as bad files are met (per process)
        self._local = threading.local()
        if archive is not None:
            members = _zip_members(archive)
            self._entries = {src: _entry(members[src]) for src, _ in self.samples}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        n = len(self.samples)
        for step in range(n):
            src, label = self.samples[(i + step) % n]
            if src in self.bad:
                continue
            try:
                img = load_image(self._read(src), name=self._name(src)) if self.archive else load_image(src)
            except Exception as err:  # noqa: BLE001 - any decoder failure means "skip this file"
                self.bad[src] = _reason(err)
                warnings.warn(f"skipping {self._name(src)}: {self.bad[src]}", stacklevel=2)
                continue
            return (self.transform(img) if self.transform is not None else img), (label if step == 0 else SKIPPED)
        raise RuntimeError(f"no image in {self.root} could be read; run check_folder on it to see why")

    def _name(self, src: str) -> str:
        return f"{self.archive}:{src}" if self.archive else src

    def _read(self, member: str) -> bytes:
        # One handle per thread and per process: a file position must not be shared across either.
        fp = getattr(self._local, "fp", None)
        if fp is None or self._local.pid != os.getpid():
            fp = self._local.fp = open(self.archive, "rb")  # noqa: SIM115 - lives as long as the thread
            self._local.pid = os.getpid()
        return _read_member(fp, self._entries[member], self.archive, member)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_local")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def __repr__(self) -> str:
        where = f"{self.archive}:{self.split}" if self.archive else self.root
        return f"ImageFolderData({where!r}, {len(self)} images, {len(self.classes)} classes)"


def open_dataset(path: str | os.PathLike, split: str | None = None, *, classes: Sequence[str] | None = None,
                 report: "FolderReport | None" = None, transform: Callable | None = None,
                 classes_of: str = "the model") -> ImageFolderData:
    """Open a labelled image folder or zip as an `ImageFolderData`.

    `split` picks "train"/"test" in a split layout; None for a plain class folder. `classes` fixes
    the labels by class name (e.g. a model's class names: a folder with only cat/ and dog/ labels
    its cats with the model's index of "cat"); a class folder with images that is not among them
    is refused, naming `classes_of` ("the model"). `report` (from `check_folder` on the same path
    and split) leaves out the files it skipped. Zero-byte files are always left out.
    Raises ValueError naming the path when it is missing, not a folder or zip, has no images, or
    has a class folder `classes` lacks.
    """
    loc, split_locs = _locate(path, split)
    listings = [_list(s) for s in split_locs]
    listing = listings[split_locs.index(loc)]
    names = list(classes) if classes is not None else (
        report.classes if report is not None else _classes(listings, split is not None))
    unknown = [c for c in listing.files if listing.files[c] and c not in names]
    if classes is not None and unknown:
        raise ValueError(_unknown_classes(loc.display, unknown, names, classes_of))
    skip = {src for src, _ in report.skipped} if report is not None else set()
    index = {c: i for i, c in enumerate(names)}
    samples = [(src, index[c]) for c, files in listing.files.items() if c in index
               for src, size in files if size > 0 and loc.name(src) not in skip]
    if not samples:
        _raise_no_images(loc, listing)
    return ImageFolderData(samples, names, root=loc.display, archive=loc.archive, split=split, transform=transform)


def _unknown_classes(folder: str, unknown: list[str], known: list[str], of: str) -> str:
    shown = ", ".join(known[:20]) + (f", … ({len(known)} in all)" if len(known) > 20 else "")
    if len(unknown) == 1:
        return (f"{folder} has the class folder {unknown[0]!r}, which is not among the classes of {of} ({shown}); "
                "remove it, or score it with a model that knows that class.")
    return (f"{folder} has the class folders {', '.join(map(repr, unknown))}, which are not among the classes of "
            f"{of} ({shown}); remove them, or score them with a model that knows those classes.")


def dataset_splits(path: str | os.PathLike) -> list[str]:
    """The splits ("train", "test", "val") of a dataset folder or zip; [] for a plain class folder.
    Raises ValueError naming the path when it is missing or neither a folder nor a zip."""
    return _layout(path)[0]


def _raise_no_images(loc: _Location, listing: _Listing):
    if not listing.files:
        hint = " (its images are not in class sub-folders)" if listing.loose else ""
        raise ValueError(f"{loc.display} has no class sub-folders{hint}; put each class's images in its own "
                         f"folder, e.g. {loc.display.rstrip('/')}/cat/1.jpg.")
    raise ValueError(f"{loc.display} has no images in its class folders ({', '.join(listing.files)}); "
                     f"image files end in {', '.join(IMG_EXTENSIONS)}.")


# -- checking a folder --------------------------------------------------------------------------
@dataclass
class FolderReport:
    """What `check_folder` found. `classes` is the label order a dataset opened with this report
    uses; `counts` holds the readable images per class folder."""

    path: str
    split: str | None
    classes: list[str]
    counts: dict[str, int]
    skipped: list[tuple[str, str]]  # (file, reason: "zero bytes", "not an image", "corrupt", "unreadable")
    converted: list[tuple[str, str]]  # (file, original mode) of readable images that are not 8-bit RGB
    empty_classes: list[str]  # class folders without a single readable image
    ignored: list[str] = field(default_factory=list)  # files without an image extension
    loose: int = 0  # images directly in the root, outside any class folder

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def raise_if_unusable(self) -> None:
        """Raise ValueError (one sentence naming the path) when this data cannot train a classifier."""
        if not self.counts:
            extra = f" ({self.loose} images sit directly in it)" if self.loose else ""
            raise ValueError(f"{self.path} has no class sub-folders{extra}; put each class's images in its own "
                             "folder, e.g. cat/1.jpg and dog/2.jpg.")
        if self.total == 0 and self.skipped:
            raise ValueError(f"{self.path} has no readable images: all {len(self.skipped)} image files were "
                             "skipped (see the report).")
        if self.total == 0:
            raise ValueError(f"{self.path} has no images in its class folders; image files end in "
                             f"{', '.join(IMG_EXTENSIONS)}.")
        usable = [c for c, n in self.counts.items() if n > 0]
        if len(usable) < 2:
            raise ValueError(f"{self.path} has images of only one class ({usable[0]!r}); a classifier needs at "
                             "least two class folders with images.")

    def summary(self) -> list[str]:
        """Human-readable lines: totals, per class counts, then every problem found."""
        lines = [f"{self.path}: {self.total} images in {len(self.counts)} class folders"
                 + (f" (split {self.split})" if self.split else "")]
        lines += [f"  {c}: {n}" for c, n in self.counts.items()]
        if self.empty_classes:
            lines.append(f"empty classes (no readable image): {', '.join(self.empty_classes)}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} files:")
            lines += [f"  {src}: {why}" for src, why in self.skipped]
        if self.converted:
            modes = sorted({m for _, m in self.converted})
            lines.append(f"converted {len(self.converted)} images to RGB (modes {', '.join(modes)})")
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} files that are not images by extension")
        if self.loose:
            lines.append(f"ignored {self.loose} images outside class folders")
        return lines


def _reason(err: BaseException) -> str:
    if isinstance(err, ImageError):
        return err.reason
    if isinstance(err, OSError):  # a zip member that cannot be read
        return "unreadable"
    return "corrupt"


def check_folder(path: str | os.PathLike, split: str | None = None, *, progress: ProgressFn | None = None,
                 cancel: CancelFlag | None = None) -> FolderReport:
    """Open every image of a folder or zip once and report what is usable.

    Bad files are reported, never raised; call `.raise_if_unusable()` to refuse unusable data.
    Raises ValueError only when the path itself is missing or not a folder/zip; Cancelled if asked.
    """
    loc, split_locs = _locate(path, split)
    listings = [_list(s) for s in split_locs]
    listing = listings[split_locs.index(loc)]
    counts: dict[str, int] = {}
    skipped, converted = [], []
    with _ImageChecker(loc, sum(len(f) for f in listing.files.values()), progress, cancel) as checker:
        for cls, files in listing.files.items():
            counts[cls] = sum(checker.check(src, size, skipped, converted) for src, size in files)
    skipped += listing.problems
    if split is None:
        classes = [c for c, n in counts.items() if n > 0]
    else:
        classes = _classes(listings, True)
    return FolderReport(loc.display, split, classes, counts, skipped, converted,
                        [c for c, n in counts.items() if n == 0], listing.ignored, listing.loose)


class _ImageChecker:
    """Opens each image of a folder or zip once (reduced-size JPEG decode), for the checks; reports
    progress every 256 files and closes the archive handle when done."""

    def __init__(self, loc: _Location, total: int, progress: ProgressFn | None, cancel: CancelFlag | None):
        self.loc, self.total, self.progress, self.cancel, self.done = loc, total, progress, cancel, 0
        self.fp = open(loc.archive, "rb") if loc.archive else None  # noqa: SIM115 - closed in __exit__
        self.members = _zip_members(loc.archive) if loc.archive else {}

    def __enter__(self) -> "_ImageChecker":
        report(self.progress, self.cancel, "checking images", 0, self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self.fp is not None:
            self.fp.close()

    def check(self, src: str, size: int, skipped: list, converted: list) -> bool:
        """True when `src` is a readable image; else (file, reason) goes to `skipped`."""
        name, ok = self.loc.name(src), False
        if size == 0:
            skipped.append((name, "zero bytes"))
        else:
            try:
                data = _read_member(self.fp, _entry(self.members[src]), self.loc.archive, src) if self.fp else src
                _, mode = images.open_image(data, name=name, draft=64)
                ok = True
                if mode != "RGB":
                    converted.append((name, mode))
            except Exception as err:  # noqa: BLE001 - classified and reported
                skipped.append((name, _reason(err)))
        self.done += 1
        if self.done % 256 == 0 or self.done == self.total:
            report(self.progress, self.cancel, "checking images", self.done, self.total)
        return ok


# -- unlabelled images --------------------------------------------------------------------------
UNLABELLED = -1  # the label an unlabelled dataset yields


@dataclass
class UnlabelledReport:
    """What `check_unlabelled` found: readable images anywhere under the path, and the bad files."""

    path: str
    split: str | None
    count: int
    skipped: list[tuple[str, str]]  # (file, reason), as FolderReport.skipped
    converted: list[tuple[str, str]]
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        """Human-readable lines, as FolderReport.summary: the count, then every problem found (files
        named relative to the path, which the first line gives)."""
        def files(n: int) -> str:
            return f"{n} file" if n == 1 else f"{n} files"

        lines = [f"{self.path}: {self.count} readable images (sub-folders included; their names are not used)"]
        if self.skipped:
            lines.append(f"skipped {files(len(self.skipped))}:")
            lines += [f"  {_relative(src, self.path)}: {why}" for src, why in self.skipped]
        if self.converted:
            lines.append(f"converted {len(self.converted)} images to RGB")
        if self.ignored:
            lines.append(f"ignored {files(len(self.ignored))} that are not images by extension")
        return lines

    def raise_if_unusable(self, minimum: int = 2) -> None:
        if self.count < minimum:
            why = f" (all {len(self.skipped)} image files were skipped)" if self.skipped else ""
            raise ValueError(f"{self.path} has {self.count} readable images{why}; distilling exits needs at least "
                             f"{minimum}, in any sub-folders, ending in {', '.join(IMG_EXTENSIONS)}.")


def _relative(src: str, root: str) -> str:
    """`src` inside `root`, shorter; as it is when elsewhere (another drive, an archive member)."""
    try:
        return os.path.relpath(src, root) if Path(src).is_relative_to(root) else src
    except ValueError:  # another drive (Windows)
        return src


def _all_images(loc: _Location, ignored: list[str], problems: list | None = None) -> list[tuple[str, int]]:
    """Every image file under `loc`, sub-folders included, in a stable order; what the walk left
    out goes to `problems` as (path, reason)."""
    if loc.archive is None:
        walker = TreeWalker(loc.root)
        found = _images_of(walker.files(), ignored)
        if problems is not None:
            problems += _reportable(walker.problems)
        return found
    found = []
    for info in _zip_members(loc.archive).values():
        rest = info.filename[len(loc.root):]
        if info.is_dir() or not info.filename.startswith(loc.root) or any(_hidden(p) for p in rest.split("/")):
            continue
        if _is_image_name(rest):
            found.append((info.filename, info.file_size))
        else:
            ignored.append(info.filename)
    return sorted(found)


def check_unlabelled(path: str | os.PathLike, split: str | None = None, *, progress: ProgressFn | None = None,
                     cancel: CancelFlag | None = None) -> UnlabelledReport:
    """Open every image under a folder or zip (any layout; class folders are ignored) once and
    report what is readable. Bad files are reported, never raised. Raises ValueError for a
    missing path or a split layout without `split`; Cancelled if asked."""
    loc, _ = _locate(path, split)
    ignored: list[str] = []
    problems: list[tuple[str, str]] = []
    files = _all_images(loc, ignored, problems)
    skipped, converted = [], []
    with _ImageChecker(loc, len(files), progress, cancel) as checker:
        count = sum(checker.check(src, size, skipped, converted) for src, size in files)
    skipped += problems
    return UnlabelledReport(loc.display, split, count, skipped, converted, ignored)


def open_unlabelled(path: str | os.PathLike, split: str | None = None, *, report: UnlabelledReport | None = None,
                    transform: Callable | None = None) -> ImageFolderData:
    """Every image under a folder or zip as a dataset whose items are (image, UNLABELLED); photos or
    webcam captures in any sub-folders. `report` (from `check_unlabelled`) leaves out its bad files.
    Raises ValueError naming the path when it holds no images."""
    loc, _ = _locate(path, split)
    skip = {src for src, _ in report.skipped} if report is not None else set()
    samples = [(src, UNLABELLED) for src, size in _all_images(loc, []) if size > 0 and loc.name(src) not in skip]
    if not samples:
        raise ValueError(f"{loc.display} has no images; image files end in {', '.join(IMG_EXTENSIONS)}.")
    return ImageFolderData(samples, [], root=loc.display, archive=loc.archive, split=split, transform=transform)



def unlabelled_parts(path: str | os.PathLike, split: str | None = None, *, val_fraction: float,
                     report: UnlabelledReport | None = None,
                     transform: Callable | None = None) -> tuple[ImageFolderData, list[int], list[int]]:
    """`open_unlabelled` and its (train indices, held-out indices), seed 0.

    Where the images are laid out by class (class folders, or the train split of a train/test
    layout), the held-out part is the one the labelled commands hold out (`split_indices` of the
    class labels), so that distilled exits, the backbone, the DyCE search and the policies all keep
    the same images out; the labels choose that part and are never used otherwise. Elsewhere the
    split is `split_indices(n)`. Raises ValueError naming the path when it holds no images."""
    try:
        labelled = open_dataset(path, split)
    except ValueError:
        labelled = None
    if labelled is None or len(labelled.classes) < 2:
        images = open_unlabelled(path, split, report=report, transform=transform)
        return (images, *split_indices(len(images), val_fraction=val_fraction, seed=0))
    skip = {src for src, _ in report.skipped} if report is not None else set()
    kept = [(src, y) for src, y in labelled.samples if labelled._name(src) not in skip]
    if not kept:
        raise ValueError(f"{labelled.root} has no readable images; image files end in {', '.join(IMG_EXTENSIONS)}.")
    images = ImageFolderData([(src, UNLABELLED) for src, _ in kept], [], root=labelled.root,
                             archive=labelled.archive, split=split, transform=transform)
    return (images, *split_indices([y for _, y in kept], val_fraction=val_fraction, seed=0))


# -- splits, transforms, loaders ----------------------------------------------------------------
def split_indices(targets: int | Sequence[int] | torch.Tensor, val_fraction: float = 0.1,
                  seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic stratified split: (train indices, validation indices), each sorted.

    `targets` are the labels (or a count n for unlabelled data). Every class with at least two
    samples gives round(n_c * val_fraction) of them — at least one — to validation.
    Raises ValueError when val_fraction is outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = torch.zeros(targets, dtype=torch.long) if isinstance(targets, int) else torch.as_tensor(targets)
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)].tolist()
        k = 0 if val_fraction == 0 or len(idx) < 2 else max(1, round(len(idx) * val_fraction))
        val += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(val)


def preset_transform(preset: InputPreset, train: bool = False) -> Callable:
    """PIL image -> normalised (3, crop, crop) tensor, as the backbone's preset says.

    Evaluation: resize the shorter side, centre crop. Training adds augmentation: for small
    (CIFAR-sized) presets a padded random crop and a flip, otherwise a random resized crop and a flip.
    """
    tail = [T.ToTensor(), T.Normalize(preset.mean, preset.std)]
    if not train:
        return T.Compose([T.Resize(preset.resize), T.CenterCrop(preset.crop), *tail])
    if preset.crop <= 64:
        return T.Compose([T.Resize(preset.resize), T.RandomCrop(preset.crop, padding=preset.crop // 8),
                          T.RandomHorizontalFlip(), *tail])
    return T.Compose([T.RandomResizedCrop(preset.crop), T.RandomHorizontalFlip(), *tail])


def default_workers(dataset_size: int) -> int:
    """Loader worker processes for this machine: none on ≤ 2 cores or small data, where a
    worker's start-up and its competition with the model's own threads cost more than decoding."""
    cores = os.cpu_count() or 1
    if cores <= 2 or dataset_size < 2048:
        return 0
    return min(cores // 2, 8)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, workers: int | None = None,
                seed: int = 0) -> DataLoader:
    """A DataLoader with sensible workers (`default_workers`) and a seeded shuffle."""
    workers = default_workers(len(dataset)) if workers is None else workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None)

"""Labelled and unlabelled image datasets read where they lie (a folder or a zip, never
extracted), and the loaders that batch them. Items are (transform(image), label); images are
decoded by `engine.images`, made into tensors by `engine.preprocess`, split by `engine.splits`.

Layouts the openers understand:
  folder/<class>/**/<image>                 a plain labelled folder (split=None)
  folder/{train,test}/<class>/**/<image>    an extracted split layout (split="train" or "test")
  archive.zip with either layout inside     read directly from the zip, never extracted
"""
from __future__ import annotations

import multiprocessing

import os
import threading
import warnings
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..images import IMAGE_EXTENSIONS, load_image
from .checks import FolderReport, UnlabelledReport, failure_reason
from .layout import Listing, Location, all_images, check_class_folders, class_names, list_classes, locate
from .zips import read_member, zip_entry, zip_members

SKIPPED = -100  # the label of an item whose own file could not be read (see ImageFolderData)
UNLABELLED = -1  # the label an unlabelled dataset yields


# -- labelled images ----------------------------------------------------------------------------
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
            members = zip_members(archive)
            self._entries = {src: zip_entry(members[src]) for src, _ in self.samples}

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
                self.bad[src] = failure_reason(err)
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
        return read_member(fp, self._entries[member], self.archive, member)

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
                 report: FolderReport | None = None, transform: Callable | None = None,
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
    loc, split_locs = locate(path, split)
    listings = [list_classes(s) for s in split_locs]
    listing = listings[split_locs.index(loc)]
    names = list(classes) if classes is not None else (
        report.classes if report is not None else class_names(listings, split is not None))
    check_class_folders(loc.display, [c for c in listing.files if listing.files[c]])
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


def _raise_no_images(loc: Location, listing: Listing):
    """Raise ValueError saying why `loc` gave no samples: no class folders, or no images in them."""
    if not listing.files:
        hint = " (its images are not in class sub-folders)" if listing.loose else ""
        raise ValueError(f"{loc.display} has no class sub-folders{hint}; put each class's images in its own "
                         f"folder, e.g. {loc.display.rstrip('/')}/cat/1.jpg.")
    raise ValueError(f"{loc.display} has no images in its class folders ({', '.join(listing.files)}); "
                     f"image files end in {', '.join(IMAGE_EXTENSIONS)}.")


# -- unlabelled images --------------------------------------------------------------------------
def open_unlabelled(path: str | os.PathLike, split: str | None = None, *, report: UnlabelledReport | None = None,
                    transform: Callable | None = None) -> ImageFolderData:
    """Every image under a folder or zip as a dataset whose items are (image, UNLABELLED); photos or
    webcam captures in any sub-folders. `report` (from `check_unlabelled`) leaves out its bad files.
    Raises ValueError naming the path when it holds no images."""
    loc, _ = locate(path, split)
    skip = {src for src, _ in report.skipped} if report is not None else set()
    samples = [(src, UNLABELLED) for src, size in all_images(loc, []) if size > 0 and loc.name(src) not in skip]
    if not samples:
        raise ValueError(f"{loc.display} has no images; image files end in {', '.join(IMAGE_EXTENSIONS)}.")
    return ImageFolderData(samples, [], root=loc.display, archive=loc.archive, split=split, transform=transform)


# -- loaders ------------------------------------------------------------------------------------
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
    # workers start from a clean process, not a fork of this one: a fork inherits the locks of every
    # thread pool running here (OpenCV's, OpenMP's, the app's threads) and can wait on them forever
    context = "forkserver" if workers and "forkserver" in multiprocessing.get_all_start_methods() else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      multiprocessing_context=context,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None)

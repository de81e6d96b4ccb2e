"""Checks that open every image of a folder or zip once and report what is usable — readable
images per class, files skipped and why, images converted to RGB — instead of crashing on the
first bad file: `check_folder` for labelled class folders, `check_unlabelled` for images in any
sub-folders. A report can then refuse unusable data in one sentence (`raise_if_unusable`) and
tells the dataset openers (`engine.data.folders`) which files to leave out."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import images
from ..images import IMAGE_EXTENSIONS, ImageError
from ..progress import CancelFlag, ProgressFn, report
from .layout import Location, all_images, check_class_folders, class_names, list_classes, locate
from .zips import read_member, zip_entry, zip_members


# -- checking a folder --------------------------------------------------------------------------
def held_out_count(n: int, val_fraction: float) -> int:
    """How many of a class's `n` images a split holds out (`engine.splits.split_indices`): none from
    a class of fewer than 2, else round(n · val_fraction), at least one."""
    return 0 if val_fraction == 0 or n < 2 else max(1, round(n * val_fraction))


def split_problem(where: str, counts, val_fraction: float) -> str | None:
    """Why images of these per-class `counts` cannot be split into a part to train on and a part
    held out (one sentence naming `where`), else None."""
    total = sum(counts)
    held = sum(held_out_count(n, val_fraction) for n in counts)
    if held == 0:
        if val_fraction == 0:
            return (f"{where}: a validation fraction of 0 holds out no image to calibrate and check the exits on; "
                    "give a fraction above 0.")
        return (f"{where} has too few readable images ({total}) to hold any out for calibrating and checking the "
                "exits: a class gives one only from 2 images; add images.")
    if held == total:
        return (f"{where}: a validation fraction of {val_fraction:g} holds out all {total} readable images and leaves "
                "none to train on; add images or lower the validation fraction.")
    return None


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

    def raise_if_unusable(self, val_fraction: float | None = None) -> None:
        """Raise ValueError (one sentence naming the path) when this data cannot train a classifier;
        with `val_fraction`, also when that fraction held out would leave no image to train on or
        none to check on (`split_problem`)."""
        if not self.counts:
            extra = f" ({self.loose} images sit directly in it)" if self.loose else ""
            raise ValueError(f"{self.path} has no class sub-folders{extra}; put each class's images in its own "
                             "folder, e.g. cat/1.jpg and dog/2.jpg.")
        if self.total == 0 and self.skipped:
            raise ValueError(f"{self.path} has no readable images: all {len(self.skipped)} image files were "
                             "skipped (see the report).")
        if self.total == 0:
            raise ValueError(f"{self.path} has no images in its class folders; image files end in "
                             f"{', '.join(IMAGE_EXTENSIONS)}.")
        usable = [c for c, n in self.counts.items() if n > 0]
        if len(usable) < 2:
            raise ValueError(f"{self.path} has images of only one class ({usable[0]!r}); a classifier needs at "
                             "least two class folders with images.")
        problem = split_problem(self.path, list(self.counts.values()), val_fraction) if val_fraction is not None else None
        if problem:
            raise ValueError(problem)

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


def failure_reason(err: BaseException) -> str:
    """The short reason a file could not be read, for reports: ImageError's own, else "unreadable"
    (an OSError, e.g. a damaged zip member) or "corrupt"."""
    if isinstance(err, ImageError):
        return err.reason
    if isinstance(err, OSError):  # a zip member that cannot be read
        return "unreadable"
    return "corrupt"


def check_folder(path: str | os.PathLike, split: str | None = None, *, progress: ProgressFn | None = None,
                 cancel: CancelFlag | None = None) -> FolderReport:
    """Open every image of a folder or zip once and report what is usable.

    Bad files are reported, never raised; call `.raise_if_unusable()` to refuse unusable data.
    Raises ValueError only when the path itself is missing or not a folder/zip, or a class folder's
    name cannot be a class name (`check_class_folders`); Cancelled if asked.
    """
    loc, split_locs = locate(path, split)
    listings = [list_classes(s) for s in split_locs]
    listing = listings[split_locs.index(loc)]
    check_class_folders(loc.display, [c for c in listing.files if listing.files[c]])
    counts: dict[str, int] = {}
    skipped, converted = [], []
    with _ImageChecker(loc, sum(len(f) for f in listing.files.values()), progress, cancel) as checker:
        for cls, files in listing.files.items():
            counts[cls] = sum(checker.check(src, size, skipped, converted) for src, size in files)
    skipped += listing.problems
    if split is None:
        classes = [c for c, n in counts.items() if n > 0]
    else:
        classes = class_names(listings, True)
    return FolderReport(loc.display, split, classes, counts, skipped, converted,
                        [c for c, n in counts.items() if n == 0], listing.ignored, listing.loose)


class _ImageChecker:
    """Opens each image of a folder or zip once (reduced-size JPEG decode), for the checks; reports
    progress every 256 files and closes the archive handle when done."""

    def __init__(self, loc: Location, total: int, progress: ProgressFn | None, cancel: CancelFlag | None):
        self.loc, self.total, self.progress, self.cancel, self.done = loc, total, progress, cancel, 0
        self.fp = open(loc.archive, "rb") if loc.archive else None  # noqa: SIM115 - closed in __exit__
        self.members = zip_members(loc.archive) if loc.archive else {}

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
                data = read_member(self.fp, zip_entry(self.members[src]), self.loc.archive, src) if self.fp else src
                _, mode = images.open_image(data, name=name, draft=64)
                ok = True
                if mode != "RGB":
                    converted.append((name, mode))
            except Exception as err:  # noqa: BLE001 - classified and reported
                skipped.append((name, failure_reason(err)))
        self.done += 1
        if self.done % 256 == 0 or self.done == self.total:
            report(self.progress, self.cancel, "checking images", self.done, self.total)
        return ok


# -- unlabelled images --------------------------------------------------------------------------
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
                             f"{minimum}, in any sub-folders, ending in {', '.join(IMAGE_EXTENSIONS)}.")


def _relative(src: str, root: str) -> str:
    """`src` inside `root`, shorter; as it is when elsewhere (another drive, an archive member)."""
    try:
        return os.path.relpath(src, root) if Path(src).is_relative_to(root) else src
    except ValueError:  # another drive (Windows)
        return src


def check_unlabelled(path: str | os.PathLike, split: str | None = None, *, progress: ProgressFn | None = None,
                     cancel: CancelFlag | None = None) -> UnlabelledReport:
    """Open every image under a folder or zip (any layout; class folders are ignored) once and
    report what is readable. Bad files are reported, never raised. Raises ValueError for a
    missing path or a split layout without `split`; Cancelled if asked."""
    loc, _ = locate(path, split)
    ignored: list[str] = []
    problems: list[tuple[str, str]] = []
    files = all_images(loc, ignored, problems)
    skipped, converted = [], []
    with _ImageChecker(loc, len(files), progress, cancel) as checker:
        count = sum(checker.check(src, size, skipped, converted) for src, size in files)
    skipped += problems
    return UnlabelledReport(loc.display, split, count, skipped, converted, ignored)


"""Which images each step may see. Every split of a dataset is made here, deterministically (the
same data and seed put the same images in the same part), so that training, calibration and the
benchmark's test part never share an image whichever command made them.

Three disjoint parts of one labelled dataset (`open_splits`):
  train        what the exits (or the whole network) were trained on; the structure policy's prototypes
  calibration  held out of training: temperatures, thresholds, DyCE search, learned policies
  test         never used for training, search or fitting: every number `offramp bench` reports
For a train/test layout (the CIFAR-10 zip) calibration is the validation part `train-exits` and
`train-backbone` hold out (`split_indices(targets, val_fraction, seed=0)` of the train split) and
test is the test split. A plain class folder has no test split: its validation part is halved
into calibration and test. Unlabelled images (`unlabelled_parts`, `UnlabelledSplits`) are split
as their class folders would be when they have them, else by count.

The building block is `split_indices`: a stratified, seeded (train, held-out) split of labels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Subset

from .backbones import InputPreset
from .data.checks import FolderReport, UnlabelledReport, check_folder, held_out_count, split_problem
from .data.folders import UNLABELLED, ImageFolderData, open_dataset, open_unlabelled
from .data.layout import dataset_splits
from .images import IMAGE_EXTENSIONS
from .preprocess import eval_transform

DEFAULT_VAL_FRACTION = 0.1  # what train-exits and train-backbone hold out by default
_HALVING_SEED = 1  # a folder's validation part -> calibration and test


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
        k = held_out_count(len(idx), val_fraction)
        val += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(val)


def usable_split(targets: int | Sequence[int], val_fraction: float, where: str) -> tuple[list[int], list[int]]:
    """`split_indices(targets, val_fraction, seed=0)`, refused in one sentence naming `where` when
    either part is empty: training then stops far later, with a message about an empty dataset
    that names neither the folder nor the cause."""
    train, held = split_indices(targets, val_fraction=val_fraction, seed=0)
    if not train or not held:
        counts = [targets] if isinstance(targets, int) else torch.bincount(torch.as_tensor(targets)).tolist()
        raise ValueError(split_problem(where, [n for n in counts if n], val_fraction)
                         or f"{where} cannot be split into images to train on and images held out")
    return train, held


def stratified_subset(subset: Subset, limit: int, seed: int = 0) -> Subset:
    """At most `limit` images of `subset`, every class in proportion (all of it when smaller)."""
    if len(subset) <= limit:
        return subset
    targets = [subset.dataset.targets[i] for i in subset.indices]
    _, pick = split_indices(targets, val_fraction=limit / len(targets), seed=seed)
    return Subset(subset.dataset, [subset.indices[i] for i in pick])


def spread_indices(n: int, limit: int) -> list[int]:
    """At most `limit` of the indices 0..n-1, evenly spaced from 0 (no labels to stratify by)."""
    return list(range(0, n, max(1, n // limit)))[:limit]


def spread_subset(subset: Subset, limit: int) -> Subset:
    """At most `limit` images of `subset`, evenly spaced over it (`spread_indices`)."""
    return Subset(subset.dataset, [subset.indices[i] for i in spread_indices(len(subset), limit)])


# -- labelled data: train, calibration, test --------------------------------------------------------
@dataclass
class Splits:
    """Disjoint parts of one labelled dataset, each a Subset of an image dataset with the preset's
    transform. `validation` is everything held out of training (for a folder: calibration + test)."""

    train: Subset
    validation: Subset
    calibration: Subset
    test: Subset
    classes: list[str]
    layout: str  # "split" (train and test trees) or "folder"
    val_fraction: float

    def describe(self) -> dict:
        """Sizes and sources of each part, and how many images calibration and test share (0)."""
        held = ("the test split" if self.layout == "split" else
                f"half of the validation part ({self.val_fraction:g} of the folder, seed {_HALVING_SEED})")
        cal = (f"validation part of the train split (val_fraction {self.val_fraction:g}, seed 0)"
               if self.layout == "split" else "the other half of that validation part")
        return {"layout": self.layout, "val_fraction": self.val_fraction, "train": len(self.train),
                "calibration": len(self.calibration), "test": len(self.test), "calibration_source": cal,
                "test_source": held, "overlap": len(_sources(self.calibration) & _sources(self.test)),
                "train_test_overlap": len(_sources(self.train) & _sources(self.test))}


def _sources(subset: Subset) -> set[str]:
    """The files (or zip members) of a Subset: what makes two images the same image."""
    ds = subset.dataset
    return {f"{ds.archive or ''}:{ds.samples[i][0]}" for i in subset.indices}


def open_splits(data: str | Path, preset: InputPreset, *, val_fraction: float = DEFAULT_VAL_FRACTION,
                classes: Sequence[str] | None = None, on_skipped: Callable[[str, str], None] | None = None,
                on_warning: Callable[[str], None] | None = None) -> Splits:
    """The train, calibration and test parts of `data`: the train/test layout (the CIFAR-10 zip or
    folder) or a plain class folder, checked first (bad files go to `on_skipped(path, reason)` and
    are left out; class folders without a readable image, which the classes leave out, go to
    `on_warning(message)`). Train and validation are `split_indices(targets, val_fraction, seed=0)`
    of the train split, exactly as `train-exits` and `train-backbone` split it.

    `classes` (an existing model's class names) labels every image by its class folder's name:
    label i is the model's class i, whatever other classes the folder lacks.

    Raises ValueError naming `data` when it is unusable, holds a single class, or has a class
    folder that is not among `classes`."""
    if "train" in dataset_splits(data):
        ds, layout = open_dataset(data, split="train", classes=classes), "split"
    else:
        check = check_folder(data)
        for path, reason in check.skipped:
            if on_skipped is not None:
                on_skipped(path, reason)
        check.raise_if_unusable(val_fraction)
        for cls in check.empty_classes:
            if on_warning is not None:
                what = "it is not scored" if classes is not None else "the model will not have this class"
                on_warning(f"class folder {Path(check.path) / cls} has no readable image; {what}")
        ds, layout = open_dataset(data, report=check, classes=classes), "folder"
    if len(set(ds.targets)) < 2:
        raise ValueError(f"{data} has a single class; exits need at least two classes to tell apart")
    ds.transform = eval_transform(preset)
    tr, va = usable_split(ds.targets, val_fraction, str(data))
    train, validation = Subset(ds, tr), Subset(ds, va)
    if layout == "split":
        try:
            test = open_dataset(data, split="test", classes=ds.classes, transform=eval_transform(preset),
                                classes_of="the model" if classes is not None else f"{data}'s train split")
            return Splits(train, validation, validation, Subset(test, list(range(len(test)))), list(ds.classes),
                          layout, val_fraction)
        except ValueError:
            if "test" in dataset_splits(data):  # a test split that cannot be used: say why
                raise
            layout = "folder"  # a train split without a test split: hold out part of validation instead
    cal, test = split_indices([ds.targets[i] for i in va], val_fraction=0.5, seed=_HALVING_SEED)
    return Splits(train, validation, Subset(ds, [va[i] for i in cal]), Subset(ds, [va[i] for i in test]),
                  list(ds.classes), layout, val_fraction)


def recorded_val_fraction(meta: dict, given: float | None = None) -> float:
    """The validation fraction to split a bundle's data by: `given`, else the one the bundle was
    trained with (`meta["split"]`), else DEFAULT_VAL_FRACTION (train-exits' default)."""
    if given is not None:
        return given
    return float((meta.get("split") or {}).get("val_fraction", DEFAULT_VAL_FRACTION))


def split_or_whole(path: str | os.PathLike, split: str) -> str | None:
    """`split` where `path` is in the train/test layout (never mix the splits), else None (all of it)."""
    try:
        open_dataset(path, split=split)
        return split
    except ValueError:
        return None


def open_labelled_part(data: str | os.PathLike, split: str, *, classes: Sequence[str],
                       on_skipped: Callable[[str, str], None] | None = None) -> tuple[ImageFolderData, FolderReport]:
    """(dataset, FolderReport) of `data` labelled by `classes` (a model's class names: label i is
    class i, whatever classes the folder lacks): `split` of a train/test layout, else all of a
    plain class folder. Checked first: unreadable files go to `on_skipped(path, reason)` and are
    left out, so every sample is one real image. Raises ValueError for a split the layout lacks, a
    class folder not among `classes`, or no readable images."""
    splits = dataset_splits(data)
    if split not in splits:
        if "train" in splits:
            raise ValueError(f"{data} has no {split!r} split (it has {', '.join(splits)}); give --split with one of them")
        split = None
    open_dataset(data, split, classes=classes)  # a class the model lacks is refused before any decoding
    check = check_folder(data, split)
    for path, reason in check.skipped:
        if on_skipped is not None:
            on_skipped(path, reason)
    if check.total == 0:
        raise ValueError(f"{check.path} has no readable images in its class folders"
                         + (f" (all {len(check.skipped)} were skipped)" if check.skipped else "")
                         + "; give a folder with one sub-folder of images per class")
    return open_dataset(data, split, classes=classes, report=check), check


# -- unlabelled data ---------------------------------------------------------------------------------
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
        return (images, *usable_split(len(images), val_fraction, str(path)))
    skip = {src for src, _ in report.skipped} if report is not None else set()
    kept = [(src, y) for src, y in labelled.samples if labelled._name(src) not in skip]
    if not kept:
        raise ValueError(f"{labelled.root} has no readable images; image files end in {', '.join(IMAGE_EXTENSIONS)}.")
    images = ImageFolderData([(src, UNLABELLED) for src, _ in kept], [], root=labelled.root,
                             archive=labelled.archive, split=split, transform=transform)
    return (images, *usable_split([y for _, y in kept], val_fraction, str(path)))


class UnlabelledSplits:
    """train-exits --unlabelled's parts of an unlabelled folder: the images the exits learnt from
    (train) and the held-out rest (calibration), split as `distil_exits` splits them."""

    def __init__(self, images, parts: tuple[list[int], list[int]], val_fraction: float, path: str):
        tr, va = parts
        self.train, self.calibration = Subset(images, tr), Subset(images, va)
        self.val_fraction, self.path = val_fraction, path

    @classmethod
    def open(cls, path: str, split: str | None, preset: InputPreset, *, val_fraction: float,
             report: UnlabelledReport | None = None) -> "UnlabelledSplits":
        """The parts of the images under `path` (`unlabelled_parts`) through `preset`'s transform.
        Raises ValueError naming the path when it holds no images."""
        images, tr, va = unlabelled_parts(path, split, val_fraction=val_fraction, report=report,
                                          transform=eval_transform(preset))
        return cls(images, (tr, va), val_fraction, path)

    def describe(self) -> dict:
        """Sizes and sources of the parts, as `Splits.describe` (no test part)."""
        return {"layout": "unlabelled", "val_fraction": self.val_fraction, "train": len(self.train),
                "calibration": len(self.calibration), "test": 0, "labels": "the last exit's predictions",
                "calibration_source": f"held out of {self.path} (val_fraction {self.val_fraction:g}, seed 0)"}

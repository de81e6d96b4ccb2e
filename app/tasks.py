"""Engine work that the panels run in a TaskWorker, each taking `progress` and `cancel` as the
worker passes them. The engine is imported inside each function, so that a first import of
PyTorch (seconds) happens in the worker's thread, never in the GUI thread."""
from __future__ import annotations

from typing import Any


def check_folder(folder: str, *, progress=None, cancel=None) -> Any:
    """engine.data.checks.check_folder: the FolderReport of a folder of labelled images."""
    from engine.data.checks import check_folder as check
    return check(folder, progress=progress, cancel=cancel)


def retrain(bundle: Any, folder: str, epochs: int, *, progress=None, cancel=None) -> tuple[Any, dict]:
    """engine.train.retrain.retrain_on_folder: (new bundle, report); `bundle` is left untouched."""
    from engine.train.retrain import retrain_on_folder
    return retrain_on_folder(bundle, folder, epochs=epochs, progress=progress, cancel=cancel)


def distil(bundle: Any, folder: str, epochs: int, *, progress=None, cancel=None) -> tuple[Any, dict]:
    """engine.train.retrain.distil_on_folder: (new bundle, report); `bundle` is left untouched."""
    from engine.train.retrain import distil_on_folder
    return distil_on_folder(bundle, folder, epochs=epochs, progress=progress, cancel=cancel)


def check_unlabelled(folder: str, *, progress=None, cancel=None) -> Any:
    """engine.data.checks.check_unlabelled: the UnlabelledReport of a folder of images without labels."""
    from engine.data.checks import check_unlabelled as check
    return check(folder, progress=progress, cancel=cancel)


def save(bundle: Any, path: str, *, progress=None, cancel=None) -> Any:
    """engine.bundle.save_bundle (atomic): the path written."""
    from engine.bundle import save_bundle
    return save_bundle(bundle, path)


# -- one progress bar for a task of several stages -------------------------------------------------------
# Rough costs, in "decoding and running the backbone on one image": what the time left is estimated from
# until the elapsed time of the stages done says better.
CHECK_COST, TRAIN_COST, EVAL_COST = 0.3, 0.05, 0.1


def training_phases(images: int, epochs: int, *, val_fraction: float, checks_images: bool,
                    old_curve: bool) -> list[tuple[str, float]]:
    """The stages (engine.progress stage names, in order) a retraining or distillation reports, each
    with its expected share of the work: the check, caching the held-out and the training images'
    features, training, evaluating, and caching the current exits' features for their curve."""
    n = max(1, images)
    val, train = max(1.0, n * val_fraction), max(1.0, n * (1 - val_fraction))
    phases = [("checking images", CHECK_COST * n) if checks_images else ("checking folder", 1.0),
              ("caching features", val), ("caching features", train),
              ("training exits", TRAIN_COST * epochs * train), ("evaluating", EVAL_COST * val + 1.0)]
    return phases + ([("caching features", val)] if old_curve else [])


class OverallProgress:
    """The fraction of a whole task done and the time left, from the progress of its stages.

    `phases`: (stage name, weight) in the order the task reports them; a stage name met again after
    its phase finished (e.g. "caching features" for a second data set) moves on to the next phase
    of that name. Unknown stages leave the position where it is."""

    def __init__(self, phases: list[tuple[str, float]], start: float):
        self.phases = phases
        self.total = sum(w for _, w in phases) or 1.0
        self.start = start
        self.index = -1  # the phase under way
        self._done = -1  # its last `done`, to see it start again

    def update(self, p, now: float) -> tuple[float, float | None]:
        """(fraction of the whole task done, seconds left or None while too early to say) after the
        engine.progress.Progress `p`."""
        current = self.phases[self.index][0] if self.index >= 0 else None
        if p.stage != current or p.done < self._done:
            following = [i for i in range(self.index + 1, len(self.phases)) if self.phases[i][0] == p.stage]
            if following:
                self.index = following[0]
        self._done = p.done
        if self.index < 0:
            return 0.0, None
        before = sum(w for _, w in self.phases[: self.index])
        fraction = min(1.0, (before + self.phases[self.index][1] * min(1.0, p.fraction)) / self.total)
        elapsed = now - self.start
        if fraction < 0.02 or elapsed < 1.0:
            return fraction, None
        return fraction, elapsed * (1 - fraction) / fraction

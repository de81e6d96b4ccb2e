"""Engine work that the panels run in a TaskWorker, each taking `progress` and `cancel` as the
worker passes them. The engine is imported inside each function, so that a first import of
PyTorch (seconds) happens in the worker's thread, never in the GUI thread."""
from __future__ import annotations

from typing import Any


def check_folder(folder: str, *, progress=None, cancel=None) -> Any:
    """engine.data.check_folder: the FolderReport of a folder of labelled images."""
    from engine.data import check_folder as check
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
    """engine.data.check_unlabelled: the UnlabelledReport of a folder of images without labels."""
    from engine.data import check_unlabelled as check
    return check(folder, progress=progress, cancel=cancel)


def save(bundle: Any, path: str, *, progress=None, cancel=None) -> Any:
    """engine.bundle.save_bundle (atomic): the path written."""
    from engine.bundle import save_bundle
    return save_bundle(bundle, path)

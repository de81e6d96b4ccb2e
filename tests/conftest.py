"""Shared fixtures: a generated labelled folder and a tiny multi-exit model on its classes."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a few cores shared with other work, spinning
# threads make tiny tensor operations many times slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # Qt tests never need a screen

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # lets tests `from synth import make_image_folder`

from synth import SYNTH_CLASSES, build_tiny_model, make_image_folder  # noqa: E402

from engine.model import MultiExitNet  # noqa: E402

__all__ = ["SYNTH_CLASSES", "build_tiny_model", "make_image_folder"]


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory) -> Path:
    """A class folder of 4 colour classes × 30 images (32×32, PNG and JPEG), made once per session.
    Read-only for tests: copy it before changing it."""
    return make_image_folder(tmp_path_factory.mktemp("synthetic"), SYNTH_CLASSES, per_class=30, seed=0)


@pytest.fixture
def tiny_model() -> MultiExitNet:
    """`build_tiny_model()`: a fresh 3-exit model on SYNTH_CLASSES for each test."""
    return build_tiny_model()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: on a shared 2-core machine more
    threads only wait for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def restore_logging():
    """Take away the handlers `setup_logging` installs, and the root level, after the test."""
    import logging
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if getattr(h, "offramp", False)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)

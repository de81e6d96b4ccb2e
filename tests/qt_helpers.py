"""Helpers for the app tests: a tiny bundle with a Pareto front, written in a few hundred ms."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.backbones import build_backbone
from engine.bundle import Bundle, save_bundle
from engine.cost import measure_costs
from engine.model import MultiExitNet
from engine.policies import BolukbasiPolicy, ThresholdPolicy

TINY_CLASSES = ["red", "green", "blue"]


def tiny_bundle(*, front: bool = True, seed: int = 0) -> Bundle:
    """cifar_resnet_small (3 stages, random weights) with an exit after every stage and 3 classes.

    Its default policy thresholds every early exit at 0.9 (a random model is never that sure, so
    the last exit fires); "first exit" takes exit 0 always; "learned" is a (untrained) policy
    without thresholds; meta["front"] holds four threshold configurations, cheapest first.
    """
    torch.manual_seed(seed)
    backbone = build_backbone("cifar_resnet_small", num_classes=len(TINY_CLASSES))
    model = MultiExitNet.attach(backbone, class_names=TINY_CLASSES).eval()
    policy = ThresholdPolicy([0.9, 0.9, 0.9])
    cost = measure_costs(model, policy)
    meta: dict = {"name": "tiny test model"}
    if front:
        flops = cost.cumulative_flops()
        points = [([0.0, 0.0, 0.0], flops[0], 0.60), ([None, 0.0, 0.0], flops[1], 0.75),
                  ([0.5, 0.5, 0.5], (flops[1] + flops[2]) / 2, 0.80), ([None, None, 1.0], flops[2], 0.85)]
        meta["front"] = [{"policy": ThresholdPolicy(ts).to_json(), "accuracy": acc, "flops": f,
                          "saved": 1.0 - f / cost.full_flops} for ts, f, acc in points]
        meta["default_point"] = 2
    policies = {"threshold": policy, "first exit": ThresholdPolicy([0.0, 0.0, 0.0]),
                "learned": BolukbasiPolicy(model.num_exits, len(TINY_CLASSES))}  # untrained: any answer will do
    return Bundle(model=model, policies=policies, default_policy="threshold", cost=cost, meta=meta)


def write_tiny_bundle(path: str | Path, **kw) -> Path:
    return save_bundle(tiny_bundle(**kw), path)


# -- fixtures for the app tests (import them into a test module to use them) -----------------------
import threading  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402


def _leftover_threads(before: set[int]) -> list[str]:
    from app.workers import running_threads
    qt = [f"QThread {t.objectName() or '?'}" for t in running_threads()]
    py = [f"thread {t.name}" for t in threading.enumerate()
          if t.ident not in before and t.is_alive() and not isinstance(t, threading._DummyThread)]
    return qt + py


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves a QThread (started by the app) or a Python thread running."""
    before = {t.ident for t in threading.enumerate()}
    yield
    from PySide6.QtCore import QCoreApplication
    deadline = time.monotonic() + 5.0
    while _leftover_threads(before) and time.monotonic() < deadline:
        if QCoreApplication.instance() is not None:
            QCoreApplication.processEvents()
        time.sleep(0.01)
    leaked = _leftover_threads(before)
    assert not leaked, f"the test left threads running: {', '.join(leaked)}"


@pytest.fixture(scope="session")
def bundle_path(tmp_path_factory) -> Path:
    """A tiny bundle file with a front (see tiny_bundle)."""
    return write_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny.offramp")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A folder of 3 classes × 4 small images (one sub-folder per class)."""
    from synth import make_image_folder
    return make_image_folder(tmp_path_factory.mktemp("images"), TINY_CLASSES, per_class=4, size=24, seed=1)


def cancel_and_check_untouched(qtbot, panel, session, info, weights: dict, timeout: int) -> None:
    """Cancel the retraining panel's running task and check that nothing changed: the same model
    is loaded (`info`, taken before training) with every weight as in `weights`."""
    with qtbot.waitSignal(panel.task.cancelled, timeout=timeout):
        panel.cancel_button.click()
    qtbot.waitUntil(lambda: panel.task is None, timeout=timeout)
    assert "cancelled" in panel.stage_label.text() and panel.new_bundle is None
    assert session.info is info and not panel.use_button.isEnabled()
    assert all((v == weights[k]).all() for k, v in info.bundle.model.state_dict().items())


@pytest.fixture
def window(qtbot, tmp_path, bundle_path):
    """A shown MainWindow with a settings file of its own (tmp_path/settings.ini) and the tiny bundle
    loaded; closed and deleted through Qt at teardown (qtbot), not by Python's garbage collector."""
    from PySide6.QtCore import QSettings

    from app.main_window import MainWindow
    from app.session import Session
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    win = MainWindow(Session(device="cpu"), settings=settings)
    qtbot.addWidget(win)
    win.show()
    with qtbot.waitSignal(win.session.model_loaded, timeout=20000):
        win.session.load_bundle(str(bundle_path))
    return win

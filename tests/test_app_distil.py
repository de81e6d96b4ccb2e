"""The retraining panel's unlabelled mode: distil the early exits from the last exit on a folder of
images without labels: check, train, compare, use, cancel, bad folders, the mode remembered."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402
from PySide6.QtCore import QSettings  # noqa: E402

from app.main_window import MainWindow  # noqa: E402
from app.session import Session  # noqa: E402
from qt_helpers import TINY_CLASSES, bundle_path, cancel_and_check_untouched, no_leaked_threads  # noqa: E402,F401
from synth import make_image_folder  # noqa: E402

WAIT = 60000


def _window(qtbot, ini, bundle=None) -> MainWindow:
    win = MainWindow(Session(device="cpu"), settings=QSettings(str(ini), QSettings.Format.IniFormat))
    qtbot.addWidget(win)
    win.show()
    if bundle is not None:
        with qtbot.waitSignal(win.session.model_loaded, timeout=WAIT):
            win.session.load_bundle(str(bundle))
    return win


@pytest.fixture
def window(qtbot, tmp_path, bundle_path):
    return _window(qtbot, tmp_path / "s.ini", bundle_path)


@pytest.fixture
def frames(tmp_path):
    """17 readable images in nested sub-folders (named like classes, or not) plus a corrupt file."""
    root = tmp_path / "frames"
    make_image_folder(root / "monday" / "desk", ["mug", "pen"], per_class=6, size=24, seed=2)
    make_image_folder(root / "tuesday", ["anything"], per_class=5, size=24, seed=4)
    (root / "tuesday" / "anything" / "broken.jpg").write_bytes(b"garbage")
    return root


def _wait_idle(qtbot, panel):
    qtbot.waitUntil(lambda: panel.task is None and "checking" not in panel.report.toPlainText(), timeout=WAIT)


def test_distilling_on_unlabelled_images_then_use(qtbot, window, frames):
    panel, session = window.retrain_panel, window.session
    old = session.info.bundle
    last_exit = {k: v.clone() for k, v in old.model.exits[-1].state_dict().items()}
    weights = {k: v.clone() for k, v in old.model.state_dict().items()}
    panel.check(str(frames))  # labelled first: then the mode's switch checks the folder again
    _wait_idle(qtbot, panel)
    panel.mode_buttons["unlabelled"].click()
    _wait_idle(qtbot, panel)
    text = panel.report.toPlainText()
    assert panel.mode.key == "unlabelled" and panel.train_button.text() == "Distil early exits"
    assert "17 readable images" in text and "skipped 1 file:" in text and "broken.jpg: " in text
    assert "mug: " not in text and "Ready: 2 new early exits" in text and panel.train_button.isEnabled()
    panel.epochs.setValue(2)
    panel.train_button.click()
    assert panel.task.what == "distilling exits" and not panel.mode_buttons["labelled"].isEnabled()
    qtbot.waitUntil(lambda: panel.task is None, timeout=WAIT)
    assert panel.new_bundle is not None and panel.new_bundle.model.class_names == TINY_CLASSES
    result = panel.result_label.text()
    assert "Agreement of each exit with the last exit on 2 held-out images: E0 " in result
    assert "E2 100 %" in result and "Default point" in result and "Distilled on 15 of 17" in result
    assert "1 file skipped" in result
    assert panel.plot.getAxis("left").labelText == "agreement with the last exit %"
    names = [item.name() for item in panel.plot.getPlotItem().listDataItems()]
    assert names == ["current", "new", "new: full model 100.0 %"]  # same classes: both curves, and the last exit
    assert all((v == weights[k]).all() for k, v in old.model.state_dict().items())  # untouched
    with qtbot.waitSignal(session.model_loaded, timeout=WAIT):
        panel.use_button.click()
    new = session.info.bundle.model
    assert session.info.class_names == TINY_CLASSES and session.info.path == ""
    assert all((v == last_exit[k]).all() for k, v in new.exits[-1].state_dict().items())


def test_cancelled_distilling_leaves_the_model_untouched(qtbot, window, tmp_path):
    folder = make_image_folder(tmp_path / "many", ["a", "b", "c"], per_class=20, size=24, seed=5)
    panel, session = window.retrain_panel, window.session
    info = session.info
    weights = {k: v.clone() for k, v in info.bundle.model.state_dict().items()}
    panel.set_mode("unlabelled")
    panel.check(str(folder))
    _wait_idle(qtbot, panel)
    assert "60 readable images" in panel.report.toPlainText()
    panel.epochs.setValue(500)
    panel.train_button.click()
    cancel_and_check_untouched(qtbot, panel, session, info, weights, WAIT)


def test_a_folder_without_readable_images_is_reported(qtbot, window, tmp_path):
    bad = tmp_path / "no images"
    (bad / "cam").mkdir(parents=True)
    (bad / "cam" / "frame.jpg").write_bytes(b"garbage")
    (bad / "notes.txt").write_text("not an image")
    panel = window.retrain_panel
    panel.set_mode("unlabelled")
    with qtbot.waitSignal(window.session.error, timeout=WAIT) as blocker:
        panel.check(str(bad))
    _wait_idle(qtbot, panel)
    message = blocker.args[0]
    assert message.startswith(f"{bad} has 0 readable images") and message.endswith(".") and "\n" not in message
    assert "Cannot train on this folder" in panel.report.toPlainText() and not panel.train_button.isEnabled()
    assert str(bad) in window.banner.text


def test_the_mode_is_remembered_and_capture_retrains_labelled(qtbot, tmp_path, bundle_path):
    ini = tmp_path / "settings.ini"
    first = _window(qtbot, ini)
    first.retrain_panel.mode_buttons["unlabelled"].click()
    first.retrain_panel.epochs.setValue(7)
    first.close()
    second = _window(qtbot, ini, bundle_path)
    panel = second.retrain_panel
    assert panel.state() == {"mode": "unlabelled", "epochs": 7} and panel.mode_buttons["unlabelled"].isChecked()
    assert panel.plot.getAxis("left").labelText == "agreement with the last exit %"
    # the Capture panel builds one folder per class: its "Retrain on this folder" trains labelled
    folder = make_image_folder(tmp_path / "teacher", ["apple", "pear"], per_class=4, size=24, seed=3)
    second.capture_panel.set_folder(str(folder))
    second.capture_panel.retrain_button.click()
    qtbot.waitUntil(lambda: panel.task is not None and panel.task.what == "retraining"
                    or panel.new_bundle is not None, timeout=WAIT)
    assert panel.mode.key == "labelled" and "apple: 4" in panel.report.toPlainText()
    if panel.task is not None:
        panel.cancel_button.click()
    qtbot.waitUntil(lambda: panel.task is None, timeout=WAIT)
    second.close()

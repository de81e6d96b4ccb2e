"""The retraining panel: check a folder, train in a worker, cancel, compare, use, save."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402
from PySide6.QtCore import QSettings  # noqa: E402

from app.main_window import MainWindow  # noqa: E402
from app.session import Session  # noqa: E402
from qt_helpers import bundle_path, cancel_and_check_untouched, image_folder, no_leaked_threads  # noqa: E402,F401
from synth import make_image_folder  # noqa: E402

WAIT = 60000


@pytest.fixture
def window(qtbot, tmp_path, bundle_path):
    win = MainWindow(Session(device="cpu"), settings=QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(win)
    win.show()
    with qtbot.waitSignal(win.session.model_loaded, timeout=WAIT):
        win.session.load_bundle(str(bundle_path))
    return win


def _check(qtbot, panel, folder):
    panel.check(str(folder))
    qtbot.waitUntil(lambda: panel.task is None and "checking" not in panel.report.toPlainText(), timeout=WAIT)


def test_cancelled_retraining_leaves_the_model_untouched(qtbot, window, image_folder):
    panel, session = window.retrain_panel, window.session
    info = session.info
    weights = {k: v.clone() for k, v in info.bundle.model.state_dict().items()}
    _check(qtbot, panel, image_folder)
    assert "red: 4" in panel.report.toPlainText() and panel.train_button.isEnabled()
    panel.train_button.click()
    assert panel.cancel_button.isEnabled() and not panel.train_button.isEnabled()
    cancel_and_check_untouched(qtbot, panel, session, info, weights, WAIT)


def test_unusable_folder_is_reported_before_training(qtbot, window, tmp_path):
    one_class = make_image_folder(tmp_path / "one", ["cat"], per_class=3, size=16)
    (one_class / "cat" / "broken.jpg").write_bytes(b"garbage")
    with qtbot.waitSignal(window.session.error, timeout=WAIT):
        _check(qtbot, window.retrain_panel, one_class)
    text = window.retrain_panel.report.toPlainText()
    assert "only one class" in text and "broken.jpg: " in text and not window.retrain_panel.train_button.isEnabled()
    assert "only one class" in window.banner.text


def test_retraining_on_new_classes_then_use_and_save(qtbot, window, tmp_path):
    from engine.bundle import load_bundle
    folder = make_image_folder(tmp_path / "teacher", ["apple", "pear"], per_class=8, size=24, seed=3)
    panel = window.retrain_panel
    _check(qtbot, panel, folder)
    panel.epochs.setValue(2)
    panel.train_button.click()
    qtbot.waitUntil(lambda: panel.task is None, timeout=WAIT)
    assert panel.new_bundle is not None and panel.new_bundle.model.class_names == ["apple", "pear"]
    assert panel.progress.value() == 1000 and panel.use_button.isEnabled() and "done" in panel.stage_label.text()
    assert len(panel.plot.getPlotItem().listDataItems()) == 1  # other classes: only the new curve
    assert panel.plot.getAxis("left").labelText == "accuracy %" and panel.mode.key == "labelled"
    assert panel.result_label.text().startswith("Accuracy per exit on 4 held-out images: E0 ")
    with qtbot.waitSignal(window.session.model_loaded, timeout=WAIT):
        panel.use_button.click()
    assert window.session.info.class_names == ["apple", "pear"] and window.session.info.path == ""
    out = tmp_path / "teacher.offramp"
    panel.save_to(str(out))
    qtbot.waitUntil(lambda: out.exists() and panel.task is None, timeout=WAIT)
    assert load_bundle(out).class_names == ["apple", "pear"]

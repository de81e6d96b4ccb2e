"""Faults a GUI sweep found, each driven like a user would: a save that would replace a file unasked,
a training that fails or a check that leaves an older result offered, a source that fails to open,
a start on a damaged bundle, and counts in words."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import logging  # noqa: E402

import pytest  # noqa: E402

from PySide6.QtCore import QSettings  # noqa: E402
from PySide6.QtWidgets import QFileDialog, QMessageBox  # noqa: E402

from app.main_window import MainWindow  # noqa: E402
from app.session import Session  # noqa: E402
from app.state import counted  # noqa: E402
from engine.progress import Progress  # noqa: E402
from qt_helpers import bundle_path, image_folder, no_leaked_threads, window  # noqa: E402,F401
from synth import make_image_folder  # noqa: E402

WAIT = 60000  # ms; generous, the machine is shared


def _answer_save_dialog(monkeypatch, path: str) -> list[str]:
    """The save dialog returns `path` (as typed); returns the names it proposed, one per call."""
    proposed: list[str] = []

    def dialog(parent, title, proposal, name_filter):
        proposed.append(proposal)
        return path, name_filter
    monkeypatch.setattr(QFileDialog, "getSaveFileName", dialog)
    return proposed


def _answer_replace(monkeypatch, answer: QMessageBox.StandardButton) -> list[str]:
    """"Replace it?" gets `answer`; returns the questions asked."""
    asked: list[str] = []

    def question(parent, title, text, *args):
        asked.append(text)
        return answer
    monkeypatch.setattr(QMessageBox, "question", question)
    return asked


# -- 1. saving never replaces a file the user was not asked about --------------------------------------
def test_a_name_typed_without_the_suffix_asks_before_replacing_that_file(qtbot, window, tmp_path, monkeypatch):
    from engine.bundle import load_bundle
    panel = window.policy_panel
    keep = tmp_path / "keep.offramp"
    keep.write_bytes(b"the user's other bundle")
    _answer_save_dialog(monkeypatch, str(tmp_path / "keep"))  # the dialog checked "keep", which is free
    asked = _answer_replace(monkeypatch, QMessageBox.StandardButton.No)
    panel.save_button.click()
    assert len(asked) == 1 and "keep.offramp already exists" in asked[0]
    assert keep.read_bytes() == b"the user's other bundle" and panel.save_button.isEnabled()  # nothing started
    asked = _answer_replace(monkeypatch, QMessageBox.StandardButton.Yes)
    panel.save_button.click()
    qtbot.waitUntil(lambda: panel.save_button.isEnabled() and keep.read_bytes()[:4] != b"the ", timeout=WAIT)
    assert len(asked) == 1 and load_bundle(keep).default_policy == "threshold"


def test_a_new_name_or_a_name_the_dialog_checked_is_saved_without_a_second_question(qtbot, window, tmp_path,
                                                                                    monkeypatch):
    panel = window.policy_panel
    asked = _answer_replace(monkeypatch, QMessageBox.StandardButton.No)
    for typed, written in [("fresh", "fresh.offramp"), ("checked.offramp", "checked.offramp")]:
        (tmp_path / "checked.offramp").write_bytes(b"replaced: the dialog asked")
        _answer_save_dialog(monkeypatch, str(tmp_path / typed))
        with qtbot.waitSignal(window.session.status, timeout=WAIT, check_params_cb=lambda m: m.startswith("saved")):
            panel.save_button.click()
        qtbot.waitUntil(panel.save_button.isEnabled, timeout=WAIT)
        assert (tmp_path / written).stat().st_size > 1000
    assert asked == [] and not (tmp_path / "fresh").exists()


# -- 2. and 3. retraining: a failure, and a check of another folder ---------------------------------------
def _check(qtbot, panel, folder):
    panel.check(str(folder))
    qtbot.waitUntil(lambda: panel.task is None and panel.report.toPlainText() != "checking …", timeout=WAIT)


def test_a_failed_training_leaves_no_bar_half_way_and_the_buttons_ready_again(qtbot, window, image_folder,
                                                                              monkeypatch):
    def broken(bundle, folder, *, epochs, progress, cancel):
        for done in range(1, 6):
            progress(Progress("caching features", done, 10))
        raise RuntimeError("the disk went away")
    monkeypatch.setattr("engine.train.retrain.retrain_on_folder", broken)
    panel = window.retrain_panel
    _check(qtbot, panel, image_folder)
    bar: list[int] = []
    panel.progress.valueChanged.connect(bar.append)
    with qtbot.waitSignal(window.session.error, timeout=WAIT):
        panel.train_button.click()
    qtbot.waitUntil(lambda: panel.task is None, timeout=WAIT)
    assert max(bar) > 0 and panel.progress.value() == 0  # it moved, and did not stay half way
    assert "the disk went away" in panel.stage_label.text() and panel.new_bundle is None
    assert panel.train_button.isEnabled() and panel.choose_button.isEnabled() and not panel.cancel_button.isEnabled()
    assert not panel.use_button.isEnabled() and not panel.save_button.isEnabled()


def test_checking_another_folder_drops_the_result_trained_on_the_first(qtbot, window, tmp_path, monkeypatch):
    fruit = make_image_folder(tmp_path / "fruit", ["apple", "pear"], per_class=6, size=24, seed=3)
    birds = make_image_folder(tmp_path / "birds", ["owl", "jay"], per_class=4, size=24, seed=4)
    panel = window.retrain_panel
    _check(qtbot, panel, fruit)
    panel.epochs.setValue(1)
    panel.train_button.click()
    qtbot.waitUntil(lambda: panel.task is None, timeout=WAIT)
    assert panel.new_bundle is not None and panel.save_button.isEnabled()
    proposed = _answer_save_dialog(monkeypatch, "")  # cancelled
    panel.save_button.click()
    assert proposed == ["fruit.offramp"]
    errors: list[str] = []
    window.session.error.connect(errors.append)
    panel.check(str(birds))
    panel.check(str(fruit))  # while the first check runs: refused, said
    assert panel.folder == str(birds) and "busy" in errors[-1]
    qtbot.waitUntil(lambda: panel.task is None, timeout=WAIT)
    assert panel.new_bundle is None and panel.new_report is None and panel.result_label.text() == ""
    assert not panel.use_button.isEnabled() and not panel.save_button.isEnabled() and panel.train_button.isEnabled()
    assert panel.plot.getPlotItem().listDataItems() == [] and panel.plot.getAxis("left").labelText == "accuracy %"


# -- 4. a source that fails to open leaves nothing stale ------------------------------------------------
def test_a_source_that_fails_leaves_no_frame_on_screen_and_nothing_to_play(qtbot, window, image_folder, tmp_path):
    session, transport = window.session, window.transport
    window.open_source(str(image_folder))
    qtbot.waitUntil(lambda: session.stats.frames >= 1, timeout=WAIT)
    window.render_now()
    assert window.shown_frame is not None and transport.seek.isEnabled()
    with qtbot.waitSignal(session.source_failed, timeout=WAIT):
        window.open_source(str(tmp_path / "missing.jpg"))  # refused before anything closed: the folder plays on
    assert session.source_open and transport.seek.isEnabled() and window.shown_frame is not None
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"junk")
    with qtbot.waitSignal(session.source_failed, timeout=WAIT):
        window.open_source(str(bad))
    qtbot.wait(100)
    window.render_now()
    assert window.shown_frame is None and window.shown_result is None and not window.video.has_frame
    assert "bad.jpg" in window.video.message and window.diagram.stages_run == 0
    assert not any(w.isEnabled() for w in (transport.play_button, transport.prev_button, transport.next_button,
                                           transport.seek, transport.pace))
    assert transport.position.text() == "no source" and not window.capture_panel.capture()
    assert "bad.jpg" not in window.windowTitle()  # the title names no source that shows nothing
    with qtbot.waitSignal(session.status, timeout=WAIT, check_params_cb=lambda m: "nothing to play" in m):
        session.toggle_pause()  # Space, with nothing open
    assert not session.paused
    window.open_source(str(image_folder))  # another source brings the controls back
    qtbot.waitUntil(lambda: transport.seek.isEnabled() and session.stats.frames >= 1, timeout=WAIT)


# -- 5. and 6. a damaged remembered bundle at start-up -------------------------------------------------
def test_a_damaged_remembered_bundle_falls_back_saying_why_once(qtbot, tmp_path, monkeypatch, bundle_path, caplog):
    damaged = tmp_path / "damaged.offramp"
    damaged.write_bytes(b"\0" * 300)
    monkeypatch.setenv("OFFRAMP_DEFAULT_BUNDLE", str(bundle_path))  # the tiny bundle stands in for the built-in one
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    settings.setValue("last_bundle", str(damaged))
    settings.setValue("device", "cuda:3")  # remembered from another machine
    win = MainWindow(Session(device="cpu"), settings=settings)
    qtbot.addWidget(win)
    win.show()
    with caplog.at_level(logging.DEBUG), qtbot.waitSignal(win.session.model_loaded, timeout=WAIT):
        win.startup()
    shown = [r.getMessage() for r in caplog.records if r.name == "app.main_window" and r.levelno == logging.INFO
             and r.getMessage().startswith("shown: ")]
    assert sum("cuda:3" in m for m in shown) == 1  # the built-in model's load does not say it again
    assert win.banner.text.count("damaged.offramp") == 1 and "not a valid bundle" in win.banner.text
    status = win.statusBar().currentMessage()
    assert "damaged.offramp" in status and status.endswith("the built-in model tiny test model is loaded instead")
    load = [r for r in caplog.records if r.name == "app.workers" and "damaged.offramp" in r.getMessage()]
    assert {r.levelno for r in load} == {logging.INFO, logging.DEBUG}  # a user's mistake: no ERROR
    assert all(r.exc_info is None for r in load if r.levelno == logging.INFO)
    assert any(r.exc_info for r in load if r.levelno == logging.DEBUG)


def test_counts_are_said_in_words():
    assert [counted(n, "class") for n in (0, 1, 2)] == ["0 classes", "1 class", "2 classes"]
    assert counted(1, "new early exit") == "1 new early exit" and counted(3, "image") == "3 images"


def test_the_status_bar_names_a_one_class_model_in_the_singular(qtbot, window):
    import dataclasses
    window._show_model(dataclasses.replace(window.session.info, class_names=["only"]))
    assert window.model_label.text().endswith(", 1 class)")


# -- messages that say what is in the way ---------------------------------------------------------------
def test_a_folder_removed_while_it_plays_is_said_so(tmp_path):
    import shutil

    from app.sources import SourceError, SourceSpec, open_source
    folder = make_image_folder(tmp_path / "slides", ["a"], per_class=3, size=16, seed=1) / "a"
    source = open_source(SourceSpec.from_text(str(folder)), loop=True)
    assert source.read() is not None
    shutil.rmtree(folder)
    with pytest.raises(SourceError, match="is gone"):
        for _ in range(4):
            source.read()


def test_capturing_where_a_file_holds_the_class_folders_name_names_that_file(tmp_path):
    import numpy as np

    from app.dataset import DatasetError, FolderWriter
    (tmp_path / "cat").write_text("not a folder")
    with pytest.raises(DatasetError, match="is a file, not a folder") as err:
        FolderWriter().write(np.zeros((8, 8, 3), dtype=np.uint8), tmp_path, "cat")
    assert str(tmp_path / "cat") in str(err.value)

"""Capture to folder: frames on screen saved into FOLDER/CLASS/, counts, bursts, bad input, retraining
on the folder, remembered choices. The writing itself (names, counts) is tested without Qt first."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PySide6.QtCore import QSettings, Qt  # noqa: E402

from app.dataset import DatasetError, FolderWriter, check_class_name, class_counts, writable_problem  # noqa: E402
from app.main_window import MainWindow  # noqa: E402
from app.session import Session  # noqa: E402
from qt_helpers import bundle_path, image_folder, no_leaked_threads  # noqa: E402,F401
from synth import make_image_folder  # noqa: E402

WAIT = 20000  # ms; generous, the machine is shared
BAD_NAMES = ["", "   ", "a/b", "a\\b", "..", ".", "what?", 'say "hi"', "tab\there", "con", "LPT1.txt", "train",
             ".hidden", "dot.", "x" * 201]


# -- the folder, without Qt ---------------------------------------------------------------------------
def test_class_names_are_checked_and_named():
    assert check_class_name("  cat ") == "cat" and check_class_name("Große Katze") == "Große Katze"
    assert check_class_name("v1.2") == "v1.2"
    for name in BAD_NAMES:
        with pytest.raises(DatasetError) as e:
            check_class_name(name)
        message = str(e.value)
        assert "\n" not in message and (repr(name) in message or "empty" in message or repr(name[:20]) in message)


def test_writer_never_overwrites_and_counts_read_the_folder(tmp_path):
    root = make_image_folder(tmp_path / "ds", ["cat", "dog"], per_class=3, size=8)
    (root / "cat" / "cat_00002.jpg").write_bytes(b"keep me")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "x.png").write_bytes(b"hidden")
    assert class_counts(root) == {"cat": 4, "dog": 3} and class_counts(tmp_path / "missing") == {}
    image = np.zeros((6, 8, 3), np.uint8)
    writer = FolderWriter()
    first = writer.write(image, root, "cat", ".png")
    assert first.name == "cat_00003.png"  # numbering goes on after the highest number there
    (root / "cat" / "cat_00004.jpg").write_bytes(b"someone else's")  # written meanwhile by another program
    assert writer.write(image, root, "cat", ".jpg").name == "cat_00005.jpg"
    assert (root / "cat" / "cat_00002.jpg").read_bytes() == b"keep me"
    assert (root / "cat" / "cat_00004.jpg").read_bytes() == b"someone else's"
    new = writer.write(image, root, " bird ", ".jpg")
    assert new == root / "bird" / "bird_00001.jpg" and cv2.imread(str(new)).shape == (6, 8, 3)
    assert class_counts(root) == {"bird": 1, "cat": 7, "dog": 3}
    (tmp_path / "file.txt").write_text("x")
    assert "file.txt" in writable_problem(tmp_path / "file.txt" / "data")
    assert writable_problem(tmp_path / "new" / "deeper") is None  # created on the first save
    with pytest.raises(DatasetError, match="file.txt"):
        writer.write(image, tmp_path / "file.txt" / "data", "cat")


# -- the panel in the window ---------------------------------------------------------------------------
@pytest.fixture
def window(qtbot, tmp_path, bundle_path):
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    win = MainWindow(Session(device="cpu"), settings=settings)
    qtbot.addWidget(win)
    win.show()
    with qtbot.waitSignal(win.session.model_loaded, timeout=WAIT):
        win.session.load_bundle(str(bundle_path))
    return win


def _still(tmp_path) -> tuple[str, np.ndarray]:
    """A 24×20 noise image file and its pixels (BGR)."""
    image = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    path = tmp_path / "still.png"
    cv2.imwrite(str(path), image)
    return str(path), image


def _show(qtbot, window, source: str) -> None:
    window.open_source(source)
    qtbot.waitUntil(lambda: window.shown_frame is not None and window.session.stats.frames >= 1, timeout=WAIT)


def _saved(qtbot, window, action) -> str:
    """Do `action`; wait for the frame it queued to be written; returns the file."""
    with qtbot.waitSignal(window.session.frame_saved, timeout=WAIT) as blocker:
        action()
    return blocker.args[0]


def _table(panel) -> dict[str, str]:
    return {panel.table.item(r, 0).text(): panel.table.item(r, 1).text() for r in range(panel.table.rowCount())}


def test_capture_saves_the_raw_frame_on_screen_and_counts_it(qtbot, window, tmp_path):
    panel = window.capture_panel
    with qtbot.waitSignal(window.session.error, timeout=WAIT):  # nothing on screen yet
        panel.capture_button.click()
    assert "no frame on screen" in window.banner.text.lower()
    path, image = _still(tmp_path)
    _show(qtbot, window, path)
    folder = tmp_path / "new" / "dataset"  # missing: made on the first capture
    panel.set_folder(str(folder))
    assert "created on the first capture" in panel.status_label.text()
    assert panel.total_label.text() == "no class folders yet"
    panel.set_class("cat")
    panel.format_combo.setCurrentText("PNG")
    first = _saved(qtbot, window, panel.capture_button.click)
    assert first == str(folder / "cat" / "cat_00001.png")
    assert np.array_equal(cv2.imread(first), image)  # the raw frame: same pixels, no overlay, not scaled
    assert panel.counts == {"cat": 1} and _table(panel) == {"cat": "1"} and panel.pending == 0
    window.activateWindow()
    second = _saved(qtbot, window, lambda: qtbot.keyClick(window, Qt.Key.Key_C))  # File ▸ Capture frame
    assert second.endswith("cat_00002.png") and panel.counts == {"cat": 2}
    panel.format_combo.setCurrentText("JPEG")
    panel.set_class("dog")
    third = _saved(qtbot, window, panel.capture)
    assert third.endswith("dog/dog_00001.jpg") and cv2.imread(third).shape == image.shape
    assert _table(panel) == {"cat": "2", "dog": "1"} and panel.total_label.text() == "3 images in 2 classes"
    assert [panel.class_combo.itemText(i) for i in range(panel.class_combo.count())] == ["cat", "dog"]
    panel.undo_last()  # a bad shot goes again
    assert not os.path.exists(third) and panel.counts == {"cat": 2, "dog": 0}
    # typing a class name never fires the C (or R) shortcut
    panel.class_combo.lineEdit().clear()
    qtbot.keyClicks(panel.class_combo.lineEdit(), "crow")
    assert panel.class_name == "crow" and panel.pending == 0 and not panel.recording
    qtbot.keyClick(panel.class_combo.lineEdit(), Qt.Key.Key_Return)  # Enter leaves the field: C captures again
    assert not panel.class_combo.lineEdit().hasFocus() and "Press C" in panel.status_label.text()
    # presentation mode hides the panel; C still captures
    window.set_presentation(True)
    assert not window.docks["capture"].isVisible()
    assert _saved(qtbot, window, lambda: qtbot.keyClick(window, Qt.Key.Key_C)).endswith("crow_00001.jpg")
    window.set_presentation(False)


def test_counts_read_an_existing_folder_and_names_never_overwrite(qtbot, window, tmp_path):
    folder = make_image_folder(tmp_path / "ds", ["cat", "dog"], per_class=3, size=8)
    (folder / "cat" / "cat_00007.jpg").write_bytes(b"an earlier capture")
    panel = window.capture_panel
    panel.set_folder(str(folder))
    assert panel.counts == {"cat": 4, "dog": 3} and _table(panel) == {"cat": "4", "dog": "3"}
    assert [panel.class_combo.itemText(i) for i in range(panel.class_combo.count())] == ["cat", "dog"]
    panel.table.cellClicked.emit(1, 0)  # choosing a class from the table
    assert panel.class_name == "dog"
    panel.set_class("cat")
    _show(qtbot, window, _still(tmp_path)[0])
    names = [os.path.basename(_saved(qtbot, window, panel.capture)) for _ in range(3)]
    assert names == ["cat_00008.jpg", "cat_00009.jpg", "cat_00010.jpg"]
    assert (folder / "cat" / "cat_00007.jpg").read_bytes() == b"an earlier capture"
    assert panel.counts["cat"] == 7 and class_counts(folder)["cat"] == 7


def test_bad_class_names_and_unwritable_folders_are_reported(qtbot, window, tmp_path, image_folder):
    session, panel = window.session, window.capture_panel
    session.set_pace(0.0)
    window.open_source(str(image_folder))
    qtbot.waitUntil(lambda: window.shown_frame is not None, timeout=WAIT)
    folder = tmp_path / "ds"
    panel.set_folder(str(folder))
    for name in BAD_NAMES[:9]:
        panel.set_class(name)
        with qtbot.waitSignal(session.error, timeout=WAIT) as blocker:
            panel.capture_button.click()
        message = blocker.args[0]
        assert repr(name) in message or "empty" in message, message
        assert window.banner.isVisible() and panel.status_label.text()
    with qtbot.waitSignal(session.error, timeout=WAIT):
        panel.record_button.click()  # recording refuses a bad name too
    assert not panel.recording and not panel.record_button.isChecked() and not window.actions.record.isChecked()
    assert not folder.exists() and panel.pending == 0
    # a folder under a file: said when chosen and on capture, naming the folder
    (tmp_path / "file.txt").write_text("x")
    bad = tmp_path / "file.txt" / "data"
    panel.set_class("cat")
    with qtbot.waitSignal(session.error, timeout=WAIT) as blocker:
        panel.set_folder(str(bad))
    assert str(bad) in blocker.args[0]
    with qtbot.waitSignal(session.error, timeout=WAIT) as blocker:
        panel.capture()
    assert str(bad) in blocker.args[0]
    # a failure only the writer meets (the class folder's name is taken by a file)
    folder.mkdir()
    (folder / "cat").write_text("in the way")
    panel.set_folder(str(folder))
    with qtbot.waitSignal(session.save_failed, timeout=WAIT) as blocker:
        panel.capture()
    assert str(folder / "cat") in blocker.args[0] and str(folder / "cat") in window.banner.text
    assert panel.pending == 0
    n = session.stats.frames
    qtbot.waitUntil(lambda: session.stats.frames > n + 2, timeout=WAIT)  # the live view kept running


def test_read_only_folder_is_named(qtbot, window, tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    if not hasattr(os, "geteuid") or os.geteuid() == 0:  # root writes anywhere: pretend it cannot
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(folder) else real(p, mode))
    try:
        with qtbot.waitSignal(window.session.error, timeout=WAIT) as blocker:
            window.capture_panel.set_folder(str(folder / "new"))
        assert str(folder) in blocker.args[0] and "not writable" in blocker.args[0]
    finally:
        folder.chmod(0o700)


def test_recording_saves_every_nth_frame_up_to_the_limit(qtbot, window, tmp_path, image_folder):
    session, panel = window.session, window.capture_panel
    session.set_pace(0.0)  # the folder at full speed: frames come as fast as the model takes them
    _show(qtbot, window, str(image_folder))
    folder = tmp_path / "burst"
    panel.set_folder(str(folder))
    panel.set_class("blur")
    panel.every.setValue(2)
    panel.limit.setValue(5)
    window.activateWindow()
    qtbot.keyClick(window, Qt.Key.Key_R)  # File ▸ Record frames
    assert panel.recording and window.actions.record.isChecked() and not panel.class_combo.isEnabled()
    qtbot.waitUntil(lambda: not panel.recording and panel.pending == 0, timeout=WAIT)
    assert len(list((folder / "blur").iterdir())) == 5 and panel.counts == {"blur": 5}
    assert panel._seen >= 9 and not window.actions.record.isChecked() and panel.class_combo.isEnabled()
    assert "recording stopped: 5 frames saved into blur (5 images now)" in panel.status_label.text().lower()
    # no limit: records until stopped
    panel.limit.setValue(0)
    panel.every.setValue(1)
    panel.record_button.click()
    qtbot.waitUntil(lambda: panel.counts["blur"] >= 8, timeout=WAIT)
    qtbot.keyClick(window, Qt.Key.Key_R)
    qtbot.waitUntil(lambda: panel.pending == 0, timeout=WAIT)
    assert not panel.recording and panel.counts["blur"] == len(list((folder / "blur").iterdir())) >= 8


def test_retrain_on_this_folder_starts_the_retraining_flow(qtbot, window, tmp_path):
    session, panel, retrain = window.session, window.capture_panel, window.retrain_panel
    assert not panel.retrain_button.isEnabled()  # no folder yet
    with qtbot.waitSignal(session.error, timeout=WAIT):
        panel.retrain()
    panel.set_folder(str(tmp_path / "not yet"))
    with qtbot.waitSignal(session.error, timeout=WAIT) as blocker:
        panel.retrain_button.click()
    assert "does not exist yet" in blocker.args[0] and retrain.folder is None
    folder = make_image_folder(tmp_path / "teacher", ["apple", "pear"], per_class=4, size=24, seed=3)
    panel.set_folder(str(folder))
    panel.set_class("apple")
    _show(qtbot, window, _still(tmp_path)[0])
    assert panel.capture()
    panel.retrain_button.click()  # right after a capture: waits for the frame to be written
    qtbot.waitUntil(lambda: retrain.task is not None and retrain.task.what == "retraining"
                    or retrain.new_bundle is not None, timeout=WAIT)
    assert retrain.folder == str(folder) and window.docks["retrain"].isVisible()
    assert "apple: 5" in retrain.report.toPlainText()  # the captured frame was on disk before the check
    if retrain.task is not None:
        retrain.cancel_button.click()
    qtbot.waitUntil(lambda: retrain.task is None, timeout=WAIT)
    assert "cancelled" in retrain.stage_label.text() or retrain.new_bundle is not None
    assert panel.retrain_button.isEnabled()


def test_capture_choices_are_remembered(qtbot, tmp_path):
    ini = str(tmp_path / "settings.ini")
    first = MainWindow(Session(device="cpu"), settings=QSettings(ini, QSettings.Format.IniFormat))
    qtbot.addWidget(first)
    panel = first.capture_panel
    panel.set_folder(str(tmp_path / "ds"))
    panel.set_class("dog")
    panel.every.setValue(3)
    panel.limit.setValue(7)
    panel.format_combo.setCurrentText("PNG")
    first.close()
    second = MainWindow(Session(device="cpu"), settings=QSettings(ini, QSettings.Format.IniFormat))
    qtbot.addWidget(second)
    assert second.capture_panel.state() == {"folder": str(tmp_path / "ds"), "class": "dog", "every": 3, "limit": 7,
                                            "format": "PNG"}
    second.close()

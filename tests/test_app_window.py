"""The window driven like a user would: sources, live panels, thresholds, budget, errors."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from PySide6.QtCore import QMimeData, QPointF, QSettings, Qt, QUrl  # noqa: E402
from PySide6.QtGui import QDropEvent  # noqa: E402

from app.main_window import MainWindow  # noqa: E402
from app.menus import model_info_dialog  # noqa: E402
from app.session import Session  # noqa: E402
from qt_helpers import bundle_path, image_folder, no_leaked_threads, window, write_tiny_bundle  # noqa: E402,F401

WAIT = 20000  # ms; generous, the machine is shared




def _still(tmp_path, name="still.png"):
    path = tmp_path / name
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
    return path


def _next_result(qtbot, window, action, check=lambda r: True):
    """Do `action`, then wait for a result that passes `check`; returns it (rendered)."""
    seen = []

    def ok(result, frame):
        if result is not None and check(result):
            seen.append(result)
            return True
        return False

    with qtbot.waitSignal(window.session.result, timeout=WAIT, check_params_cb=ok):
        action()
    window.render_now()
    return seen[-1]


def test_folder_plays_and_panels_update(qtbot, window, image_folder):
    window.transport.pace.setCurrentIndex(1)
    window.transport.pace.activated.emit(1)  # full speed
    assert window.session.pace == 0.0
    window.open_source(str(image_folder))
    qtbot.waitUntil(lambda: window.session.stats.frames >= 3, timeout=WAIT)
    window.render_now()
    result = window.session.stats.last
    assert result.exit_index == 2  # a random model is never 90 % sure: the last exit answers
    assert window.diagram.fired == 2 and window.diagram.stages_run == 3 and set(window.diagram.exits_ran) == {0, 1, 2}
    assert set(window.confidence.values) == {0, 1, 2} and window.confidence.threshold_values[:2] == [0.9, 0.9]
    assert window.compute.big_label.text().startswith("FLOPs saved ")
    assert window.compute.hist.opts["height"][2] == pytest.approx(100.0)
    assert window.video.label == result.label and window.video.has_frame
    assert "/ 12" in window.transport.position.text()


def test_threshold_sliders_choose_the_exit(qtbot, window, tmp_path):
    window.open_source(str(_still(tmp_path)))
    qtbot.waitUntil(lambda: window.session.stats.frames >= 1, timeout=WAIT)
    rows = window.policy_panel.rows
    r = _next_result(qtbot, window, lambda: rows[0].slider.setValue(0), lambda r: r.exit_index == 0)
    assert r.stages_run == 1 and window.diagram.stages_run == 1  # stages 2 and 3 never ran: drawn skipped
    assert window.session.policy.thresholds[0] == 0.0 and window.session.policy.edited
    # exit 0 off, exit 1 at 0: exit 1 fires and exit 0's head is not even evaluated
    _next_result(qtbot, window, lambda: rows[1].slider.setValue(0), lambda r: r.exit_index == 0)
    r = _next_result(qtbot, window, lambda: rows[0].off.setChecked(True), lambda r: r.exit_index == 1)
    assert [e.exit_index for e in r.exits] == [1] and "off" in window.confidence._ticks[0][1]
    # both at 1.0: only the last exit answers
    rows[0].off.setChecked(False)
    rows[0].slider.setValue(100)
    r = _next_result(qtbot, window, lambda: rows[1].slider.setValue(100), lambda r: r.exit_index == 2)
    assert window.session.policy.thresholds[:2] == [1.0, 1.0] and rows[1].value.text() == "1.00"


def test_budget_slider_walks_the_front_and_reset(qtbot, window, tmp_path):
    window.open_source(str(_still(tmp_path)))
    qtbot.waitUntil(lambda: window.session.stats.frames >= 1, timeout=WAIT)
    panel = window.policy_panel
    assert panel.budget.isEnabled() and panel.budget.maximum() == 3 and panel.budget.value() == 2
    _next_result(qtbot, window, lambda: panel.budget.setValue(0), lambda r: r.exit_index == 0)
    assert "expected accuracy 60.0 %" in panel.budget_label.text()
    assert [row.slider.value() for row in panel.rows] == [0, 0]  # sliders follow the chosen point
    r = _next_result(qtbot, window, lambda: panel.budget.setValue(3), lambda r: r.exit_index == 2)
    assert [e.exit_index for e in r.exits] == [2] and panel.rows[0].off.isChecked()
    _next_result(qtbot, window, panel.reset_button.click, lambda r: len(r.exits) == 3)
    assert window.session.policy.thresholds == [0.9, 0.9, 0.9] and not window.session.policy.edited
    # a bundle without a front: the budget slider is off and says why
    with qtbot.waitSignal(window.session.model_loaded, timeout=WAIT):
        window.load_bundle(str(write_tiny_bundle(tmp_path / "nofront.offramp", front=False)))
    assert not panel.budget.isEnabled() and "no Pareto front" in panel.budget.toolTip()


def test_policy_choice_and_saving_the_configuration(qtbot, window, tmp_path):
    from engine.bundle import load_bundle
    window.open_source(str(_still(tmp_path)))
    qtbot.waitUntil(lambda: window.session.stats.frames >= 1, timeout=WAIT)
    panel = window.policy_panel
    names = [panel.combo.itemText(i) for i in range(panel.combo.count())]
    assert names == ["threshold", "first exit", "learned"]
    # a policy without thresholds: the sliders are off, the live view goes on
    panel.combo.setCurrentIndex(2)
    _next_result(qtbot, window, lambda: panel.combo.activated.emit(2))
    assert not panel.thresholds_box.isEnabled() and "no thresholds" in panel.thresholds_box.toolTip()
    assert window.confidence.threshold_values == []
    panel.combo.setCurrentIndex(1)
    _next_result(qtbot, window, lambda: panel.combo.activated.emit(1), lambda r: r.exit_index == 0)
    assert window.session.policy.thresholds == [0.0, 0.0, 0.0] and panel.thresholds_box.isEnabled()
    panel.rows[1].off.setChecked(True)
    out = tmp_path / "edited.offramp"
    panel.save_to(str(out))
    qtbot.waitUntil(lambda: out.exists() and panel.save_button.isEnabled(), timeout=WAIT)
    saved = load_bundle(out)
    assert saved.default_policy == "edited" and saved.policies["edited"].thresholds == [0.0, None, 0.0]
    assert set(saved.policies) == {"threshold", "first exit", "learned", "edited"}


def test_bad_inputs_are_shown_and_nothing_is_lost(qtbot, window, tmp_path, image_folder):
    session, info = window.session, window.session.info
    corrupt = tmp_path / "corrupt.offramp"
    corrupt.write_bytes(b"\x00" * 100)
    with qtbot.waitSignal(session.error, timeout=WAIT):
        window.load_bundle(str(corrupt))
    assert window.banner.isVisible() and "corrupt.offramp" in window.banner.text
    assert session.info is info  # the model that was loaded is still the one running
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"no image here")
    for source, words in [(tmp_path / "missing", "does not exist"), (empty, "no images"), (bad_image, "bad.png"),
                          ("camera:97", "camera 97")]:
        with qtbot.waitSignal(session.error, timeout=WAIT):
            window.open_source(str(source))
        assert words in window.banner.text.lower() and window.statusBar().currentMessage()
    with qtbot.waitSignal(session.error, timeout=WAIT):
        session.set_device("cuda:7")
    assert "cuda:7" in window.banner.text and session.device == "cpu" and session.info is info
    window.open_source(str(image_folder))  # still works after all that
    qtbot.waitUntil(lambda: session.stats.frames >= 2, timeout=WAIT)


def _settled_frames(qtbot, session, quiet_ms: int = 300) -> int:
    """The frame count once no result has arrived for `quiet_ms`."""
    while True:
        n = session.stats.frames
        qtbot.wait(quiet_ms)
        if session.stats.frames == n:
            return n


def test_keys_presentation_screenshot_drop_and_settings(qtbot, window, tmp_path, image_folder, bundle_path):
    session = window.session
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(image_folder))])
    window.dropEvent(QDropEvent(QPointF(5, 5), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                                Qt.KeyboardModifier.NoModifier))
    qtbot.waitUntil(lambda: session.stats.frames >= 1, timeout=WAIT)
    window.activateWindow()
    window.actions.presentation.trigger()  # F5
    assert window.presentation and not window.docks["policy"].isVisible() and window.docks["compute"].isVisible()
    assert window.font().pointSizeF() > window._base_font.pointSizeF()
    shot = window.save_screenshot(tmp_path / "shot.png")
    assert shot is not None and shot.stat().st_size > 1000
    window.set_presentation(False)
    assert window.docks["policy"].isVisible() and not window.isFullScreen()
    qtbot.keyClick(window, Qt.Key.Key_Space)
    assert session.paused
    n = _settled_frames(qtbot, session)  # a frame already in flight when paused may still arrive
    with qtbot.waitSignal(session.result, timeout=WAIT):
        qtbot.keyClick(window, Qt.Key.Key_Right)  # next image, while paused
    assert session.stats.frames == n + 1 and session.paused
    dialog = model_info_dialog(window, session.info)
    text = " ".join(w.text() for w in dialog.findChildren(type(window.model_label)))
    assert "cifar_resnet_small" in text and "red" in text and "E2 after stage 3" in text
    window.close()
    s = window.settings
    assert s.value("last_source") == str(image_folder) and s.value("last_bundle") == str(bundle_path)
    assert s.value("geometry") is not None


def test_built_in_default_model(qtbot, tmp_path, monkeypatch, bundle_path):
    session = Session(device="cpu")
    win = MainWindow(session, settings=QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(win)
    monkeypatch.setenv("OFFRAMP_DEFAULT_BUNDLE", str(tmp_path / "none.offramp"))
    with qtbot.waitSignal(session.error, timeout=WAIT):
        win.startup()
    assert "no built-in model" in win.banner.text.lower() and session.info is None
    monkeypatch.setenv("OFFRAMP_DEFAULT_BUNDLE", str(bundle_path))
    with qtbot.waitSignal(session.model_loaded, timeout=WAIT):  # Model ▸ Built-in default model
        next(a for a in win.menuBar().actions()[1].menu().actions() if "Built-in" in a.text()).trigger()
    assert session.info.path == str(bundle_path) and not win.banner.isVisible()


def test_missing_device_falls_back_with_a_message(qtbot, tmp_path, bundle_path):
    session = Session(device="cuda:5")  # e.g. remembered from another machine
    win = MainWindow(session, settings=QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(win)
    win.show()
    with qtbot.waitSignals([session.error, session.model_loaded], timeout=WAIT):
        session.load_bundle(str(bundle_path))
    assert win.banner.isVisible() and "cuda:5" in win.banner.text
    assert session.info.device == "cpu" and session.device == "cpu"


def test_a_bundle_that_fails_with_no_model_loaded_brings_in_the_built_in_one(qtbot, tmp_path):
    """Started on a damaged bundle, the window still classifies (built-in model) and keeps the error."""
    bad = tmp_path / "damaged.offramp"
    bad.write_bytes(b"\0" * 300)
    win = MainWindow(Session(device="cpu"), settings=QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(win)
    win.show()
    with qtbot.waitSignal(win.session.model_loaded, timeout=WAIT):
        win.session.load_bundle(str(bad))
    assert win.session.info is not None and win.session.info.path.endswith("default.offramp")
    assert win.banner.isVisible() and "damaged.offramp" in win.banner.text


def test_the_inference_worker_is_the_engines_only_caller(qtbot, window, image_folder, monkeypatch):
    """One owner serialises the engine: while a folder plays and thresholds move on the GUI thread,
    every call on the Engine is made by one thread, the inference worker's, never the GUI's."""
    import threading

    from engine.runtime import Engine
    callers: set[int] = set()
    for name in ("infer", "set_thresholds", "set_policy"):
        original = getattr(Engine, name)

        def spy(self, *a, _original=original, **kw):
            callers.add(threading.get_ident())
            return _original(self, *a, **kw)
        monkeypatch.setattr(Engine, name, spy)
    window.transport.pace.setCurrentIndex(1)
    window.transport.pace.activated.emit(1)  # full speed
    window.open_source(str(image_folder))
    qtbot.waitUntil(lambda: window.session.stats.frames >= 3, timeout=WAIT)
    for value in (10, 90, 40, 70):
        window.policy_panel.rows[0].slider.setValue(value)
        qtbot.wait(20)
    frames = window.session.stats.frames
    qtbot.waitUntil(lambda: window.session.stats.frames >= frames + 3, timeout=WAIT)
    window.session.close_source()
    assert len(callers) == 1 and threading.get_ident() not in callers

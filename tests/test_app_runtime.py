"""Device ▸ Runtime: torch and onnxruntime as exclusive choices, queued to the inference thread like
a device change; the live figures say which runtime timed them; a runtime that cannot run here is
disabled with the reason as its tooltip."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

pytest.importorskip("onnxruntime")

from qt_helpers import bundle_path, no_leaked_threads  # noqa: E402,F401

WAIT = 60000  # ms: making the ONNX graphs takes seconds on a shared machine


@pytest.fixture
def window(qtbot, tmp_path, bundle_path):  # noqa: F811 - qt_helpers' window, with this file's patience
    from PySide6.QtCore import QSettings

    from app.main_window import MainWindow
    from app.session import Session
    win = MainWindow(Session(device="cpu"), settings=QSettings(str(tmp_path / "settings.ini"),
                                                               QSettings.Format.IniFormat))
    qtbot.addWidget(win)
    win.show()
    with qtbot.waitSignal(win.session.model_loaded, timeout=WAIT):
        win.session.load_bundle(str(bundle_path))
    return win


def _runtime_actions(window) -> dict:
    return {a.text(): a for a in window.actions.runtime_group.actions()}


def test_runtime_menu_switches_the_runtime_on_the_inference_thread(qtbot, window, tmp_path):
    session = window.session
    menu = [a.text() for a in window.actions.device_menu.actions()]
    assert "Runtime" in menu and menu.index("Runtime") < menu.index("onnxruntime")
    acts = _runtime_actions(window)
    assert set(acts) == {"torch", "onnxruntime"} and window.actions.runtime_group.isExclusive()
    assert acts["torch"].isChecked() and acts["onnxruntime"].isEnabled() and session.runtime == "torch"
    still = tmp_path / "still.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(still)
    with qtbot.waitSignal(session.result, timeout=WAIT):
        window.open_source(str(still))

    with qtbot.waitSignal(session.runtime_changed, timeout=WAIT) as changed:
        acts["onnxruntime"].trigger()
    assert changed.args == ["onnxruntime"] and session.runtime == session.info.runtime == "onnxruntime"
    assert window.settings.value("runtime") == "onnxruntime"  # remembered for the next start
    assert _runtime_actions(window)["onnxruntime"].isChecked() and not _runtime_actions(window)["torch"].isChecked()
    qtbot.waitUntil(lambda: session.stats.last is not None and session.stats.last.runtime.startswith("onnxruntime"),
                    timeout=WAIT)  # the still runs again under the new runtime
    def shown() -> bool:  # the live panel names the runtime next to "time saved"
        window.render_now()
        return "timed on onnxruntime 1." in window.compute.fps_label.text()
    qtbot.waitUntil(shown, timeout=WAIT)

    with qtbot.waitSignal(session.runtime_changed, timeout=WAIT) as changed:
        _runtime_actions(window)["torch"].trigger()
    assert changed.args == ["torch"] and session.runtime == "torch"
    qtbot.waitUntil(lambda: session.stats.last is not None and "TorchScript" in session.stats.last.runtime,
                    timeout=WAIT)


def test_a_runtime_that_cannot_run_here_is_disabled_with_the_reason(window):
    why = "the onnxruntime runtime runs on the CPU only, and the model is on cuda; choose the CPU device first"
    info = dataclasses.replace(window.session.info, runtimes={"torch": "", "onnxruntime": why})
    window.actions.set_devices(info)
    acts = _runtime_actions(window)
    assert not acts["onnxruntime"].isEnabled() and acts["onnxruntime"].toolTip() == why
    assert acts["torch"].isEnabled() and acts["torch"].isChecked()
    assert window.actions.device_menu.toolTipsVisible()


def test_the_runtime_chosen_last_time_is_the_one_a_new_window_loads_with(qtbot, tmp_path, bundle_path):  # noqa: F811
    from PySide6.QtCore import QSettings

    from app.main_window import MainWindow
    from app.session import Session
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    settings.setValue("runtime", "onnxruntime")
    win = MainWindow(Session(device="cpu"), settings=settings)
    qtbot.addWidget(win)
    with qtbot.waitSignal(win.session.model_loaded, timeout=WAIT):
        win.session.load_bundle(str(bundle_path))
    assert win.session.info.runtime == "onnxruntime" and _runtime_actions(win)["onnxruntime"].isChecked()
    settings.setValue("runtime", "no such runtime")  # a hand-edited file: the default, no error
    other = MainWindow(Session(device="cpu"), settings=settings)
    qtbot.addWidget(other)
    assert other.session.runtime == "torch"

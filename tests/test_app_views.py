"""The live views (`app.widgets.live.LiveView`): every panel that describes the model and the frame
on screen is fed by the window's one loop, so a new panel needs only the four methods."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from PySide6.QtCore import QSettings  # noqa: E402

from app.main_window import MainWindow  # noqa: E402
from app.session import Session  # noqa: E402
from app.widgets import LiveView  # noqa: E402
from qt_helpers import bundle_path, no_leaked_threads  # noqa: E402,F401

WAIT = 20000  # ms; generous, the machine is shared


class Recorder:
    """A live view that only writes down what it was told."""

    def __init__(self):
        self.calls: list[tuple] = []

    def set_model(self, info) -> None:
        self.calls.append(("set_model", info.num_exits))

    def show_result(self, result, frame) -> None:
        self.calls.append(("show_result", None if result is None else result.exit_index, frame.name))

    def set_theme(self, theme) -> None:
        self.calls.append(("set_theme", theme.name))

    def clear(self) -> None:
        self.calls.append(("clear",))


def test_a_new_live_view_is_fed_like_the_others(qtbot, tmp_path, bundle_path):
    win = MainWindow(Session(device="cpu"), settings=QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(win)
    assert [type(v).__name__ for v in win.live_views] == ["VideoView", "ExitDiagram", "ConfidencePlot", "ComputePanel"]
    assert all(isinstance(v, LiveView) for v in win.live_views) and isinstance(Recorder(), LiveView)
    rec = Recorder()
    win.live_views += (rec,)
    with qtbot.waitSignal(win.session.model_loaded, timeout=WAIT):
        win.session.load_bundle(str(bundle_path))
    # told of the model, then drawn once with made-up values off screen (the warm-up) and cleared
    assert rec.calls == [("set_model", 3), ("show_result", 0, "warm-up"), ("clear",)]
    rec.calls.clear()

    still = tmp_path / "still.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(still)
    with qtbot.waitSignal(win.session.result, timeout=WAIT, check_params_cb=lambda r, f: r is not None):
        win.open_source(str(still))
    win.render_now()
    result = win.shown_result
    assert rec.calls[-1] == ("show_result", result.exit_index, "still.png")
    assert win.video.label == result.label and win.diagram.fired == win.confidence.fired == result.exit_index

    win.set_presentation(True)
    win.set_presentation(False)
    assert rec.calls[-2:] == [("set_theme", "presentation"), ("set_theme", "normal")]
    for view in win.live_views:
        view.clear()
    assert not win.video.has_frame and win.diagram.fired is None and win.confidence.fired is None
    assert win.compute.frame_label.text() == "This frame: –"
    win.session.close_source()

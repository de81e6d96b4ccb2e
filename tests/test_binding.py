"""The Qt binding under the app must not lose references to None while painting (PySide6 6.12.0 on
Python < 3.12 does, and the interpreter aborts after a minute of video): the painted widgets keep
`sys.getrefcount(None)` level, and a known-bad binding is refused at start in one line."""
from __future__ import annotations

import gc
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from PySide6.QtCore import QSettings  # noqa: E402

from app import __main__ as app_main  # noqa: E402
from app import qt_binding  # noqa: E402
from app.main_window import MainWindow  # noqa: E402
from app.session import Session  # noqa: E402
from qt_helpers import bundle_path, no_leaked_threads  # noqa: E402,F401

WAIT = 20000
ROUNDS = 150  # paints per widget: a binding that loses one reference per QPainter call loses thousands
TOLERANCE = 40  # a few references to None come and go with other objects between two readings


def _none_refs() -> int:
    gc.collect()
    return sys.getrefcount(None)


def test_known_bad_binding_is_listed_for_the_pythons_it_hurts():
    assert qt_binding.known_bad("6.12.0", (3, 11)) and qt_binding.known_bad("6.12.0", (3, 10))
    assert not qt_binding.known_bad("6.12.0", (3, 12)) and not qt_binding.known_bad("6.11.3", (3, 11))
    message = qt_binding.binding_problem("6.12.0", (3, 11), probe=False)
    assert message and "6.12.0" in message and "3.11" in message and "\n" not in message
    assert qt_binding.binding_problem("6.12.0", (3, 12), probe=False) is None


def test_the_installed_binding_passes_the_probe():
    """What CI installs (pyproject excludes the bad release) must paint without losing references."""
    assert qt_binding.probe_none_refcount(500) <= qt_binding.PROBE_TOLERANCE
    assert qt_binding.binding_problem() is None


def test_app_refuses_a_bad_binding_in_one_line(monkeypatch, capsys, tmp_path):
    still = tmp_path / "still.png"
    Image.new("RGB", (8, 8)).save(still)
    monkeypatch.setattr(qt_binding, "binding_problem", lambda: "PySide6 9.9 is broken: install another.")
    assert app_main.main(["--source", str(still), "--frames", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "offramp-app: error: PySide6 9.9 is broken: install another."


def test_painting_every_live_widget_keeps_none_alive(qtbot, tmp_path, bundle_path):
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    window = MainWindow(Session(device="cpu"), settings=settings)
    qtbot.addWidget(window)
    window.show()
    with qtbot.waitSignal(window.session.model_loaded, timeout=WAIT):
        window.session.load_bundle(str(bundle_path))
    still = tmp_path / "still.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(still)
    got = []
    with qtbot.waitSignal(window.session.result, timeout=WAIT,
                          check_params_cb=lambda r, f: r is not None and not got.append((r, f))):
        window.open_source(str(still))
    result, frame = got[-1]
    window.render_now()

    widgets = {"window": window, "video": window.video, "diagram": window.diagram,
               "confidence": window.confidence, "compute": window.compute, "policy": window.policy_panel,
               "retrain": window.retrain_panel, "capture": window.capture_panel, "banner": window.banner,
               "transport": window.transport}
    window.show_error("a banner that paints too")
    losses = {}
    for name, widget in widgets.items():
        widget.grab()  # first paint: caches, fonts, glyphs
        before = _none_refs()
        for _ in range(ROUNDS):
            widget.grab()
        losses[name] = before - _none_refs()
    # the live path too: a result arrives by signal and every panel redraws from it
    before = _none_refs()
    for _ in range(ROUNDS):
        window.session.result.emit(result, frame)
        window.render_now()
        window.grab()
    losses["live results"] = before - _none_refs()
    window.session.close_source()
    bad = {k: v for k, v in losses.items() if v > TOLERANCE}
    assert not bad, f"references to None lost while painting ({ROUNDS} rounds each): {bad}"

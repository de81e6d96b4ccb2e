"""The window comes back as it was: presentation mode leaves no trace, banners are readable in
every theme, a failed load or camera is said and stays said, a run that died does not reopen its
source by itself, and a Linux machine without Qt's X11 libraries is told which packages to install."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from PySide6.QtCore import QRect, QSettings, Qt  # noqa: E402
from PySide6.QtGui import QColor, QPalette  # noqa: E402

from app.main_window import MainWindow  # noqa: E402
from app.platform_check import APT_LINE, XCB_LIBRARIES, uses_xcb, xcb_problem  # noqa: E402
from app.session import Session  # noqa: E402
from app.widgets import NORMAL, PRESENTATION, contrast_ratio  # noqa: E402
from qt_helpers import bundle_path, image_folder, no_leaked_threads  # noqa: E402,F401

WAIT = 20000


def _settings(tmp_path) -> QSettings:
    return QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)


@pytest.fixture
def window(qtbot, tmp_path):
    win = MainWindow(Session(device="cpu"), settings=_settings(tmp_path))
    qtbot.addWidget(win)
    win.show()
    qtbot.waitExposed(win)
    return win


def _layout(win) -> dict:
    return {"geometry": win.geometry(), "full screen": win.isFullScreen(),
            "docks": {n: (d.width(), d.height()) if d.isVisible() else "hidden" for n, d in win.docks.items()}}


def test_leaving_presentation_restores_the_window_exactly(qtbot, window, tmp_path):
    # a layout that fits the offscreen screen (800 × 800): the left docks closed, the confidence plot
    # closed too (presentation shows it), the compute panel narrower than presentation makes it
    for name in ("policy", "retrain", "capture", "confidence"):
        window.docks[name].hide()
    qtbot.wait(50)  # the window's minimum size shrinks once the layout has seen that
    window.setGeometry(QRect(20, 40, 700, 650))
    window.resizeDocks([window.docks["compute"]], [200], Qt.Orientation.Horizontal)
    qtbot.wait(50)
    before = _layout(window)
    window.actions.presentation.trigger()  # F5
    qtbot.wait(50)
    assert window.isFullScreen() and window.docks["confidence"].isVisible() and window.docks["compute"].width() > 250
    window.actions.presentation.trigger()  # F5 again
    qtbot.wait(50)
    assert _layout(window) == before
    # closing while in presentation mode saves the layout from before it
    window.actions.presentation.trigger()
    window.close()
    again = MainWindow(Session(device="cpu"), settings=_settings(tmp_path))
    qtbot.addWidget(again)
    again.show()
    qtbot.wait(50)
    assert _layout(again) == before


def _banner_colours(banner) -> tuple[QColor, QColor]:
    """(background as painted, text colour) of a banner: the most common pixel, and the label's colour."""
    image = banner.grab().toImage()
    pixels = Counter(image.pixel(x, y) for x in range(0, image.width(), 3) for y in range(0, image.height(), 3))
    background = QColor.fromRgb(pixels.most_common(1)[0][0])
    return background, banner.label.palette().color(QPalette.ColorRole.WindowText)


@pytest.mark.parametrize("presentation", [False, True])
def test_error_banner_is_readable_in_every_theme(qtbot, window, presentation):
    window.set_presentation(presentation)
    window.show_error("could not load broken.offramp: not a bundle")
    qtbot.waitUntil(window.banner.isVisible)
    theme = PRESENTATION if presentation else NORMAL
    background, text = _banner_colours(window.banner)
    assert background == QColor(theme.error)  # the banner paints its own colour, not the window's
    assert contrast_ratio(background, text) >= 4.5, (background.name(), text.name())
    window.offer.offer("Reopen clip.mp4?", "Reopen", lambda: None)
    background, text = _banner_colours(window.offer)
    assert contrast_ratio(background, text) >= 4.5 and background == QColor(theme.offer)


def test_a_failed_load_stops_saying_loading(qtbot, window, tmp_path, bundle_path):
    session = window.session
    with qtbot.waitSignal(session.model_loaded, timeout=WAIT):
        session.load_bundle(str(bundle_path))
    broken = tmp_path / "broken.offramp"
    broken.write_bytes(b"not a bundle")
    with qtbot.waitSignal(session.error, timeout=WAIT):
        window.load_bundle(str(broken))
    assert "loading" not in window.model_label.text() and "tiny test model" in window.model_label.text()
    assert "loading" not in window.statusBar().currentMessage()
    assert window.banner.isVisible() and "broken.offramp" in window.banner.text


def test_a_camera_error_stays_until_dismissed(qtbot, window, bundle_path):
    session = window.session
    with qtbot.waitSignal(session.error, timeout=WAIT):
        window.open_source("camera:97")
    message = window.banner.text
    assert "camera 97" in message.lower()
    with qtbot.waitSignal(session.model_loaded, timeout=WAIT):  # a model loading meanwhile changes nothing
        session.load_bundle(str(bundle_path))
    qtbot.wait(200)
    assert window.banner.isVisible() and window.banner.text == message
    assert "camera 97" in window.video.message.lower()  # the view says it too, not "open a source"
    window.banner.close_button.click()
    assert not window.banner.isVisible()


def test_a_source_open_when_the_app_died_is_offered_not_reopened(qtbot, tmp_path, image_folder, bundle_path):
    s = _settings(tmp_path)
    s.setValue("last_source", str(image_folder))
    s.setValue("last_bundle", str(bundle_path))
    s.setValue("running", True)  # the last run never cleared it: it died
    s.sync()
    win = MainWindow(Session(device="cpu"), settings=s)
    qtbot.addWidget(win)
    win.show()
    with qtbot.waitSignal(win.session.model_loaded, timeout=WAIT):
        win.startup()
    assert win.session.spec is None and win.offer.isVisible() and image_folder.name in win.offer.text
    win.offer.action_button.click()  # "Reopen …"
    qtbot.waitUntil(lambda: win.session.stats.frames >= 1, timeout=WAIT)
    assert win.session.spec.target == str(image_folder) and not win.offer.isVisible()
    assert _settings(tmp_path).value("running", type=bool)
    win.close()
    assert not _settings(tmp_path).value("running", type=bool)  # a clean exit: reopened next time


def test_a_source_open_at_a_clean_exit_is_reopened(qtbot, tmp_path, image_folder, bundle_path):
    s = _settings(tmp_path)
    s.setValue("last_source", str(image_folder))
    s.setValue("running", False)
    win = MainWindow(Session(device="cpu"), settings=s)
    qtbot.addWidget(win)
    with qtbot.waitSignal(win.session.model_loaded, timeout=WAIT):
        win.startup(bundle=str(bundle_path))
    assert win.session.spec is not None and not win.offer.isVisible()


def test_missing_x11_libraries_are_named_in_one_apt_get_line(capsys, monkeypatch):
    x11 = {"DISPLAY": ":0"}
    lacking = {"libxcb-cursor.so.0", "libxcb-icccm.so.4"}
    problem = xcb_problem(x11, loads=lambda so: so not in lacking)
    assert problem.count("\n") == 0 and "libxcb-cursor0 libxcb-icccm4;" in problem
    assert problem.endswith(APT_LINE) and "libxcb-keysyms1" in APT_LINE and "libxkbcommon-x11-0" in APT_LINE
    assert xcb_problem(x11, loads=lambda so: True) is None
    assert not uses_xcb({"DISPLAY": ":0", "QT_QPA_PLATFORM": "offscreen"})
    assert not uses_xcb({"DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0"}) and not uses_xcb({})
    assert uses_xcb({"QT_QPA_PLATFORM": "xcb"}, platform="linux") and not uses_xcb(x11, platform="darwin")
    assert set(XCB_LIBRARIES) >= {"libxcb-cursor.so.0", "libxcb-icccm.so.4", "libxcb-keysyms.so.1"}
    assert APT_LINE in (Path(__file__).parents[1] / "README.md").read_text()  # the Linux notes say the same line
    # the app says it and stops before Qt aborts with its generic message
    from app.__main__ import main
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.delenv("QT_QPA_PLATFORM")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr("app.platform_check._loads", lambda so: so not in lacking)
    monkeypatch.setattr("app.platform_check.sys.platform", "linux")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sudo apt-get install -y libxcb1" in err

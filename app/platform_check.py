"""Say which system packages are missing before Qt's X11 (xcb) platform plugin fails to load.

The PySide6 wheel carries Qt but not the X11 client libraries its xcb plugin links against. On a
stock Debian/Ubuntu desktop some are missing (libxcb-cursor0, libxcb-icccm4, libxcb-keysyms1 were
seen), and Qt then aborts inside QApplication with a generic "could not load the Qt platform plugin
xcb" message. This check loads each library the plugin needs (the list is the plugin's and
libQt6XcbQpa's DT_NEEDED entries for PySide6 6.11/6.12) before any window, and names the one
apt-get line that installs them.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Callable

# soname the xcb plugin needs -> the Debian/Ubuntu package that ships it
XCB_LIBRARIES = {
    "libxcb.so.1": "libxcb1",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
}
APT_LINE = "sudo apt-get install -y " + " ".join(XCB_LIBRARIES.values())


def uses_xcb(environ: dict | None = None, platform: str | None = None) -> bool:
    """True when Qt will pick the xcb plugin: on Linux, with QT_QPA_PLATFORM naming xcb, or unset in an
    X11 session (DISPLAY set, no Wayland display: there Qt 6 would pick its Wayland plugin)."""
    env = os.environ if environ is None else environ
    if not (platform or sys.platform).startswith("linux"):
        return False
    chosen = env.get("QT_QPA_PLATFORM", "")
    if chosen:
        return chosen.split(":")[0].split(";")[0] == "xcb"
    return bool(env.get("DISPLAY")) and not env.get("WAYLAND_DISPLAY")


def _loads(soname: str) -> bool:
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def missing_xcb_libraries(loads: Callable[[str], bool] | None = None) -> list[str]:
    """The sonames of XCB_LIBRARIES that the dynamic loader cannot load here (`loads(soname)`, default:
    try it)."""
    loads = loads or _loads
    return [soname for soname in XCB_LIBRARIES if not loads(soname)]


def xcb_problem(environ: dict | None = None, loads: Callable[[str], bool] | None = None) -> str | None:
    """One line saying which packages to install when the xcb plugin would fail to load, else None."""
    if not uses_xcb(environ):
        return None
    missing = missing_xcb_libraries(loads)
    if not missing:
        return None
    packages = " ".join(XCB_LIBRARIES[m] for m in missing)
    return (f"Qt's X11 platform plugin (xcb) cannot load: this system lacks {packages}; install what it needs "
            f"with: {APT_LINE}")

"""Refuse a Qt binding that would crash the app later: checked once at start, before any window.

PySide6 6.12.0 drops one reference to `None` on every `QPainter.setPen`/`setBrush`/`drawEllipse`/
`drawRect` call (and some signal emits) without taking one. On Python 3.10/3.11, `None` is an
ordinary object: its count reaches zero after a minute or so of painting and the interpreter aborts
("Fatal Python error: none_dealloc"), taking the window and any unsaved work with it. On Python 3.12+
`None` is immortal (PEP 683) and the binding's decrements are ignored (measured: no change in
`sys.getrefcount(None)` on 3.12.1 and 3.13.0 with 6.12.0; −3,998 per 4,000 paint calls on 3.10 and 3.11).

Two checks: a list of releases known to be bad on the Pythons they hurt, and a short probe that paints
into an image and watches `sys.getrefcount(None)`, so that a future release with the same fault is
refused too (the probe costs about a millisecond).
"""
from __future__ import annotations

import sys

# (binding version, the first Python version it is safe on)
KNOWN_BAD = {"6.12.0": (3, 12)}
PROBE_CALLS = 200  # paint calls of each kind; a healthy binding loses nothing, a broken one ~1 per call
PROBE_TOLERANCE = 20  # other threads may hold and drop a few references to None meanwhile


def known_bad(version: str, python: tuple[int, int]) -> bool:
    """True when PySide6 `version` is listed as breaking Python `python` (major, minor)."""
    safe_from = KNOWN_BAD.get(version)
    return safe_from is not None and tuple(python) < safe_from


def probe_none_refcount(calls: int = PROBE_CALLS) -> int:
    """How many references to `None` `calls` rounds of QPainter calls lost (0 on a healthy binding).

    Needs only QtGui; paints into a QImage, so no screen or QApplication is required."""
    from PySide6.QtCore import QRectF
    from PySide6.QtGui import QBrush, QColor, QImage, QPainter, QPen
    image = QImage(8, 8, QImage.Format.Format_RGB32)
    painter = QPainter(image)
    pen, brush, rect = QPen(QColor(1, 2, 3)), QBrush(QColor(4, 5, 6)), QRectF(1, 1, 4, 4)
    try:
        before = sys.getrefcount(None)
        for _ in range(calls):
            painter.setPen(pen)
            painter.setBrush(brush)
            painter.drawEllipse(rect)
            painter.drawRect(rect)
        return before - sys.getrefcount(None)
    finally:
        painter.end()


def binding_problem(version: str | None = None, python: tuple[int, int] | None = None,
                    probe: bool = True) -> str | None:
    """One sentence saying why this Qt binding cannot run the app, or None when it can.

    `version`/`python` default to the installed PySide6 and the running interpreter; `probe=False`
    skips the painting probe (it only means something for the running interpreter and binding)."""
    if version is None:
        import PySide6
        version = PySide6.__version__
    python = tuple(python or sys.version_info[:2])
    fix = (f"install another release (pip install 'PySide6-Essentials!={version}', e.g. 6.11.3) "
           "or use Python 3.12 or newer")
    if known_bad(version, python):
        return (f"PySide6 {version} on Python {python[0]}.{python[1]} loses a reference to None on every "
                f"paint call and would crash the app within minutes: {fix}.")
    if probe and python < (3, 12):
        lost = probe_none_refcount()
        if lost > PROBE_TOLERANCE:
            return (f"PySide6 {version} on Python {python[0]}.{python[1]} lost {lost} references to None in "
                    f"{4 * PROBE_CALLS} paint calls and would crash the app: {fix}.")
    return None

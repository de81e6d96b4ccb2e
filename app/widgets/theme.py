"""Colours and type sizes: the normal desktop look and the high-contrast presentation look."""
from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtGui import QColor


@dataclass(frozen=True)
class Theme:
    name: str
    font_scale: float  # multiplies the application's base point size
    background: str  # plot and diagram background
    foreground: str  # text and axes
    panel: str  # window background behind panels
    stage: str  # a stage that ran
    skipped: str  # a stage or exit that did not run
    exit_ran: str  # an exit that ran and did not fire
    fired: str  # the exit that fired
    threshold: str  # threshold markers
    accent: str  # saved-compute curve
    error: str  # error banner background
    error_text: str  # error banner text: at least 4.5:1 against `error` (WCAG AA)
    offer: str  # background of a banner that offers something ("Reopen …?")
    offer_text: str

    def color(self, role: str, alpha: int = 255) -> QColor:
        """The colour of `role` (a field name), with `alpha`."""
        c = QColor(getattr(self, role))
        c.setAlpha(alpha)
        return c

    def stylesheet(self) -> str:
        if self.name == "normal":
            return ""
        return (f"QWidget {{ background: {self.panel}; color: {self.foreground}; }}"
                f"QDockWidget::title {{ background: #202020; padding: 4px; }}"
                f"QStatusBar, QMenuBar, QMenu {{ background: #000; color: {self.foreground}; }}"
                f"QMenu::item:selected, QMenuBar::item:selected {{ background: #404040; }}"
                f"QPushButton, QComboBox {{ background: #202020; border: 1px solid {self.foreground};"
                f" padding: 4px 10px; }}"
                f"QSlider::groove:horizontal {{ background: #505050; height: 6px; }}"
                f"QSlider::handle:horizontal {{ background: {self.fired}; width: 18px; margin: -6px 0; }}")


NORMAL = Theme(name="normal", font_scale=1.0, background="#ffffff", foreground="#202020", panel="#f0f0f0",
               stage="#4a7fc1", skipped="#c8c8c8", exit_ran="#f0a030", fired="#2ca02c", threshold="#d62728",
               accent="#1f77b4", error="#b00020", error_text="#ffffff", offer="#1f4e79", offer_text="#ffffff")
PRESENTATION = Theme(name="presentation", font_scale=1.6, background="#000000", foreground="#ffffff",
                     panel="#000000", stage="#3d8bff", skipped="#3a3a3a", exit_ran="#ffb000", fired="#00e000",
                     threshold="#ff4040", accent="#00c8ff", error="#c00000", error_text="#ffffff", offer="#1f4e79",
                     offer_text="#ffffff")


def contrast_ratio(a: QColor, b: QColor) -> float:
    """WCAG 2 contrast ratio of two colours, 1 (same) to 21 (black on white); text needs 4.5 (AA)."""
    def luminance(c: QColor) -> float:
        def channel(v: float) -> float:
            return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4
        return 0.2126 * channel(c.redF()) + 0.7152 * channel(c.greenF()) + 0.0722 * channel(c.blueF())
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)

"""Strips above the video: `ErrorBanner` shows the latest error until it is dismissed (or a new one
comes), `OfferBanner` offers one action ("Reopen …?") until taken or dismissed. Both are coloured
from the theme, with text that meets WCAG AA contrast (4.5:1) in every theme."""
from __future__ import annotations

from typing import Callable

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QToolButton, QWidget

from .theme import NORMAL, Theme


class _Strip(QWidget):
    """A coloured strip: a wrapping label, optional buttons, a ✕ that hides it."""

    background_role, text_role = "error", "error_text"

    def __init__(self, name: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName(name)
        # a plain QWidget paints a style sheet's background only with this attribute; without it the
        # strip showed the window's light grey behind white text
        self.setAttribute(Qt.WidgetAttribute.WA_StyledBackground, True)
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.close_button = QToolButton()
        self.close_button.setText("✕")
        self.close_button.setToolTip("dismiss")
        self.close_button.clicked.connect(self.hide)
        self.row = QHBoxLayout(self)
        self.row.setContentsMargins(10, 4, 4, 4)
        self.row.addWidget(self.label, 1)
        self.row.addWidget(self.close_button)
        self.set_theme(NORMAL)
        self.hide()

    @property
    def text(self) -> str:
        return self.label.text()

    def set_theme(self, theme: Theme) -> None:
        bg, fg = getattr(theme, self.background_role), getattr(theme, self.text_role)
        self.setStyleSheet(f"#{self.objectName()} {{ background: {bg}; }} "
                           f"QLabel, QToolButton {{ color: {fg}; background: transparent; font-weight: bold; }} "
                           f"QPushButton {{ color: {fg}; background: transparent; border: 1px solid {fg}; "
                           f"padding: 2px 10px; font-weight: bold; }}")


class ErrorBanner(_Strip):
    def __init__(self, parent: QWidget | None = None):
        super().__init__("error_banner", parent)
        self.origin = ""

    def show_error(self, message: str, origin: str = "") -> None:
        """Show `message`; `origin` ("source", "model") lets the window clear it when that part recovers."""
        self.origin = origin
        self.label.setText(message[:1].upper() + message[1:])
        self.show()


class OfferBanner(_Strip):
    background_role, text_role = "offer", "offer_text"

    def __init__(self, parent: QWidget | None = None):
        super().__init__("offer_banner", parent)
        self.action_button = QPushButton()
        self.action_button.clicked.connect(self._on_action_clicked)
        self.row.insertWidget(1, self.action_button)
        self._action: Callable[[], None] | None = None

    def offer(self, message: str, button: str, action: Callable[[], None]) -> None:
        """Show `message` with a button `button` that calls `action` (and hides the strip)."""
        self.label.setText(message)
        self.action_button.setText(button)
        self._action = action
        self.show()

    def _on_action_clicked(self) -> None:
        action, self._action = self._action, None
        self.hide()
        if action is not None:
            action()

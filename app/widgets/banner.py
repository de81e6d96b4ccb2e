"""A strip above the video that shows the latest error until it is dismissed (or a new one comes)."""
from __future__ import annotations

from PySide6.QtWidgets import QHBoxLayout, QLabel, QToolButton, QWidget


class ErrorBanner(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("error_banner")
        self.label = QLabel()
        self.label.setWordWrap(True)
        close = QToolButton()
        close.setText("✕")
        close.setToolTip("dismiss")
        close.clicked.connect(self.hide)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(10, 4, 4, 4)
        layout.addWidget(self.label, 1)
        layout.addWidget(close)
        self.setStyleSheet("#error_banner { background: #b00020; } QLabel, QToolButton { color: white; "
                           "background: transparent; font-weight: bold; }")
        self.setAutoFillBackground(True)
        self.origin = ""
        self.hide()

    @property
    def text(self) -> str:
        return self.label.text()

    def show_error(self, message: str, origin: str = "") -> None:
        """Show `message`; `origin` ("source", "model") lets the window clear it when that part recovers."""
        self.origin = origin
        self.label.setText(message[:1].upper() + message[1:])
        self.show()

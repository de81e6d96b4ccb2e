"""The frame, scaled to fit, with the predicted label, its confidence and the exit that fired."""
from __future__ import annotations

import cv2
import numpy as np
from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QColor, QFont, QImage, QPainter, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from .theme import NORMAL, Theme

EMPTY_TEXT = "Open an image, a folder, a video or a camera from the File menu — or drop a file here"


class VideoView(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setMinimumSize(240, 180)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.theme: Theme = NORMAL
        self._rgb: np.ndarray | None = None  # keeps the QImage's memory alive
        self._image: QImage | None = None
        self.label = ""
        self.confidence: float | None = None
        self.caption = ""  # e.g. "exit 1 of 4 · stage 2 of 6"
        self.message = EMPTY_TEXT

    def set_theme(self, theme: Theme) -> None:
        self.theme = theme
        self.update()

    def set_frame(self, bgr: np.ndarray) -> None:
        """Show a (h, w, 3) uint8 BGR frame."""
        rgb = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        h, w = rgb.shape[:2]
        self._rgb = rgb
        self._image = QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888)
        self.message = ""
        self.update()

    def set_prediction(self, label: str, confidence: float | None, caption: str = "") -> None:
        self.label, self.confidence, self.caption = label, confidence, caption
        self.update()

    def set_message(self, text: str) -> None:
        self.message = text
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt's name
        p = QPainter(self)
        p.fillRect(self.rect(), self.theme.color("background") if self.theme.name != "normal" else Qt.GlobalColor.black)
        if self._image is not None:
            iw, ih = self._image.width(), self._image.height()
            scale = min(self.width() / iw, self.height() / ih)
            w, h = iw * scale, ih * scale
            target = QRectF((self.width() - w) / 2, (self.height() - h) / 2, w, h)
            # tiny images (CIFAR's 32×32) blur into mush when smoothed; show their pixels
            p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, scale < 4)
            p.drawImage(target, self._image)
        if self.message:
            p.setPen(QPen(Qt.GlobalColor.white))
            p.drawText(self.rect().adjusted(20, 20, -20, -20), Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap,
                       self.message)
        if self.label and self._image is not None:
            self._draw_overlay(p)
        p.end()

    def _draw_overlay(self, p: QPainter) -> None:
        big = QFont(self.font())
        big.setPointSizeF(min(40.0, max(12.0, self.height() / 26)))
        big.setBold(True)
        small = QFont(big)
        small.setPointSizeF(big.pointSizeF() * 0.5)
        small.setBold(False)
        conf = f"  {100 * self.confidence:.0f} %" if self.confidence is not None else ""
        text = f"{self.label}{conf}"
        p.setFont(big)
        big_h, big_w = p.fontMetrics().height(), p.fontMetrics().horizontalAdvance(text)
        p.setFont(small)
        small_h = p.fontMetrics().height() if self.caption else 0
        small_w = p.fontMetrics().horizontalAdvance(self.caption) if self.caption else 0
        pad = 12
        w = min(max(big_w, small_w) + 2 * pad, self.width() - 24)
        box = QRectF(12, self.height() - big_h - small_h - 2 * pad - 12, w, big_h + small_h + 2 * pad)
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(self.theme.color("background", 210) if self.theme.name != "normal" else QColor(0, 0, 0, 190))
        p.drawRoundedRect(box, 8, 8)
        p.setFont(big)
        p.setPen(QPen(self.theme.color("fired")))
        p.drawText(QRectF(box.x() + pad, box.y() + pad, w - 2 * pad, big_h), Qt.AlignmentFlag.AlignLeft, text)
        if self.caption:
            p.setFont(small)
            p.setPen(QPen(Qt.GlobalColor.white))
            p.drawText(QRectF(box.x() + pad, box.y() + pad + big_h, w - 2 * pad, small_h), Qt.AlignmentFlag.AlignLeft,
                       self.caption)

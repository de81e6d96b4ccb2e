"""The frame, scaled to fit, with the predicted label, its confidence and the exit that fired.
A live view (`app.widgets.live`)."""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QFont, QImage, QPainter, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from ..state import ModelInfo, signed_percent
from .theme import NORMAL, Theme

EMPTY_TEXT = "Open an image, a folder, a video or a camera from the File menu — or drop a file here"


class VideoView(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setMinimumSize(240, 180)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.theme: Theme = NORMAL
        self._bgr: np.ndarray | None = None  # the frame as given
        self._rgb: np.ndarray | None = None  # the frame scaled for display; keeps the QImage's memory alive
        self._image: QImage | None = None  # of _rgb, drawn unscaled
        self._frame_no = 0  # counts set_frame calls
        self._scaled_for: tuple | None = None  # (frame number, width, height) _image was made for
        self.label = ""
        self.confidence: float | None = None
        self.caption = ""  # e.g. "exit 1 of 4 · stage 2 of 6"
        self.message = EMPTY_TEXT

    def set_theme(self, theme: Theme) -> None:
        self.theme = theme
        self.update()

    def set_model(self, info: ModelInfo) -> None:
        """Nothing to size: the frame on screen stays until the new model's result replaces it."""

    def show_result(self, result: Any, frame: Any) -> None:
        """The frame and, over it, the label, confidence and the exit that fired (None: not run)."""
        self.set_frame(frame.image)
        if result is None:
            self.set_prediction("", None, "")
            return
        caption = (f"exit E{result.exit_index} of {result.num_exits} · {result.stages_run} of "
                   f"{result.num_stages} stages · FLOPs saved {signed_percent(result.saved)}")
        self.set_prediction(result.label, result.confidence, caption)

    def set_frame(self, bgr: np.ndarray) -> None:
        """Show a (h, w, 3) uint8 BGR frame."""
        self._bgr = bgr
        self._frame_no += 1
        self.message = ""
        self.update()

    @property
    def has_frame(self) -> bool:
        return self._bgr is not None

    def _scaled(self) -> tuple[QImage, float, float]:
        """The frame scaled to fit the widget (OpenCV scales far faster than QPainter, and
        without holding the GIL), with its top-left corner; cached per frame and size."""
        ih, iw = self._bgr.shape[:2]
        scale = min(self.width() / iw, self.height() / ih)
        w, h = max(1, round(iw * scale)), max(1, round(ih * scale))
        key = (self._frame_no, w, h)
        if key != self._scaled_for:
            # tiny images (CIFAR's 32×32) blur into mush when smoothed: show their pixels
            interp = cv2.INTER_NEAREST if scale >= 4 else cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            rgb = cv2.cvtColor(cv2.resize(self._bgr, (w, h), interpolation=interp), cv2.COLOR_BGR2RGB)
            self._rgb = np.ascontiguousarray(rgb)
            self._image = QImage(self._rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888)
            self._scaled_for = key
        return self._image, (self.width() - w) / 2, (self.height() - h) / 2

    def clear(self) -> None:
        """No frame, no prediction: the empty view."""
        self._bgr = self._image = self._rgb = None
        self.label, self.confidence, self.caption, self.message = "", None, "", EMPTY_TEXT
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
        image_rect = QRectF(self.rect())
        if self._bgr is not None:
            image, x, y = self._scaled()
            p.drawImage(QPointF(x, y), image)
            image_rect = QRectF(x, y, image.width(), image.height())
        if self.message:
            p.setPen(QPen(Qt.GlobalColor.white))
            p.drawText(self.rect().adjusted(20, 20, -20, -20), Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap,
                       self.message)
        if self.label and self._bgr is not None:
            self._draw_overlay(p, image_rect)
        p.end()

    def _draw_overlay(self, p: QPainter, image: QRectF) -> None:
        """Label, confidence and caption in a box at the bottom left of the image."""
        big = QFont(self.font())
        big.setPointSizeF(min(40.0, max(12.0, self.height() / 26)))
        big.setBold(True)
        conf = f"  {100 * self.confidence:.0f} %" if self.confidence is not None else ""
        text = f"{self.label}{conf}"
        for _ in range(6):  # measure; while too wide for the view, shrink the type and measure again
            small = QFont(big)
            small.setPointSizeF(big.pointSizeF() * 0.5)
            small.setBold(False)
            p.setFont(big)
            big_h, big_w = p.fontMetrics().height(), p.fontMetrics().horizontalAdvance(text)
            p.setFont(small)
            small_h = p.fontMetrics().height() if self.caption else 0
            small_w = p.fontMetrics().horizontalAdvance(self.caption) if self.caption else 0
            room = (self.width() - 48) / max(big_w, small_w, 1)
            if room >= 1 or big.pointSizeF() <= 6.0:
                break
            # glyph widths do not scale exactly with the point size (hinting): aim a little lower
            big.setPointSizeF(max(6.0, big.pointSizeF() * room * 0.97))
        pad = 12
        w = min(max(big_w, small_w) + 2 * pad + 4, self.width() - 24)  # + 4: advances are rounded, glyphs are not
        h = big_h + small_h + 2 * pad
        x = min(max(12.0, image.left() + 12), self.width() - w - 12)
        y = max(12.0, min(image.bottom(), self.height()) - h - 12)
        box = QRectF(x, y, w, h)
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(self.theme.color("background", 210) if self.theme.name != "normal" else QColor(0, 0, 0, 190))
        p.drawRoundedRect(box, 8, 8)
        inner = int(w - 2 * pad)  # a view too narrow for even the smallest type elides, never clips
        p.setFont(big)
        p.setPen(QPen(self.theme.color("fired")))
        text = p.fontMetrics().elidedText(text, Qt.TextElideMode.ElideRight, inner)
        p.drawText(QRectF(box.x() + pad, box.y() + pad, inner, big_h), Qt.AlignmentFlag.AlignLeft, text)
        if self.caption:
            p.setFont(small)
            p.setPen(QPen(Qt.GlobalColor.white))
            caption = p.fontMetrics().elidedText(self.caption, Qt.TextElideMode.ElideRight, inner)
            p.drawText(QRectF(box.x() + pad, box.y() + pad + big_h, inner, small_h), Qt.AlignmentFlag.AlignLeft,
                       caption)

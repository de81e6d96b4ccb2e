"""The network as a row of stages with its exits hanging below them: stages that ran are coloured,
stages never executed are greyed and marked "skipped", the exit that fired lights up. A live view
(`app.widgets.live`)."""
from __future__ import annotations

from typing import Any

from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QFont, QPainter, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from ..state import ModelInfo
from .theme import NORMAL, Theme


class ExitDiagram(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setMinimumHeight(130)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.theme: Theme = NORMAL
        self.num_stages = 0
        self.exit_stages: list[int] = []
        self.active: list[bool] = []  # exits the policy evaluates at all
        self.stages_run = 0
        self.exits_ran: dict[int, float] = {}  # exit index -> confidence
        self.fired: int | None = None
        self.label = ""

    def set_theme(self, theme: Theme) -> None:
        self.theme = theme
        self.update()

    def set_model(self, info: ModelInfo) -> None:
        self.num_stages, self.exit_stages = info.num_stages, list(info.exit_stages)
        self.active = [True] * len(self.exit_stages)
        self.clear()

    def set_active(self, active: list[bool]) -> None:
        self.active = list(active)
        self.update()

    def set_result(self, stages_run: int, exits_ran: dict[int, float], fired: int, label: str = "") -> None:
        self.stages_run, self.exits_ran, self.fired, self.label = stages_run, dict(exits_ran), fired, label
        self.update()

    def show_result(self, result: Any, frame: Any) -> None:
        """The stages that ran and the exits' confidence for this frame (None: not run)."""
        if result is None:
            self.clear()
            return
        self.set_result(result.stages_run, {r.exit_index: r.confidence for r in result.exits}, result.exit_index,
                        result.label)

    def clear(self) -> None:
        self.stages_run, self.exits_ran, self.fired, self.label = 0, {}, None, ""
        self.update()

    def sizeHint(self):  # noqa: N802 - Qt's name
        size = super().sizeHint()
        size.setHeight(int(self.fontMetrics().height() * 9))
        return size

    # -- drawing ------------------------------------------------------------------------------------
    def paintEvent(self, event) -> None:  # noqa: N802
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        p.fillRect(self.rect(), self.theme.color("background"))
        if not self.num_stages:
            p.setPen(self.theme.color("foreground"))
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "no model loaded")
            p.end()
            return
        fm = self.fontMetrics()
        margin, gap = 10.0, max(10.0, self.width() / (self.num_stages * 8))
        box_w = (self.width() - 2 * margin - gap * (self.num_stages - 1)) / self.num_stages
        box_h = min(fm.height() * 2.6, self.height() * 0.36)
        top = 6.0
        radius = min(box_h * 0.42, box_w * 0.3)
        exit_y = top + box_h + (self.height() - top - box_h - fm.height() * 1.3) / 2
        for s in range(self.num_stages):
            x = margin + s * (box_w + gap)
            self._draw_stage(p, QRectF(x, top, box_w, box_h), s)
            if s < self.num_stages - 1:
                y = top + box_h / 2
                self._arrow(p, QPointF(x + box_w, y), QPointF(x + box_w + gap, y), s + 1 < self.stages_run)
        for e, s in enumerate(self.exit_stages):
            cx = margin + s * (box_w + gap) + box_w / 2
            self._draw_exit(p, e, QPointF(cx, exit_y), radius, top + box_h)
        p.end()

    def _draw_stage(self, p: QPainter, rect: QRectF, s: int) -> None:
        ran = s < self.stages_run
        skipped = self.fired is not None and not ran
        fg = self.theme.color("foreground")
        p.setPen(QPen(fg if not skipped else self.theme.color("skipped"), 1.5,
                      Qt.PenStyle.DashLine if skipped else Qt.PenStyle.SolidLine))
        p.setBrush(self.theme.color("stage") if ran else self.theme.color("skipped", 90 if skipped else 160))
        p.drawRoundedRect(rect, 6, 6)
        p.setPen(Qt.GlobalColor.white if ran else (self.theme.color("skipped") if skipped else fg))
        text = f"stage {s + 1}" + ("\nskipped" if skipped else "")
        p.drawText(rect, Qt.AlignmentFlag.AlignCenter, _fit(text, rect.width(), p))

    def _draw_exit(self, p: QPainter, e: int, c: QPointF, r: float, stage_bottom: float) -> None:
        active = e >= len(self.active) or self.active[e] or e == len(self.exit_stages) - 1
        ran = e in self.exits_ran
        fired = e == self.fired
        role = "fired" if fired else "exit_ran" if ran else "skipped"
        style = Qt.PenStyle.SolidLine if active else Qt.PenStyle.DotLine
        p.setPen(QPen(self.theme.color(role if ran else "skipped"), 3 if fired else 1.5, style))
        p.drawLine(QPointF(c.x(), stage_bottom), QPointF(c.x(), c.y() - r))
        p.setBrush(self.theme.color(role) if ran else self.theme.color("background"))
        p.setPen(QPen(self.theme.color("fired") if fired else self.theme.color("foreground" if ran else "skipped"),
                      4 if fired else 1.5, style))
        p.drawEllipse(c, r, r)
        font = QFont(self.font())
        font.setBold(fired)
        p.setFont(font)
        p.setPen(Qt.GlobalColor.black if ran else self.theme.color("skipped" if not active else "foreground"))
        p.drawText(QRectF(c.x() - r, c.y() - r, 2 * r, 2 * r), Qt.AlignmentFlag.AlignCenter, f"E{e}")
        under = QRectF(c.x() - 80, c.y() + r + 1, 160, p.fontMetrics().height() + 2)
        if fired:
            text = f"{self.label} {100 * self.exits_ran.get(e, 0):.0f}%".strip()
            p.setPen(self.theme.color("fired"))
        elif ran:
            text, _ = f"{100 * self.exits_ran[e]:.0f}%", p.setPen(self.theme.color("foreground"))
        else:
            text, _ = ("off" if not active else ""), p.setPen(self.theme.color("skipped"))
        p.drawText(under, Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop, text)
        p.setFont(self.font())

    def _arrow(self, p: QPainter, a: QPointF, b: QPointF, ran: bool) -> None:
        p.setPen(QPen(self.theme.color("foreground" if ran else "skipped"), 2))
        p.drawLine(a, b)
        head = min(6.0, (b.x() - a.x()) / 2)
        p.drawLine(b, QPointF(b.x() - head, b.y() - head))
        p.drawLine(b, QPointF(b.x() - head, b.y() + head))


def _fit(text: str, width: float, p: QPainter) -> str:
    """Shorten "stage 12" to "12" when the box is too narrow for the word."""
    lines = text.split("\n")
    if max(p.fontMetrics().horizontalAdvance(t) for t in lines) <= width - 4:
        return text
    return "\n".join(t.replace("stage ", "S").replace("skipped", "–") for t in lines)

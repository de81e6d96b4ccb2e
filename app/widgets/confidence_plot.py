"""Confidence at every exit that ran for this frame (pyqtgraph bars), with each exit's threshold
drawn across its bar; the fired exit's bar in the "fired" colour, exits that did not run empty.
Under the bars, when the bundle has a novelty calibration (`engine.novelty.LiveNovelty`), the
frame's novelty score, with "unlike my classes" once it passes the calibrated threshold.
A live view (`app.widgets.live`)."""
from __future__ import annotations

from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from ..state import ModelInfo
from .theme import NORMAL, Theme


class ConfidencePlot(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.theme: Theme = NORMAL
        self.plot = pg.PlotWidget()
        self.plot.setMenuEnabled(False)
        self.plot.setToolTip("confidence of every exit that ran for this frame; red: its threshold; "
                             "E3 – : the exit did not run (the frame left earlier); off: the exit is switched off")
        self.plot.setMouseEnabled(False, False)
        self.plot.hideButtons()
        self.plot.setYRange(0, 1.05, padding=0)
        self.plot.setLabel("left", "confidence")
        self.bars = pg.BarGraphItem(x=[], height=[], width=0.6, pen=None)
        self.thresholds = pg.PlotDataItem([], [], connect="pairs")
        self.plot.addItem(self.bars)
        self.plot.addItem(self.thresholds)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.plot)
        self.novelty = QLabel()  # hidden for a bundle without a novelty calibration
        self.novelty.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.novelty.setVisible(False)
        layout.addWidget(self.novelty)
        self.novel: bool | None = None  # the frame shown is "unlike my classes"; None: no score shown
        self._reading: Any = None
        self.num_exits = 0
        self.threshold_values: list[float | None] = []
        self.values: dict[int, float] = {}
        self.fired: int | None = None
        self._ticks: list | None = None
        self.set_theme(NORMAL)

    def set_theme(self, theme: Theme) -> None:
        self.theme = theme
        self.plot.setBackground(theme.background)
        for axis in ("left", "bottom"):
            ax = self.plot.getAxis(axis)
            ax.setPen(theme.foreground)
            ax.setTextPen(theme.foreground)
            font = self.font()
            font.setPointSizeF(font.pointSizeF() * (1.0 if theme.name == "normal" else 1.3))
            ax.setStyle(tickFont=font)
        self.thresholds.setPen(pg.mkPen(theme.threshold, width=3))
        self._redraw()
        self.set_novelty(self._reading)

    def set_model(self, info: ModelInfo) -> None:
        self.num_exits = info.num_exits
        self.plot.setXRange(-0.6, self.num_exits - 0.4, padding=0)
        self.values, self.fired = {}, None
        self._redraw()
        self.set_novelty(None)

    def set_thresholds(self, thresholds: list[float | None] | None) -> None:
        """Thresholds per exit (None = exit off); None for a policy without thresholds."""
        self.threshold_values = list(thresholds) if thresholds else []
        self._redraw()

    def show_result(self, result: Any, frame: Any) -> None:
        """The confidence of every exit that ran for this frame (None: not run, no bars)."""
        if result is None:
            self.clear()
            return
        self.set_values({r.exit_index: r.confidence for r in result.exits}, result.exit_index)
        self.set_novelty(getattr(result, "novelty", None))

    def clear(self) -> None:
        self.set_values({}, None)
        self.set_novelty(None)

    def set_novelty(self, reading: Any) -> None:
        """The frame's `engine.novelty.NoveltyReading`; None (no calibration, no frame) hides it."""
        self._reading = reading
        label = self.novelty
        if reading is None:
            self.novel = None
            label.setVisible(False)
            return
        self.novel = bool(reading.novel)
        if reading.score is None:
            text, colour = "novelty: unknown", self.theme.skipped
        else:
            text = f"novelty {reading.score:.2f} at E{reading.exit_index}"
            text, colour = (f"unlike my classes · {text}", self.theme.threshold) if self.novel \
                else (text, self.theme.foreground)
        font = self.font()
        font.setPointSizeF(font.pointSizeF() * (1.0 if self.theme.name == "normal" else 1.3))
        font.setBold(self.novel)
        label.setFont(font)
        label.setText(text)
        label.setStyleSheet(f"color: {colour};")
        label.setToolTip(novelty_tooltip(reading))
        label.setVisible(True)

    def set_values(self, values: dict[int, float], fired: int | None) -> None:
        """Confidence of every exit that ran (exit index -> 0..1) and the exit that fired."""
        self.values, self.fired = dict(values), fired
        self._redraw()

    def _redraw(self) -> None:
        xs = list(range(self.num_exits))
        heights = [self.values.get(e, 0.0) for e in xs]
        brushes = [self.theme.color("fired" if e == self.fired else "exit_ran") for e in xs]
        self.bars.setOpts(x=xs, height=heights, width=0.6, brushes=brushes)
        tx, ty = [], []
        last = self.num_exits - 1
        for e, t in enumerate(self.threshold_values[: self.num_exits]):
            if t is not None and e != last:  # the last exit always answers: its threshold means nothing
                tx += [e - 0.4, e + 0.4]
                ty += [t, t]
        self.thresholds.setData(tx, ty, connect="pairs")
        labels = []
        for e in xs:
            off = e < len(self.threshold_values) and self.threshold_values[e] is None and e != last
            # short marks so that 6+ exits fit under the bars, large type included: "–" did not run
            state = "off" if off else ("" if e in self.values or not self.values else "–")
            labels.append((e, f"E{e}" + (f" {state}" if state else "")))
        if labels != self._ticks:  # setting ticks re-lays the axis out: only when they change
            self._ticks = labels
            self.plot.getAxis("bottom").setTicks([labels])


def novelty_tooltip(reading: Any) -> str:
    """What the novelty score means, its threshold's false-alarm rate and its measured reliability."""
    samples = f"{reading.samples} calibration images" if reading.samples else "the calibration images"
    lines = ["Novelty: how unlike the classes this model knows the frame is. 1 − the similarity of the "
             "frame's features to the nearest class prototype, at the exit it fired at (or, when it ran "
             f"to the end, the deepest early exit it ran), as the share of {samples} that were more "
             "typical there: 0.50 is an ordinary image, 0.99 stranger than 99 % of them.",
             f"\"Unlike my classes\" from {reading.threshold:.2f} on: about {reading.false_alarm:.0%} of images "
             "like the calibration set raise it too (false alarms).",
             "Reliability: " + (reading.reliability or "not measured for this bundle (offramp shift measures "
                                "how well the structure measures tell corrupted images from clean ones)") + ".",
             "A hint, not a verdict: it changes no answer and no exit."]
    if reading.score is None and reading.why_unknown:
        lines.insert(0, f"Unknown for this frame: {reading.why_unknown}.")
    return "\n".join(lines)

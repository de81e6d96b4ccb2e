"""Compute saved against the full model: this frame and cumulative (FLOPs and measured ms), a plot
of the saving over time, the exit histogram, and frames per second.

One wording and one sign for both savings: "FLOPs saved 31 %", "time saved −5 %" (a negative saving
costs more than the full model); the headline figures are green only when they are not negative.
A live view (`app.widgets.live`): "This frame" follows every frame shown; the running figures are
drawn less often, by `update_stats`."""
from __future__ import annotations

from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QGridLayout, QLabel, QSizePolicy, QVBoxLayout, QWidget

from engine.totals import THREAD_CLOCK, percentiles_ms

from ..state import ModelInfo, RunningTotals, format_flops, signed_percent
from .theme import NORMAL, Theme

NOT_RUN = "This frame: –"

HISTORY = 300  # frames shown in the plot over time (RunningTotals keeps as many)


class ComputePanel(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.theme: Theme = NORMAL
        self.frame_label = QLabel(NOT_RUN)
        self.total_label = QLabel("All frames: –")
        self.fps_label = QLabel("")  # empty unless frames stream in (see RunningTotals.rate)
        self.big_label = QLabel("")  # the headline numbers, large: FLOPs saved …
        self.time_label = QLabel("")  # … and time saved, when timed against the full model live
        for label in (self.big_label, self.time_label):
            label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        for label in (self.big_label, self.time_label, self.frame_label, self.total_label, self.fps_label):
            # one line each, sized by the layout and not by the text: a label that grows with its text
            # would resize the plots below it on every update, and a pyqtgraph resize is costly
            label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        for label in (self.frame_label, self.total_label):  # two lines each, always
            label.setWordWrap(True)
        self.time_plot = pg.PlotWidget()
        self.time_plot.setMouseEnabled(False, False)
        self.time_plot.setMenuEnabled(False)
        self.time_plot.hideButtons()
        # fixed ranges: an axis that rescales every frame re-lays itself out, which is most of a redraw
        self.time_plot.setYRange(-5, 105, padding=0)  # room above 100 for its tick label
        self.time_plot.setXRange(-HISTORY + 1, 0, padding=0.02)
        self.time_plot.setLabel("left", "saved %")
        self.time_plot.setLabel("bottom", "frames ago")
        self.legend = self.time_plot.addLegend(offset=(-5, 5), colCount=2)
        self.frame_curve = self.time_plot.plot([], [], name="each frame")
        self.total_curve = self.time_plot.plot([], [], name="cumulative")
        self.hist_plot = pg.PlotWidget()
        self.hist_plot.setMouseEnabled(False, False)
        self.hist_plot.setMenuEnabled(False)
        self.hist_plot.hideButtons()
        self.hist_plot.setLabel("left", "% of frames")
        self.hist_plot.setYRange(0, 105, padding=0.02)
        self.hist_plot.getAxis("bottom").setTicks([[]])  # exit names come with the model
        self.hist = pg.BarGraphItem(x=[], height=[], width=0.6, pen=None)
        self.hist_plot.addItem(self.hist)
        grid = QGridLayout()
        for row, label in enumerate((self.big_label, self.time_label, self.frame_label, self.total_label,
                                     self.fps_label)):
            grid.addWidget(label, row, 0)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(grid)
        layout.addWidget(self.time_plot, 3)
        layout.addWidget(self.hist_plot, 2)
        self._num_exits = 0
        self._headlines: dict[QLabel, tuple[float | None, str]] = {}  # what each headline shows
        self.compact = False
        self.set_theme(NORMAL)

    def set_theme(self, theme: Theme) -> None:
        self.theme = theme
        self.compact = theme.name != "normal"
        self.frame_label.setVisible(not self.compact)
        lines = 1 if self.compact else 2
        for label in (self.frame_label, self.total_label):
            label.setFixedHeight(label.fontMetrics().lineSpacing() * lines + 4)
        tick_font = self.font()
        tick_font.setPointSizeF(tick_font.pointSizeF() * (1.0 if theme.name == "normal" else 1.3))
        for plot in (self.time_plot, self.hist_plot):
            plot.setBackground(theme.background)
            for axis in ("left", "bottom"):
                plot.getAxis(axis).setPen(theme.foreground)
                plot.getAxis(axis).setTextPen(theme.foreground)
                plot.getAxis(axis).setStyle(tickFont=tick_font)
        self.frame_curve.setPen(pg.mkPen(theme.skipped if theme.name == "normal" else "#909090", width=1))
        self.total_curve.setPen(pg.mkPen(theme.accent, width=3))
        self.legend.setLabelTextColor(theme.foreground)
        font = self.font()
        font.setBold(True)
        for label, scale in ((self.big_label, 1.8), (self.time_label, 1.3)):  # time: the second figure
            font.setPointSizeF(self.font().pointSizeF() * scale)
            label.setFont(font)
            self._headline(label, *self._headlines.get(label, (None, "")))  # the same figures, new colours

    def _headline(self, label: QLabel, fraction: float | None, what: str = "") -> None:
        """"FLOPs saved 31 %" in the theme's green; a negative saving in its red, never green."""
        self._headlines[label] = (fraction, what)
        label.setText("" if fraction is None else f"{what} saved {signed_percent(fraction)}")
        negative = fraction is not None and round(100 * fraction) < 0
        label.setStyleSheet(f"color: {self.theme.threshold if negative else self.theme.fired};")

    def set_model(self, info: ModelInfo) -> None:
        num_exits = self._num_exits = info.num_exits
        self.hist_plot.getAxis("bottom").setTicks([[(e, f"E{e}") for e in range(num_exits)]])
        self.hist_plot.setXRange(-0.6, num_exits - 0.4, padding=0)
        self.clear()

    def clear(self) -> None:
        self.frame_curve.setData([], [])
        self.total_curve.setData([], [])
        self.hist.setOpts(x=[], height=[])
        self._headline(self.big_label, None)
        self._headline(self.time_label, None)
        self.frame_label.setText(NOT_RUN)
        self.total_label.setText("All frames: –")
        self.fps_label.setText("")

    def warm_up(self, num_exits: int) -> None:
        """Fill every plot and label once (drawn off screen by the window, then cleared)."""
        self.frame_curve.setData([-1, 0], [10, 20])
        self.total_curve.setData([-1, 0], [10, 20])
        self.hist.setOpts(x=list(range(num_exits)), height=[10] * num_exits, width=0.6,
                          brushes=[self.theme.color("stage")] * num_exits)
        for label in (self.big_label, self.time_label, self.frame_label, self.total_label, self.fps_label):
            label.setText("0 % 123456789 frames/s FLOPs ms")

    def show_result(self, result: Any, frame: Any) -> None:
        """"This frame": the result on screen (None: the frame on screen was not run)."""
        self.show_frame(result)

    def show_frame(self, result) -> None:
        """"This frame" for `result` (None: not run); `update_stats` redraws it with the figures."""
        if result is None:
            self.frame_label.setText(NOT_RUN)
        else:
            self.frame_label.setText(f"This frame: exit E{result.exit_index} · {format_flops(result.flops)} of "
                                     f"{format_flops(result.full_flops)} · FLOPs saved {signed_percent(result.saved)}"
                                     f" · {result.ms:.2f} ms")
        self.frame_label.setToolTip(self.frame_label.text())

    def update_stats(self, stats: RunningTotals, shown=None, fps: float | None = None) -> None:
        """Redraw the running figures (at most at the window's stats rate), with `shown`, the result on
        screen, marked in the histogram; `fps` None hides the rate (no stream: paused, a still, a burst)."""
        self.show_frame(shown)
        if not stats.frames:
            return
        mean_ms = stats.ms / stats.frames
        live = stats.full_ms and stats.last is not None and stats.last.full_ms_live
        self._headline(self.big_label, stats.saved, "FLOPs")
        # time saved only against the full model timed alongside the live frames: a fair comparison
        self._headline(self.time_label, stats.saved_ms if live else None, "time")
        rate = "" if fps is None else f"{fps:.1f} frames/s · "
        if self.compact:  # presentation: large type, the figures that matter
            self.total_label.setText(f"All {stats.frames} frames: FLOPs saved {signed_percent(stats.saved, 1)}")
            self.fps_label.setText(f"{rate}{mean_ms:.1f} ms per frame")
        else:
            # the totals in two short lines at most (the label keeps two); what they were measured
            # against goes below, one line each, in the label that grows with its lines
            times = ""
            if stats.full_ms and live:
                full_ms = stats.full_ms / stats.frames
                typical = stats.typical_ms if stats.typical_ms is not None else mean_ms
                full = f" · time saved {signed_percent(stats.saved_ms, 1)}"
                how = "live medians" if getattr(stats.last, "clock", "") != THREAD_CLOCK else "medians, CPU time"
                times = f"typical frame {typical:.2f} ms · full model {full_ms:.2f} ms ({how})"
            elif stats.full_ms:
                full = f" · {mean_ms:.2f} ms per frame"
                times = f"full model {stats.full_ms / stats.frames:.2f} ms (profiled)"
            else:
                full = f" · {mean_ms:.2f} ms per frame"
            self.total_label.setText(f"All {stats.frames} frames: FLOPs saved {signed_percent(stats.saved, 1)}{full}")
            # which runtime the milliseconds are of, in its short form ("torch TorchScript + oneDNN Graph")
            runtime = (getattr(stats.last, "runtime", "") or "").split(",")[0] if stats.last is not None else ""
            line = " · ".join(p for p in (rate[:-3], f"timed on {runtime}" if runtime else "") if p)
            self.fps_label.setText("\n".join(p for p in (line, times, _latency_text(stats)) if p))  # never cut
        for label in (self.total_label, self.fps_label):
            label.setToolTip(label.text())
        n = len(stats.saved_history)
        xs = list(range(1 - n, 1))
        self.frame_curve.setData(xs, list(stats.saved_history))
        self.total_curve.setData(xs, list(stats.cumulative_history))
        counts = stats.exit_counts
        fired = shown.exit_index if shown is not None else None
        shares = [100 * c / max(1, stats.frames) for c in counts]
        self.hist.setOpts(x=list(range(len(counts))), height=shares, width=0.6,
                          brushes=[self.theme.color("fired" if e == fired else "stage") for e in range(len(counts))])


def _latency_text(stats: RunningTotals) -> str:
    """"p50 / p95 / p99 …" of the per-frame inference times the totals keep (the tail an early exit
    makes matter: the mean can look good while p99 is the full model's time); "" with fewer than
    two frames kept."""
    if len(stats.frame_ms) < 2:
        return ""
    p = percentiles_ms(stats.frame_ms)
    return f"p50 / p95 / p99 {p['p50_ms']:.2f} / {p['p95_ms']:.2f} / {p['p99_ms']:.2f} ms"

"""Compute saved against the full model: this frame and cumulative (FLOPs and measured ms), a plot
of the saving over time, the exit histogram, and frames per second."""
from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QGridLayout, QLabel, QVBoxLayout, QWidget

from ..state import LiveStats, format_flops, percent
from .theme import NORMAL, Theme

HISTORY = 300  # frames shown in the plot over time (LiveStats keeps as many)


class ComputePanel(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.theme: Theme = NORMAL
        self.frame_label = QLabel("This frame: –")
        self.total_label = QLabel("Cumulative: –")
        self.fps_label = QLabel("– frames/s")
        self.big_label = QLabel("–")  # the headline number, large
        self.big_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        for label in (self.frame_label, self.total_label):
            label.setWordWrap(True)
        self.time_plot = pg.PlotWidget()
        self.time_plot.setMouseEnabled(False, False)
        self.time_plot.setMenuEnabled(False)
        self.time_plot.hideButtons()
        # fixed ranges: an axis that rescales every frame re-lays itself out, which is most of a redraw
        self.time_plot.setYRange(-5, 100, padding=0)
        self.time_plot.setXRange(-HISTORY + 1, 0, padding=0.02)
        self.time_plot.setLabel("left", "saved %")
        self.time_plot.setLabel("bottom", "frames ago")
        self.frame_curve = self.time_plot.plot([], [])
        self.total_curve = self.time_plot.plot([], [])
        self.hist_plot = pg.PlotWidget()
        self.hist_plot.setMouseEnabled(False, False)
        self.hist_plot.setMenuEnabled(False)
        self.hist_plot.hideButtons()
        self.hist_plot.setLabel("left", "% of frames")
        self.hist_plot.setYRange(0, 100, padding=0.02)
        self.hist = pg.BarGraphItem(x=[], height=[], width=0.6, pen=None)
        self.hist_plot.addItem(self.hist)
        grid = QGridLayout()
        grid.addWidget(self.big_label, 0, 0, 1, 2)
        grid.addWidget(self.frame_label, 1, 0, 1, 2)
        grid.addWidget(self.total_label, 2, 0)
        grid.addWidget(self.fps_label, 2, 1, Qt.AlignmentFlag.AlignRight)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(grid)
        layout.addWidget(self.time_plot, 3)
        layout.addWidget(self.hist_plot, 2)
        self._num_exits = 0
        self.set_theme(NORMAL)

    def set_theme(self, theme: Theme) -> None:
        self.theme = theme
        for plot in (self.time_plot, self.hist_plot):
            plot.setBackground(theme.background)
            for axis in ("left", "bottom"):
                plot.getAxis(axis).setPen(theme.foreground)
                plot.getAxis(axis).setTextPen(theme.foreground)
        self.frame_curve.setPen(pg.mkPen(theme.skipped if theme.name == "normal" else "#909090", width=1))
        self.total_curve.setPen(pg.mkPen(theme.accent, width=3))
        font = self.font()
        font.setPointSizeF(font.pointSizeF() * 1.8)
        font.setBold(True)
        self.big_label.setFont(font)
        self.big_label.setStyleSheet(f"color: {theme.fired};")

    def set_model(self, num_exits: int) -> None:
        self._num_exits = num_exits
        self.hist_plot.getAxis("bottom").setTicks([[(e, f"E{e}") for e in range(num_exits)]])
        self.hist_plot.setXRange(-0.6, num_exits - 0.4, padding=0)
        self.clear()

    def clear(self) -> None:
        self.frame_curve.setData([], [])
        self.total_curve.setData([], [])
        self.hist.setOpts(x=[], height=[])
        self.big_label.setText("–")
        self.frame_label.setText("This frame: –")
        self.total_label.setText("Cumulative: –")
        self.fps_label.setText("– frames/s")

    def update_stats(self, stats: LiveStats) -> None:
        """Redraw from the running figures (called at most at the window's render rate)."""
        r = stats.last
        if r is None:
            return
        ms = f" · {r.ms:.2f} ms of {r.full_ms:.2f} ms" if r.full_ms else f" · {r.ms:.2f} ms"
        self.frame_label.setText(f"This frame: exit E{r.exit_index} · {format_flops(r.flops)} of "
                                 f"{format_flops(r.full_flops)} · saved {percent(r.saved)} FLOPs{ms}")
        time_part = f", {percent(stats.saved_ms)} time" if stats.full_ms else ""
        self.total_label.setText(f"Cumulative over {stats.frames} frames: saved {percent(stats.saved, 1)} FLOPs"
                                 f"{time_part}")
        self.big_label.setText(f"{percent(stats.saved)} compute saved")
        self.fps_label.setText(f"{stats.fps:.1f} frames/s")
        n = len(stats.saved_history)
        xs = list(range(1 - n, 1))
        self.frame_curve.setData(xs, list(stats.saved_history))
        self.total_curve.setData(xs, list(stats.cumulative_history))
        counts = stats.exit_counts
        shares = [100 * c / max(1, stats.frames) for c in counts]
        self.hist.setOpts(x=list(range(len(counts))), height=shares, width=0.6,
                          brushes=[self.theme.color("fired" if e == r.exit_index else "stage") for e in range(len(counts))])

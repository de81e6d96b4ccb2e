"""Compute saved against the full model: this frame and cumulative (FLOPs and measured ms), a plot
of the saving over time, the exit histogram, and frames per second."""
from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QGridLayout, QLabel, QSizePolicy, QVBoxLayout, QWidget

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
        self.big_label = QLabel("")  # the headline number, large
        self.big_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        for label in (self.big_label, self.frame_label, self.total_label, self.fps_label):
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
        grid.addWidget(self.big_label, 0, 0, 1, 2)
        grid.addWidget(self.frame_label, 1, 0, 1, 2)
        grid.addWidget(self.total_label, 2, 0, 1, 2)
        grid.addWidget(self.fps_label, 3, 0, 1, 2)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(grid)
        layout.addWidget(self.time_plot, 3)
        layout.addWidget(self.hist_plot, 2)
        self._num_exits = 0
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
        self.big_label.setText("")
        self.frame_label.setText("This frame: –")
        self.total_label.setText("Cumulative: –")
        self.fps_label.setText("– frames/s")

    def warm_up(self, num_exits: int) -> None:
        """Fill every plot and label once (drawn off screen by the window, then cleared)."""
        self.frame_curve.setData([-1, 0], [10, 20])
        self.total_curve.setData([-1, 0], [10, 20])
        self.hist.setOpts(x=list(range(num_exits)), height=[10] * num_exits, width=0.6,
                          brushes=[self.theme.color("stage")] * num_exits)
        for label in (self.big_label, self.frame_label, self.total_label, self.fps_label):
            label.setText("0 % 123456789 frames/s FLOPs ms")

    def update_stats(self, stats: LiveStats, shown=None) -> None:
        """Redraw from the running figures (called at most at the window's render rate); "this
        frame" is `shown`, the result on screen, else the newest one."""
        r = shown if shown is not None else stats.last
        if r is None:
            return
        mean_ms = stats.ms / stats.frames if stats.frames else 0.0
        self.big_label.setText(f"{percent(stats.saved)} compute saved")
        if self.compact:  # presentation: large type, the figures that matter
            self.total_label.setText(f"All {stats.frames} frames: saved {percent(stats.saved, 1)} FLOPs")
            self.fps_label.setText(f"{stats.fps:.1f} frames/s · {mean_ms:.1f} ms per frame")
        else:
            self.frame_label.setText(f"This frame: exit E{r.exit_index} · {format_flops(r.flops)} of "
                                     f"{format_flops(r.full_flops)} · saved {percent(r.saved)} · {r.ms:.2f} ms")
            full = ""
            if stats.full_ms:
                full_ms = stats.full_ms / stats.frames
                if r.full_ms_live:  # timed alongside the live frames: a fair comparison
                    change = (f"{percent(stats.saved_ms, 1)} time saved" if stats.saved_ms >= 0
                              else f"{percent(-stats.saved_ms, 1)} slower")
                    full = f" vs full model {full_ms:.2f} ms measured live · {change}"
                else:  # an idle-time profile: shown beside, not turned into a percentage
                    full = f" (full model: {full_ms:.2f} ms profiled)"
            self.total_label.setText(f"All {stats.frames} frames: saved {percent(stats.saved, 1)} FLOPs · "
                                     f"{mean_ms:.2f} ms per frame{full}")
            self.fps_label.setText(f"{stats.fps:.1f} frames/s")
        for label in (self.frame_label, self.total_label, self.fps_label):
            label.setToolTip(label.text())
        n = len(stats.saved_history)
        xs = list(range(1 - n, 1))
        self.frame_curve.setData(xs, list(stats.saved_history))
        self.total_curve.setData(xs, list(stats.cumulative_history))
        counts = stats.exit_counts
        shares = [100 * c / max(1, stats.frames) for c in counts]
        self.hist.setOpts(x=list(range(len(counts))), height=shares, width=0.6,
                          brushes=[self.theme.color("fired" if e == r.exit_index else "stage") for e in range(len(counts))])

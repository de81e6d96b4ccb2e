"""Retraining panel: choose a folder of labelled images → its check report → train new exits and a
policy on the frozen backbone in a worker (progress, stage, time left, Cancel) → the new model's
accuracy-vs-cost curve against the current one → use it, save it as a bundle."""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import pyqtgraph as pg
from PySide6.QtWidgets import (QFileDialog, QHBoxLayout, QLabel, QPlainTextEdit, QProgressBar, QPushButton, QSpinBox,
                               QVBoxLayout, QWidget)

from .. import tasks
from ..session import Session
from ..state import curve_xy
from .theme import NORMAL, Theme


class RetrainPanel(QWidget):
    def __init__(self, session: Session, parent: QWidget | None = None):
        super().__init__(parent)
        self.session = session
        self.folder: str | None = None
        self.report_ok = False
        self.task = None  # the running TaskWorker
        self._train_when_ready = False  # train once the running check finds the folder usable
        self.new_bundle: Any = None
        self.new_report: dict | None = None
        self._stage, self._stage_start = "", 0.0
        self.choose_button = QPushButton("Choose folder…")
        self.choose_button.clicked.connect(self._on_choose_clicked)
        self.folder_label = QLabel("A folder with one sub-folder of images per class (e.g. cat/, dog/).")
        self.folder_label.setWordWrap(True)
        self.report = QPlainTextEdit()
        self.report.setReadOnly(True)
        self.report.setPlaceholderText("The folder's check report appears here before anything trains.")
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 500)
        self.epochs.setValue(30)
        self.epochs.setPrefix("epochs: ")
        self.train_button = QPushButton("Train exits and policy")
        self.train_button.setEnabled(False)
        self.train_button.clicked.connect(self._on_train_clicked)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self._on_cancel_clicked)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.stage_label = QLabel("")
        self.plot = pg.PlotWidget()
        self.plot.setMenuEnabled(False)
        self.plot.setLabel("bottom", "cost, % of the full model")
        self.plot.setLabel("left", "accuracy %")
        self.legend = self.plot.addLegend(offset=(-10, -10))
        self.plot.setMinimumHeight(160)
        self.use_button = QPushButton("Use this model")
        self.use_button.setEnabled(False)
        self.use_button.clicked.connect(self._on_use_clicked)
        self.save_button = QPushButton("Save bundle…")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self._on_save_clicked)
        row = QHBoxLayout()
        row.addWidget(self.epochs)
        row.addWidget(self.train_button, 1)
        row.addWidget(self.cancel_button)
        done = QHBoxLayout()
        done.addWidget(self.use_button)
        done.addWidget(self.save_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.choose_button)
        layout.addWidget(self.folder_label)
        layout.addWidget(self.report, 2)
        layout.addLayout(row)
        layout.addWidget(self.progress)
        layout.addWidget(self.stage_label)
        layout.addWidget(self.plot, 3)
        layout.addLayout(done)
        self.set_theme(NORMAL)
        session.model_loaded.connect(self._on_model_loaded)

    def set_theme(self, theme: Theme) -> None:
        self.plot.setBackground(theme.background)
        for axis in ("left", "bottom"):
            self.plot.getAxis(axis).setPen(theme.foreground)
            self.plot.getAxis(axis).setTextPen(theme.foreground)

    def _on_model_loaded(self, info) -> None:
        self._update_buttons()

    def _update_buttons(self) -> None:
        busy = self.task is not None
        self.choose_button.setEnabled(not busy)
        self.train_button.setEnabled(not busy and self.report_ok and self.session.info is not None)
        self.train_button.setToolTip("" if self.session.info is not None else "load a model first")
        self.cancel_button.setEnabled(busy)
        self.use_button.setEnabled(not busy and self.new_bundle is not None)
        self.save_button.setEnabled(not busy and self.new_bundle is not None)

    # -- 1. folder and its check ---------------------------------------------------------------------
    def _on_choose_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder of labelled images (one sub-folder per class)")
        if folder:
            self.check(folder)

    def check(self, folder: str, train_when_ready: bool = False) -> None:
        """Check `folder` in a worker and show the report; training is possible once it is usable,
        and with `train_when_ready` starts by itself then."""
        self.folder, self.report_ok, self._train_when_ready = folder, False, train_when_ready
        self.folder_label.setText(folder)
        self.report.setPlainText("checking …")
        self._start(functools.partial(tasks.check_folder, folder), "checking folder", result=self._on_checked)

    def _on_checked(self, report) -> None:
        lines = list(report.summary())
        try:
            report.raise_if_unusable()
            self.report_ok = True
            lines.append(f"\nReady: new exits for {len(report.classes)} classes will be trained on the frozen backbone.")
        except ValueError as e:
            lines.append(f"\nCannot train on this folder: {e}")
            self.session.error.emit(str(e))
        self.report.setPlainText("\n".join(lines))

    # -- 2. training -------------------------------------------------------------------------------------
    def _on_train_clicked(self) -> None:
        self.train()

    def train(self) -> None:
        info, folder, epochs = self.session.info, self.folder, self.epochs.value()
        if info is None or folder is None:
            return
        bundle = info.bundle
        self.new_bundle = self.new_report = None
        self.progress.setValue(0)
        self.session.status.emit(f"retraining exits on {folder} …")
        self._start(functools.partial(tasks.retrain, bundle, folder, epochs), "retraining",
                    result=self._on_trained, cancelled=self._on_cancelled)

    def _on_cancel_clicked(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.stage_label.setText("cancelling …")

    def _start(self, fn, what: str, **slots) -> None:
        self._stage, self._stage_start = "", time.perf_counter()
        self.task = self.session.start_task(fn, what, progress=self._on_progress, error=self._on_failed,
                                            finished=self._on_finished, **slots)
        self._update_buttons()

    def _on_progress(self, p) -> None:
        now = time.perf_counter()
        if p.stage != self._stage:
            self._stage, self._stage_start = p.stage, now
        self.progress.setValue(int(1000 * p.fraction))
        left = ""
        elapsed = now - self._stage_start
        if 0.02 < p.fraction < 1.0 and elapsed > 0.5:
            left = f" · about {_duration(elapsed * (1 - p.fraction) / p.fraction)} left in this stage"
        msg = f" — {p.message}" if p.message else ""
        self.stage_label.setText(f"{p.stage}: {p.done}/{p.total}{left}{msg}")

    def _on_trained(self, out) -> None:
        self.new_bundle, self.new_report = out
        self.progress.setValue(1000)
        self.stage_label.setText("done: compare the curves, then use or save the new model")
        self.show_curves(self.new_report)
        self.session.status.emit("retraining done")

    def _on_cancelled(self) -> None:
        self.stage_label.setText("cancelled: the current model is unchanged")
        self.progress.setValue(0)
        self.session.status.emit("retraining cancelled; the current model is unchanged")

    def _on_failed(self, message: str) -> None:
        self.stage_label.setText(message)
        if self.task is not None and self.task.what == "checking folder":
            self.report.setPlainText(message)
        self.session.error.emit(message)

    def _on_finished(self) -> None:
        self.task = None
        train, self._train_when_ready = self._train_when_ready and self.report_ok, False
        self._update_buttons()
        if train:  # after the check's worker is done: one task at a time
            self.train()

    def show_curves(self, report: dict) -> None:
        self.plot.clear()
        self.legend.clear()
        new_x, new_y = curve_xy(report.get("curve_new"))
        old_x, old_y = curve_xy(report.get("curve_old"))
        if old_x:
            self.plot.plot(old_x, old_y, pen=pg.mkPen("#888888", width=2), symbol="o", symbolSize=4, name="current")
        self.plot.plot(new_x, new_y, pen=pg.mkPen("#2ca02c", width=3), symbol="o", symbolSize=5, name="new")
        if not old_x:
            self.legend.addItem(pg.PlotDataItem(pen=None), "current model: no comparable curve (another class list)")

    # -- 3. use or save -----------------------------------------------------------------------------------
    def _on_use_clicked(self) -> None:
        if self.new_bundle is not None:
            self.session.load_bundle(self.new_bundle)

    def _on_save_clicked(self) -> None:
        start = f"{Path(self.folder or 'retrained').name}.offramp"
        path, _ = QFileDialog.getSaveFileName(self, "Save the retrained bundle", start, "Offramp bundles (*.offramp)")
        if path:
            self.save_to(path if path.endswith(".offramp") else path + ".offramp")

    def save_to(self, path: str) -> None:
        self._start(functools.partial(tasks.save, self.new_bundle, path), "saving bundle", result=self._on_saved)

    def _on_saved(self, path) -> None:
        self.session.status.emit(f"saved the retrained bundle to {path}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"

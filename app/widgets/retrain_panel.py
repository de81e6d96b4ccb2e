"""Retraining panel: choose a folder → its check report → train new exits and a policy on the
frozen backbone in a worker (progress, stage, time left, Cancel) → the new model's curve against
the current one → use it, save it as a bundle.

One flow, two kinds of folder (a `Mode` holds what differs):
- labelled: one sub-folder per class; new exits for those classes (`tasks.retrain`);
- unlabelled: images in any sub-folders; new early exits learn the model's own last exit
  (`tasks.distil`), so the classes and the last exit stay, and "accuracy" becomes agreement with
  the last exit."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QButtonGroup, QFileDialog, QGroupBox, QHBoxLayout, QLabel, QPlainTextEdit,
                               QProgressBar, QPushButton, QRadioButton, QSpinBox, QVBoxLayout, QWidget)

from .. import tasks
from ..session import Session
from ..state import ModelInfo, counted, curve_xy, percent
from .dialogs import ask_save_path
from .theme import NORMAL, Theme


# -- what the folder's check says ------------------------------------------------------------------------
def _labelled_summary(report, info: ModelInfo | None) -> tuple[list[str], str | None]:
    """The lines of a FolderReport, and why it cannot be trained on (None: it can)."""
    from engine.train.retrain import RETRAIN_VAL_FRACTION
    lines = list(report.summary())
    try:
        report.raise_if_unusable(RETRAIN_VAL_FRACTION)  # as training will split it: "Ready" must mean it
    except ValueError as e:
        return lines, str(e)
    ready = f"\nReady: new exits for {counted(len(report.classes), 'class')} will be trained on the frozen backbone."
    return lines + [ready], None


def _unlabelled_summary(report, info: ModelInfo | None) -> tuple[list[str], str | None]:
    """The lines of an UnlabelledReport, and why its exits cannot be distilled (None: they can)."""
    lines = report.summary()
    try:
        report.raise_if_unusable()
    except ValueError as e:
        return lines, str(e)
    if info is not None and info.num_exits < 2:
        return lines, f"{info.name} has a single exit, so it has no early exit to distil: load a model with early exits"
    if info is None:
        return lines + ["\nReady: load a model, then distil its early exits on these images."], None
    return lines + [f"\nReady: {counted(info.num_exits - 1, 'new early exit')} will learn what the last exit answers "
                    f"on these images; the {counted(len(info.class_names), 'class')} and the last exit stay as they "
                    "are."], None


@dataclass(frozen=True)
class Mode:
    """What differs between training on a labelled and on an unlabelled folder."""

    key: str  # remembered as retrain/mode
    choice: str  # the radio button
    hint: str  # under "Choose folder…" until a folder is chosen
    check: Callable  # tasks.check_folder | tasks.check_unlabelled
    summary: Callable  # (check report, ModelInfo | None) -> (lines, problem or None)
    train: Callable  # tasks.retrain | tasks.distil
    button: str  # the train button
    doing: str  # the training task's name (TaskWorker.what)
    score: str  # what the curves and the result measure
    per_exit: str  # the report's key for the score of every exit
    per_exit_words: str  # how the result names that score


LABELLED = Mode("labelled", "Labelled: one sub-folder per class (new classes)",
                "A folder with one sub-folder of images per class (e.g. cat/, dog/): new exits learn these classes.",
                tasks.check_folder, _labelled_summary, tasks.retrain, "Train exits and policy", "retraining",
                "accuracy", "accuracy_per_exit", "Accuracy per exit")
UNLABELLED = Mode("unlabelled", "Unlabelled: distil the early exits from\nthe last exit (keeps the classes)",
                  "A folder of images in any sub-folders, e.g. webcam captures; nothing needs a label: the early "
                  "exits learn the loaded model's last exit.",
                  tasks.check_unlabelled, _unlabelled_summary, tasks.distil, "Distil early exits", "distilling exits",
                  "agreement with the last exit", "agreement_per_exit", "Agreement of each exit with the last exit")
MODES = {m.key: m for m in (LABELLED, UNLABELLED)}


def result_text(report: dict, mode: Mode, held_out: int | None) -> str:
    """What training gave, in words: the score of every exit on the held-out images, the default
    point, and for distillation how many images it used."""
    per_exit = report.get(mode.per_exit) or []
    on = f" on {held_out} held-out images" if held_out else " on the held-out images"
    scores = ", ".join(f"E{e} {percent(s)}" for e, s in enumerate(per_exit))
    last = f" (E{len(per_exit) - 1} is the last exit itself)" if mode is UNLABELLED and per_exit else ""
    lines = [f"{mode.per_exit_words}{on}: {scores}{last}."]
    point = report.get("default_point")
    if point:
        at = f" at threshold {point['threshold']:.2f}" if point.get("threshold") is not None else ""
        lines.append(f"Default point{at}: {percent(1 - point['saved'])} of the full model's compute (saves "
                     f"{percent(point['saved'])}), {percent(point['accuracy'])} {mode.score}.")
    if mode is UNLABELLED and "images" in report:
        skipped = len(report.get("skipped") or [])
        lines.append(f"Distilled on {report['images'] - (held_out or 0)} of {report['images']} readable images"
                     + (f"; {counted(skipped, 'file')} skipped." if skipped else "."))
    return "\n".join(lines)


# -- the panel ---------------------------------------------------------------------------------------------
class RetrainPanel(QWidget):
    changed = Signal()  # the mode or the epochs changed (the window remembers them)

    def __init__(self, session: Session, parent: QWidget | None = None):
        super().__init__(parent)
        self.session = session
        self.mode: Mode = LABELLED
        self.folder: str | None = None
        self.report_ok = False
        self.task = None  # the running TaskWorker
        self._train_when_ready = False  # train once the running check finds the folder usable
        self.new_bundle: Any = None
        self.new_report: dict | None = None
        self.result_mode: Mode = LABELLED  # the mode that made new_bundle
        self.result_folder: str | None = None  # the folder it was trained on (a later check may name another)
        self._checked = None  # the last check's report (its image count sizes the progress plan)
        self._overall = tasks.OverallProgress([], 0.0)
        mode_box = QGroupBox("The folder holds")
        self.mode_group = QButtonGroup(self)
        self.mode_buttons: dict[str, QRadioButton] = {}
        box = QVBoxLayout(mode_box)
        for mode in MODES.values():
            button = self.mode_buttons[mode.key] = QRadioButton(mode.choice)
            button.setToolTip(mode.hint)
            self.mode_group.addButton(button)
            box.addWidget(button)
        self.mode_buttons[self.mode.key].setChecked(True)
        self.mode_group.buttonToggled.connect(self._on_mode_toggled)
        self.choose_button = QPushButton("Choose folder…")
        self.choose_button.clicked.connect(self._on_choose_clicked)
        self.folder_label = QLabel()
        self.folder_label.setWordWrap(True)
        self.report = QPlainTextEdit()
        self.report.setReadOnly(True)
        self.report.setPlaceholderText("The folder's check report appears here before anything trains.")
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 500)
        self.epochs.setValue(30)
        self.epochs.setPrefix("epochs: ")
        self.epochs.valueChanged.connect(self.changed)
        self.train_button = QPushButton()
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
        self.legend = self.plot.addLegend(offset=(-10, -10))
        self.plot.setMinimumHeight(160)
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        self.result_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
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
        layout.addWidget(mode_box)
        layout.addWidget(self.choose_button)
        layout.addWidget(self.folder_label)
        layout.addWidget(self.report, 2)
        layout.addLayout(row)
        layout.addWidget(self.progress)
        layout.addWidget(self.stage_label)
        layout.addWidget(self.plot, 3)
        layout.addWidget(self.result_label)
        layout.addLayout(done)
        self._show_mode()
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
        for button in self.mode_buttons.values():
            button.setEnabled(not busy)
        self.train_button.setEnabled(not busy and self.report_ok and self.session.info is not None)
        self.train_button.setToolTip("" if self.session.info is not None else "load a model first")
        self.cancel_button.setEnabled(busy)
        self.use_button.setEnabled(not busy and self.new_bundle is not None)
        self.save_button.setEnabled(not busy and self.new_bundle is not None)

    # -- 0. labelled or unlabelled ---------------------------------------------------------------------
    def set_mode(self, key: str, recheck: bool = True) -> None:
        """Train on a "labelled" or an "unlabelled" folder; with `recheck`, a folder already chosen
        is checked again for the new mode. Ignored while a task runs. Raises KeyError for another key."""
        mode = MODES[key]
        if mode is self.mode or self.task is not None:
            return
        self.mode = mode
        self.mode_group.blockSignals(True)
        self.mode_buttons[key].setChecked(True)
        self.mode_group.blockSignals(False)
        self._show_mode()
        self.changed.emit()
        if self.folder is not None and recheck:
            self.check(self.folder)

    def _on_mode_toggled(self, button: QRadioButton, checked: bool) -> None:
        if checked:
            self.set_mode(next(k for k, b in self.mode_buttons.items() if b is button))

    def _show_mode(self) -> None:
        self.train_button.setText(self.mode.button)
        if self.folder is None:
            self.folder_label.setText(self.mode.hint)
        if self.new_report is None:  # a result on screen keeps the words it was measured in
            self.plot.setLabel("left", f"{self.mode.score} %")

    def state(self) -> dict:
        """What the window remembers between runs."""
        return {"mode": self.mode.key, "epochs": self.epochs.value()}

    def restore(self, state: dict) -> None:
        """Take back what `state()` gave (values may come back from QSettings as strings)."""
        try:
            self.epochs.setValue(int(state["epochs"]))
        except (KeyError, TypeError, ValueError):
            pass
        if state.get("mode") in MODES:
            self.set_mode(str(state["mode"]))

    # -- 1. folder and its check ---------------------------------------------------------------------
    def _on_choose_clicked(self) -> None:
        title = "Folder of labelled images (one sub-folder per class)" if self.mode is LABELLED else \
            "Folder of images (any sub-folders; no labels needed)"
        folder = QFileDialog.getExistingDirectory(self, title, self.folder or "")
        if folder:
            self.check(folder)

    def check(self, folder: str, train_when_ready: bool = False, mode: str | None = None) -> None:
        """Check `folder` (in `mode`, default the chosen one) in a worker and show the report;
        training is possible once it is usable, and with `train_when_ready` starts by itself then.
        A result on hand goes: it was trained on another folder, or the folder changed since. Refused
        (with an error) while a task runs."""
        if self.task is not None:
            self.session.error.emit("the Retraining panel is busy: wait for it or cancel it, then check the folder "
                                    "again")
            return
        self._clear_result()
        if mode is not None:
            self.set_mode(mode, recheck=False)
        self.folder, self.report_ok, self._train_when_ready = folder, False, train_when_ready
        self.folder_label.setText(folder)
        self.report.setPlainText("checking …")
        self._start(functools.partial(self.mode.check, folder), "checking folder", result=self._on_checked)

    def _on_checked(self, report) -> None:
        self._checked = report
        lines, problem = self.mode.summary(report, self.session.info)
        self.report_ok = problem is None
        if problem is not None:
            lines.append(f"\nCannot train on this folder: {problem}")
            self.session.error.emit(problem)
        self.report.setPlainText("\n".join(lines))

    # -- 2. training -------------------------------------------------------------------------------------
    def _on_train_clicked(self) -> None:
        self.train()

    def train(self) -> None:
        info, folder, epochs, mode = self.session.info, self.folder, self.epochs.value(), self.mode
        if info is None or folder is None:
            return
        self._clear_result()  # an older run's curve is not this run's: nothing is "new" until it ends
        self.result_mode, self.result_folder = mode, folder
        self.session.status.emit(f"{mode.doing} on {folder} …")
        self._start(functools.partial(mode.train, info.bundle, folder, epochs), mode.doing, self._phases(epochs),
                    result=self._on_trained, cancelled=self._on_cancelled)

    def _phases(self, epochs: int) -> list[tuple[str, float]]:
        """The stages training reports, sized by the checked folder (see tasks.training_phases)."""
        from engine.train.retrain import RETRAIN_VAL_FRACTION
        report, info = self._checked, self.session.info
        if self.mode is LABELLED:
            images = report.total if report is not None else 1
            same = report is not None and list(report.classes) == list(info.class_names)
            return tasks.training_phases(images, epochs, val_fraction=RETRAIN_VAL_FRACTION, checks_images=False,
                                         old_curve=same)
        images = report.count if report is not None else 1
        return tasks.training_phases(images, epochs, val_fraction=0.1, checks_images=True, old_curve=True)

    def _on_cancel_clicked(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.stage_label.setText("cancelling …")

    def _start(self, fn, what: str, phases: list[tuple[str, float]] | None = None, **slots) -> None:
        """Run `fn` as the panel's task; `phases` (stage, weight) make its stages one progress bar."""
        self._overall = tasks.OverallProgress(phases or [], time.perf_counter())
        self.task = self.session.start_task(fn, what, progress=self._on_progress, error=self._on_failed,
                                            finished=self._on_finished, **slots)
        self._update_buttons()

    def _on_progress(self, p) -> None:
        """One bar for the whole task (all its stages), with the time left for all of it."""
        if self._overall.phases:
            fraction, left = self._overall.update(p, time.perf_counter())
        else:
            fraction, left = p.fraction, None
        self.progress.setValue(int(1000 * fraction))
        msg = f" — {p.message}" if p.message else ""
        left_text = f" · about {_duration(left)} left" if left is not None and fraction < 1.0 else ""
        self.stage_label.setText(f"{p.stage}: {p.done}/{p.total}{msg}{left_text}")

    def _on_trained(self, out) -> None:
        self.new_bundle, self.new_report = out
        self.progress.setValue(1000)
        self.stage_label.setText("done: compare the curves, then use or save the new model")
        self.show_curves(self.new_report)
        held_out = self.new_report.get("held_out") or self.new_bundle.meta.get("evaluation", {}).get("samples")
        self.result_label.setText(result_text(self.new_report, self.result_mode, held_out))
        self.session.status.emit(f"{self.result_mode.doing} done")

    def _on_cancelled(self) -> None:
        self.stage_label.setText("cancelled: the current model is unchanged")
        self.progress.setValue(0)
        self._clear_curves()
        self.session.status.emit(f"{self.result_mode.doing} cancelled; the current model is unchanged")

    def _on_failed(self, message: str) -> None:
        """The bar shows how far the result on hand got: a failed check or training leaves none (a failed
        save leaves the result, done); the buttons follow when the task has finished."""
        if self.new_bundle is None:
            self.progress.setValue(0)
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

    def _clear_result(self) -> None:
        """No trained model on hand: its curves, words and progress go (the buttons follow in _start)."""
        self.new_bundle = self.new_report = None
        self._clear_curves()
        self.plot.setLabel("left", f"{self.mode.score} %")
        self.progress.setValue(0)
        self.stage_label.setText("")

    def _clear_curves(self) -> None:
        self.plot.clear()
        self.legend.clear()
        self.result_label.setText("")

    def show_curves(self, report: dict) -> None:
        """The new model's curve and its full model (last exit) against the current model's curve,
        scored as the result's mode scores; a current model with other classes has no curve to show."""
        self._clear_curves()
        self.plot.setLabel("left", f"{self.result_mode.score} %")
        new_x, new_y = curve_xy(report.get("curve_new") or report.get("curve"))
        old_x, old_y = curve_xy(report.get("curve_old"))
        if old_x:
            self.plot.plot(old_x, old_y, pen=pg.mkPen("#888888", width=2), symbol="o", symbolSize=4, name="current")
        self.plot.plot(new_x, new_y, pen=pg.mkPen("#2ca02c", width=3), symbol="o", symbolSize=6, name="new")
        per_exit = report.get(self.result_mode.per_exit) or []
        if per_exit:  # the new model's full model: every stage, the last exit answers
            full = 100 * float(per_exit[-1])
            self.plot.plot([0, 100], [full, full], pen=pg.mkPen("#2ca02c", width=1, style=Qt.PenStyle.DashLine),
                           name=f"new: full model {full:.1f} %")
        if not old_x:
            self.legend.addItem(pg.PlotDataItem(pen=None), "current: other classes, no comparable curve")
        self.plot.setXRange(0, 102, padding=0.02)
        ys = new_y + old_y + ([100 * float(per_exit[-1])] if per_exit else [])
        if ys:
            self.plot.setYRange(max(0.0, min(ys) - 5), min(100.0, max(ys)) + 3, padding=0)

    # -- 3. use or save -----------------------------------------------------------------------------------
    def _on_use_clicked(self) -> None:
        if self.new_bundle is not None:
            self.session.load_bundle(self.new_bundle)

    def _on_save_clicked(self) -> None:
        # named after the folder the model learned, not one checked since
        name = Path(self.result_folder or "retrained").name + ("-distilled" if self.result_mode is UNLABELLED else "")
        path = ask_save_path(self, "Save the new bundle", f"{name}.offramp")
        if path:
            self.save_to(path)

    def save_to(self, path: str) -> None:
        self._start(functools.partial(tasks.save, self.new_bundle, path), "saving bundle", result=self._on_saved)

    def _on_saved(self, path) -> None:
        self.session.status.emit(f"saved the new bundle to {path}")



def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"

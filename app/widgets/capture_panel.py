"""Capture panel: build a labelled dataset live. Frames from any source are saved, raw (no overlay),
into FOLDER/CLASS/ — one at a time (Capture, key C) or every Nth frame while recording (key R) —
with a count per class read from the folder, an undo for a bad shot, and one click to retrain
the exits on the folder. The files are written by the session's writer thread, never here."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout,
                               QHeaderView, QLabel, QLineEdit, QPushButton, QSpinBox, QTableWidget, QTableWidgetItem,
                               QVBoxLayout, QWidget)

from ..dataset import FORMATS, DatasetError, check_class_name, class_counts, writable_problem
from ..session import Session
from ..state import counted


class CapturePanel(QWidget):
    retrain_requested = Signal(str)  # the dataset folder, once every queued frame is written
    recording_changed = Signal(bool)
    changed = Signal()  # folder, class or an option changed (the window remembers them)

    def __init__(self, session: Session, frame_on_screen: Callable[[], Any], parent: QWidget | None = None):
        """`frame_on_screen()`: the Frame the window shows now (None before the first)."""
        super().__init__(parent)
        self.session = session
        self._frame_on_screen = frame_on_screen
        self.folder = ""  # the dataset folder, user-expanded ("" = none chosen)
        self.counts: dict[str, int] = {}
        self.pending = 0  # frames handed to the writer, not yet saved or failed
        self.saved_paths: list[str] = []  # saved by this panel, newest last (for undo)
        self.recording = False
        self._seen = self._queued = self._skipped = 0  # frames seen / queued / skipped while recording
        self._burst_saved = 0  # of those queued, written
        self._burst_ending = False  # recording stopped, its last frames are still being written
        self._last_frame = None  # a re-run of a frame (threshold change) is not a new frame
        self._retrain_waiting = False

        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("dataset folder (created if missing)")
        self.folder_edit.editingFinished.connect(self._on_folder_edited)
        self.choose_button = QPushButton("Choose…")
        self.choose_button.clicked.connect(self._on_choose_clicked)
        self.class_combo = QComboBox()
        self.class_combo.setEditable(True)
        self.class_combo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.class_combo.lineEdit().setPlaceholderText("class name, e.g. cat")
        self.class_combo.setToolTip("pick a class folder of the dataset, or type a new class name")
        self.class_combo.editTextChanged.connect(self._on_class_edited)
        # leave the name field once a class is chosen: there C and R type letters instead of capturing
        self.class_combo.lineEdit().returnPressed.connect(self._on_class_chosen)
        self.class_combo.activated.connect(self._on_class_chosen)
        self.format_combo = QComboBox()
        self.format_combo.addItems(list(FORMATS))
        self.format_combo.setToolTip("JPEG: small files, fast. PNG: exact pixels, 10-40× slower to write")
        self.format_combo.currentIndexChanged.connect(self.changed)
        self.capture_button = QPushButton("Capture (C)")
        self.capture_button.setToolTip("save the frame on screen (without the overlay) into FOLDER/CLASS/")
        self.capture_button.clicked.connect(self.capture)
        self.undo_button = QPushButton("Undo last")
        self.undo_button.setToolTip("delete the last image this panel saved")
        self.undo_button.clicked.connect(self.undo_last)
        self.every = QSpinBox()
        self.every.setRange(1, 300)
        self.every.setValue(5)
        self.every.setPrefix("every ")
        self.every.setSuffix(" frames")
        self.every.setSpecialValueText("every frame")
        self.every.setToolTip("while recording, save one frame in this many (a camera gives about 30 a second)")
        self.every.valueChanged.connect(self.changed)
        self.limit = QSpinBox()
        self.limit.setRange(0, 100000)
        self.limit.setValue(50)
        self.limit.setPrefix("stop after ")
        self.limit.setSuffix(" images")
        self.limit.setSpecialValueText("no limit")
        self.limit.valueChanged.connect(self.changed)
        self.record_button = QPushButton("● Record (R)")
        self.record_button.setCheckable(True)
        self.record_button.setToolTip("save every Nth frame into the class folder until stopped")
        self.record_button.toggled.connect(self.set_recording)
        self.status_label = QLabel("Choose a folder and a class, then press C to save the frame on screen.")
        self.status_label.setWordWrap(True)
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["class", "images"])
        self.table.verticalHeader().hide()
        self.table.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 8)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setMinimumHeight(90)
        self.table.cellClicked.connect(self._on_row_clicked)
        self.total_label = QLabel("")
        self.retrain_button = QPushButton("Retrain on this folder")
        self.retrain_button.setToolTip("check the folder in the Retraining panel and train new exits on it")
        self.retrain_button.clicked.connect(self.retrain)

        folder_row = QHBoxLayout()
        folder_row.addWidget(self.folder_edit, 1)
        folder_row.addWidget(self.choose_button)
        form = QFormLayout()
        form.addRow("Folder", folder_row)
        form.addRow("Class", self.class_combo)
        form.addRow("Format", self.format_combo)
        shot = QHBoxLayout()
        shot.addWidget(self.capture_button, 1)
        shot.addWidget(self.undo_button)
        burst_box = QGroupBox("Record a burst")
        options = QHBoxLayout()
        options.addWidget(self.every, 1)
        options.addWidget(self.limit, 1)
        burst = QVBoxLayout(burst_box)
        burst.addLayout(options)
        burst.addWidget(self.record_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(shot)
        layout.addWidget(burst_box)
        layout.addWidget(self.status_label)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.total_label)
        layout.addWidget(self.retrain_button)
        session.result.connect(self._on_result)
        session.frame_saved.connect(self._on_saved)
        session.save_failed.connect(self._on_save_failed)
        self._update_buttons()

    # -- folder and class ------------------------------------------------------------------------------
    @property
    def class_name(self) -> str:
        return self.class_combo.currentText()

    def set_folder(self, folder: str, report: bool = True) -> None:
        """Use `folder` (made on the first save when missing) and read its class counts; with
        `report`, a folder that cannot be written is said at once."""
        folder = os.path.abspath(Path(str(folder).strip()).expanduser()) if str(folder).strip() else ""
        if folder != self.folder and self.recording:
            self.set_recording(False)
        self.folder = folder
        self.folder_edit.setText(folder)
        self.folder_edit.setToolTip(folder)
        self.refresh()
        problem = writable_problem(folder) if folder else None
        if problem:
            self._say(problem, error=report)
        elif folder:
            where = "" if Path(folder).is_dir() else " (created on the first capture)"
            self._say(f"Saving into {folder}{where}.")
        self.changed.emit()

    def set_class(self, name: str) -> None:
        self.class_combo.setEditText(name)

    def refresh(self) -> None:
        """Read the class folders and their image counts from disk again."""
        self.counts = class_counts(self.folder) if self.folder else {}
        text = self.class_name
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        self.class_combo.addItems(list(self.counts))
        self.class_combo.setEditText(text)
        self.class_combo.blockSignals(False)
        self._show_counts()

    def _show_counts(self) -> None:
        current = self.class_name.strip()
        self.table.setRowCount(len(self.counts))
        for row, (cls, n) in enumerate(sorted(self.counts.items())):
            name, count = QTableWidgetItem(cls), QTableWidgetItem(str(n))
            count.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            if cls == current:
                font = QFont(self.font())
                font.setBold(True)
                name.setFont(font)
                count.setFont(font)
            self.table.setItem(row, 0, name)
            self.table.setItem(row, 1, count)
        total = sum(self.counts.values())
        self.total_label.setText(f"{counted(total, 'image')} in {counted(len(self.counts), 'class')}"
                                 if self.counts else "no class folders yet" if self.folder else "")
        self._update_buttons()

    def _update_buttons(self) -> None:
        self.undo_button.setEnabled(bool(self.saved_paths))
        self.retrain_button.setEnabled(bool(self.folder) and not self._retrain_waiting)

    def _on_folder_edited(self) -> None:
        text = self.folder_edit.text().strip()
        if text != self.folder:
            self.set_folder(text)

    def _on_choose_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Dataset folder (one sub-folder per class)", self.folder)
        if folder:
            self.set_folder(folder)

    def _on_class_edited(self, text: str) -> None:
        self._show_counts()
        self.changed.emit()

    def _on_class_chosen(self, *_) -> None:
        self.capture_button.setFocus()
        if self.class_name.strip():
            self._say(f"press C to save the frame on screen into {self.class_name.strip()}, R to record a burst")

    def _on_row_clicked(self, row: int, column: int) -> None:
        self.set_class(self.table.item(row, 0).text())
        self._on_class_chosen()

    def _target(self) -> tuple[str, str] | None:
        """(folder, class) to save into, or None after saying what is wrong."""
        if not self.folder:
            self._say("no dataset folder chosen: choose one with Choose… in the Capture panel", error=True)
            return None
        try:
            cls = check_class_name(self.class_name)
        except DatasetError as e:
            self._say(str(e), error=True)
            return None
        problem = writable_problem(self.folder)
        if problem:
            self._say(problem, error=True)
            return None
        return self.folder, cls

    # -- saving -------------------------------------------------------------------------------------------
    def capture(self) -> bool:
        """Save the frame on screen; False (and a message) when there is none or the target is bad."""
        frame = self._frame_on_screen()
        if frame is None:
            self._say("no frame on screen to capture: open a camera, a video or a folder first", error=True)
            return False
        target = self._target()
        return target is not None and self._queue(frame.image, *target)

    def _queue(self, image, folder: str, cls: str) -> bool:
        suffix = FORMATS[self.format_combo.currentText()]
        if not self.session.save_frame(image, folder, cls, suffix):
            if not self.recording:  # a recording counts what it skips and says so at the end
                self._say("saving is behind (a slow disk?): this frame was not saved; try again in a moment",
                          error=True)
            return False
        self.pending += 1
        return True

    def set_recording(self, on: bool) -> None:
        """Start or stop saving every Nth new frame (the limit stops it by itself)."""
        if on and not self.recording and self._target() is None:
            on = False
        changed = on != self.recording
        self.recording = on
        self.record_button.blockSignals(True)
        self.record_button.setChecked(on)
        self.record_button.setText("■ Stop recording (R)" if on else "● Record (R)")
        self.record_button.blockSignals(False)
        for w in (self.folder_edit, self.choose_button, self.class_combo, self.format_combo):
            w.setEnabled(not on)
        if on and changed:
            self._seen = self._queued = self._skipped = self._burst_saved = 0
            self._burst_ending = False
            self._say(f"recording into {self.class_name.strip()}: one frame in {self.every.value()} …")
        elif changed:
            self._burst_ending = True
            self._end_burst()
        if changed or not on:
            self.recording_changed.emit(on)

    def _end_burst(self) -> None:
        """Sum up a recording once its last frame is written."""
        if not self._burst_ending or self.pending:
            return
        self._burst_ending = False
        skipped = f"; {counted(self._skipped, 'frame')} skipped, the disk was behind" if self._skipped else ""
        failed = self._queued - self._burst_saved
        failed = f"; {failed} could not be saved" if failed else ""
        cls = self.class_name.strip()
        self._say(f"recording stopped: {counted(self._burst_saved, 'frame')} saved into {cls} "
                  f"({counted(self.counts.get(cls, 0), 'image')} now){skipped}{failed}")

    def _on_result(self, result, frame) -> None:
        if not self.recording or frame is None or frame is self._last_frame:
            return
        self._last_frame = frame
        self._seen += 1
        if (self._seen - 1) % self.every.value():
            return
        if self._queue(frame.image, self.folder, self.class_name.strip()):
            self._queued += 1
        else:
            self._skipped += 1
        if self.limit.value() and self._queued >= self.limit.value():
            self.set_recording(False)

    def _on_saved(self, path: str, cls: str) -> None:
        self.pending = max(0, self.pending - 1)
        p = Path(path)
        if p.parent.parent == Path(self.folder):
            self.counts[cls] = self.counts.get(cls, 0) + 1
            if self.class_combo.findText(cls) < 0:
                self.class_combo.blockSignals(True)
                self.class_combo.addItem(cls)
                self.class_combo.blockSignals(False)
        self.saved_paths.append(path)
        self._show_counts()
        if self.recording or self._burst_ending:
            self._burst_saved += 1
        self._say(f"saved {p.parent.name}/{p.name} — {counted(self.counts.get(cls, 0), 'image')} of {cls}")
        self.session.status.emit(f"saved {path}")
        self._end_burst()
        self._maybe_retrain()

    def _on_save_failed(self, message: str) -> None:
        self.pending = max(0, self.pending - 1)
        if self.recording:
            self.set_recording(False)
        self._say(message)  # the session has already put it in the banner
        self._end_burst()
        self._maybe_retrain()

    def undo_last(self) -> None:
        """Delete the last image this panel saved."""
        if not self.saved_paths:
            return
        path = Path(self.saved_paths.pop())
        try:
            path.unlink()
        except FileNotFoundError:
            self._say(f"{path} was already gone", error=False)
        except OSError as e:
            self._say(f"cannot delete {path}: {e.strerror or e}", error=True)
            self.saved_paths.append(str(path))
            return
        else:
            self._say(f"deleted {path.parent.name}/{path.name}")
        self.refresh()

    # -- retraining ------------------------------------------------------------------------------------
    def retrain(self) -> None:
        """Hand the folder to the retraining flow, once the frames still being written are on disk."""
        if not self.folder:
            self._say("no dataset folder chosen: choose one with Choose… in the Capture panel", error=True)
            return
        if self.recording:
            self.set_recording(False)
        self._retrain_waiting = True
        self._update_buttons()
        if self.pending:
            self._say(f"waiting for {counted(self.pending, 'frame')} to be written …")
        self._maybe_retrain()

    def _maybe_retrain(self) -> None:
        if not self._retrain_waiting or self.pending:
            return
        self._retrain_waiting = False
        self._update_buttons()
        if not Path(self.folder).is_dir():
            self._say(f"{self.folder} does not exist yet: capture some frames into it first", error=True)
            return
        self.retrain_requested.emit(self.folder)

    # -- settings ----------------------------------------------------------------------------------------
    def state(self) -> dict:
        """What the window remembers between runs."""
        return {"folder": self.folder, "class": self.class_name.strip(), "every": self.every.value(),
                "limit": self.limit.value(), "format": self.format_combo.currentText()}

    def restore(self, state: dict) -> None:
        """Take back what `state()` gave (values may come back from QSettings as strings)."""
        for spin, key in ((self.every, "every"), (self.limit, "limit")):
            try:
                spin.setValue(int(state[key]))
            except (KeyError, TypeError, ValueError):
                pass
        if state.get("format") in FORMATS:
            self.format_combo.setCurrentText(state["format"])
        if state.get("class"):
            self.set_class(str(state["class"]))
        if state.get("folder"):
            self.set_folder(str(state["folder"]), report=False)

    def _say(self, message: str, error: bool = False) -> None:
        """In the panel; with `error` also in the window's banner (the panel may be hidden)."""
        self.status_label.setText(message[:1].upper() + message[1:])
        if error:
            self.session.error.emit(message)

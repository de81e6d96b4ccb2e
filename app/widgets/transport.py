"""Play/pause, previous/next, seek and pace for file sources (a camera only pauses)."""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QSlider, QToolButton, QWidget

from ..session import Session

# (label, seconds per frame): None = the source's own pace (video fps, 1 s per image), 0 = full speed
PACES = [("own pace", None), ("full speed", 0.0), ("30 frames/s", 1 / 30), ("10 frames/s", 0.1),
         ("0.5 s / image", 0.5), ("1 s / image", 1.0), ("2 s / image", 2.0), ("5 s / image", 5.0)]


class TransportBar(QWidget):
    def __init__(self, session: Session, parent: QWidget | None = None):
        super().__init__(parent)
        self.session = session
        self.prev_button = QToolButton(text="◀", toolTip="previous image / frame (Left)")
        self.play_button = QToolButton(text="❚❚", toolTip="pause / play (Space)")
        self.next_button = QToolButton(text="▶", toolTip="next image / frame (Right)")
        self.seek = QSlider(Qt.Orientation.Horizontal)
        self.seek.setObjectName("seek_slider")
        self.position = QLabel("no source")
        self.position.setMinimumWidth(self.position.fontMetrics().horizontalAdvance("00000 / 00000  "))
        self.pace = QComboBox()
        self.pace.setObjectName("pace_combo")
        self.pace.setToolTip("how fast a folder or video plays")
        for label, _ in PACES:
            self.pace.addItem(label)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(4, 0, 4, 0)
        for w in (self.prev_button, self.play_button, self.next_button):
            layout.addWidget(w)
        layout.addWidget(self.seek, 1)
        layout.addWidget(self.position)
        layout.addWidget(self.pace)
        self.prev_button.clicked.connect(self._on_prev)
        self.next_button.clicked.connect(self._on_next)
        self.play_button.clicked.connect(session.toggle_pause)
        self.seek.sliderReleased.connect(self._on_seek)
        self.pace.activated.connect(self._on_pace_chosen)
        session.source_info.connect(self._on_source_info)
        session.source_position.connect(self._on_position)
        session.paused_changed.connect(self._on_paused)
        session.source_failed.connect(self._on_source_failed)
        self.set_pace(session.pace)
        self._enable(False, False)

    def set_pace(self, seconds: float | None) -> None:
        index = next((i for i, (_, s) in enumerate(PACES) if s == seconds), 0)
        self.pace.setCurrentIndex(index)

    def _enable(self, seekable: bool, playing: bool) -> None:
        for w in (self.prev_button, self.next_button, self.seek, self.pace):
            w.setEnabled(seekable)
        self.play_button.setEnabled(playing)

    def _on_source_info(self, info: dict) -> None:
        count = info.get("count") or 0
        self.seek.setRange(0, max(0, count - 1))
        self._enable(bool(info.get("seekable")), True)
        self.set_pace(self.session.pace)

    def _on_source_failed(self, message: str) -> None:
        """No source open any more (a path refused before anything closed leaves the bar as it is)."""
        if self.session.source_open:
            return
        self._enable(False, False)
        self.seek.setRange(0, 0)
        self.position.setText("no source")
        self.position.setToolTip("")

    def _on_position(self, index: int, count: int, name: str) -> None:
        if not self.seek.isSliderDown():
            self.seek.blockSignals(True)
            self.seek.setValue(index)
            self.seek.blockSignals(False)
        self.position.setText(f"{index + 1} / {count}" if count > 0 else f"frame {index + 1}")
        self.position.setToolTip(name)

    def _on_paused(self, paused: bool) -> None:
        self.play_button.setText("▶" if paused else "❚❚")

    def _on_prev(self) -> None:
        self.session.step(-1)

    def _on_next(self) -> None:
        self.session.step(1)

    def _on_seek(self) -> None:
        self.session.seek(self.seek.value())

    def _on_pace_chosen(self, index: int) -> None:
        self.session.set_pace(PACES[index][1])

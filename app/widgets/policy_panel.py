"""Policy panel: choose the bundle's policy, edit one threshold per exit with immediate effect, walk
the Pareto front with a budget slider, reset to the bundle's default, save the configuration.

The budget slider walks the active policy's own front (a learned policy's λ sweep, where the bundle
can run it); a policy without one walks the bundle's front, and moving it switches the combo to
the policy that front belongs to, so the combo always names what runs. Its label reads the budget
as a fraction of the full model's compute ("≤ 60 % of full compute"); `budget_fraction()` and
`set_budget_fraction(0.6)` read and set it so."""
from __future__ import annotations

import functools
import logging
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFormLayout, QGridLayout, QGroupBox, QHBoxLayout, QLabel,
                               QPushButton, QSlider, QVBoxLayout, QWidget)

from engine.budget import check_budget

from .. import tasks
from ..session import Session
from ..state import ModelInfo, PolicyState, budget_text, front_label
from .dialogs import ask_save_path

log = logging.getLogger(__name__)

STEPS = 100  # slider positions for 0..1
NO_FRONT_TIP = ("This bundle has no Pareto front (meta['front']); train or search one with the offramp "
                "command line to get a budget slider.")


class _ExitRow:
    """Label, slider, value and "off" box of one exit."""

    def __init__(self, panel: "PolicyPanel", e: int, stage: int):
        self.e = e
        self.name = QLabel(f"E{e} · stage {stage + 1}")
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, STEPS)
        self.slider.setObjectName(f"threshold_slider_{e}")
        self.slider.setToolTip(f"exit E{e} fires when its confidence reaches this threshold")
        self.value = QLabel("–")
        self.value.setMinimumWidth(self.value.fontMetrics().horizontalAdvance("0.000"))
        self.off = QCheckBox("off")
        self.off.setObjectName(f"threshold_off_{e}")
        self.off.setToolTip(f"switch exit E{e} off: its head is not even evaluated")
        self.slider.valueChanged.connect(panel._on_slider_moved)
        self.off.toggled.connect(panel._on_off_toggled)

    def show(self, t: float | None, enabled: bool) -> None:
        """Threshold `t` (None = off); `enabled` False: the policy has no thresholds (every exit runs
        as it decides), so nothing is shown as off."""
        for w in (self.slider, self.off):
            w.blockSignals(True)
        self.off.setChecked(enabled and t is None)
        if t is not None:
            self.slider.setValue(round(t * STEPS))
        self.value.setText("–" if not enabled else "off" if t is None else f"{t:.2f}")
        self.slider.setEnabled(enabled and t is not None)
        self.off.setEnabled(enabled)
        for w in (self.slider, self.off):
            w.blockSignals(False)


class PolicyPanel(QWidget):
    def __init__(self, session: Session, parent: QWidget | None = None):
        super().__init__(parent)
        self.session = session
        self.rows: list[_ExitRow] = []
        self.combo = QComboBox()
        self.combo.setObjectName("policy_combo")
        self.combo.activated.connect(self._on_policy_chosen)
        self.describe = QLabel("no model loaded")
        self.describe.setWordWrap(True)
        self.thresholds_box = QGroupBox("Thresholds per exit")
        self.grid = QGridLayout(self.thresholds_box)
        self.budget = QSlider(Qt.Orientation.Horizontal)
        self.budget.setObjectName("budget_slider")
        self.budget.setTickPosition(QSlider.TickPosition.TicksBelow)
        self.budget.valueChanged.connect(self._on_budget_moved)
        self.budget_label = QLabel("–")
        self.budget_label.setWordWrap(True)
        self.budget_box = budget_box = QGroupBox("Budget (Pareto front)")
        blay = QVBoxLayout(budget_box)
        ends = QHBoxLayout()
        ends.addWidget(QLabel("cheapest"))
        ends.addStretch(1)
        ends.addWidget(QLabel("most accurate"))
        blay.addWidget(self.budget)
        blay.addLayout(ends)
        blay.addWidget(self.budget_label)
        self.reset_button = QPushButton("Reset to bundle default")
        self.reset_button.clicked.connect(self._on_reset)
        self.save_button = QPushButton("Save configuration into a bundle…")
        self.save_button.clicked.connect(self._on_save_clicked)
        form = QFormLayout()
        form.addRow("Policy", self.combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.reset_button)
        buttons.addWidget(self.save_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.describe)
        layout.addWidget(self.thresholds_box)
        layout.addWidget(budget_box)
        layout.addLayout(buttons)
        layout.addStretch(1)
        session.model_loaded.connect(self._on_model_loaded)
        session.policy_changed.connect(self._on_policy_changed)
        self.setEnabled(False)

    # -- model and policy from the session --------------------------------------------------------
    def _on_model_loaded(self, info: ModelInfo) -> None:
        self.setEnabled(True)
        self.combo.blockSignals(True)
        self.combo.clear()
        self.combo.addItems(list(info.policies))
        self.combo.blockSignals(False)
        while self.grid.count():
            w = self.grid.takeAt(0).widget()
            if w is not None:
                w.deleteLater()
        self.rows = [_ExitRow(self, e, s) for e, s in enumerate(info.exit_stages[:-1])]
        for r, row in enumerate(self.rows):
            for c, w in enumerate((row.name, row.slider, row.value, row.off)):
                self.grid.addWidget(w, r, c)
        last = len(info.exit_stages) - 1
        self.grid.addWidget(QLabel(f"E{last} · stage {info.exit_stages[-1] + 1}"), len(self.rows), 0)
        self.grid.addWidget(QLabel("final exit: always answers"), len(self.rows), 1, 1, 3)

    def _on_policy_changed(self, state: PolicyState) -> None:
        self.combo.blockSignals(True)
        self.combo.setCurrentText(state.name)
        self.combo.blockSignals(False)
        kind = state.current.get("kind", "?")
        front, owner = state.front, state.front_owner
        on_front = state.point is not None and state.current == front[state.point]["policy"]
        origin = (f"{state.name}, front point {state.point + 1}" if on_front and state.edited else
                  f"{state.name}, edited" if state.edited else state.name)
        self.describe.setText(f"Active: {_describe(state.current)}  ({origin})")
        ts = state.thresholds
        self.thresholds_box.setEnabled(ts is not None)
        self.thresholds_box.setToolTip("" if ts is not None else f"the {kind} policy has no thresholds to edit")
        for row in self.rows:
            row.show(ts[row.e] if ts is not None else None, ts is not None)
        self._show_budget(state, front, owner, on_front)

    def _show_budget(self, state: PolicyState, front: list, owner: str | None, on_front: bool) -> None:
        self.budget.blockSignals(True)
        self.budget.setRange(0, max(0, len(front) - 1))
        if state.point is not None:
            self.budget.setValue(state.point)
        self.budget.blockSignals(False)
        self.budget.setEnabled(bool(front))
        self.budget.setToolTip("" if front else NO_FRONT_TIP)
        self.budget_label.setToolTip("" if front else NO_FRONT_TIP)
        self.budget_box.setTitle(f"Budget (Pareto front of {owner})" if front else "Budget (Pareto front)")
        if not front:
            self.budget_label.setText("no front in this bundle")
        elif owner != state.name:
            self.budget_label.setText(f"the {state.name} policy has no front of its own: moving the budget switches "
                                      f"to the {owner} policy")
        elif state.point is not None:
            where = "" if on_front else " (then edited)"
            fit = (f"{budget_text(state.budget)} · " if state.budget_met else
                   f"nothing fits {budget_text(state.budget)}: the cheapest · ")
            self.budget_label.setText(f"{fit}point {state.point + 1} of {len(front)}{where}: "
                                      + front_label(front[state.point]))
        else:
            self.budget_label.setText("not on the front: move the budget to choose a point")

    # -- the user's edits ---------------------------------------------------------------------------
    def _row_of(self, widget) -> _ExitRow:
        return next(r for r in self.rows if widget in (r.slider, r.off))

    def _on_slider_moved(self, value: int) -> None:
        row = self._row_of(self.sender())
        row.value.setText(f"{value / STEPS:.2f}")
        self.session.set_threshold(row.e, value / STEPS)

    def _on_off_toggled(self, off: bool) -> None:
        row = self._row_of(self.sender())
        self.session.set_threshold(row.e, None if off else row.slider.value() / STEPS)

    def _on_policy_chosen(self, index: int) -> None:
        self.session.choose_policy(self.combo.itemText(index))

    def _on_budget_moved(self, index: int) -> None:
        self.session.choose_point(index)

    # -- the budget as a fraction of the full model's compute -----------------------------------------
    def budget_fraction(self) -> float | None:
        """The budget as a fraction of the full model's FLOPs: the one set with `set_budget_fraction`,
        else the cost of the front point the slider is on; None off the front or with no model."""
        policy = self.session.policy
        return None if policy is None else policy.budget

    def set_budget_fraction(self, fraction: float) -> None:
        """Move the budget to the most accurate front point within `fraction` of the full model's FLOPs
        (none fits: the cheapest, and the label says so). Raises ValueError for a fraction outside
        (0, 1]; does nothing when there is no front to walk."""
        check_budget(fraction)
        self.session.choose_budget(fraction)

    def _on_reset(self) -> None:
        self.session.reset_policy()

    def _on_save_clicked(self) -> None:
        info = self.session.info
        start = str(Path(info.path).with_name(Path(info.path).stem + "-edited.offramp")) if info.path else "edited.offramp"
        path = ask_save_path(self, "Save configuration into a bundle", start)
        if path:
            self.save_to(path)

    def save_to(self, path: str) -> None:
        """Save the loaded bundle with the active configuration as its default policy, in a worker."""
        try:
            bundle = self.session.edited_bundle()
        except Exception as e:  # noqa: BLE001 - shown, nothing is written
            log.exception("cannot save the configuration")
            self.session.error.emit(f"cannot save the configuration: {e}")
            return
        self.save_button.setEnabled(False)
        self.session.status.emit(f"saving {path} …")
        self.session.start_task(functools.partial(tasks.save, bundle, path), "saving bundle",
                                result=self._on_saved, error=self._on_save_failed)

    def _on_saved(self, path) -> None:
        self.save_button.setEnabled(True)
        self.session.status.emit(f"saved {path}")

    def _on_save_failed(self, message: str) -> None:
        self.save_button.setEnabled(True)
        self.session.error.emit(message)


def _describe(policy: dict) -> str:
    if policy.get("kind") == "threshold":
        ts = ", ".join("off" if t is None else f"{t:.2f}" for t in policy["thresholds"][:-1])
        return f"threshold on {policy.get('measure', 'max_prob')} [{ts}]"
    knobs = [f"λ {policy['lambda']:g}" if isinstance(policy.get("lambda"), (int, float)) else "",
             f"offset {policy['offset']:+.2f}" if isinstance(policy.get("offset"), (int, float)) else "",
             f"τ {policy['tau']:.2f}" if isinstance(policy.get("tau"), (int, float)) else ""]
    knobs = [k for k in knobs if k]
    return f"{policy.get('kind')}" + (f" ({', '.join(knobs)})" if knobs else "")

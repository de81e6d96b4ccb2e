"""The policy panel under learned policies (their own front, or a visible switch) and the policy
and thresholds remembered per bundle across restarts."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from PySide6.QtCore import QSettings  # noqa: E402

from app.main_window import MainWindow  # noqa: E402
from app.session import Session  # noqa: E402
from app.state import own_front  # noqa: E402
from engine.bundle import save_bundle  # noqa: E402
from qt_helpers import no_leaked_threads, tiny_bundle  # noqa: E402,F401

WAIT = 20000
OFFSETS = (50.0, 0.0, -50.0)  # an untrained policy's score is small: +50 always exits at once, -50 never early


def _learned_front_bundle(path):
    """The tiny bundle whose "learned" policy has a front of its own: its λ at three offsets (runnable
    with the weights the bundle holds), and a point at another λ (whose weights it does not hold)."""
    bundle = tiny_bundle()
    base = bundle.policies["learned"].to_json()
    points = [{"policy": {**base, "offset": o}, "accuracy": 0.6 + 0.1 * i, "flops": 40.0 + 30 * i,
               "saved": 0.6 - 0.3 * i} for i, o in enumerate(OFFSETS)]  # cheapest first
    points.insert(1, {"policy": {**base, "lambda": 0.5}, "accuracy": 0.7, "flops": 60.0, "saved": 0.4})
    bundle.meta["policy_fronts"] = {"learned": {"kind": "bolukbasi", "points": points, "chosen": 2}}
    return save_bundle(bundle, path)


def _window(qtbot, settings, bundle, source=None):
    win = MainWindow(Session(device="cpu"), settings=settings)
    qtbot.addWidget(win)
    win.show()
    with qtbot.waitSignal(win.session.model_loaded, timeout=WAIT):
        win.session.load_bundle(str(bundle))
    if source is not None:
        win.open_source(str(source))
        qtbot.waitUntil(lambda: win.session.stats.frames >= 1, timeout=WAIT)
    return win


@pytest.fixture
def still(tmp_path):
    path = tmp_path / "still.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
    return path


def _settings(tmp_path):
    return QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)


def _wait_exit(qtbot, win, action, exit_index):
    with qtbot.waitSignal(win.session.result, timeout=WAIT,
                          check_params_cb=lambda r, f: r is not None and r.exit_index == exit_index):
        action()


def test_own_front_keeps_the_points_the_bundle_can_run():
    base = {"kind": "bolukbasi", "lambda": 0.05, "offset": 0.0, "hidden": 0}
    entry = {"points": [{"policy": {**base, "offset": -1.0}}, {"policy": {**base, "lambda": 0.2}},
                        {"policy": base}, {"policy": {"kind": "threshold", "thresholds": [0.5, 1.0]}}]}
    points, index = own_front(entry, base)
    assert [p["policy"]["offset"] for p in points] == [-1.0, 0.0] and index == 1
    shared = {"kind": "threshold", "measure": "max_prob", "thresholds": [0.9, 1.0]}
    entry = {"points": [{"policy": {**shared, "thresholds": [t, 1.0]}} for t in (0.2, 0.5)]}
    assert len(own_front(entry, shared)[0]) == 2  # a threshold policy runs any point from its JSON


def test_budget_walks_a_learned_policys_own_front(qtbot, tmp_path, still):
    win = _window(qtbot, _settings(tmp_path), _learned_front_bundle(tmp_path / "learned.offramp"), still)
    panel, session = win.policy_panel, win.session
    index = panel.combo.findText("learned")
    panel.combo.setCurrentIndex(index)
    panel.combo.activated.emit(index)
    assert panel.budget.isEnabled() and panel.budget.maximum() == 2 and panel.budget.value() == 1
    assert "learned" in panel.budget_box.title()
    assert not any(row.off.isChecked() for row in panel.rows)  # every exit runs: none shown as "off"
    assert all(row.value.text() == "–" and not row.slider.isEnabled() for row in panel.rows)
    _wait_exit(qtbot, win, lambda: panel.budget.setValue(0), 0)  # offset +50: the first exit always takes it
    assert session.policy.name == "learned" and panel.combo.currentText() == "learned"
    assert session.policy.current["offset"] == 50.0 and "offset +50.00" in panel.describe.text()
    _wait_exit(qtbot, win, lambda: panel.budget.setValue(2), 2)  # offset -50: only the last exit answers
    assert panel.combo.currentText() == "learned"


def test_budget_under_a_policy_without_a_front_switches_visibly(qtbot, tmp_path, still):
    bundle = save_bundle(tiny_bundle(), tmp_path / "plain.offramp")
    win = _window(qtbot, _settings(tmp_path), bundle, still)
    panel, session = win.policy_panel, win.session
    index = panel.combo.findText("learned")
    panel.combo.setCurrentIndex(index)
    panel.combo.activated.emit(index)
    assert panel.budget.isEnabled() and "switches to the threshold policy" in panel.budget_label.text()
    assert not any(row.off.isChecked() for row in panel.rows)
    _wait_exit(qtbot, win, lambda: panel.budget.setValue(0), 0)  # the front's cheapest point: exit 0 always
    assert panel.combo.currentText() == "threshold" == session.policy.name and session.policy.point == 0
    assert panel.rows[0].slider.isEnabled() and "front point 1" in panel.describe.text()


def test_policy_and_thresholds_are_remembered_per_bundle(qtbot, tmp_path):
    learned = _learned_front_bundle(tmp_path / "learned.offramp")
    plain = save_bundle(tiny_bundle(), tmp_path / "plain.offramp")
    win = _window(qtbot, _settings(tmp_path), plain)
    panel = win.policy_panel
    panel.combo.setCurrentIndex(panel.combo.findText("first exit"))
    panel.combo.activated.emit(panel.combo.findText("first exit"))
    panel.rows[1].slider.setValue(30)
    panel.rows[0].off.setChecked(True)
    with qtbot.waitSignal(win.session.model_loaded, timeout=WAIT):
        win.load_bundle(str(learned))
    panel.combo.setCurrentIndex(panel.combo.findText("learned"))
    panel.combo.activated.emit(panel.combo.findText("learned"))
    panel.budget.setValue(2)
    win.close()
    # a restart: each bundle comes back with its own choice
    again = _window(qtbot, _settings(tmp_path), plain)
    state, panel = again.session.policy, again.policy_panel
    assert state.name == "first exit" and state.thresholds == [None, 0.3, 0.0] and state.edited
    assert panel.combo.currentText() == "first exit" and panel.rows[1].slider.value() == 30
    assert panel.rows[0].off.isChecked()
    with qtbot.waitSignal(again.session.model_loaded, timeout=WAIT):
        again.load_bundle(str(learned))
    state = again.session.policy
    assert state.name == "learned" and state.point == 2 and state.current["offset"] == -50.0
    assert again.policy_panel.budget.value() == 2
    # the file replaced by a bundle without that policy: its default, said in the status bar
    bare = tiny_bundle()
    bare.policies.pop("learned")
    save_bundle(bare, learned)
    with qtbot.waitSignal(again.session.model_loaded, timeout=WAIT):
        again.load_bundle(str(learned))
    assert again.session.policy.name == "threshold" and "does not fit" in again.statusBar().currentMessage()


def test_an_unedited_choice_comes_back_unedited():
    from types import SimpleNamespace

    from app.state import PolicyState
    threshold = {"kind": "threshold", "measure": "max_prob", "thresholds": [0.9, 0.9, 0.9]}
    front = [{"policy": {**threshold, "thresholds": [t, t, t]}, "accuracy": 0.7, "saved": 0.5} for t in (0.2, 0.5)]
    info = SimpleNamespace(policies={"threshold": threshold, "learned": {"kind": "bolukbasi"}},
                           default_policy="threshold", front=front, default_point=1, policy_fronts={})
    state = PolicyState(info)
    memory = state.memory()
    again = PolicyState(info)
    again.choose("learned")
    again.restore(memory)
    assert again.current == threshold and not again.edited and again.point == 1
    with pytest.raises(ValueError):
        again.restore({"name": "threshold", "edited": True, "thresholds": [0.5, 2.0, 1.0]})
    assert again.current == threshold  # a memory that does not fit: the default stays

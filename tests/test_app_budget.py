"""The app's budget as a fraction of the full model's compute: the plain state (`PolicyState`) and the
policy panel's slider, read and set as a fraction, its label saying "≤ 60 % of full compute"."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402

from app.state import PolicyState, budget_text  # noqa: E402
from qt_helpers import bundle_path, no_leaked_threads, window, write_tiny_bundle  # noqa: E402,F401

WAIT = 20000  # ms; generous, the machine is shared


def _point(thresholds, accuracy, cost):
    return {"policy": {"kind": "threshold", "measure": "max_prob", "thresholds": thresholds},
            "accuracy": accuracy, "flops": 100 * cost, "saved": 1 - cost}


FRONT = [_point([0.0, 0.0, 1.0], 0.6, 0.3), _point([None, 0.0, 1.0], 0.8, 0.55), _point([None, None, 1.0], 0.9, 1.0)]


def _state(front=FRONT) -> PolicyState:
    policies = {"threshold": {"kind": "threshold", "measure": "max_prob", "thresholds": [0.9, 0.9, 1.0]},
                "learned": {"kind": "learned"}}
    return PolicyState(SimpleNamespace(policies=policies, default_policy="threshold", front=front,
                                       default_point=1 if front else None))


# -- the plain state ---------------------------------------------------------------------------------
def test_state_reads_the_budget_as_the_cost_of_its_point():
    state = _state()
    assert state.point == 1 and state.budget == pytest.approx(0.55) and state.budget_met is True
    state.choose_point(2)
    assert state.budget == pytest.approx(1.0)
    state.choose("learned")  # a policy with no front of its own is on no point
    assert state.budget is None and state.budget_met is None


def test_state_chooses_the_most_accurate_point_within_a_budget():
    state = _state()
    assert state.choose_budget(0.6)["thresholds"] == [None, 0.0, 1.0] and state.point == 1
    assert state.budget == 0.6 and state.budget_met is True
    state.choose_budget(1.0)
    assert state.point == 2 and state.budget_met is True and state.edited
    state.choose_budget(0.2)  # nothing fits: the cheapest, and it says so
    assert state.point == 0 and state.budget == 0.2 and state.budget_met is False
    state.choose_point(1)  # moving the slider: the budget is that point's cost again
    assert state.budget == pytest.approx(0.55)
    state.choose("learned")
    state.choose_budget(0.6)  # walks the bundle's front and switches to its policy
    assert state.name == "threshold" and state.point == 1


def test_state_refuses_a_budget_outside_0_1_and_without_a_front():
    state = _state()
    for bad in (0.0, 1.5, -1, float("nan")):
        with pytest.raises(ValueError, match=f"budget {bad!r}"):
            state.choose_budget(bad)
    assert state.point == 1  # unchanged
    with pytest.raises(IndexError, match="no front"):
        _state([]).choose_budget(0.5)


def test_budget_text_rounds_up_so_the_bound_holds():
    assert budget_text(0.6) == "≤ 60 % of full compute"
    assert budget_text(0.573) == "≤ 58 % of full compute" and budget_text(1.0) == "≤ 100 % of full compute"


# -- the panel -----------------------------------------------------------------------------------------
def test_budget_slider_reads_and_sets_a_cost_fraction(qtbot, window):
    panel, session = window.policy_panel, window.session
    cost = [1 - p["saved"] for p in session.info.front]  # the tiny bundle's: about 0.41, 0.71, 0.85, 1.00
    assert panel.budget.value() == 2 and panel.budget_fraction() == pytest.approx(cost[2])
    assert budget_text(cost[2]) in panel.budget_label.text()
    with qtbot.waitSignal(session.policy_changed, timeout=WAIT):
        panel.set_budget_fraction(0.75)
    assert panel.budget.value() == 1 and panel.budget_fraction() == 0.75  # 0.71 fits, 0.85 does not
    assert panel.budget_label.text().startswith("≤ 75 % of full compute")
    assert "expected accuracy 75.0 %" in panel.budget_label.text()
    assert session.policy.thresholds == session.info.front[1]["policy"]["thresholds"]
    panel.set_budget_fraction(0.9)
    assert panel.budget.value() == 2 and panel.budget_fraction() == 0.9
    panel.budget.setValue(0)  # the user moves the slider: the budget is that point's cost
    assert panel.budget_fraction() == pytest.approx(cost[0])
    assert panel.budget_label.text().startswith(budget_text(cost[0]))


def test_budget_no_point_fits_says_so_and_bad_values_are_refused(qtbot, window, tmp_path):
    panel, session = window.policy_panel, window.session
    panel.set_budget_fraction(0.2)  # below the cheapest point (about 0.41)
    assert panel.budget.value() == 0 and panel.budget_fraction() == 0.2
    assert panel.budget_label.text().startswith("nothing fits ≤ 20 % of full compute: the cheapest")
    assert session.policy.budget_met is False
    for bad in (0.0, 1.2, -0.5):
        with pytest.raises(ValueError, match=f"budget {bad!r}"):
            panel.set_budget_fraction(bad)
    assert panel.budget.value() == 0 and panel.budget_fraction() == 0.2  # nothing changed
    with qtbot.waitSignal(session.model_loaded, timeout=WAIT):  # a bundle without a front: nothing to set
        window.load_bundle(str(write_tiny_bundle(tmp_path / "nofront.offramp", front=False)))
    panel.set_budget_fraction(0.5)
    assert panel.budget_fraction() is None and not panel.budget.isEnabled()

"""The retraining panel: check a folder, train in a worker, cancel, compare, use, save."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

from qt_helpers import bundle_path, cancel_and_check_untouched, image_folder, no_leaked_threads, window  # noqa: E402,F401
from synth import make_image_folder  # noqa: E402

WAIT = 60000




def _check(qtbot, panel, folder):
    panel.check(str(folder))
    qtbot.waitUntil(lambda: panel.task is None and "checking" not in panel.report.toPlainText(), timeout=WAIT)


def test_cancelled_retraining_leaves_the_model_untouched(qtbot, window, image_folder):
    panel, session = window.retrain_panel, window.session
    info = session.info
    weights = {k: v.clone() for k, v in info.bundle.model.state_dict().items()}
    _check(qtbot, panel, image_folder)
    assert "red: 4" in panel.report.toPlainText() and panel.train_button.isEnabled()
    panel.train_button.click()
    assert panel.cancel_button.isEnabled() and not panel.train_button.isEnabled()
    cancel_and_check_untouched(qtbot, panel, session, info, weights, WAIT)


def test_unusable_folder_is_reported_before_training(qtbot, window, tmp_path):
    one_class = make_image_folder(tmp_path / "one", ["cat"], per_class=3, size=16)
    (one_class / "cat" / "broken.jpg").write_bytes(b"garbage")
    with qtbot.waitSignal(window.session.error, timeout=WAIT):
        _check(qtbot, window.retrain_panel, one_class)
    text = window.retrain_panel.report.toPlainText()
    assert "only one class" in text and "broken.jpg: " in text and not window.retrain_panel.train_button.isEnabled()
    assert "only one class" in window.banner.text


def test_retraining_on_new_classes_then_use_and_save(qtbot, window, tmp_path):
    from engine.bundle import load_bundle
    folder = make_image_folder(tmp_path / "teacher", ["apple", "pear"], per_class=8, size=24, seed=3)
    panel = window.retrain_panel
    _check(qtbot, panel, folder)
    panel.epochs.setValue(2)
    panel.train_button.click()
    qtbot.waitUntil(lambda: panel.task is None, timeout=WAIT)
    assert panel.new_bundle is not None and panel.new_bundle.model.class_names == ["apple", "pear"]
    assert panel.progress.value() == 1000 and panel.use_button.isEnabled() and "done" in panel.stage_label.text()
    items = panel.plot.getPlotItem().listDataItems()
    assert [i.name() for i in items][:2] == ["new", f"new: full model {100 * panel.new_report['accuracy_per_exit'][-1]:.1f} %"]
    assert len(items) == 2 and len(items[0].xData) >= 1  # other classes: no current curve, the new one drawn
    assert panel.plot.getAxis("left").labelText == "accuracy %" and panel.mode.key == "labelled"
    assert panel.result_label.text().startswith("Accuracy per exit on 4 held-out images: E0 ")
    with qtbot.waitSignal(window.session.model_loaded, timeout=WAIT):
        panel.use_button.click()
    assert window.session.info.class_names == ["apple", "pear"] and window.session.info.path == ""
    out = tmp_path / "teacher.offramp"
    panel.save_to(str(out))
    qtbot.waitUntil(lambda: out.exists() and panel.task is None, timeout=WAIT)
    assert load_bundle(out).class_names == ["apple", "pear"]


def test_three_new_classes_show_their_curve_and_only_a_finished_run_is_new(qtbot, window, tmp_path):
    folder = make_image_folder(tmp_path / "fruit", ["apple", "pear", "plum"], per_class=6, size=24, seed=5)
    panel = window.retrain_panel
    _check(qtbot, panel, folder)
    panel.epochs.setValue(2)
    bar = []
    panel.progress.valueChanged.connect(bar.append)
    panel.train_button.click()
    qtbot.waitUntil(lambda: panel.task is None, timeout=WAIT)
    assert panel.new_bundle.model.class_names == ["apple", "pear", "plum"]
    assert bar == sorted(bar) and bar[-1] == 1000  # one bar for the whole run: it never starts again
    items = {i.name(): i for i in panel.plot.getPlotItem().listDataItems()}
    full = 100 * panel.new_report["accuracy_per_exit"][-1]
    assert len(items["new"].xData) >= 1 and list(items[f"new: full model {full:.1f} %"].yData) == [full, full]
    legend = [label.text for _, label in panel.legend.items]
    assert any("no comparable curve" in t for t in legend)  # the current model has other classes
    # a second run, cancelled: the first run's curve is not shown as "new" meanwhile, nor after
    panel.train_button.click()
    assert not panel.plot.getPlotItem().listDataItems() and panel.result_label.text() == ""
    with qtbot.waitSignal(panel.task.cancelled, timeout=WAIT):
        panel.cancel_button.click()
    qtbot.waitUntil(lambda: panel.task is None, timeout=WAIT)
    assert not panel.plot.getPlotItem().listDataItems() and "cancelled" in panel.stage_label.text()


def test_overall_progress_is_one_bar_with_the_time_left():
    from app.tasks import OverallProgress, training_phases
    from engine.progress import Progress
    phases = training_phases(100, 10, val_fraction=0.2, checks_images=False, old_curve=True)
    assert [s for s, _ in phases] == ["checking folder", "caching features", "caching features", "training exits",
                                      "evaluating", "caching features"]
    plan = OverallProgress(phases, start=0.0)
    seen = []
    steps = [("checking folder", 0, 1), ("checking folder", 1, 1), ("caching features", 0, 20),
             ("caching features", 20, 20), ("caching features", 0, 80), ("caching features", 80, 80),
             ("training exits", 5, 10), ("training exits", 10, 10), ("evaluating", 1, 1), ("caching features", 0, 20),
             ("caching features", 20, 20)]
    for t, (stage, done, total) in enumerate(steps, start=1):
        seen.append(plan.update(Progress(stage, done, total), now=float(t)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert seen[0][1] is None and seen[6][1] > 0  # too early to say, then seconds left for the whole run

"""Live novelty ("unlike my classes"): the engine's per-frame reading (engine.novelty.LiveNovelty in
engine.runtime) and the confidence panel's indicator. A tiny synthetic model and bundle, built in
memory in well under a second; nothing from ../shared."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from synth import SYNTH_CLASSES, build_tiny_model, class_colour, make_image  # noqa: E402

from engine.bundle import Bundle, load_bundle, save_bundle  # noqa: E402
from engine.cost import measure_costs  # noqa: E402
from engine.novelty import META_KEY, LiveNovelty, atypicality, calibrate_live  # noqa: E402
from engine.policies import ThresholdPolicy  # noqa: E402
from engine.policies.structure import StructurePolicy  # noqa: E402
from engine.prepared import prepare  # noqa: E402
from engine.preprocess import preprocess  # noqa: E402
from engine.records import Records  # noqa: E402
from engine.runtime import Engine  # noqa: E402

K = len(SYNTH_CLASSES)


def _images(rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], torch.Tensor]:
    frames = [np.asarray(make_image(rng, class_colour(i % K, K))) for i in range(n)]
    return frames, torch.arange(n) % K


def _records(model, frames, labels) -> Records:
    x = torch.cat([preprocess(f, model.backbone.preset, True) for f in frames])
    with torch.no_grad():
        logits, features = model.forward_all(x, with_features=True, calibrated=True)
    return Records(torch.stack(logits, 1), features, labels, list(SYNTH_CLASSES), model.exit_stages)


def _bundle(calibrated: bool = True, structure: bool = True) -> tuple[Bundle, Records]:
    """The tiny model with a threshold policy (default) and a structure policy whose prototypes come
    from 40 synthetic images; its novelty calibrated on 80 others."""
    model = build_tiny_model()
    rng = np.random.default_rng(0)
    train = _records(model, *_images(rng, 40))
    calibration = _records(model, *_images(rng, 80))
    threshold = ThresholdPolicy([0.5, 0.5, None])
    policies = {"threshold": threshold, "low": ThresholdPolicy([0.0, 0.0, None]),
                "late": ThresholdPolicy([None, None, None])}
    if structure:
        widths = [f.shape[1] for f in train.features]
        policies["structure"] = StructurePolicy.from_thresholds([0.5, 0.5, None], "max_prob", widths, K) \
            .set_prototypes(train.features, train.labels)
    bundle = Bundle(model, policies, "threshold", measure_costs(model, threshold), {})
    if calibrated:
        calibrate_live(bundle, calibration, reliability="synthetic test data")
    return bundle, calibration


@pytest.fixture(scope="module")
def calibrated(one_thread):
    return _bundle()


@pytest.fixture(scope="module")
def engine(calibrated) -> Engine:
    return Engine(calibrated[0], device="cpu", latency_repeats=1)


def _typical(n=8, seed=1) -> list[np.ndarray]:
    return _images(np.random.default_rng(seed), n)[0]


NOVEL = [np.full((32, 32, 3), v, np.uint8) for v in (0, 255)]  # flat black and white: no class's colour


# -- engine ---------------------------------------------------------------------------------------
def test_calibration_is_stored_in_the_bundle_and_survives_saving(calibrated, tmp_path):
    bundle, _ = calibrated
    entry = bundle.meta[META_KEY]
    assert entry["policy"] == "structure" and entry["false_alarm"] == 0.05 and entry["samples"] == 80
    assert sorted(entry["quantiles"]) == ["0", "1"]  # every early exit, none for the last
    path = save_bundle(bundle, tmp_path / "b.offramp")
    live, why = LiveNovelty.from_bundle(load_bundle(path, device="cpu"))
    assert live is not None and why == "" and live.exits == [0, 1]


def test_score_matches_the_structure_measure_and_is_uniform_on_calibration(calibrated):
    bundle, cal = calibrated
    live, _ = LiveNovelty.from_bundle(bundle)
    policy = bundle.policies["structure"]
    raw = atypicality(policy, cal.logits, cal.features, [0, 1])
    for e in (0, 1):
        mine = [live.atypicality(e, cal.features[e][i].numpy()) for i in range(10)]
        assert mine == pytest.approx(raw[:10, e], abs=1e-5)
        q = np.asarray(bundle.meta[META_KEY]["quantiles"][str(e)])
        assert [live.score(e, cal.features[e][i].numpy()) for i in range(10)] == \
            pytest.approx(np.interp(mine, q, np.linspace(0, 1, len(q))), abs=1e-9)
        scores = np.array([live.score(e, f.numpy()) for f in cal.features[e]])
        assert scores.min() >= 0.0 and scores.max() <= 1.0
        assert abs(np.median(scores) - 0.5) < 0.05  # a percentile of its own calibration
        assert (scores >= live.threshold).mean() <= 0.1  # ~5 % false alarms on calibration-like data


def test_live_readings_in_range_novel_frames_flagged(engine):
    engine.set_policy("threshold")
    assert "TorchScript" in engine.runtime  # the batch-1 graphs
    typical = [engine.infer(f, rgb=True).novelty for f in _typical()]
    novel = [engine.infer(f, rgb=True).novelty for f in NOVEL]
    for r in typical + novel:
        assert r is not None and r.score is not None and 0.0 <= r.score <= 1.0 and r.exit_index in (0, 1)
    assert all(r.novel for r in novel)
    assert sum(r.novel for r in typical) <= 2


def test_reading_comes_from_an_exit_the_frame_ran(engine):
    engine.set_policy("low")  # every frame leaves at exit 0: the score reads exit 0
    r = engine.infer(_typical(1)[0], rgb=True)
    assert r.exit_index == 0 and r.novelty.exit_index == 0
    engine.set_policy("late")  # early exits off: no early exit ran, so no evidence: unknown
    r = engine.infer(_typical(1)[0], rgb=True)
    assert r.exit_index == 2 and r.novelty.score is None and not r.novelty.novel and r.novelty.why_unknown
    engine.set_policy("threshold")


def test_a_policy_changed_in_place_keeps_its_reading(engine):
    """Changing a policy in place remakes its prepared plan; the run still records its taps."""
    engine.set_policy("structure")
    assert engine.infer(NOVEL[0], rgb=True).novelty.score is not None
    policy = engine.policy
    tau = policy.tau
    policy.tau = 0.6  # a new state key: engine.prepared makes a new plan for it
    try:
        assert engine.infer(NOVEL[0], rgb=True).novelty.novel
    finally:
        policy.tau = tau
        engine.set_policy("threshold")


def test_novelty_changes_no_answer(calibrated, engine):
    plain = Engine(_bundle(calibrated=False)[0], device="cpu", latency_repeats=1)
    assert plain.infer(NOVEL[0], rgb=True).novelty is None and "no novelty calibration" in plain.novelty_reason
    for name in ("threshold", "structure", "low"):
        engine.set_policy(name)
        plain.set_policy(name)
        for f in _typical(4) + NOVEL:
            a, b = engine.infer(f, rgb=True), plain.infer(f, rgb=True)
            assert (a.exit_index, a.class_index, a.stages_run) == (b.exit_index, b.class_index, b.stages_run)
            assert [x.confidence for x in a.exits] == [x.confidence for x in b.exits]
    engine.set_policy("threshold")


def test_eager_path_gives_the_same_score(calibrated):
    """Other devices and shapes run the folded stages eagerly (`MultiExitNet.run` records the taps)."""
    graphs = Engine(calibrated[0], device="cpu", latency_repeats=1)
    eager = Engine(calibrated[0], device="cpu", latency_repeats=1)
    eager._prepared = prepare(eager.model, graphs=False)  # what a GPU runs
    for f in _typical(3) + NOVEL:
        a, b = graphs.infer(f, rgb=True), eager.infer(f, rgb=True)
        assert a.exit_index == b.exit_index and a.novelty.exit_index == b.novelty.exit_index
        assert a.novelty.score == pytest.approx(b.novelty.score, abs=1e-4)


def test_batches_say_unknown_and_bundles_without_structure_have_none(engine):
    results = engine.infer_batch(_typical(2), rgb=True)
    assert all(r.novelty is not None and r.novelty.score is None for r in results)
    bare, _ = _bundle(calibrated=False, structure=False)
    assert Engine(bare, device="cpu", latency_repeats=1).infer(NOVEL[0], rgb=True).novelty is None
    bare.meta[META_KEY] = {"policy": "structure", "false_alarm": 0.05, "quantiles": {}}  # names a missing policy
    live, why = LiveNovelty.from_bundle(bare)
    assert live is None and "no structure policy" in why
    with pytest.raises(ValueError, match="structure policy"):
        calibrate_live(bare, _bundle(calibrated=False)[1])


# -- app ------------------------------------------------------------------------------------------
def test_indicator_shows_for_a_novel_frame_and_not_for_a_typical_one(qtbot, engine):
    from app.widgets import ConfidencePlot, PRESENTATION

    plot = ConfidencePlot()
    qtbot.addWidget(plot)
    engine.set_policy("threshold")
    novel = engine.infer(NOVEL[0], rgb=True)
    typical = next(r for r in (engine.infer(f, rgb=True) for f in _typical()) if not r.novelty.novel)
    plot.show_result(novel, None)
    assert plot.novel and not plot.novelty.isHidden()
    assert plot.novelty.text().startswith("unlike my classes") and f"{novel.novelty.score:.2f}" in plot.novelty.text()
    tip = plot.novelty.toolTip()
    assert "false alarm" in tip and "5%" in tip and "synthetic test data" in tip and "80 calibration images" in tip
    plot.set_theme(PRESENTATION)  # redrawn in the other theme, still shown
    assert plot.novel and "unlike my classes" in plot.novelty.text()
    plot.show_result(typical, None)
    assert plot.novel is False and "unlike my classes" not in plot.novelty.text()
    assert f"{typical.novelty.score:.2f}" in plot.novelty.text()
    plot.clear()
    assert plot.novel is None and plot.novelty.isHidden()


def test_no_indicator_without_calibration_and_unknown_when_not_computed(qtbot, engine):
    from app.widgets import ConfidencePlot

    plot = ConfidencePlot()
    qtbot.addWidget(plot)
    plain = Engine(_bundle(calibrated=False)[0], device="cpu", latency_repeats=1)
    plot.show_result(plain.infer(NOVEL[0], rgb=True), None)
    assert plot.novel is None and plot.novelty.isHidden()
    engine.set_policy("late")
    plot.show_result(engine.infer(NOVEL[0], rgb=True), None)
    assert plot.novelty.text() == "novelty: unknown" and "Unknown for this frame" in plot.novelty.toolTip()
    assert not plot.novel
    engine.set_policy("threshold")

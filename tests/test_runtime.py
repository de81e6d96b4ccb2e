"""Engine: devices, preprocessing, staged inference that really stops, running totals, threads."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.backbones import build_backbone
from engine.bundle import Bundle, BundleError, save_bundle
from engine.cost import CostTable, measure_costs
from engine.model import MultiExitNet
from engine.policies import OraclePolicy, Policy, ThresholdPolicy, confidence, register_policy
from engine import runtime as engine_runtime
from engine.runtime import Engine, InferenceResult, RunningTotals
from engine.totals import THREAD_CLOCK, WALL_CLOCK

CLASSES = [f"class{i}" for i in range(10)]
REPEATS = 2  # latency profile repeats: enough to fill the table, quick on a shared machine


@register_policy
class _AlwaysExit(Policy):
    """Takes the first exit it sees: a policy without thresholds."""

    kind = "test_runtime_always"

    def decide(self, evidence):
        return torch.ones(evidence.current.shape[0], dtype=torch.bool, device=evidence.current.device)

    @classmethod
    def from_json(cls, d, *, num_exits, num_classes):
        return cls()


def _bundle(cost: CostTable | None = None) -> Bundle:
    torch.manual_seed(0)
    model = MultiExitNet.attach(build_backbone("cifar_resnet_small"), class_names=CLASSES).eval()
    model.temperature.copy_(torch.tensor([1.2, 0.9, 1.0]))
    policies = {"threshold": ThresholdPolicy([0.5, 0.5, None]), "entropy": ThresholdPolicy([0.2, 0.2, None], "entropy"),
                "always": _AlwaysExit(), "oracle": OraclePolicy()}
    return Bundle(model, policies, "threshold", cost or measure_costs(model, policies["threshold"]), {})


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bundles") / "tiny.offramp"
    save_bundle(_bundle(), path)
    return path


@pytest.fixture
def eng(bundle_path) -> Engine:
    return Engine(bundle_path, device="cpu", latency_repeats=REPEATS)


def _frame(h=48, w=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _check(r: InferenceResult, e: Engine) -> None:
    """Fields of one result agree with each other and with the engine."""
    assert 0 <= r.exit_index < r.num_exits == e.num_exits
    assert r.label == CLASSES[r.class_index] and 0 < r.confidence <= 1
    assert [x.exit_index for x in r.exits] == sorted(x.exit_index for x in r.exits)
    assert [x.fired for x in r.exits].count(True) == 1 and r.exits[-1].fired and r.exits[-1].exit_index == r.exit_index
    fired = r.exits[-1]
    assert fired.top_k[0] == (r.label, r.confidence) and len(fired.top_k) == 3
    assert all(p >= q for x in r.exits for (_, p), (_, q) in zip(x.top_k, x.top_k[1:]))
    assert r.stages_run == e.model.exit_stages[r.exit_index] + 1 and r.num_stages == e.model.backbone.num_stages
    assert 0 < r.flops and r.full_flops == e.cost.full_flops
    if r.exit_index < r.num_exits - 1:
        assert r.flops < r.full_flops and 0 < r.saved <= 1
    assert r.ms > 0 and r.full_ms == pytest.approx(e.cost.full_ms) and r.full_ms > 0
    t = r.totals
    assert sum(t.exit_counts) == t.frames and len(t.exit_counts) == r.num_exits


# -- loading and devices --------------------------------------------------------------------------
def test_engine_loads_a_bundle_and_profiles_latency(eng):
    assert eng.device == "cpu" and not eng.model.training
    assert eng.policy_name == "threshold" and eng.thresholds == [0.5, 0.5, None]
    assert eng.cost.has_latency and eng.cost.device == "cpu" and len(eng.cost.stage_ms) == 3
    assert eng.class_names == CLASSES and eng.preset.crop == 32
    assert eng.totals.to_json() == RunningTotals(3).to_json()  # no frame counted


def test_engine_measures_flops_when_the_bundle_has_none():
    e = Engine(_bundle(CostTable([], [], [])), device="cpu", latency_repeats=REPEATS)
    assert len(e.cost.stage_flops) == 3 and all(f > 0 for f in e.cost.stage_flops) and e.cost.has_latency


def test_devices(bundle_path):
    devices = Engine.available_devices()
    assert devices[0] == "cpu" and set(devices) <= {"cpu", "cuda", "mps"}
    with pytest.raises(ValueError, match="unknown device 'tpu'; available: cpu"):
        Engine(bundle_path, device="tpu")
    if "cuda" not in devices:
        with pytest.raises(ValueError, match="'cuda' is not available on this machine; available: cpu"):
            Engine(bundle_path, device="cuda")
    e = Engine(bundle_path, device="auto", latency_repeats=REPEATS)
    assert e.device == ("cuda" if "cuda" in devices else "mps" if "mps" in devices else "cpu")
    e.set_device("cpu")
    assert e.device == "cpu" and e.cost.device == "cpu"
    with pytest.raises(ValueError, match="not available on this machine"):
        e.set_device("cuda:7")


def test_default_bundle(monkeypatch, tmp_path, bundle_path):
    monkeypatch.setenv("OFFRAMP_DEFAULT_BUNDLE", str(tmp_path / "absent.offramp"))
    with pytest.raises(BundleError, match=r"no default bundle at .*absent\.offramp"):
        Engine()
    monkeypatch.setenv("OFFRAMP_DEFAULT_BUNDLE", str(bundle_path))
    assert Engine(device="cpu", latency_repeats=REPEATS).class_names == CLASSES


# -- frames ---------------------------------------------------------------------------------------
def test_frame_kinds_agree(eng, tmp_path):
    rgb = _frame()
    want = eng.preprocess(rgb, rgb=True)
    assert torch.equal(eng.preprocess(np.ascontiguousarray(rgb[..., ::-1])), want)  # BGR, OpenCV's order
    assert torch.equal(eng.preprocess(rgb[..., ::-1]), want)  # a negative-stride view works too
    alpha = np.full(rgb.shape[:2] + (1,), 200, np.uint8)
    assert torch.equal(eng.preprocess(np.concatenate([rgb, alpha], -1), rgb=True), want)  # RGBA
    assert torch.equal(eng.preprocess(np.concatenate([rgb[..., ::-1], alpha], -1)), want)  # BGRA
    assert torch.equal(eng.preprocess(Image.fromarray(rgb)), want)
    assert torch.equal(eng.preprocess(rgb.astype(np.float32) / 255), eng.preprocess(rgb))
    path = tmp_path / "frame.png"
    Image.fromarray(rgb).save(path)
    assert torch.equal(eng.preprocess(path), want) and torch.equal(eng.preprocess(str(path)), want)
    grey = rgb[..., 0].copy()
    x = eng.preprocess(grey)
    assert x.shape == (1, 3, 32, 32) and torch.equal(x, eng.preprocess(np.stack([grey] * 3, -1)))
    assert torch.equal(eng.preprocess(grey[..., None]), x)


def test_bad_frames(eng, tmp_path):
    with pytest.raises(ValueError, match="cannot read image .*missing.png"):
        eng.infer(tmp_path / "missing.png")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image .*junk.jpg"):
        eng.infer(str(junk))
    with pytest.raises(ValueError, match="HxWx3"):
        eng.infer(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        eng.infer(np.zeros((8, 8, 3), np.int32))
    with pytest.raises(TypeError):
        eng.infer([[1, 2, 3]])


# -- inference ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bgr", "rgb", "grey", "rgba", "path"])
def test_infer_on_every_frame_kind(eng, tmp_path, kind):
    rgb = _frame()
    frame = {"bgr": rgb[..., ::-1], "rgb": rgb, "grey": rgb[..., 1],
             "rgba": np.concatenate([rgb, rgb[..., :1]], -1), "path": tmp_path / "f.png"}[kind]
    if kind == "path":
        Image.fromarray(rgb).save(frame)
    r = eng.infer(frame, rgb=kind in ("rgb", "rgba"))
    _check(r, eng)
    assert r.totals.frames == 1


def test_bgr_and_rgb_give_the_same_result(eng):
    rgb = _frame(seed=3)
    a, b = eng.infer(rgb, rgb=True), eng.infer(np.ascontiguousarray(rgb[..., ::-1]))
    assert (a.exit_index, a.class_index, a.confidence) == (b.exit_index, b.class_index, b.confidence)
    assert [(x.confidence, x.top_k) for x in a.exits] == [(x.confidence, x.top_k) for x in b.exits]


def test_zero_thresholds_stop_at_the_first_exit(eng):
    eng.set_thresholds([0.0, 0.0, 0.0])
    r = eng.infer(_frame())
    _check(r, eng)
    assert r.exit_index == 0 and r.stages_run == 1 and len(r.exits) == 1 and r.exits[0].threshold == 0.0
    assert r.flops == eng.cost.cumulative_flops()[0] < r.full_flops and r.saved > 0


@pytest.mark.parametrize("t", [None, 1.0])
def test_closed_exits_run_the_full_model(eng, t):
    eng.set_thresholds([t, t, t])
    r = eng.infer(_frame())
    _check(r, eng)
    assert r.exit_index == 2 and r.stages_run == 3
    ran = [x.exit_index for x in r.exits]
    assert ran == ([2] if t is None else [0, 1, 2])  # an exit that is off is not even evaluated
    assert r.exits[-1].threshold is None  # the last exit always answers
    if t is None:
        assert r.flops == pytest.approx(r.full_flops)


def test_readings_use_the_policy_measure(eng):
    eng.set_policy("entropy")
    eng.set_thresholds([1.0, 1.0, None])  # never confident enough: every exit runs
    x = eng.preprocess(_frame())
    r = eng.infer(x)
    with torch.no_grad():
        logits = eng.model.forward_all(x, calibrated=True)
    for reading in r.exits:
        assert reading.confidence == pytest.approx(float(confidence(logits[reading.exit_index], "entropy")), abs=1e-6)


def test_totals(eng):
    frames = [_frame(seed=s) for s in range(6)]
    for i, f in enumerate(frames):
        eng.set_thresholds([0.0, 0.0, None] if i % 2 else [None, None, None])
        eng.infer(f)
    t = eng.totals
    assert t.frames == 6 and sum(t.exit_counts) == 6 and t.exit_counts[0] == 3 and t.exit_counts[2] == 3
    assert 0 < t.saved < 1 and t.flops < t.full_flops == pytest.approx(6 * eng.cost.full_flops)
    assert t.ms > 0 and t.full_ms > 0
    eng.reset_totals()
    assert eng.totals.to_json() == RunningTotals(3).to_json()  # no frame counted


def test_infer_batch(eng):
    frames = [_frame(seed=s) for s in range(5)]
    eng.set_thresholds([None, None, None])
    results = eng.infer_batch(frames)
    assert len(results) == 5 and eng.totals.frames == 5 and eng.infer_batch([]) == []
    assert len({r.ms for r in results}) == 1
    for f, r in zip(frames, results):
        _check(r, eng)
        single = eng.infer(f)
        assert single.class_index == r.class_index and single.confidence == pytest.approx(r.confidence, abs=1e-5)
    eng.set_thresholds([0.0, 0.0, None])
    assert {r.exit_index for r in eng.infer_batch(frames)} == {0}


# -- policies -------------------------------------------------------------------------------------
def test_set_policy(eng):
    eng.set_policy("always")
    assert eng.policy_name == "always" and eng.thresholds is None
    r = eng.infer(_frame())
    assert r.exit_index == 0 and r.exits[0].threshold is None
    with pytest.raises(ValueError, match="has no thresholds"):
        eng.set_thresholds([0.1, 0.1, None])
    mine = ThresholdPolicy([0.0, None, None])
    eng.set_policy(mine)
    assert eng.policy is mine and eng.policy_name is None and eng.infer(_frame()).exit_index == 0
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        eng.set_policy("nope")
    with pytest.raises(ValueError, match="evaluation only"):
        eng.set_policy("oracle")
    with pytest.raises(ValueError, match="2 thresholds but the model has 3 exits"):
        eng.set_policy(ThresholdPolicy([0.5, None]))
    assert eng.policy is mine


def test_set_thresholds_checks_and_copies(eng):
    original = eng.bundle.policies["threshold"]
    eng.set_thresholds([0.25, None, None])
    assert eng.thresholds == [0.25, None, None] and original.thresholds == [0.5, 0.5, None]
    with pytest.raises(ValueError, match="give 3 thresholds"):
        eng.set_thresholds([0.1])
    with pytest.raises(ValueError, match="outside 0..1"):
        eng.set_thresholds([1.5, None, None])
    eng.set_policy("threshold")  # back to the bundle's thresholds
    assert eng.thresholds == [0.5, 0.5, None]


def test_reference_runs_time_the_full_model_live_and_count_nowhere_else(bundle_path):
    engine = Engine(bundle_path, device="cpu", latency_repeats=2, reference_every=3)
    calls = []
    prepared = engine._prepared  # the full model is timed as the staged run runs: its prepared form
    run_to = prepared.run_to
    prepared.run_to = lambda x, *a: (calls.append(1), run_to(x, *a))[1]
    first_exit = ThresholdPolicy([0.0] * (engine.num_exits - 1) + [None])  # exit 0 fires on everything
    engine.set_policy(first_exit)
    frame = np.zeros((32, 32, 3), dtype=np.uint8)
    results = [engine.infer(frame) for _ in range(7)]
    # frames 1, 4 and 7 also ran the full model (frame 1 three times: two untimed runs warm its
    # graph); the staged runs stopped at exit 0
    assert len(calls) == 5 and len(engine._reference_ms) == 3
    assert all(r.stages_run == 1 for r in results)
    assert all(r.exit_index == 0 and r.full_ms_live and r.full_ms > 0 for r in results)
    assert results[-1].totals.frames == 7 and results[-1].totals.exit_counts[0] == 7
    assert results[-1].totals.flops == pytest.approx(7 * results[0].flops)
    # the full model ran first on those frames; their staged runs, on the caches it warmed, are not
    # what a typical frame costs
    assert [r.warm for r in results] == [True, False, False, True, False, False, True]
    assert len(results[-1].totals.exit_ms[0]) == 4 and results[-1].totals.frames == 7
    with pytest.raises(ValueError, match="reference_every"):
        Engine(bundle_path, device="cpu", reference_every=-1)
    assert not Engine(bundle_path, device="cpu", latency_repeats=2).infer(frame).full_ms_live


def test_one_stalled_reference_run_does_not_claim_time_saved(bundle_path):
    """The full model's live reference is the median of its runs: a stall in one of them (the machine
    busy elsewhere) must not show as time saved."""
    engine = Engine(bundle_path, device="cpu", latency_repeats=2, reference_every=1)
    engine._reference_ms.extend([1.0, 1.1, 0.9, 50.0])
    cost = engine.bundle.cost
    full_ms, live = engine._full_ms(cost)
    assert live and full_ms == pytest.approx(1.05)


@pytest.mark.skipif(not engine_runtime._THREAD_CLOCK_FINE, reason="this platform's thread clock is too coarse")
def test_one_thread_on_the_cpu_is_timed_by_its_cpu_time(bundle_path, monkeypatch):
    """With clock="auto", one intra-op thread on the CPU, frames and the full model's reference runs
    are timed by the inference thread's CPU time: time the thread spends not computing (here a
    sleep, in the window the GUI thread holding the interpreter lock) is not the model's. With
    clock="wall" the same frames count it."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    frame = np.zeros((32, 32, 3), dtype=np.uint8)
    ms = {}
    for clock in ("auto", "wall"):
        engine = Engine(bundle_path, device="cpu", latency_repeats=2, reference_every=1, clock=clock)
        engine.infer(frame)  # makes the graphs and the reference's
        prepared = engine._prepared
        run, run_to = prepared.run, prepared.run_to

        def idle_run(*a, run=run):
            time.sleep(0.2)  # not computing: no CPU time (long, so a loaded machine cannot blur it)
            return run(*a)

        def idle_run_to(*a, run_to=run_to):
            time.sleep(0.2)
            return run_to(*a)
        prepared.run, prepared.run_to = idle_run, idle_run_to
        result = engine.infer(frame)
        ms[clock] = (result.ms, result.full_ms, result.clock)
    assert ms["auto"][2] == THREAD_CLOCK and ms["wall"][2] == WALL_CLOCK
    assert ms["wall"][0] >= 200 and ms["auto"][0] < 90, ms  # the 200 ms asleep count only on the wall clock
    # the full model's reference: the median of one run awake and one asleep (their mean), on the same clock
    assert ms["auto"][1] < 90 <= ms["wall"][1], ms


def test_more_threads_or_a_wrong_clock_name(bundle_path, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # other threads' work would not count
    frame = np.zeros((32, 32, 3), dtype=np.uint8)
    assert Engine(bundle_path, device="cpu", latency_repeats=2).infer(frame).clock == WALL_CLOCK
    with pytest.raises(ValueError, match="unknown clock 'cpu'"):
        Engine(bundle_path, device="cpu", clock="cpu")

"""The app's plain-Python parts, no window: sources, the frame slot, stats, policy state."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import threading  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from app.sources import SourceError, SourceSpec, open_source  # noqa: E402
from app.state import LatenessMeter, PolicyState, RunningTotals, curve_xy, front_label, percent  # noqa: E402
from app.workers import FrameSlot  # noqa: E402


def _folder(tmp_path, n=3):
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    return tmp_path


def test_source_spec_parses_paths_and_cameras(tmp_path):
    _folder(tmp_path)
    assert SourceSpec.from_text(str(tmp_path)).kind == "folder"
    assert SourceSpec.from_text(str(tmp_path / "0.png")).kind == "image"
    assert SourceSpec.from_text("camera:1") == SourceSpec("camera", "1")
    (tmp_path / "notes.txt").write_text("x")
    for bad in ("camera:x", str(tmp_path / "missing.png"), str(tmp_path / "notes.txt")):
        with pytest.raises(SourceError):
            SourceSpec.from_text(bad)


def test_folder_source_loops_steps_and_skips_corrupt_files(tmp_path):
    _folder(tmp_path)
    (tmp_path / "3.png").write_bytes(b"not a png")
    src = open_source(SourceSpec("folder", str(tmp_path)), loop=True)
    names = [src.read().name for _ in range(5)]
    assert names == ["0.png", "1.png", "2.png", "0.png", "1.png"]  # 3.png skipped, then round again
    assert src.skipped and "3.png" in src.skipped[0][0]
    src.seek(2)
    frame = src.read()
    assert frame.index == 2 and frame.image.shape == (8, 8, 3) and frame.image.dtype == np.uint8


def test_video_source_plays_seeks_and_loops(tmp_path):
    import cv2
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG video")
    for i in range(6):
        writer.write(np.full((24, 32, 3), 40 * i, np.uint8))
    writer.release()
    src = open_source(SourceSpec.from_text(str(path)), loop=True)
    assert src.count == 6 and src.interval == pytest.approx(0.1) and src.seekable
    frames = [src.read() for _ in range(8)]
    assert [f.index for f in frames] == [0, 1, 2, 3, 4, 5, 0, 1]  # loops at the end
    assert frames[0].image.shape == (24, 32, 3) and frames[3].image.mean() > frames[0].image.mean()
    src.seek(4)
    assert src.read().index == 4
    src.close()


def test_unusable_sources_say_why(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no images"):
        open_source(SourceSpec("folder", str(empty)))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(SourceError, match="bad.jpg"):
        open_source(SourceSpec("image", str(bad)))
    video = tmp_path / "bad.mp4"
    video.write_bytes(b"garbage")
    with pytest.raises(SourceError, match="cannot read video"):
        open_source(SourceSpec("video", str(video)))


def test_frame_slot_newest_wins():
    slot = FrameSlot()
    slot.put("a")
    slot.put("b")
    assert slot.dropped == 1 and slot.take(0.01) == "b" and slot.take(0.01) is None
    got = []
    t = threading.Thread(target=lambda: got.append(slot.take(2.0)))
    t.start()
    slot.put("c")
    t.join(2.0)
    assert got == ["c"] and slot.wait_empty(0.1)


def _result(exit_index, flops, full=100.0, ms=1.0, full_ms=2.0, num_exits=3):
    return SimpleNamespace(exit_index=exit_index, num_exits=num_exits, flops=flops, full_flops=full, ms=ms,
                           full_ms=full_ms, saved=1 - flops / full)


def test_live_stats_and_lateness():
    stats = RunningTotals(3)
    for i, (e, f) in enumerate([(0, 25.0), (2, 100.0), (0, 25.0), (1, 50.0)]):
        stats.add(_result(e, f), now=i * 0.1)
    assert stats.frames == 4 and stats.exit_counts == [2, 1, 1]
    assert stats.saved == pytest.approx(0.5) and stats.saved_ms == pytest.approx(0.5)
    assert stats.overall_fps == pytest.approx(10.0)
    assert stats.rate(now=0.35) is None  # 4 frames within 0.3 s: a burst, not a stream with a rate
    assert stats.to_json()["exit_histogram"] == [2, 1, 1]
    meter = LatenessMeter(0.010)
    for t in (0.0, 0.010, 0.030, 0.041):
        meter.tick(t)
    assert meter.max_ms == pytest.approx(10.0) and meter.ticks == 4
    assert percent(-0.00001) == "0 %" and percent(0.456) == "46 %"


def test_one_accumulator_for_the_engine_and_the_app():
    """The engine counts figures (no history), the app counts results (with a re-run replacing its
    frame); both are `engine.totals.RunningTotals` and agree on the same frames."""
    engine, shown = RunningTotals(3, history=0), RunningTotals(3)
    for i, (e, f) in enumerate([(0, 25.0), (2, 100.0), (1, 50.0)]):
        engine.count(e, 3, f, 100.0, 1.0, 2.0, now=i * 0.1)
        shown.add(_result(e, f), now=i * 0.1)
    assert engine.to_json() == shown.to_json() and not engine.saved_history and len(shown.saved_history) == 3
    before = engine.snapshot()
    engine.count(0, 3, 25.0, 100.0, 1.0, 2.0, rerun=True)  # no history kept: a re-run still replaces its frame
    assert engine.frames == 3 and engine.exit_counts == [2, 0, 1] and before.exit_counts == [1, 1, 1]
    shown.add(_result(0, 25.0), rerun=True)
    assert shown.exit_counts == [2, 0, 1] and list(shown.saved_history) == [75.0, 0.0, 75.0]
    assert shown.last.flops == 25.0 and engine.last is None


def _info(front):
    policies = {"threshold": {"kind": "threshold", "measure": "max_prob", "thresholds": [0.9, 0.9, 0.9]},
                "learned": {"kind": "learned"}}
    return SimpleNamespace(policies=policies, default_policy="threshold", front=front, default_point=1 if front else None)


def test_policy_state_edits_points_and_reset():
    front = [{"policy": {"kind": "threshold", "measure": "max_prob", "thresholds": [0.0, 0.0, 0.0]},
              "accuracy": 0.6, "flops": 10.0, "saved": 0.7},
             {"policy": {"kind": "threshold", "measure": "max_prob", "thresholds": [None, 0.5, 0.5]},
              "accuracy": 0.8, "flops": 20.0, "saved": 0.4}]
    state = PolicyState(_info(front))
    assert state.thresholds == [0.9, 0.9, 0.9] and not state.edited
    assert state.set_threshold(0, None) == [None, 0.9, 0.9] and state.edited
    assert state.choose_point(0)["thresholds"] == [0.0, 0.0, 0.0] and state.point == 0
    state.choose("learned")
    assert state.thresholds is None
    with pytest.raises(ValueError):
        state.set_threshold(0, 0.5)
    state.reset()
    assert state.thresholds == [0.9, 0.9, 0.9] and state.point == 1 and not state.edited
    assert "expected accuracy 80.0 %" in front_label(front[1]) and "saves 40 %" in front_label(front[1])
    xs, ys = curve_xy(front)
    assert xs == pytest.approx([30.0, 60.0]) and ys == pytest.approx([60.0, 80.0])


def test_time_saved_compares_medians_on_both_sides():
    """A few stalled staged frames (the window's own thread taking the core at full speed) must not
    hide the time saved: each exit's frames count at their median time, as the full model's live
    reference is a median (seen: "time saved 0 %" where the engine alone measured 24 %)."""
    stats = RunningTotals(3)
    for i in range(100):
        exit_index, ms = (0, 0.5) if i % 2 else (2, 1.0)
        stats.add(_result(exit_index, 25.0 if exit_index == 0 else 100.0, ms=ms * (8.0 if i % 10 == 3 else 1.0),
                          full_ms=1.0), now=i * 0.1)
    assert stats.ms / stats.frames > 1.0  # the mean says slower than the full model ...
    assert stats.typical_ms == pytest.approx(0.75)  # ... half the frames at 0.5 ms, half at 1.0 ms
    assert stats.saved_ms == pytest.approx(0.25)
    stats.add(_result(1, 50.0, ms=0.6, full_ms=1.0), rerun=True)  # a rerun replaces the last frame's time
    assert stats.frames == 100 and stats.exit_counts == [49, 1, 50] and len(stats.exit_ms[0]) == 49
    assert stats.snapshot().typical_ms == pytest.approx(stats.typical_ms)
    assert RunningTotals(3).typical_ms is None and RunningTotals(3).saved_ms == 0.0


def test_a_warm_frame_counts_everywhere_but_in_the_typical_frame():
    """A frame the full model's reference run had just warmed the caches for is faster than the
    frames it stands among: it counts in the totals and latencies, not in `typical_ms`; a rerun
    that replaces it takes back only what it added."""
    stats = RunningTotals(3)
    for i in range(10):
        stats.add(_result(0, 25.0, ms=1.0, full_ms=2.0), now=i * 0.1)
    warm = SimpleNamespace(**vars(_result(0, 25.0, ms=0.1, full_ms=2.0)), warm=True)
    stats.add(warm, now=1.0)
    assert stats.frames == 11 and stats.ms == pytest.approx(10.1)
    assert len(stats.exit_ms[0]) == 10 and stats.typical_ms == pytest.approx(1.0)
    stats.add(_result(0, 25.0, ms=3.0, full_ms=2.0), rerun=True)  # replaces the warm frame
    assert stats.frames == 11 and stats.ms == pytest.approx(13.0) and len(stats.exit_ms[0]) == 11
    stats.add(warm, rerun=True)  # and back: the typical frame's times lose the 3.0 ms one again
    assert len(stats.exit_ms[0]) == 10 and stats.typical_ms == pytest.approx(1.0)

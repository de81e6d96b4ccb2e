"""What an audience sees must agree: one result drives every panel, a re-run is not a new frame,
frames/s only over a real stream, one wording for savings, the scripted run's JSON and screenshot
describe the same moment, and exits and stages are numbered alike in the app and the CLI."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from PySide6.QtCore import QSettings  # noqa: E402

from app.main_window import STATS_MS, MainWindow  # noqa: E402
from app.scripted import ScriptedRun  # noqa: E402
from app.session import Session  # noqa: E402
from app.sources import Frame  # noqa: E402
from app.stats import RunningTotals  # noqa: E402
from app.widgets import NORMAL, PRESENTATION  # noqa: E402
from engine.runtime import ExitReading, InferenceResult, RunningTotals  # noqa: E402
from qt_helpers import bundle_path, image_folder, no_leaked_threads, window, write_tiny_bundle  # noqa: E402,F401

WAIT = 20000




def _result(exit_index: int, num_exits: int = 3, ms: float = 1.0, full_ms: float = 2.0, live: bool = True,
            flops: float | None = None) -> InferenceResult:
    exits = [ExitReading(e, e, 0.4 + 0.2 * e, [("red", 0.5)], 0.9, e == exit_index) for e in range(exit_index + 1)]
    return InferenceResult(exit_index, num_exits, 0, f"label{exit_index}", 0.5 + 0.1 * exit_index, exits,
                           exit_index + 1, num_exits, flops=10.0 * (exit_index + 1) if flops is None else flops,
                           full_flops=30.0, ms=ms, full_ms=full_ms, totals=RunningTotals(), full_ms_live=live)


def _frame(i: int) -> Frame:
    return Frame(np.full((8, 8, 3), 10 * i, np.uint8), i, 5, f"{i}.png", 0.0)


def _deliver(session: Session, result, frame, rerun: bool = False, generation: int | None = None) -> None:
    """A result as the inference thread hands it to the session."""
    gen = session._slot.generation if generation is None else generation
    session._inference.result.emit(result, frame, rerun, gen)


def _panels(window) -> dict:
    """The exit each panel says fired for the frame on screen."""
    hist_fired = [i for i, b in enumerate(window.compute.hist.opts["brushes"])
                  if b == NORMAL.color("fired")]
    return {"overlay": int(re.search(r"exit E(\d+)", window.video.caption).group(1)), "diagram": window.diagram.fired,
            "confidence": window.confidence.fired,
            "this frame": int(re.search(r"This frame: exit E(\d+)", window.compute.frame_label.text()).group(1)),
            "histogram": hist_fired[0] if len(hist_fired) == 1 else hist_fired}


def test_two_quick_steps_leave_every_panel_on_the_same_frame(qtbot, window):
    """Two results within STATS_MS (two quick ← presses, then paused): the second one is on every
    panel, also later; it used to stay in the overlay only, "This frame" kept the first."""
    session = window.session
    _deliver(session, _result(2), _frame(4))
    window.render_now()  # drawn, the running figures too: the next result comes within STATS_MS
    _deliver(session, _result(0), _frame(3))
    window.render_now(force_stats=False)  # what the render timer does
    assert _panels(window)["overlay"] == _panels(window)["this frame"] == 0
    qtbot.wait(3 * STATS_MS)
    assert set(_panels(window).values()) == {0}, _panels(window)
    assert window.shown_frame.index == 3 and window.shown_result.label == "label0"


def test_a_result_of_a_closed_source_is_not_shown_or_counted(qtbot, window, tmp_path):
    session = window.session
    window.open_source(str(_still(tmp_path)))
    qtbot.waitUntil(lambda: session.stats.frames == 1, timeout=WAIT)
    window.render_now()
    shown, old = window.shown_result, session._slot.generation
    session.close_source()  # e.g. another source opened while a frame of this one was in inference
    late = _result(1)
    _deliver(session, late, _frame(1), generation=old)
    window.render_now()
    assert session.stats.frames == 1 and session.stats.last is shown and window.shown_result is shown


def _still(tmp_path):
    path = tmp_path / "still.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
    return path


def test_rerunning_a_still_image_is_not_a_new_frame(qtbot, window, tmp_path):
    session = window.session
    window.open_source(str(_still(tmp_path)))
    qtbot.waitUntil(lambda: session.stats.frames == 1 and window.shown_result is not None, timeout=WAIT)
    assert session.stats.exit_counts == [0, 0, 1]
    with qtbot.waitSignal(session.result, timeout=WAIT, check_params_cb=lambda r, f: r is not None and r.exit_index == 0):
        window.policy_panel.rows[0].slider.setValue(0)  # exit 0 now fires: the same image, run again
    window.render_now()
    stats = session.stats
    assert stats.frames == 1 and stats.exit_counts == [1, 0, 0] and len(stats.saved_history) == 1
    assert "All 1 frames" in window.compute.total_label.text()
    assert window.compute.hist.opts["height"][0] == pytest.approx(100.0)
    assert stats.saved == pytest.approx(stats.last.saved)  # "all frames" is that one frame, as shown now
    assert window.fps_label.text() == "" and "frames/s" not in window.compute.fps_label.text()  # a still: no rate
    assert window.compute.fps_label.text().startswith("timed on torch")  # … but the runtime its time was taken on


def test_frames_per_second_only_over_a_real_stream():
    stats = RunningTotals(3)
    stats.add(_result(0), now=10.0)
    stats.add(_result(0), now=10.0001)  # two frames 0.1 ms apart: once shown as 10000 frames/s
    assert stats.rate(now=10.001) is None
    for i in range(10):  # a stream at 10 frames/s
        stats.add(_result(1), now=20.0 + 0.1 * i)
    assert stats.rate(now=21.0) == pytest.approx(10.0, rel=0.01)
    stats.add(_result(2), now=21.0, rerun=True)  # a setting changed: the last frame run again
    assert stats.frames == 12 and stats.rate(now=21.0) == pytest.approx(10.0, rel=0.01)
    assert stats.rate(now=24.0) is None  # nothing for 3 s: the stream stopped, and its rate with it
    assert RunningTotals(3).rate(now=1.0) is None and RunningTotals(3).overall_fps is None


def test_savings_read_alike_and_a_negative_one_is_never_green(qtbot, window):
    session = window.session
    _deliver(session, _result(1, ms=2.1, full_ms=2.0, flops=20.7), _frame(0))  # FLOPs saved 31 %, time saved −5 %
    window.render_now()
    compute = window.compute
    assert compute.big_label.text() == "FLOPs saved 31 %" and compute.time_label.text() == "time saved −5 %"
    assert NORMAL.fired in compute.big_label.styleSheet() and NORMAL.fired not in compute.time_label.styleSheet()
    total = compute.total_label.text()
    assert "FLOPs saved 31.0 %" in total and "time saved −5.0 %" in total and "slower" not in total
    assert "FLOPs saved 31 %" in compute.frame_label.text() and "saved 31 %" in window.video.caption
    assert "compute saved" not in " ".join(w.text() for w in (compute.big_label, compute.total_label))
    window.set_presentation(True)  # the same figures in the projector's colours
    assert compute.big_label.text() == "FLOPs saved 31 %" and PRESENTATION.fired in compute.big_label.styleSheet()
    assert PRESENTATION.threshold in compute.time_label.styleSheet()


def _text_of_window(window) -> dict:
    return {"total": window.compute.total_label.text(), "caption": window.video.caption, "label": window.video.label,
            "frames": window.session.stats.frames}


def test_scripted_json_and_screenshot_describe_the_same_moment(qtbot, tmp_path, bundle_path, image_folder, monkeypatch):
    monkeypatch.setattr("app.scripted.resident_mb", lambda: math.nan)  # a figure that is not a number
    win = MainWindow(Session(device="cpu"), settings=None)
    qtbot.addWidget(win)
    win.show()
    shot, stats = tmp_path / "shot.png", tmp_path / "stats.json"
    run = ScriptedRun(win, source=str(image_folder), frames=6, screenshot=str(shot), stats=str(stats),
                      bundle=str(bundle_path))
    seen = {}
    run.done.connect(lambda code, message: seen.update(_text_of_window(win), code=code, message=message))
    with qtbot.waitSignal(run.done, timeout=WAIT):
        run.start()
    assert seen["code"] == 0, seen["message"]
    data = json.loads(stats.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))
    assert data["rss_mb_end"] is None and shot.stat().st_size > 1000
    # at the screenshot the window showed exactly the frames and the last frame the JSON reports
    assert data["frames"] == seen["frames"] >= 6 and f"All {data['frames']} frames" in seen["total"]
    assert seen["caption"].startswith(f"exit E{data['last']['exit']} of 3") and seen["label"] == data["last"]["label"]
    qtbot.wait(300)  # the source was closed: nothing more arrives afterwards
    assert win.session.stats.frames == data["frames"]


def test_scripted_run_loads_the_last_bundle_used_as_help_says(qapp, tmp_path, bundle_path, image_folder,
                                                              monkeypatch, capsys):
    from app.__main__ import main, parse_args
    remembered = write_tiny_bundle(tmp_path / "remembered.offramp", seed=3)
    settings = QSettings(str(tmp_path / "user.ini"), QSettings.Format.IniFormat)
    settings.setValue("last_bundle", str(remembered))
    monkeypatch.setattr("app.remember.user_settings", lambda: settings)
    monkeypatch.setenv("OFFRAMP_DEFAULT_BUNDLE", str(tmp_path / "no-built-in.offramp"))
    stats = tmp_path / "stats.json"
    assert main(["--source", str(image_folder), "--frames", "2", "--stats", str(stats), "--device", "cpu"]) == 0, \
        capsys.readouterr().err
    assert json.loads(stats.read_text())["bundle"] == str(remembered)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "default: the last one used" in " ".join(capsys.readouterr().out.split())


def test_exits_and_stages_are_numbered_alike_in_the_cli_and_the_app(window, bundle_path, capsys):
    from engine.cli import main as cli
    assert cli(["info", str(bundle_path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+E\d+\s", line)]
    info = window.session.info
    app_rows = dict(window.session.info.summary())["Exits"]
    assert [(r[0], int(r[1])) for r in rows] == [(f"E{e}", s + 1) for e, s in enumerate(info.exit_stages)]
    for name, stage in [(r[0], r[1]) for r in rows]:
        assert f"{name} after stage {stage}" in app_rows
    assert window.policy_panel.rows[0].name.text() == f"E0 · stage {info.exit_stages[0] + 1}"
    _deliver(window.session, _result(2), _frame(0))
    window.render_now()
    assert window.video.caption.startswith("exit E2 of 3")  # `offramp run` says "at exit E2 of 3"


def test_compute_panel_shows_the_latency_tail_of_the_frames_it_counts(qtbot):
    """p50 / p95 / p99 of the kept per-frame times, next to the rate: an early exit makes the tail matter."""
    from app.widgets.compute_panel import ComputePanel
    panel = ComputePanel()
    qtbot.addWidget(panel)
    stats = RunningTotals(3, latency_frames=100)
    for i, ms in enumerate([1.0] * 90 + [9.0] * 10):  # one frame in ten pays for the whole network
        stats.add(_result(0 if ms == 1.0 else 2, ms=ms), now=10.0 + 0.05 * i)
    panel.update_stats(stats, fps=20.0)
    text = panel.fps_label.text()
    assert "p50 / p95 / p99 1.00 / 9.00 / 9.00 ms" in text, text
    one = RunningTotals(3, latency_frames=100)
    one.add(_result(0), now=10.0)
    panel.update_stats(one)
    assert "p50" not in panel.fps_label.text()  # a single frame has no tail to show

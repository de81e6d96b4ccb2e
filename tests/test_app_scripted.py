"""`offramp-app --source … --frames N --screenshot … --stats …`: the scripted run (through `main`, in
this process: a second process would spend most of the test importing torch again)."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import json  # noqa: E402

from PySide6.QtCore import QSettings  # noqa: E402

from app.__main__ import main  # noqa: E402
from app.main_window import MainWindow  # noqa: E402
from app.scripted import ScriptedRun  # noqa: E402
from app.session import Session  # noqa: E402
from qt_helpers import bundle_path, image_folder, no_leaked_threads  # noqa: E402,F401

def test_scripted_run_writes_screenshot_and_stats(qapp, tmp_path, bundle_path, image_folder, capsys):
    shot, stats = tmp_path / "out" / "shot.png", tmp_path / "out" / "stats.json"
    shot.parent.mkdir()  # a missing folder is refused, not made (test_app_options)
    code = main(["--source", str(image_folder), "--frames", "8", "--screenshot", str(shot), "--stats", str(stats),
                 "--bundle", str(bundle_path), "--device", "cpu", "--presentation", "--threads", "0"])
    assert code == 0, capsys.readouterr().err
    assert shot.stat().st_size > 5000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(stats.read_text())
    assert data["frames"] >= 8 and sum(data["exit_histogram"]) == data["frames"]
    assert data["exit_histogram"][2] == data["frames"]  # the random tiny model never reaches 0.9 early
    for key in ("saved_flops", "saved_ms", "fps", "gui_lateness_max_ms", "mean_ms", "dropped_frames"):
        assert isinstance(data[key], (int, float)), key
    assert data["fps"] > 0 and data["presentation"] is True and data["device"] == "cpu"
    # per-frame inference latency: percentiles of the recorded times of the frames shown
    assert data["latency_frames"] == data["frames"] and 0 < data["p50_ms"] <= data["p95_ms"] <= data["p99_ms"]
    assert data["runtime"].startswith("torch")  # which runtime the time figures were measured on
    assert data["clock"] in ("thread CPU time", "wall clock")  # and which clock timed them


def test_a_paced_scripted_run_reads_files_as_a_camera_delivers_frames(qapp, tmp_path, bundle_path, image_folder,
                                                                       capsys):
    stats = tmp_path / "stats.json"
    code = main(["--source", str(image_folder), "--frames", "12", "--fps", "25", "--stats", str(stats),
                 "--bundle", str(bundle_path), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    data = json.loads(stats.read_text())
    # one file every 40 ms: the stream cannot run faster than that (at full speed this tiny model
    # runs hundreds of frames a second)
    assert data["frames"] >= 12 and 0 < data["fps"] <= 27
    assert data["clock"] == "thread CPU time" or os.name == "nt"  # one thread on the CPU: its CPU time


def test_bad_input_fails_with_one_line(tmp_path, capsys):
    assert main(["--source", str(tmp_path / "missing"), "--frames", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    assert main(["--frames", "3"]) == 2
    assert main(["--source", str(tmp_path), "--frames", "0"]) == 2
    capsys.readouterr()
    for fps in ("0", "-5", "nan"):
        assert main(["--source", str(tmp_path), "--frames", "3", "--fps", fps]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--fps must be" in err, err
    assert main(["--source", str(tmp_path), "--fps", "30"]) == 2  # pacing is for scripted runs
    assert "--fps paces a scripted run" in capsys.readouterr().err


def test_scripted_run_reports_a_bundle_that_fails(qtbot, tmp_path, image_folder):
    bad = tmp_path / "bad.offramp"
    bad.write_text("not a bundle")
    win = MainWindow(Session(device="cpu"), settings=QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(win)
    run = ScriptedRun(win, source=str(image_folder), frames=5, stats=str(tmp_path / "s.json"), bundle=str(bad))
    with qtbot.waitSignal(run.done, timeout=30000) as blocker:
        run.start()
    code, message = blocker.args
    assert code == 2 and "bad.offramp" in message and "\n" not in message
    assert not (tmp_path / "s.json").exists()

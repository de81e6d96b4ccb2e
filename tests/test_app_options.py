"""`offramp-app`'s scripted options against hostile values: where --screenshot / --stats write, --timeout,
--threads, a still image asked for more frames than it has, and a folder with unreadable files. Bad
values are refused in one line before the run (no window, no model); the runs go through `main` in
this process, as in test_app_scripted."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import json  # noqa: E402
import shutil  # noqa: E402
import stat  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
from PySide6.QtCore import QSettings  # noqa: E402

from app.__main__ import MAX_TIMEOUT_S, _check, main, max_threads, parse_args  # noqa: E402
from app.main_window import MainWindow  # noqa: E402
from app.scripted import ScriptedRun  # noqa: E402
from app.session import Session  # noqa: E402
from qt_helpers import bundle_path, image_folder, no_leaked_threads  # noqa: E402,F401

POSIX = os.name == "posix"


def _refused(capsys, argv: list[str], *words: str) -> str:
    """Run `main(argv)`, which must refuse it (status 2) in one line holding each of `words`."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("offramp-app: error: "), err
    for word in words:
        assert word in err, err
    return err


# -- where the results go: checked before the run -------------------------------------------------------
@pytest.mark.skipif(not POSIX, reason="FIFOs, device nodes and symlinks are POSIX")
@pytest.mark.parametrize("option", ["--stats", "--screenshot"])
def test_outputs_that_are_not_regular_files_are_refused_and_left_alone(tmp_path, capsys, option):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    _refused(capsys, ["--source", str(tmp_path), option, str(fifo)], str(fifo), "not a regular file", option)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    for device in ("/dev/null", "/dev/full"):
        if os.path.exists(device):
            _refused(capsys, ["--source", str(tmp_path), option, device], device, "not a regular file")
            assert stat.S_ISCHR(os.stat(device).st_mode)
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "gone.json")  # where it was meant to lead is unknown
    _refused(capsys, ["--source", str(tmp_path), option, str(dangling)], str(dangling))
    assert dangling.is_symlink() and not (tmp_path / "gone.json").exists()


@pytest.mark.skipif(not POSIX, reason="symbolic links are POSIX")
def test_outputs_through_a_link_replace_what_it_names_and_keep_the_link(qapp, tmp_path, bundle_path, image_folder,
                                                                        capsys):
    """As the shell's `>` and engine.files do: a link says where the file lives."""
    (tmp_path / "data").mkdir()
    real_stats, real_shot = tmp_path / "data" / "stats.json", tmp_path / "data" / "shot.png"
    real_stats.write_text("{}")
    real_shot.write_bytes(b"old")
    stats, shot = tmp_path / "stats.json", tmp_path / "shot.png"
    stats.symlink_to(real_stats)
    shot.symlink_to(real_shot)
    code = main(["--source", str(image_folder), "--frames", "2", "--stats", str(stats), "--screenshot", str(shot),
                 "--bundle", str(bundle_path), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert stats.is_symlink() and shot.is_symlink()
    assert json.loads(real_stats.read_text())["frames"] >= 2
    assert real_shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_output_that_is_a_folder_or_in_a_missing_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    _refused(capsys, ["--source", str(tmp_path), "--stats", str(out)], str(out), "is a folder", "--stats")
    assert out.is_dir() and not list(out.iterdir())
    shot = tmp_path / "nonexistent" / "d" / "s.png"
    _refused(capsys, ["--source", str(tmp_path), "--screenshot", str(shot)], str(shot.parent), "does not exist")
    assert not (tmp_path / "nonexistent").exists()  # no folder made up
    assert not [p for p in tmp_path.iterdir() if ".offramp-tmp-" in p.name]  # the write probe is gone


def test_a_scripted_run_given_a_missing_folder_makes_none(qtbot, tmp_path, bundle_path, image_folder):
    """ScriptedRun itself (without `main`'s check) fails naming the folder instead of creating it."""
    win = MainWindow(Session(device="cpu"), settings=QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(win)
    missing = tmp_path / "missing"
    run = ScriptedRun(win, source=str(image_folder), frames=2, stats=str(missing / "s.json"), bundle=str(bundle_path))
    with qtbot.waitSignal(run.done, timeout=30000) as blocker:
        run.start()
    code, message = blocker.args
    assert code == 2 and str(missing) in message and "does not exist" in message and "\n" not in message
    assert not missing.exists()
    win.session.shutdown()


# -- numbers -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-5", str(MAX_TIMEOUT_S + 1), "1e10"])
def test_a_timeout_qt_cannot_time_is_refused(tmp_path, capsys, value):
    _refused(capsys, ["--source", str(tmp_path), "--frames", "3", f"--timeout={value}"], "--timeout must be")


def test_timeouts_and_thread_counts_in_range_are_taken(tmp_path):
    for extra in (["--timeout", "0.5"], ["--timeout", str(MAX_TIMEOUT_S)], ["--threads", "0"], ["--threads", "1"],
                  ["--threads", str(max_threads())]):
        assert _check(parse_args(["--source", str(tmp_path), "--frames", "3", *extra])) is None, extra


@pytest.mark.parametrize("value", ["-1", str(max_threads() + 1), "100000"])
def test_a_thread_count_torch_cannot_use_is_refused(tmp_path, capsys, value):
    _refused(capsys, ["--source", str(tmp_path), "--threads", value], "--threads must be", value)


def test_a_thread_count_torch_refuses_is_an_error_not_a_dead_inference_thread(qtbot, bundle_path):
    """Session used without `main`'s check: the inference thread says so once and goes on working."""
    session = Session(device="cpu", threads=-1)
    try:
        with qtbot.waitSignal(session.error, timeout=20000) as blocker:
            pass
        message = blocker.args[0]
        assert "-1 threads" in message and "\n" not in message
        with qtbot.waitSignal(session.model_loaded, timeout=20000):  # the thread still runs commands
            session.load_bundle(str(bundle_path))
    finally:
        session.shutdown()


# -- what the source can give ----------------------------------------------------------------------------------
def test_a_still_image_asked_for_more_frames_fails_at_once(qapp, tmp_path, bundle_path, image_folder, capsys):
    still = next(image_folder.rglob("*.png"))
    stats = tmp_path / "stats.json"
    t0 = time.perf_counter()
    err = _refused(capsys, ["--source", str(still), "--frames", "3", "--stats", str(stats), "--bundle",
                            str(bundle_path), "--device", "cpu", "--timeout", "60"],
                   str(still), "ended after 1 frame,", "3 asked for")
    assert time.perf_counter() - t0 < 30, err  # not the 60 s timeout
    assert not stats.exists()
    assert main(["--source", str(still), "--frames", "1", "--stats", str(stats), "--bundle", str(bundle_path),
                 "--device", "cpu", "--timeout", "60"]) == 0, capsys.readouterr().err
    assert json.loads(stats.read_text())["frames"] == 1


def test_the_stats_name_the_unreadable_files_a_folder_left_out(qapp, tmp_path, bundle_path, image_folder, capsys):
    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    bad = folder / "a_broken.png"  # sorted first: met before the 8 frames are shown
    bad.write_bytes(b"not a png at all")
    stats = tmp_path / "stats.json"
    code = main(["--source", str(folder), "--frames", "8", "--stats", str(stats), "--bundle", str(bundle_path),
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    data = json.loads(stats.read_text())
    assert data["frames"] >= 8
    assert data["skipped_files"] == 1 and len(data["skipped"]) == 1  # once, though the slideshow may loop
    assert data["skipped"][0]["file"] == str(bad) and data["skipped"][0]["why"]
    clean = tmp_path / "clean.json"
    assert main(["--source", str(image_folder), "--frames", "2", "--stats", str(clean), "--bundle", str(bundle_path),
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    assert json.loads(clean.read_text())["skipped_files"] == 0 and json.loads(clean.read_text())["skipped"] == []

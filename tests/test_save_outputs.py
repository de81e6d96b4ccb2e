"""Issue 11, item 3: a failed save never throws away finished work. Outputs are checked before any
work starts; a write that still fails keeps the result in a spare folder and says where; writes go
through recognisable temporaries, and stale ones of ours are cleaned up at the next save."""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine.bundle as bundle_module
from engine.bundle import load_bundle, save_bundle
from engine.cli import main
from engine.files import (OutputPathError, SaveFailed, check_output_path, clean_stale_temps, json_text,
                          save_or_keep, temp_path, write_json)
from qt_helpers import tiny_bundle, write_tiny_bundle
from synth import make_image_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("small"), 4, per_class=8, seed=2)


@pytest.fixture
def rescue(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "rescue"
    monkeypatch.setenv("OFFRAMP_RESCUE_DIR", str(folder))
    return folder


def _train(folder, out) -> list[str]:
    return ["train-exits", "--data", str(folder), "--backbone", "cifar_resnet_small", "--epochs", "1",
            "--val-fraction", "0.25", "--out", str(out)]


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("offramp ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# -- checked before any work ----------------------------------------------------------------------
@pytest.fixture
def no_work(monkeypatch):
    """Every command's expensive step fails the test if reached."""
    import engine.evaluate
    import engine.splits
    import engine.train.retrain

    def work(*a, **k):
        raise AssertionError("work started before the output was checked")

    for mod, name in [(engine.train.retrain, "fit_exits"), (engine.splits, "open_splits"),
                      (engine.evaluate, "record_outputs"), (bundle_module, "load_bundle")]:
        monkeypatch.setattr(mod, name, work)


def _read_only(monkeypatch, folder: Path):
    """`folder` refuses new files, as a read-only folder does even for root (who ignores permissions)."""
    real = os.open

    def fake(path, flags, *a, **k):
        if Path(path).parent == folder and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", fake)


BAD_OUTS = {
    "missing folder": (lambda t: t / "nowhere" / "m.offramp", "the folder .*nowhere for .* does not exist"),
    "a folder": (lambda t: t / "dir.offramp", "dir.offramp is a folder; give --out a file name"),
    "wrong suffix": (lambda t: t / "model.jpg", "model.jpg does not end in .offramp"),
    "read-only folder": (lambda t: t / "ro" / "m.offramp", "the folder .*ro cannot take new files"),
}


@pytest.mark.parametrize("case", list(BAD_OUTS))
@pytest.mark.parametrize("command", ["train-exits", "train-backbone", "search", "train-policy"])
def test_out_is_checked_before_any_work(case, command, tmp_path, small_folder, no_work, monkeypatch, capsys):
    make, message = BAD_OUTS[case]
    (tmp_path / "dir.offramp").mkdir()
    (tmp_path / "ro").mkdir()
    out = make(tmp_path)
    if case == "read-only folder":
        _read_only(monkeypatch, tmp_path / "ro")
    args = {"train-exits": _train(small_folder, out),
            "train-backbone": ["train-backbone", "--arch", "cifar_resnet_small", "--data", str(small_folder),
                               "--epochs", "1", "--out", str(out)],
            "search": ["search", str(tmp_path / "in.offramp"), "--data", str(small_folder), "--out", str(out)],
            "train-policy": ["train-policy", str(tmp_path / "in.offramp"), "--data", str(small_folder),
                             "--kind", "bolukbasi", "--out", str(out)]}[command]
    assert main(args) != 0
    line = _one_line_error(capsys.readouterr().err)
    assert str(out) in line
    assert re.search(message, line), line
    assert not (tmp_path / "ro").exists() or list((tmp_path / "ro").iterdir()) == []


@pytest.mark.parametrize("option, name, message", [
    ("--json", "nowhere/r.json", "the folder .*nowhere for .* does not exist"),
    ("--json", "report.txt", r"report.txt does not end in .json"),
    ("--png", "plot.jpg", r"plot.jpg does not end in .png"),
    ("--json", ".", "is a folder; give --json a file name"),
])
@pytest.mark.parametrize("command", ["evaluate", "bench"])
def test_report_paths_are_checked_before_any_work(command, option, name, message, tmp_path, small_folder, no_work,
                                                  capsys):
    out = tmp_path / name
    assert main([command, str(tmp_path / "in.offramp"), "--data", str(small_folder), option, str(out)]) != 0
    line = _one_line_error(capsys.readouterr().err)
    assert re.search(message, line), line


def test_export_folder_is_checked_before_any_work(tmp_path, no_work, capsys):
    (tmp_path / "file").write_text("x")
    for out, message in [(tmp_path / "nowhere" / "onnx", "does not exist"), (tmp_path / "file", "is a file, not a folder")]:
        assert main(["export", str(tmp_path / "in.offramp"), "--out", str(out)]) != 0
        assert message in _one_line_error(capsys.readouterr().err)


def test_check_output_path_accepts_what_can_be_written(tmp_path):
    assert check_output_path(tmp_path / "m.offramp", suffixes=(".offramp",)) == tmp_path / "m.offramp"
    (tmp_path / "old.OFFRAMP").write_bytes(b"x")  # an existing file is replaced, whatever its case
    check_output_path(tmp_path / "old.OFFRAMP", suffixes=(".offramp",))
    check_output_path(tmp_path / "new", folder=True)
    assert sorted(os.listdir(tmp_path)) == ["old.OFFRAMP"]  # the probe left nothing behind
    with pytest.raises(OutputPathError, match="is empty"):
        check_output_path("")


# -- a write that fails after the work ------------------------------------------------------------
def _disk_full_in(monkeypatch, folder: Path):
    real = bundle_module._write

    def write(tmp, data):
        if Path(tmp).parent == folder:
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, data)

    monkeypatch.setattr(bundle_module, "_write", write)


def test_a_failed_save_after_training_keeps_the_bundle(tmp_path, small_folder, rescue, monkeypatch, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "trained.offramp"
    _disk_full_in(monkeypatch, out_dir)
    assert main(_train(small_folder, out)) != 0
    line = _one_line_error(capsys.readouterr().err)
    kept = list(rescue.iterdir())
    assert len(kept) == 1 and kept[0].name.startswith("trained-unsaved-") and kept[0].suffix == ".offramp"
    assert f"could not write {out} (No space left on device); the bundle was kept at {kept[0]}" in line
    assert sorted(load_bundle(kept[0]).class_names) == ["blue", "green", "red", "yellow"]
    assert os.listdir(out_dir) == []  # neither a half bundle nor a temporary


def test_a_failed_save_keeps_the_previous_bundle_and_the_new_one(tmp_path, small_folder, rescue, monkeypatch, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = write_tiny_bundle(out_dir / "model.offramp")
    before = out.read_bytes()
    _disk_full_in(monkeypatch, out_dir)
    assert main(_train(small_folder, out)) != 0
    assert "the bundle was kept at" in _one_line_error(capsys.readouterr().err)
    assert out.read_bytes() == before and os.listdir(out_dir) == ["model.offramp"]
    assert len(list(rescue.iterdir())) == 1


def test_when_no_copy_can_be_kept_either_it_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFRAMP_RESCUE_DIR", str(tmp_path / "file" / "below"))
    (tmp_path / "file").write_text("not a folder")

    def write(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SaveFailed, match=r"could not write .*m.offramp \(No space left on device\), nor keep a copy "
                                         r"in .*below; the bundle is lost") as info:
        save_or_keep(write, tmp_path / "m.offramp", what="bundle")
    assert info.value.kept_at is None


def test_report_that_cannot_be_written_is_kept(tmp_path, rescue, monkeypatch):
    import engine.files as files
    real = files.write_atomic

    def write_atomic(path, data):
        if Path(path).parent == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(path, data)

    monkeypatch.setattr(files, "write_atomic", write_atomic)
    with pytest.raises(SaveFailed, match="Permission denied.*the report was kept at") as info:
        save_or_keep(lambda p: write_json(p, {"accuracy": float("nan")}), tmp_path / "r.json", what="report")
    assert json.loads(info.value.kept_at.read_text()) == {"accuracy": None}


def test_save_bundle_says_in_one_sentence_what_is_wrong(tmp_path):
    b = tiny_bundle(front=False)
    with pytest.raises(IsADirectoryError, match=f"cannot save the bundle to {tmp_path}: it is a folder"):
        save_bundle(b, tmp_path)
    with pytest.raises(FileNotFoundError, match="the folder .*missing does not exist"):
        save_bundle(b, tmp_path / "missing" / "m.offramp")


# -- temporaries ----------------------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporaries_are_recognisable_and_stale_ones_are_cleaned(tmp_path):
    name = temp_path(tmp_path / "m.offramp").name
    assert name.startswith(".m.offramp.offramp-tmp-") and str(os.getpid()) in name
    dead = tmp_path / f".m.offramp.offramp-tmp-{_dead_pid()}-0badc0de"
    alive = tmp_path / f".m.offramp.offramp-tmp-{os.getpid()}-1234abcd"  # this process: maybe being written
    old = tmp_path / f".x.json.offramp-tmp-{os.getppid()}-feedf00d"  # a live process, but hours old
    legacy = tmp_path / f".m.offramp.{_dead_pid()}.0a1b2c3d.tmp"  # save_bundle's temporaries before
    theirs = tmp_path / ".m.offramp.12345.tmp"  # not ours: never touched
    for f in (dead, alive, old, legacy, theirs):
        f.write_bytes(b"\0" * 100)
    os.utime(old, (time.time() - 7 * 3600,) * 2)
    # safetensors' own temporaries (older versions saved through them): a bundle's half, long untouched
    write_tiny_bundle(tmp_path / "whole.offramp")
    half = (tmp_path / "whole.offramp").read_bytes()[:3000]
    for name, data, age in [(".tmpAb12Cd", half, 3600), (".tmpXy34Zw", half, 0), (".tmpQq11Rr", b"\0" * 3000, 3600)]:
        (tmp_path / name).write_bytes(data)
        os.utime(tmp_path / name, (time.time() - age,) * 2)
    save_bundle(tiny_bundle(front=False), tmp_path / "m.offramp")
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, theirs.name, "m.offramp", "whole.offramp",
                                                   ".tmpXy34Zw", ".tmpQq11Rr"])
    assert clean_stale_temps(tmp_path / "missing") == []


KILLED_MID_WRITE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import engine.bundle as b
from qt_helpers import tiny_bundle

def write(tmp, data):
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

b._write = write
b.save_bundle(tiny_bundle(front=False), {out!r})
"""


@pytest.mark.skipif(os.name != "posix", reason="kill -9 is POSIX")
def test_a_kill_mid_write_leaves_a_temporary_the_next_save_removes(tmp_path):
    out = tmp_path / "model.offramp"
    write_tiny_bundle(out)
    before = out.read_bytes()
    script = KILLED_MID_WRITE.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -9
    assert out.read_bytes() == before  # the previous bundle is intact
    left = [n for n in os.listdir(tmp_path) if n != "model.offramp"]
    assert len(left) == 1 and left[0].startswith(".model.offramp.offramp-tmp-")
    save_bundle(tiny_bundle(front=False), tmp_path / "other.offramp")  # any later save into the folder
    assert sorted(os.listdir(tmp_path)) == ["model.offramp", "other.offramp"]


# -- strict JSON ----------------------------------------------------------------------------------
def test_json_we_write_never_holds_a_bare_nan(tmp_path):
    obj = {"a": float("nan"), "b": [float("inf"), 1.5, (float("-inf"),)], "c": {"d": torch.tensor(2.0).item()}}
    assert json_text(obj) == '{"a": null, "b": [null, 1.5, [null]], "c": {"d": 2.0}}'
    path = write_json(tmp_path / "x.json", obj)

    def refuse(name):
        raise AssertionError(name)

    assert json.loads(path.read_text(), parse_constant=refuse)["a"] is None


@pytest.mark.parametrize("command", ["evaluate", "bench"])
def test_an_explicit_png_without_matplotlib_is_refused_before_any_work(command, tmp_path, small_folder, no_work,
                                                                       monkeypatch, capsys):
    import engine.plot
    problem = "drawing the plot needs matplotlib, an optional extra: pip install 'offramp[plot]'"
    monkeypatch.setattr(engine.plot, "plotting_problem", lambda: problem)
    png = tmp_path / "plot.png"
    assert main([command, str(tmp_path / "in.offramp"), "--data", str(small_folder), "--png", str(png)]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line == f"offramp {command}: --png {png} was asked for, but {problem}"
    assert not png.exists() and not list(tmp_path.glob("*.json"))
    # without --png nothing is refused up front: the report is written and the plot's absence said at the end
    assert main([command, str(tmp_path / "in.offramp"), "--data", str(small_folder), "--json",
                 str(tmp_path / "r.json")]) == 1
    assert "work started" in capsys.readouterr().err  # no_work's stand-in for loading the bundle was reached

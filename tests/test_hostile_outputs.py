"""Hostile outputs: where Offramp writes, it replaces only what is its to replace. `export
--overwrite` replaces an earlier export or an empty folder, never a folder of the user's files; a
write never replaces a FIFO, a device, a folder or a broken link, and goes through a link to the
file it names; `offramp run` names every image-named entry of a folder it could not read (broken
links, link loops, FIFOs) and does not exit 0; `offramp info | head` ends quietly."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import engine.export as export_module
from engine.cli import main
from engine.export import FORMAT, MANIFEST, check_export_folder, export_bundle
from engine.files import (TEMP_MARK, NotReplaceable, OutputPathError, SaveFailed, check_output_path, replacing,
                          save_or_keep, target_problem, write_json)
from engine.media import list_images
from qt_helpers import tiny_bundle, write_tiny_bundle

pytestmark = pytest.mark.skipif(os.name != "posix", reason="FIFOs and symlinks are POSIX")
REPO = Path(__file__).resolve().parents[1]


def _temporaries(*folders: Path) -> list[Path]:
    return [p for f in folders for p in f.iterdir() if TEMP_MARK in p.name]


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("offramp ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny.offramp")


# -- files: only a regular file is replaced ---------------------------------------------------------
def _make(kind: str, path: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
        (path / "keep.txt").write_text("mine")
    elif kind == "broken link":
        path.symlink_to(path.parent / "nowhere.json")
    elif kind == "link loop":
        path.symlink_to(path.parent / "other.json")
        (path.parent / "other.json").symlink_to(path)


@pytest.mark.parametrize("kind", ["fifo", "folder", "broken link", "link loop"])
def test_a_write_never_replaces_what_is_not_a_regular_file(kind, tmp_path):
    target = tmp_path / "out.json"
    _make(kind, target)
    before = os.lstat(target)
    with pytest.raises(NotReplaceable) as err:
        write_json(target, {"a": 1})
    message = str(err.value)
    assert message.startswith(str(target)) and "Errno" not in message and "\n" not in message
    after = os.lstat(target)
    assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode) and after.st_ino == before.st_ino
    assert not (tmp_path / "nowhere.json").exists() and _temporaries(tmp_path) == []
    # checked before any work by the same rule
    with pytest.raises(OutputPathError, match=str(target)):
        check_output_path(target, suffixes=(".json",))


def test_a_device_is_refused():
    # Only checked, never written: run as root, a wrong answer would replace /dev/null.
    assert target_problem("/dev/null").startswith("exists and is not a regular file")
    with pytest.raises(OutputPathError, match="/dev/null exists and is not a regular file"):
        check_output_path("/dev/null", option="--json")


def test_a_write_through_a_link_replaces_the_file_it_names(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    real = write_json(store / "report.json", {"run": 1})
    link = tmp_path / "report.json"
    link.symlink_to(real)
    assert check_output_path(link, suffixes=(".json",)) == link
    write_json(link, {"run": 2})
    assert link.is_symlink() and os.readlink(link) == str(real)  # the link stays a link
    assert json.loads(real.read_text()) == {"run": 2}
    assert _temporaries(tmp_path, store) == []


def test_a_fifo_found_at_save_time_keeps_the_result_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFRAMP_RESCUE_DIR", str(tmp_path / "rescue"))
    fifo = tmp_path / "result.json"
    os.mkfifo(fifo)
    with pytest.raises(SaveFailed) as err:
        save_or_keep(lambda p: write_json(p, {"done": True}), fifo)
    assert json.loads(err.value.kept_at.read_text()) == {"done": True}
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_folder_of_files_is_never_replaced_and_an_empty_one_is(tmp_path):
    photos = tmp_path / "photos"
    (photos / "notes").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(b"my photo")
    (photos / "notes" / "n.txt").write_text("my notes")
    before = _tree(photos)
    with pytest.raises(NotReplaceable, match="photos is a folder that is not empty"):
        with replacing(photos, folder=True) as tmp:
            (tmp / "new").write_text("x")
    assert _tree(photos) == before and _temporaries(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with replacing(empty, folder=True) as tmp:
        (tmp / "new").write_text("x")
    assert (empty / "new").read_text() == "x" and _temporaries(tmp_path) == []


def test_a_failed_folder_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    old = tmp_path / "export"
    old.mkdir()
    (old / "manifest.json").write_text("old")
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((Path(src), Path(dst)))
        if Path(dst) == old and len(calls) == 2:  # the new folder into place: fails (disk gone)
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        with replacing(old, folder=True, check_old=lambda p: None) as tmp:
            (tmp / "manifest.json").write_text("new")
    assert _tree(old) == {"manifest.json": b"old"} and _temporaries(tmp_path) == []


# -- export --overwrite ---------------------------------------------------------------------------
@pytest.fixture
def user_folder(tmp_path) -> Path:
    folder = tmp_path / "holiday"
    (folder / "raw").mkdir(parents=True)
    Image.new("RGB", (4, 4), (200, 0, 0)).save(folder / "beach.jpg")
    (folder / "notes.txt").write_text("do not lose")
    (folder / "raw" / "0001.png").write_bytes(b"raw")
    return folder


def test_export_overwrite_never_removes_a_folder_that_is_not_an_export(bundle_file, user_folder, capsys):
    before = _tree(user_folder)
    code = main(["export", str(bundle_file), "--out", str(user_folder), "--overwrite", "--no-check"])
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2 and _tree(user_folder) == before
    assert f"{user_folder} is not an Offramp export folder (no {MANIFEST}" in line and "remove it yourself" in line
    # a manifest.json of something else (a web app's) does not make it an export
    (user_folder / MANIFEST).write_text(json.dumps({"name": "my web app"}))
    with pytest.raises(ValueError, match="is not an Offramp export folder"):
        export_bundle(tiny_bundle(), user_folder, overwrite=True, check=False)
    assert (user_folder / "notes.txt").read_text() == "do not lose"


def test_export_folder_rules(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_export_folder(empty, overwrite=True) == empty
    with pytest.raises(ValueError, match="already exists"):
        check_export_folder(empty)
    assert check_export_folder(tmp_path / "new") == tmp_path / "new"


@pytest.fixture(scope="module")
def earlier_export(tmp_path_factory) -> Path:
    pytest.importorskip("onnx")
    folder = tmp_path_factory.mktemp("exports") / "onnx"
    export_bundle(tiny_bundle(), folder, check=False)
    return folder


def test_overwrite_replaces_an_earlier_export_and_a_failed_one_keeps_it(earlier_export, tmp_path, monkeypatch):
    import shutil
    out = tmp_path / "onnx"
    shutil.copytree(earlier_export, out)
    before = _tree(out)
    assert json.loads(before[MANIFEST])["format"] == FORMAT

    def failing(bundle, name, policy, folder, *a):
        (folder / "stage0.onnx").write_bytes(b"half")
        raise RuntimeError("the exporter failed")

    monkeypatch.setattr(export_module, "_write_graphs", failing)
    with pytest.raises(RuntimeError, match="the exporter failed"):
        export_bundle(tiny_bundle(), out, overwrite=True, check=False)
    assert _tree(out) == before and _temporaries(tmp_path) == []

    def fake(bundle, name, policy, folder, *a):  # the folder handling, without 10 s of ONNX export
        (folder / "stage0.onnx").write_bytes(b"new")
        return {"format": FORMAT, "policy": {"name": name}}

    monkeypatch.setattr(export_module, "_write_graphs", fake)
    export_bundle(tiny_bundle(), out, overwrite=True, check=False, policy="first exit")
    assert sorted(_tree(out)) == [MANIFEST, "stage0.onnx"] and _temporaries(tmp_path) == []
    assert json.loads((out / MANIFEST).read_text())["policy"]["name"] == "first exit"


# -- offramp run on links and FIFOs ----------------------------------------------------------------
@pytest.fixture
def odd_folder(tmp_path) -> Path:
    odd = tmp_path / "odd"
    odd.mkdir()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(odd / "good.png")
    (odd / "broken.jpg").symlink_to(odd / "gone.jpg")
    (odd / "loop1.jpg").symlink_to(odd / "loop2.jpg")
    (odd / "loop2.jpg").symlink_to(odd / "loop1.jpg")
    os.mkfifo(odd / "pipe.png")
    (odd / "again").symlink_to(odd)  # a link back into the folder: nothing missed, not a problem
    return odd


def test_list_images_tells_the_image_named_entries_it_left_out(odd_folder):
    told: list[str] = []
    assert list_images(odd_folder, on_problem=told.append) == [odd_folder / "good.png"]
    assert sorted(told) == sorted([f"cannot read image {odd_folder / 'broken.jpg'}: broken link",
                                   f"cannot read image {odd_folder / 'loop1.jpg'}: link loop",
                                   f"cannot read image {odd_folder / 'loop2.jpg'}: link loop",
                                   f"cannot read image {odd_folder / 'pipe.png'}: not a regular file"])


def test_run_on_a_folder_names_what_it_could_not_read_and_does_not_exit_0(bundle_file, odd_folder, capsys):
    code = main(["run", "--bundle", str(bundle_file), str(odd_folder), "--json"])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    assert [json.loads(line)["source"] for line in out.splitlines()] == [str(odd_folder / "good.png")]
    skipped = [line for line in err.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 4 and "again" not in err
    for name in ("broken.jpg", "loop1.jpg", "loop2.jpg", "pipe.png"):
        assert sum(str(odd_folder / name) in line for line in skipped) == 1, err


def test_run_calls_a_link_given_directly_a_loop_or_broken_not_missing(bundle_file, odd_folder, capsys):
    code = main(["run", "--bundle", str(bundle_file), str(odd_folder / "loop1.jpg"), str(odd_folder / "broken.jpg"),
                 str(odd_folder / "good.png")])
    err = capsys.readouterr().err
    assert code == 1 and f"{odd_folder / 'loop1.jpg'} does not exist" not in err
    assert f"{odd_folder / 'loop1.jpg'} is a link loop" in err
    assert f"{odd_folder / 'broken.jpg'} is a broken link (it points to {odd_folder / 'gone.jpg'}" in err


# -- a reader that goes away -----------------------------------------------------------------------
def test_a_closed_pipe_ends_the_command_quietly(bundle_file):
    script = f"import sys; from engine.cli import main; sys.exit(main(['info', {str(bundle_file)!r}]))"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=REPO)
    proc.stdout.close()  # `| head -0`: the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err

"""One folder walker (engine.walk) for every folder reader: links are followed, but never back into
a folder above, never round a loop and never twice to the same folder or file."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from app.dataset import class_counts
from app.sources import SourceSpec, open_source
from engine import media
from engine.data.checks import check_folder, check_unlabelled
from engine.data.folders import open_dataset, open_unlabelled
from engine.walk import LOOP, REPEAT, TreeWalker

pytestmark = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="POSIX symbolic links")


def _finishes(fn, seconds: float = 20.0):
    """fn()'s result; fails (instead of hanging the run) when it takes longer than `seconds`."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("result", fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert "result" in out, f"{fn} did not finish within {seconds} s (a link loop?)"
    return out["result"]


@pytest.fixture
def hostile_folder(tmp_path: Path) -> Path:
    """cat/ (3 images) and dog/ (2 images) laced with links: to the root, to the folder above it,
    to a folder's own self, to a sibling class, loops two deep, a broken link, a hard link and a
    link to a file already listed; plus a class folder that lives elsewhere (linked in)."""
    root = tmp_path / "data"
    for cls, n in (("cat", 3), ("dog", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (4, 4), (40 * i, 0, 0)).save(root / cls / f"{i}.png")
    (root / "cat" / "to_root").symlink_to(root)
    (root / "cat" / "to_above").symlink_to(tmp_path)
    (root / "dog" / "self").symlink_to(root / "dog")
    (root / "dog" / "deep" / "er").mkdir(parents=True)
    (root / "dog" / "deep" / "er" / "back").symlink_to(root / "dog" / "deep")
    (root / "cat" / "broken.png").symlink_to(root / "nowhere.png")
    os.link(root / "cat" / "0.png", root / "cat" / "hard.png")
    (root / "dog" / "again.png").symlink_to(root / "dog" / "0.png")
    elsewhere = tmp_path / "elsewhere" / "bird"
    elsewhere.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(elsewhere / "b.png")
    (root / "bird").symlink_to(elsewhere)
    (root / "alias").symlink_to(root / "cat")  # the same class folder twice: read once
    return root


def test_labelled_folder_counts_each_real_image_once(hostile_folder: Path):
    rep = _finishes(lambda: check_folder(hostile_folder))
    assert rep.counts == {"alias": 0, "bird": 1, "cat": 3, "dog": 2}
    assert rep.empty_classes == ["alias"] and rep.classes == ["bird", "cat", "dog"]
    why = {Path(p).name: reason for p, reason in rep.skipped}
    assert why["to_root"] == LOOP and why["to_above"] == LOOP  # never into the root or above it
    assert why["self"] == why["back"] == why["alias"] == REPEAT  # a folder already read: not again
    assert why["broken.png"] == "broken link"
    ds = _finishes(lambda: open_dataset(hostile_folder))
    assert len(ds) == 6 and sorted(ds.targets) == [0, 1, 1, 1, 2, 2]


def test_unlabelled_and_media_readers_walk_the_same_way(hostile_folder: Path):
    assert _finishes(lambda: check_unlabelled(hostile_folder)).count == 6
    assert len(_finishes(lambda: open_unlabelled(hostile_folder))) == 6
    files = _finishes(lambda: media.list_images(hostile_folder))
    assert len(files) == 6 and len({f.resolve() for f in files}) == 6
    assert len(_finishes(lambda: list(media.iter_frames([hostile_folder])))) == 6
    source = _finishes(lambda: open_source(SourceSpec("folder", str(hostile_folder))))
    assert source.count == 6
    assert _finishes(lambda: class_counts(hostile_folder)) == {"alias": 0, "bird": 1, "cat": 3, "dog": 2}


def test_a_link_to_its_own_folder_adds_nothing(tmp_path: Path):
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "a" / "x.png")
    for i in range(5):  # five ways back to the same folder: still one image
        (root / "a" / f"again{i}").symlink_to(root / "a")
    assert [Path(p).name for p, _ in TreeWalker(root).files()] == ["x.png"]


def test_the_walk_keeps_name_order_and_survives_an_unreadable_folder(tmp_path: Path):
    root = tmp_path / "d"
    (root / "b").mkdir(parents=True)
    (root / "a").mkdir()
    for p in ("z.png", "a/y.png", "b/x.png", "a/.hidden.png"):
        (root / p).write_bytes(b"x")
    walker = TreeWalker(root)
    assert [os.path.relpath(p, root) for p, _ in walker.files()] == ["z.png", "a/y.png", "b/x.png"]
    if os.geteuid() != 0:  # root reads anything
        (root / "b").chmod(0)
        try:
            walker = TreeWalker(root)
            assert len(walker.files()) == 2 and walker.problems[0][1].startswith("unreadable folder")
        finally:
            (root / "b").chmod(0o755)

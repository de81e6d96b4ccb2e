"""engine.data: folder and zip layouts, checks that report bad files, image conversion, loaders."""
from __future__ import annotations

import io
import pickle
import shutil
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synth import make_image_folder

from engine.backbones.cifar import CIFAR_PRESET
from engine.data.checks import check_folder
from engine.data.folders import make_loader, open_dataset
from engine.images import load_image
from engine.preprocess import eval_transform


# -- helpers ------------------------------------------------------------------------------------
def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _sixteen_bit() -> Image.Image:
    img = Image.fromarray(np.array([[0, 32896], [65535, 65535]], dtype=np.uint16))
    return Image.open(io.BytesIO(_png_bytes(img)))


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """Classes a and b with 6 good images each; a also holds every kind of bad or odd file; c
    holds no image at all; hidden files and folders lie around."""
    root = make_image_folder(tmp_path / "messy", ["a", "b"], per_class=6)
    a = root / "a"
    good = (a / "0001.jpg").read_bytes()
    (a / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (a / "empty.jpg").write_bytes(b"")
    (a / "text.jpg").write_text("this is not a picture")
    Image.new("L", (32, 32), 90).save(a / "gray.png")
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(a / "rgba.png")
    (a / "deep.png").write_bytes(_png_bytes(_sixteen_bit()))
    (a / ".hidden.jpg").write_text("hidden files are ignored")
    (root / "c").mkdir()
    (root / "c" / "notes.txt").write_text("not an image by extension")
    (root / "c" / ".DS_Store").write_bytes(b"\0\1")
    (root / ".thumbnails").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".thumbnails" / "x.png")
    return root


def _make_split_layout(root: Path, test_classes=("red", "green", "blue")) -> Path:
    make_image_folder(root / "train", ["red", "green", "blue"], per_class=4, seed=1)
    make_image_folder(root / "test", list(test_classes), per_class=2, seed=2)
    return root


def _zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, prefix + path.relative_to(folder).as_posix() + ("/" if path.is_dir() else ""))
    return archive


# -- load_image ---------------------------------------------------------------------------------
def test_load_image_converts_modes():
    gray = load_image(_png_bytes(Image.new("L", (4, 4), 77)))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    deep = load_image(_png_bytes(_sixteen_bit()))
    assert _sixteen_bit().mode.startswith("I")
    assert deep.mode == "RGB" and [deep.getpixel(p)[0] for p in ((0, 0), (1, 0), (0, 1))] == [0, 128, 255]
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))
    out = load_image(io.BytesIO(_png_bytes(rgba)))
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)  # on white
    pal = Image.new("P", (2, 2), 3)
    pal.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * 756)
    assert load_image(_png_bytes(pal)).getpixel((0, 0)) == (70, 80, 90)


def test_load_image_raises_on_garbage():
    with pytest.raises(OSError):
        load_image(b"not an image")


# -- checks -------------------------------------------------------------------------------------
def test_check_folder_reports_every_problem(messy_folder: Path):
    seen = []
    rep = check_folder(messy_folder, progress=seen.append)
    assert (seen[0].done, seen[-1].done, seen[-1].total, seen[-1].stage) == (0, 18, 18, "checking images")
    skipped = {Path(p).name: why for p, why in rep.skipped}
    assert skipped == {"truncated.jpg": "corrupt", "empty.jpg": "zero bytes", "text.jpg": "not an image"}
    converted = {Path(p).name: mode for p, mode in rep.converted}
    assert converted["gray.png"] == "L" and converted["rgba.png"] == "RGBA"
    assert converted["deep.png"].startswith("I")
    assert rep.counts == {"a": 9, "b": 6, "c": 0}
    assert rep.classes == ["a", "b"] and rep.empty_classes == ["c"]
    assert any(p.endswith("notes.txt") for p in rep.ignored)
    rep.raise_if_unusable()  # two classes with images: usable despite the problems
    text = "\n".join(rep.summary())
    assert "15 images" in text and "empty classes" in text and "text.jpg: not an image" in text


def test_dataset_after_check_skips_bad_files(messy_folder: Path):
    rep = check_folder(messy_folder)
    ds = open_dataset(messy_folder, report=rep, transform=eval_transform(CIFAR_PRESET))
    assert len(ds) == 15 and ds.classes == ["a", "b"] and sorted(set(ds.targets)) == [0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch, labels = next(iter(make_loader(ds, batch_size=len(ds))))
    assert batch.shape == (15, 3, 32, 32) and labels.tolist() == ds.targets


def test_bad_files_met_while_loading_are_skipped_with_a_warning(messy_folder: Path):
    ds = open_dataset(messy_folder)  # no check: zero-byte files are left out, the rest is tried
    assert len(ds) == 17 and ds.classes == ["a", "b"]
    with pytest.warns(UserWarning, match="skipping"):
        items = [ds[i] for i in range(len(ds))]
    assert all(img.mode == "RGB" for img, _ in items)
    assert sorted(Path(p).name for p in ds.bad) == ["text.jpg", "truncated.jpg"]


def test_unusable_folders_are_refused_with_the_path(tmp_path: Path):
    single = make_image_folder(tmp_path / "single", ["only"], per_class=2)
    with pytest.raises(ValueError, match=r"single.*only one class"):
        check_folder(single).raise_if_unusable()

    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "x.png")
    with pytest.raises(ValueError, match=r"loose.*no class sub-folders"):
        open_dataset(loose)
    with pytest.raises(ValueError, match=r"loose.*no class sub-folders"):
        check_folder(loose).raise_if_unusable()

    textonly = tmp_path / "textonly"
    for c in ("x", "y"):
        (textonly / c).mkdir(parents=True)
        (textonly / c / "a.jpg").write_text("nope")
    with pytest.raises(ValueError, match=r"textonly.*no readable images"):
        check_folder(textonly).raise_if_unusable()

    noimg = tmp_path / "noimg"
    (noimg / "x").mkdir(parents=True)
    (noimg / "x" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"noimg.*no images"):
        open_dataset(noimg)

    with pytest.raises(ValueError, match=r"missing.*does not exist"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"file\.txt.*neither a folder nor a zip"):
        open_dataset(tmp_path / "file.txt")


def test_fixed_class_order(synthetic_folder: Path):
    ds = open_dataset(synthetic_folder, classes=["yellow", "blue", "green", "red", "unseen"])
    assert ds.classes[0] == "yellow" and ds[0][1] == ds.classes.index(Path(ds.samples[0][0]).parent.name)
    with pytest.raises(ValueError, match="not among the classes"):
        open_dataset(synthetic_folder, classes=["red", "green"])


# -- the CIFAR-style layout: zip and extracted --------------------------------------------------
def test_zip_and_extracted_split_layout_agree(tmp_path: Path):
    folder = _make_split_layout(tmp_path / "cifar", test_classes=("red", "blue"))
    archive = _zip_folder(folder, tmp_path / "cifar.zip")
    tf = eval_transform(CIFAR_PRESET)
    for split, n in (("train", 12), ("test", 4)):
        from_zip = open_dataset(archive, split, transform=tf)
        from_dir = open_dataset(folder, split, transform=tf)
        assert from_zip.classes == from_dir.classes == ["blue", "green", "red"]  # test shares train's labels
        assert len(from_zip) == len(from_dir) == n
        assert from_zip.samples[0][0].startswith(f"{split}/") and from_zip.targets == from_dir.targets
        for i in (0, n - 1):
            assert torch.equal(from_zip[i][0], from_dir[i][0])
    with pytest.raises(ValueError, match=r"cifar\.zip.*split='train'"):
        open_dataset(archive)
    with pytest.raises(ValueError, match=r"cifar.*split='train'"):
        open_dataset(folder)
    with pytest.raises(ValueError, match="no 'val' split"):
        open_dataset(archive, "val")
    rep = check_folder(archive, "test")
    assert rep.counts == {"blue": 2, "red": 2} and rep.classes == ["blue", "green", "red"]


def test_zip_with_a_top_folder_and_a_plain_zip(tmp_path: Path):
    folder = _make_split_layout(tmp_path / "cifar")
    wrapped = _zip_folder(folder, tmp_path / "wrapped.zip", prefix="cifar10/")
    assert len(open_dataset(wrapped, "train")) == 12
    plain = _zip_folder(folder / "train", tmp_path / "plain.zip")
    ds = open_dataset(plain)
    assert ds.classes == ["blue", "green", "red"] and len(ds) == 12


def test_zip_reads_from_threads_and_worker_processes(tmp_path: Path):
    archive = _zip_folder(_make_split_layout(tmp_path / "cifar"), tmp_path / "cifar.zip")
    ds = open_dataset(archive, "train", transform=eval_transform(CIFAR_PRESET))
    expected = torch.stack([ds[i][0] for i in range(len(ds))])
    with ThreadPoolExecutor(4) as pool:
        got = torch.stack(list(pool.map(lambda i: ds[i][0], range(len(ds)))))
    assert torch.equal(got, expected)
    copy = pickle.loads(pickle.dumps(ds))
    assert torch.equal(copy[3][0], expected[3])
    batch, _ = next(iter(make_loader(ds, batch_size=len(ds), workers=1)))
    assert torch.equal(batch, expected)


def test_corrupt_zip_member_is_reported_and_skipped(tmp_path: Path):
    folder = _make_split_layout(tmp_path / "cifar")
    good = (folder / "train" / "red" / "0001.jpg").read_bytes()
    (folder / "train" / "red" / "0001.jpg").write_bytes(good[:40])
    archive = _zip_folder(folder, tmp_path / "cifar.zip")
    rep = check_folder(archive, "train")
    assert [(Path(p).name, why) for p, why in rep.skipped] == [("0001.jpg", "corrupt")]
    assert len(open_dataset(archive, "train", report=rep)) == 11
    ds = open_dataset(archive, "train")
    with pytest.warns(UserWarning, match="0001.jpg"):
        _ = [ds[i] for i in range(len(ds))]


# -- loaders ------------------------------------------------------------------------------------
def test_make_loader_defaults(synthetic_folder: Path):
    ds = open_dataset(synthetic_folder, transform=eval_transform(CIFAR_PRESET))
    loader = make_loader(ds, batch_size=50, shuffle=True, seed=1)
    assert loader.num_workers == 0  # small data on a small machine: decode in the main process
    first = [y.tolist() for _, y in loader]
    assert first == [y.tolist() for _, y in make_loader(ds, batch_size=50, shuffle=True, seed=1)]
    assert sum(len(b) for b in first) == 120


def test_hidden_and_copied_folder(synthetic_folder: Path, tmp_path: Path):
    copy = Path(shutil.copytree(synthetic_folder, tmp_path / "copy"))
    (copy / ".git").mkdir()
    Image.new("RGB", (4, 4)).save(copy / ".git" / "a.png")
    assert open_dataset(copy).classes == open_dataset(synthetic_folder).classes


def test_class_folders_without_image_files_are_refused(tmp_path: Path):
    for c in ("x", "y"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"no images in its class folders"):
        check_folder(tmp_path).raise_if_unusable()


def test_a_zip_member_that_inflates_past_the_limit_is_skipped(tmp_path: Path, monkeypatch):
    from engine.data import zips
    folder = make_image_folder(tmp_path / "f", ["a", "b"], per_class=2)
    archive = _zip_folder(folder, tmp_path / "z.zip")
    with zipfile.ZipFile(archive, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/bomb.png", b"\0" * 100_000)  # 100 kB of zeros: a few hundred bytes compressed
    monkeypatch.setattr(zips, "MAX_MEMBER_BYTES", 50_000)
    rep = check_folder(archive)
    assert [(p.split(":")[-1], why.split(" (")[0]) for p, why in rep.skipped] == [("a/bomb.png", "too large")]
    assert rep.counts == {"a": 2, "b": 2}

"""One image decoder (engine.images) on every path that reads a file: training data, Engine.infer(path),
`offramp run`, the app's image and folder sources. The same file gives the same pixels, or the same
refusal, everywhere."""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from app.sources import SourceError, SourceSpec, _as_bgr, open_source
from engine import images, media
from engine.backbones.cifar import CIFAR_PRESET
from engine.data.checks import check_folder, check_unlabelled
from engine.data.folders import open_dataset
from engine.images import ImageError, from_opencv, read_rgb
from engine.preprocess import load_frame, preprocess


# -- helpers ------------------------------------------------------------------------------------
def _every_path(path: Path) -> dict[str, np.ndarray]:
    """The (h, w, 3) RGB array each reader makes of `path` (it must lie in root/<class>/)."""
    root = path.parent.parent
    ds = open_dataset(root)
    i = [Path(src) for src, _ in ds.samples].index(path)
    out = {"decoder": read_rgb(path),
           "training data": np.asarray(ds[i][0]),
           "Engine.infer(path)": load_frame(path),
           "offramp run": dict(media.iter_frames([path]))[str(path)]}
    for kind in ("image", "folder"):  # the app: BGR frames, the same values
        target = path if kind == "image" else path.parent
        src = open_source(SourceSpec(kind, str(target)))
        frame = src.read()
        while frame.name != path.name:
            frame = src.read()
        out[f"app {kind} source"] = frame.image[..., ::-1]
    return out


def _assert_all_equal(arrays: dict[str, np.ndarray]) -> np.ndarray:
    first_name, first = next(iter(arrays.items()))
    for name, a in arrays.items():
        assert a.dtype == np.uint8 and a.shape == first.shape, (name, a.shape, first_name, first.shape)
        assert np.array_equal(a, first), (name, first_name)
    return first


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height 8-bit grey pixels (its data is one row)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * (width + 1))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data)
            + _png_chunk(b"IEND", b""))


@pytest.fixture
def rotated_jpeg(tmp_path: Path) -> Path:
    """A 20-wide, 10-high JPEG (left half red, right half blue) whose EXIF says orientation 6
    (shown rotated 90° clockwise: 10 wide, 20 high), next to a plain image in another class."""
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = (250, 0, 0)
    a[:, 10:] = (0, 0, 250)
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir()
    path = tmp_path / "data" / "a" / "rotated.jpg"
    Image.fromarray(a).save(path, exif=exif, quality=95)
    Image.new("RGB", (8, 8), (0, 200, 0)).save(tmp_path / "data" / "b" / "plain.png")
    return path


# -- the same pixels everywhere ---------------------------------------------------------------------
def test_exif_orientation_is_applied_on_every_path(rotated_jpeg: Path):
    got = _assert_all_equal(_every_path(rotated_jpeg))
    assert got.shape == (20, 10, 3)  # turned upright: 10 wide, 20 high
    assert got[1, 5, 0] > 200 and got[-2, 5, 2] > 200  # red on top, blue below (rotated clockwise)
    # what the models see agrees too: the app's BGR frame and the file give the same input tensor
    bgr = open_source(SourceSpec("image", str(rotated_jpeg))).read().image
    assert torch.equal(preprocess(bgr, CIFAR_PRESET), preprocess(rotated_jpeg, CIFAR_PRESET))


def test_a_gif_is_read_as_its_first_frame_on_every_path_folders_included(tmp_path: Path):
    """A folder's GIFs were left out of every listing (training data, `offramp run` on a folder, the
    app's slideshow), while a GIF given by name was read: a folder of GIFs was refused."""
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir()
    Image.new("RGB", (4, 4), (0, 200, 0)).save(tmp_path / "data" / "b" / "x.png")
    path = tmp_path / "data" / "a" / "moving.GIF"
    frames = [Image.new("RGB", (9, 6), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    got = _assert_all_equal(_every_path(path))
    assert got.shape == (6, 9, 3) and got[..., 0].min() > 200 and got[..., 2].max() < 50  # the red first frame
    assert media.list_images(tmp_path / "data") == [path, tmp_path / "data" / "b" / "x.png"]
    assert check_folder(tmp_path / "data").counts == {"a": 1, "b": 1}


@pytest.mark.parametrize("layout", ["grey", "colour"])
def test_sixteen_bit_images_scale_the_same_on_every_path(tmp_path: Path, layout: str):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "data" / "b" / "x.png")
    path = tmp_path / "data" / "a" / "deep.png"
    shape = (6, 7) if layout == "grey" else (6, 7, 3)
    assert cv2.imwrite(str(path), np.full(shape, 1000, np.uint16))
    got = _assert_all_equal(_every_path(path))
    assert (got == 1000 >> 8).all()  # 3: the high byte, as Pillow keeps it for 16-bit colour


def test_alpha_grey_and_palette_convert_as_documented(tmp_path: Path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[0, 1] = (0, 0, 255, 0)
    rgba[1, 0] = (0, 0, 0, 128)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = read_rgb(tmp_path / "a.png")
    assert got[0, 0].tolist() == [255, 0, 0] and got[0, 1].tolist() == [255, 255, 255]  # on white
    assert got[1, 0].tolist() == [127, 127, 127]
    # a BGRA frame from a camera is converted by the same arithmetic
    assert np.array_equal(from_opencv(rgba[..., [2, 1, 0, 3]]), got)
    assert np.array_equal(from_opencv(np.full((2, 3), 1000, np.uint16)), np.full((2, 3, 3), 3, np.uint8))
    assert np.array_equal(from_opencv(np.full((1, 1), 0.5, np.float32)), np.full((1, 1, 3), 128, np.uint8))
    bgr = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    assert _as_bgr(bgr) is bgr  # the app's camera frames pay nothing
    assert np.array_equal(from_opencv(bgr), bgr[..., ::-1])
    Image.new("L", (3, 3), 77).save(tmp_path / "g.png")
    assert (read_rgb(tmp_path / "g.png") == 77).all()
    Image.new("CMYK", (3, 3), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    assert read_rgb(tmp_path / "c.jpg").shape == (3, 3, 3)


# -- the same refusal everywhere ----------------------------------------------------------------
def _refusals(path: Path, capsys) -> dict[str, str]:
    """What each reader says about an unreadable `path` (in root/<class>/, beside a good image)."""
    from engine.cli import main
    out = {}
    with pytest.raises(ImageError) as err:
        read_rgb(path)
    out["decoder"] = str(err.value)
    with pytest.raises(ValueError) as err:
        load_frame(path)
    out["Engine.infer(path)"] = str(err.value)
    with pytest.raises(SourceError) as err:
        open_source(SourceSpec("image", str(path)))
    out["app image source"] = str(err.value)
    folder = open_source(SourceSpec("folder", str(path.parent)))
    while folder.read() is not None:
        pass
    out["app folder source"] = " ".join(why for f, why in folder.skipped if f == str(path))
    rep = check_folder(path.parent.parent)
    out["training check"] = " ".join(f"{p}: {why}" for p, why in rep.skipped if p == str(path))
    rep = check_unlabelled(path.parent.parent)
    out["unlabelled check"] = " ".join(f"{p}: {why}" for p, why in rep.skipped if p == str(path))
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    out["offramp run"] = capsys.readouterr().err
    return out


def _bad_beside_good(tmp_path: Path, name: str, data: bytes) -> Path:
    (tmp_path / "data" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "data" / "a" / "good.png")
    path = tmp_path / "data" / "a" / name
    path.write_bytes(data)
    return path


def test_an_oversize_image_is_refused_with_the_same_message_on_every_path(tmp_path: Path, capsys):
    # 10000 x 9000 = 90 Mpx: over our 80 Mpx limit and Pillow's warning threshold, under its error
    path = _bad_beside_good(tmp_path, "huge.png", _png_claiming(10_000, 9_000))
    reason = images.too_large_reason(90_000_000, (10_000, 9_000))
    for where, said in _refusals(path, capsys).items():
        assert reason in said and "huge.png" in said, where
    assert "Traceback" not in said and "DecompressionBomb" not in said


def test_a_decompression_bomb_and_a_lowered_limit(tmp_path: Path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(30_000, 30_000))  # 900 Mpx: Pillow itself refuses it
    with pytest.raises(ImageError, match=r"too large \(900,000,000 pixels"):
        read_rgb(bomb)
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    Image.new("RGB", (20, 10)).save(tmp_path / "small.png")
    with pytest.raises(ImageError, match=r"small\.png: too large \(20x10 = 200 pixels; the limit is 100"):
        read_rgb(tmp_path / "small.png")


def test_a_truncated_image_is_refused_on_every_path(tmp_path: Path, capsys):
    full = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    path = _bad_beside_good(tmp_path, "cut.jpg", data[: len(data) // 2])
    for where, said in _refusals(path, capsys).items():
        assert "cut.jpg" in said and "corrupt" in said, where


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_is_never_opened(tmp_path: Path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "data" / "a" / "good.png")
    pipe = tmp_path / "data" / "a" / "pipe.jpg"
    os.mkfifo(pipe)  # opening it for reading would wait for a writer forever
    with pytest.raises(ImageError, match="pipe.jpg: not a regular file"):
        read_rgb(pipe)
    rep = check_folder(tmp_path / "data")
    assert (str(pipe), "not a regular file") in rep.skipped and rep.counts == {"a": 1}
    assert media.list_images(tmp_path / "data") == [tmp_path / "data" / "a" / "good.png"]
    with pytest.raises(ValueError, match="neither a folder nor a zip"):
        open_dataset(pipe)


def test_empty_missing_and_garbage_files_name_the_file(tmp_path: Path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    for name, reason in (("empty.png", "zero bytes"), ("text.jpg", "not an image"), ("missing.png", "does not exist")):
        with pytest.raises(ImageError) as err:
            read_rgb(tmp_path / name)
        assert err.value.reason == reason and str(err.value) == f"cannot read image {tmp_path / name}: {reason}"
    with pytest.raises(ImageError, match="is a folder"):
        read_rgb(tmp_path)
    with pytest.raises(ImageError, match="<bytes>: not an image"):
        read_rgb(b"garbage")

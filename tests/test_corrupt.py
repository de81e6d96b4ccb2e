"""Corrupted copies of a test split (engine.corrupt, `offramp corrupt`): deterministic corruptions
that change an image more as severity rises, the folder layout `evaluate` reads, clear errors."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from engine.bundle import Bundle, save_bundle
from engine.cli import main
from engine.corrupt import KINDS, corrupt, encoded, image_key, parse_set_name, set_name
from engine.cost import measure_costs
from engine.policies import ThresholdPolicy
from synth import SYNTH_CLASSES, build_tiny_model, make_image, make_image_folder, class_colour


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.asarray(make_image(np.random.default_rng(3), class_colour(1, 4)))


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
    """train/ and test/ class folders of the synthetic classes, and one unreadable test image."""
    root = tmp_path_factory.mktemp("split")
    make_image_folder(root / "train", SYNTH_CLASSES, per_class=6, seed=0)
    make_image_folder(root / "test", SYNTH_CLASSES, per_class=5, seed=1)
    (root / "test" / SYNTH_CLASSES[0] / "broken.png").write_bytes(b"not an image at all")
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_corruption_is_deterministic_keeps_shape_and_changes_the_image(image, kind):
    a = corrupt(image, kind, 3, seed=0, key=7)
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, corrupt(image, kind, 3, seed=0, key=7))
    assert not np.array_equal(a, image)


@pytest.mark.parametrize("kind", KINDS)
def test_higher_severity_changes_the_image_more(image, kind):
    change = [np.abs(corrupt(image, kind, s).astype(int) - image).mean() for s in (1, 3, 5)]
    assert 0 < change[0] < change[1] < change[2]


def test_noise_depends_on_seed_and_key_only(image):
    base = corrupt(image, "gaussian_noise", 2, seed=0, key=1)
    assert not np.array_equal(base, corrupt(image, "gaussian_noise", 2, seed=1, key=1))
    assert not np.array_equal(base, corrupt(image, "gaussian_noise", 2, seed=0, key=2))
    assert image_key("test/cat/0001.jpg") == image_key("test/cat/0001.jpg")


def test_files_hold_exactly_the_corruption(image):
    data, suffix = encoded(image, "contrast", 4, key=5)
    assert suffix == ".png" and np.array_equal(np.asarray(Image.open(io.BytesIO(data))), corrupt(image, "contrast", 4, key=5))
    data, suffix = encoded(image, "jpeg_compression", 4)
    assert suffix == ".jpg" and np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                                               corrupt(image, "jpeg_compression", 4))


def test_bad_kind_severity_or_array_is_one_sentence(image):
    with pytest.raises(ValueError, match="'fog'.*gaussian_noise"):
        corrupt(image, "fog", 1)
    for bad in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match=f"severity {bad!r} is not one of 1"):
            corrupt(image, "contrast", bad)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(image.astype(np.float32), "contrast", 1)
    assert parse_set_name(set_name("gaussian_blur", 5)) == ("gaussian_blur", 5) and parse_set_name("other-3") is None


def _tiny_bundle(path):
    model = build_tiny_model()
    save_bundle(Bundle(model, {"threshold": ThresholdPolicy.uniform(model.num_exits, 0.9)}, "threshold",
                       measure_costs(model)), path)
    return path


def test_corrupt_writes_the_layout_and_evaluate_reads_it(split_folder, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["corrupt", "--data", str(split_folder), "--out", str(out), "--kinds", "gaussian_noise",
                 "jpeg_compression", "--severities", "2", "5", "--limit", "12"]) == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err  # reported, skipped
    assert sorted(p.name for p in out.iterdir()) == ["gaussian_noise-2", "gaussian_noise-5", "jpeg_compression-2",
                                                     "jpeg_compression-5"]
    for name, suffix in (("gaussian_noise-5", ".png"), ("jpeg_compression-2", ".jpg")):
        files = sorted((out / name / "test").glob("*/*"))
        assert len(files) == 12 and {f.suffix for f in files} == {suffix}
        assert {f.parent.name for f in files} == set(SYNTH_CLASSES)  # every class in proportion
    written = sorted((out / "gaussian_noise-2" / "test" / SYNTH_CLASSES[1]).glob("*.png"))[0]
    [src] = (split_folder / "test" / SYNTH_CLASSES[1]).glob(written.stem + ".*")
    expected = corrupt(np.asarray(Image.open(src).convert("RGB")), "gaussian_noise", 2, key=image_key(str(src)))
    assert np.array_equal(np.asarray(Image.open(written)), expected)  # lossless: exactly the corruption
    again = tmp_path / "again"
    assert main(["corrupt", "--data", str(split_folder), "--out", str(again), "--kinds", "gaussian_noise",
                 "--severities", "2", "--limit", "12"]) == 0
    for f in sorted((out / "gaussian_noise-2").rglob("*.png")):
        assert f.read_bytes() == (again / f.relative_to(out)).read_bytes()  # deterministic
    bundle = _tiny_bundle(tmp_path / "tiny.offramp")
    report = tmp_path / "e.json"
    code = main(["evaluate", str(bundle), "--data", str(out / "gaussian_noise-5"), "--json", str(report)])
    assert code in (0, 2)  # 2 only when matplotlib (an optional extra) is missing for the plot; the report is written
    assert json.loads(report.read_text())["num_samples"] == 12


def test_corrupt_bad_input_gives_one_line(split_folder, tmp_path, capsys):
    assert main(["corrupt", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing" in err and "Traceback" not in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["corrupt", "--data", str(split_folder), "--out", str(tmp_path / "o"), "--severities", "7"])
    assert "7 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["corrupt", "--data", str(split_folder), "--out", str(tmp_path / "o"), "--kinds", "fog"])
    assert "'fog' is not a corruption" in capsys.readouterr().err
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["corrupt", "--data", str(split_folder), "--out", str(a_file)]) == 2
    assert "file.txt is a file" in capsys.readouterr().err

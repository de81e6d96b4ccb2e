"""Issue 11: a generated set of hostile files swept through `offramp run`, `evaluate`, `train-exits`,
`info` (the CLI's main() in-process) and bundle loading. Whatever the input: no traceback, one line
naming the file, an exit code other than 0 where nothing was done, and nothing saved before altered.

Inputs that could hang a reader that gets them wrong (a FIFO, a symlink loop) are swept in a child
process with a time limit, so a regression fails the test instead of hanging the suite.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.bundle import Bundle, BundleError, load_bundle, read_manifest, save_bundle
from engine.bundle_checks import CHECKSUM_KEY, tensors_checksum
from engine.cli import main
from engine.cost import measure_costs
from engine.policies import ThresholdPolicy
from synth import SYNTH_CLASSES, build_tiny_model, make_image_folder

POSIX = os.name == "posix"


# -- the generated world --------------------------------------------------------------------------
def _good_bundle(path: Path) -> Path:
    model = build_tiny_model()
    policy = ThresholdPolicy([0.9, 0.9, None])
    return save_bundle(Bundle(model, {"threshold": policy}, "threshold", measure_costs(model, policy)), path)


def _rewrite(good: Path, out: Path, *, manifest=None, tensors=None, resum: bool = True) -> Path:
    t, m = load_file(str(good)), read_manifest(good)
    if tensors is not None:
        t = tensors(dict(t))
    if manifest is not None:
        manifest(m)
    if resum and CHECKSUM_KEY in m:
        m[CHECKSUM_KEY] = tensors_checksum(t)  # a made-up bundle, consistent with itself
    save_file(t, str(out), metadata={"offramp": json.dumps(m)})
    return out


def _set_first(key: str, value: float):
    def edit(t):
        x = t[key].clone()
        x.view(-1)[0] = value
        t[key] = x
        return t
    return edit


def _flip_bytes(good: Path, out: Path) -> Path:
    data = bytearray(good.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    for i in range(100):
        data[start + (i * 7919) % (len(data) - start)] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


def _png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with almost no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _hostile_bundles(root: Path, good: Path) -> dict[str, tuple[Path, bool]]:
    """name -> (path, whether reading its manifest alone shows it is bad, so `info` must fail too)."""
    rng = random.Random(0)
    b = root / "bundles"
    b.mkdir()
    out: dict[str, tuple[Path, bool]] = {}

    def put(name: str, data: bytes, manifest_bad: bool = True):
        p = b / f"{name}.offramp"
        p.write_bytes(data)
        out[name] = (p, manifest_bad)

    raw = good.read_bytes()
    put("truncated", raw[: len(raw) // 2])
    put("zero-bytes", b"")
    put("garbage", rng.randbytes(4096))
    put("header-claims-1TB", (10**12).to_bytes(8, "little") + b'{"__metadata__":{}}')
    put("json-text", json.dumps(read_manifest(good)).encode())
    put("pickle", pickle.dumps({"model": [1, 2, 3]}))
    torch.save({"weight": torch.zeros(3)}, b / "torch-save.offramp")  # a zip of pickles
    out["torch-save"] = (b / "torch-save.offramp", True)
    with zipfile.ZipFile(b / "zip.offramp", "w") as z:
        z.writestr("model.offramp", raw)
    out["zip"] = (b / "zip.offramp", True)
    (b / "directory.offramp").mkdir()
    out["directory"] = (b / "directory.offramp", True)
    save_file({"x": torch.zeros(2)}, str(b / "no-manifest.offramp"))
    out["no-manifest"] = (b / "no-manifest.offramp", True)
    if POSIX:
        os.symlink(b / "gone.offramp", b / "dangling.offramp")
        out["dangling-link"] = (b / "dangling.offramp", True)
    edits = {
        "wrong-types": lambda m: m.update(class_names="red", exits={"0": 1}),
        "backbone-not-object": lambda m: m.update(backbone=5),
        "string-sizes": lambda m: m["exits"][0].update(channels="16"),
        "huge-classes": lambda m: (m["backbone"]["kwargs"].update(num_classes=2_500_000),
                                   m["exits"][-1].update(num_classes=2_500_000),
                                   m.update(class_names=["c"] * 10)),
        "huge-conv-head": lambda m: m["exits"][0].update(kind="conv", hidden=10**6),
        "huge-crop": lambda m: m["preset"].update(crop=10**9, resize=10**9),
        "missing-exits": lambda m: m.pop("exits"),
        "unknown-policy": lambda m: m["policies"]["threshold"].update(kind="telepathy"),
        "nan-threshold": lambda m: m["policies"]["threshold"].update(thresholds=[float("nan"), 0.9, None]),
        "negative-cost": lambda m: m["cost"].update(stage_flops=[-1.0] * len(m["cost"]["stage_flops"])),
        "newer-format": lambda m: m.update(format_version=99),
        "deep-nesting": lambda m: m["meta"].update(x=json.loads("[" * 500 + "]" * 500)),
        "control-class-name": lambda m: m["class_names"].__setitem__(0, "red\n\x1b[31mink"),
        "surrogate-class-name": lambda m: m["class_names"].__setitem__(0, "\ud800"),
        "empty-class-name": lambda m: m["class_names"].__setitem__(0, " "),
        "duplicate-class-names": lambda m: m["class_names"].__setitem__(1, m["class_names"][0]),
    }
    found_on_load = {"huge-conv-head", "unknown-policy"}  # the manifest reads; the model cannot be built
    for name, edit in edits.items():
        out[name] = (_rewrite(good, b / f"{name}.offramp", manifest=edit), name not in found_on_load)
    for name, edit in {"nan-weights": _set_first("model.exits.0.post.weight", float("nan")),
                       "inf-weights": _set_first("model.backbone.stages.0.0.0.weight", float("inf")),
                       "zero-temperature": _set_first("model.temperature", 0.0),
                       "negative-temperature": _set_first("model.temperature", -2.0)}.items():
        out[name] = (_rewrite(good, b / f"{name}.offramp", tensors=edit), False)
    out["negative-variance"] = (_rewrite(good, b / "negative-variance.offramp", tensors=_negative_variance), False)
    out["flipped-bytes"] = (_flip_bytes(good, b / "flipped-bytes.offramp"), False)
    # an integer of more digits than Python turns into an int from text: written by hand, json.dumps refuses it
    text = json.dumps({**read_manifest(good), "top_k": "BIG"}).replace('"BIG"', "9" * 5000)
    save_file(load_file(str(good)), str(b / "huge-integer.offramp"), metadata={"offramp": text})
    out["huge-integer"] = (b / "huge-integer.offramp", True)
    return out


def _negative_variance(t: dict) -> dict:
    """A BatchNorm's running variance negated: every output would be NaN (a "nan %" answer before)."""
    key = next(k for k in sorted(t) if k.endswith("running_var"))
    t[key] = -t[key].abs() - 1.0
    return t


def _hostile_images(root: Path, good_jpeg: Path) -> dict[str, Path]:
    d = root / "images"
    d.mkdir()
    files = {"zero-bytes": (d / "empty.jpg", b""),
             "truncated-jpeg": (d / "truncated.jpg", good_jpeg.read_bytes()[:200]),
             "text-named-jpg": (d / "notes.jpg", b"this is not an image\n" * 10),
             "huge-dimensions": (d / "huge.png", _png(100_000, 100_000)),
             "png-named-jpg-garbage": (d / "garbage.jpg", random.Random(1).randbytes(2048))}
    for path, data in files.values():
        path.write_bytes(data)
    out = {name: path for name, (path, _) in files.items()}
    (d / "folder.jpg").mkdir()  # a folder that looks like an image
    out["folder-named-jpg"] = d / "folder.jpg"
    return out


def _hostile_folders(root: Path, bad_images: dict[str, Path]) -> dict[str, Path]:
    d = root / "folders"
    empty = d / "empty"
    empty.mkdir(parents=True)
    text = d / "only-text"
    for cls in ("red", "green"):
        (text / cls).mkdir(parents=True)
        (text / cls / "notes.txt").write_text("no images here")
    unreadable = d / "only-unreadable"
    for cls in ("red", "green"):
        (unreadable / cls).mkdir(parents=True)
        for p in bad_images.values():
            if p.is_file():
                (unreadable / cls / p.name).write_bytes(p.read_bytes())
    empty_classes = d / "empty-classes"
    for cls in SYNTH_CLASSES:
        (empty_classes / cls).mkdir(parents=True)
    return {"empty": empty, "only-non-images": text, "only-unreadable-images": unreadable,
            "empty-class-folders": empty_classes}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    good = _good_bundle(root / "good.offramp")
    data = make_image_folder(root / "data", SYNTH_CLASSES, per_class=6, seed=3)
    good_jpeg = next(data.glob("red/*.jpg"))
    out = root / "out"
    out.mkdir()
    prev = _good_bundle(out / "prev.offramp")  # saved before: must survive every failed command
    (out / "prev.json").write_text('{"saved": "before"}')
    (out / "prev.png").write_bytes(b"\x89PNG saved before")
    images = _hostile_images(root, good_jpeg)
    return {"root": root, "good": good, "data": data, "image": good_jpeg, "out": out, "prev": prev,
            "bundles": _hostile_bundles(root, good), "images": images,
            "folders": _hostile_folders(root, images)}


@pytest.fixture
def unaltered(world):
    """Fails the test if anything in the output folder changed (bytes) or was added."""
    out = world["out"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    yield
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _sweep(argv: list[str], capsys, names, *, fails: bool = True) -> str:
    """Run the CLI; no traceback, one 'offramp ...' line naming `names` (a path or paths), and a
    non-zero exit code when `fails`. Returns that line."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    if fails:
        assert code != 0, f"exit code 0 for {argv}: {err}"
    lines = [line for line in err.splitlines() if line.startswith("offramp ")]
    assert len(lines) == 1, err
    for name in [names] if isinstance(names, (str, Path)) else names:
        assert str(name) in err, f"{name} not named in: {err}"
    return lines[0]


BUNDLE_CASES = ["truncated", "zero-bytes", "garbage", "header-claims-1TB", "json-text", "pickle", "torch-save",
                "zip", "directory", "no-manifest", "dangling-link", "wrong-types", "backbone-not-object",
                "string-sizes", "huge-classes", "huge-conv-head", "huge-crop", "missing-exits", "unknown-policy",
                "nan-threshold", "negative-cost", "newer-format", "deep-nesting", "nan-weights", "inf-weights",
                "zero-temperature", "negative-temperature", "flipped-bytes", "control-class-name",
                "surrogate-class-name", "empty-class-name", "duplicate-class-names", "negative-variance",
                "huge-integer"]


def _bundle(world, case) -> tuple[Path, bool]:
    if case not in world["bundles"]:
        pytest.skip(f"{case} needs POSIX")
    return world["bundles"][case]


# -- hostile bundles ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", BUNDLE_CASES)
def test_hostile_bundle_is_refused_on_load(world, case):
    path, _ = _bundle(world, case)
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("case", BUNDLE_CASES)
def test_hostile_bundle_through_every_command(world, case, capsys, unaltered):
    path, _ = _bundle(world, case)
    out = world["out"]
    _sweep(["run", "--bundle", path, world["image"]], capsys, path)
    _sweep(["evaluate", path, "--data", world["data"], "--json", out / "prev.json", "--png", out / "prev.png"],
           capsys, path)
    _sweep(["train-exits", "--from", path, "--data", world["data"], "--epochs", "1", "--out", world["prev"]],
           capsys, path)
    _sweep(["info", path], capsys, path)  # info verifies the weights too: it never vouches for a bad bundle


# -- hostile images and folders -------------------------------------------------------------------
IMAGE_CASES = ["zero-bytes", "truncated-jpeg", "text-named-jpg", "huge-dimensions", "png-named-jpg-garbage",
               "folder-named-jpg"]


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_hostile_image_through_run(world, case, capsys):
    image = world["images"][case]
    _sweep(["run", "--bundle", world["good"], image], capsys, image)


def test_hostile_images_beside_good_ones_are_skipped_and_named(world, capsys):
    bad = [world["images"][c] for c in IMAGE_CASES if c != "folder-named-jpg"]
    code = main(["run", "--bundle", str(world["good"]), str(world["image"]), *map(str, bad), "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and code != 0  # done, but not everything: not 0
    assert [json.loads(line)["source"] for line in out.splitlines()] == [str(world["image"])]
    assert all(str(p) in err for p in bad)


FOLDER_CASES = ["empty", "only-non-images", "only-unreadable-images", "empty-class-folders"]


@pytest.mark.parametrize("case", FOLDER_CASES)
def test_hostile_folder_through_every_command(world, case, capsys, unaltered):
    folder = world["folders"][case]
    out = world["out"]
    _sweep(["run", "--bundle", world["good"], folder], capsys, folder)
    _sweep(["evaluate", world["good"], "--data", folder, "--json", out / "prev.json", "--png", out / "prev.png"],
           capsys, folder)
    _sweep(["train-exits", "--backbone", "cifar_resnet_small", "--data", folder, "--epochs", "1",
            "--out", world["prev"]], capsys, folder)


# -- inputs that could hang: in a child process with a time limit ---------------------------------
CHILD = """
import contextlib, io, json, sys
sys.path.insert(0, {tests!r})
from engine.cli import main
from engine.bundle import BundleError, load_bundle
results = {{}}
for name, argv in json.loads({cases!r}).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        if argv[0] == "load":
            try:
                load_bundle(argv[1]); code = 0
            except BundleError as e:
                print("offramp load: " + str(e), file=sys.stderr); code = 1
        else:
            code = main(argv)
    results[name] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


@pytest.mark.skipif(not POSIX, reason="FIFOs and symlinks are POSIX")
def test_inputs_that_could_hang(world, capsys, unaltered):
    root, out = world["root"], world["out"]
    hang = root / "could-hang"
    loop = hang / "loop"
    (loop / "red").mkdir(parents=True)
    os.symlink(loop, loop / "red" / "again")  # a link back into an ancestor
    os.symlink(loop / "red", loop / "red" / "self")
    fifo = hang / "pipe.offramp"
    os.mkfifo(fifo)
    fifo_image = hang / "pipe.jpg"
    os.mkfifo(fifo_image)
    fifo_class = hang / "fifo-class"
    (fifo_class / "red").mkdir(parents=True)
    os.mkfifo(fifo_class / "red" / "frame.jpg")
    good, data, prev = str(world["good"]), str(world["data"]), str(world["prev"])
    report = ["--json", str(out / "prev.json"), "--png", str(out / "prev.png")]
    cases = {
        "loop: run": (["run", "--bundle", good, str(loop)], loop),
        "loop: evaluate": (["evaluate", good, "--data", str(loop), *report], loop),
        "loop: train-exits": (["train-exits", "--backbone", "cifar_resnet_small", "--data", str(loop),
                               "--epochs", "1", "--out", prev], loop),
        "fifo bundle: load": (["load", str(fifo)], fifo),
        "fifo bundle: run": (["run", "--bundle", str(fifo), str(world["image"])], fifo),
        "fifo bundle: info": (["info", str(fifo)], fifo),
        "fifo image: run": (["run", "--bundle", good, str(fifo_image)], fifo_image),
        "fifo in a class: evaluate": (["evaluate", good, "--data", str(fifo_class), *report], fifo_class),
        "fifo out: train-exits": (["train-exits", "--backbone", "cifar_resnet_small", "--data", data,
                                   "--epochs", "1", "--out", str(fifo)], fifo),
    }
    script = CHILD.format(tests=str(Path(__file__).parent), cases=json.dumps({k: v[0] for k, v in cases.items()}))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    for name, (_, path) in cases.items():
        code, stdout, stderr = results[name]
        assert "Traceback" not in stdout + stderr, (name, stderr)
        assert code != 0, (name, stderr)
        lines = [line for line in stderr.splitlines() if line.startswith("offramp ")]
        assert len(lines) == 1 and str(path) in stderr, (name, stderr)


# -- names that cannot be class names -------------------------------------------------------------
@pytest.mark.skipif(not POSIX, reason="a newline in a folder name is POSIX")
def test_a_class_folder_whose_name_breaks_lines_is_refused_before_training(world, capsys, unaltered):
    """A class folder named with a newline and an escape would become a class name that splits every
    line `offramp run` prints and writes to the terminal; training refuses it up front, naming it."""
    folder = world["root"] / "odd-class-names"
    make_image_folder(folder, ["red", "green"], per_class=4, seed=5)
    os.rename(folder / "green", folder / "gr\neen\x1b[0m")
    line = _sweep(["train-exits", "--backbone", "cifar_resnet_small", "--data", folder, "--epochs", "1",
                   "--out", world["prev"]], capsys, folder)
    assert "rename the folder" in line and "\\n" in line and "\x1b" not in line


def test_too_few_images_to_hold_any_out_is_said_before_training(world, tmp_path, capsys, unaltered):
    """One image per class leaves nothing to calibrate on, and a validation fraction that takes every
    image leaves nothing to train on: both are said naming the folder, not as an empty dataset."""
    one_each = make_image_folder(tmp_path / "one-each", SYNTH_CLASSES, per_class=1, seed=6)
    line = _sweep(["train-exits", "--backbone", "cifar_resnet_small", "--data", one_each, "--epochs", "1",
                   "--out", world["prev"]], capsys, one_each)
    assert "too few readable images" in line
    two_each = make_image_folder(tmp_path / "two-each", SYNTH_CLASSES, per_class=2, seed=6)
    line = _sweep(["train-exits", "--backbone", "cifar_resnet_small", "--data", two_each, "--epochs", "1",
                   "--val-fraction", "0.99", "--out", world["prev"]], capsys, two_each)
    assert "leaves none to train on" in line


def test_non_finite_logits_are_an_error_not_an_answer(world):
    """Weights that pass every check and still overflow: the engine says so instead of "nan %"."""
    import numpy as np

    from engine.runtime import Engine
    bundle = load_bundle(world["good"])
    with torch.no_grad():
        for p in bundle.model.exits[-1].parameters():
            p.fill_(3e38)  # finite, but its products overflow to inf and then NaN
    engine = Engine(bundle, device="cpu", latency_repeats=1)
    with pytest.raises(ValueError, match="no finite answer"):
        engine.infer(np.zeros((32, 32, 3), dtype=np.uint8))


def test_a_folders_check_refuses_what_training_could_not_split(tmp_path):
    """The retraining panel says "Ready" only when the check passed: with the fraction training holds
    out, a folder of one image a class must fail the check, not the training after it."""
    from engine.data.checks import check_folder
    one_each = make_image_folder(tmp_path / "one-each", SYNTH_CLASSES, per_class=1, seed=7)
    report = check_folder(one_each)
    report.raise_if_unusable()  # usable as data: every class has an image
    with pytest.raises(ValueError, match="too few readable images"):
        report.raise_if_unusable(0.2)
    check_folder(make_image_folder(tmp_path / "three-each", SYNTH_CLASSES, per_class=3, seed=7)).raise_if_unusable(0.2)

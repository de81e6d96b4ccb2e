"""Bad or partial input to the `offramp` commands: labels mapped by class name, unreadable images
skipped and counted out, exit codes, invalid numbers refused by argparse, malformed manifests and
checkpoints refused in one line."""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from synth import SYNTH_CLASSES, make_image_folder

from engine.bundle import MANIFEST_KEY, load_bundle
from engine.cli import build_parser, main
from engine.data.folders import open_dataset
from engine.evaluate import record_outputs
from engine.features import cache_features
from engine.preprocess import eval_transform
from engine.splits import open_splits
from engine.train.retrain import retrain_on_folder


@pytest.fixture(scope="module")
def bundle(synthetic_folder, tmp_path_factory) -> Path:
    """Exits trained on the 4 colour classes, in SYNTH_CLASSES order (red, green, blue, yellow)."""
    out = tmp_path_factory.mktemp("cli_inputs") / "colours.offramp"
    assert main(["train-exits", "--data", str(synthetic_folder), "--backbone", "cifar_resnet_small",
                 "--epochs", "25", "--val-fraction", "0.25", "--out", str(out)]) == 0
    assert load_bundle(out).model.class_names == sorted(SYNTH_CLASSES)  # the folder's order: check below
    return out


def _subset(src: Path, dst: Path, classes: list[str]) -> Path:
    for c in classes:
        shutil.copytree(src / c, dst / c)
    return dst


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("\r")]
    assert "Traceback" not in err and lines, err
    return lines[-1]


# -- 1. labels by class name ------------------------------------------------------------------------
def test_evaluate_scores_a_partial_folder_against_the_model_classes(bundle, synthetic_folder, tmp_path, capsys):
    model = load_bundle(bundle).model
    folder = _subset(synthetic_folder, tmp_path / "two", ["green", "yellow"])
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(bundle), "--data", str(folder), "--json", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert rep["classes_scored"] == ["green", "yellow"] and rep["num_samples"] == 60
    assert "2 of the model's 4 classes: green, yellow" in capsys.readouterr().out
    # what the report says is what the model does on these images, labelled by their folders' names
    tf, right = eval_transform(model.backbone.preset), 0
    for path in sorted(folder.rglob("*.*")):
        x = tf(Image.open(path).convert("RGB"))[None]
        with torch.no_grad():
            right += int(model.forward_all(x, calibrated=True)[-1].argmax()) == model.class_names.index(path.parent.name)
    assert rep["accuracy_per_exit"][-1] == pytest.approx(right / 60) and right / 60 > 0.6


def test_a_class_the_model_does_not_know_is_refused_everywhere(bundle, synthetic_folder, tmp_path, capsys):
    folder = _subset(synthetic_folder, tmp_path / "zoo", ["green", "red"])
    shutil.copytree(synthetic_folder / "blue", folder / "zebra")
    for command in (["evaluate", str(bundle), "--data", str(folder), "--json", str(tmp_path / "e.json")],
                    ["search", str(bundle), "--data", str(folder), "--out", str(tmp_path / "s.offramp")],
                    ["train-policy", str(bundle), "--data", str(folder), "--kind", "threshold",
                     "--out", str(tmp_path / "p.offramp")],
                    ["bench", str(bundle), "--data", str(folder), "--json", str(tmp_path / "b.json")]):
        assert main(command) == 2, command
        line = _one_line(capsys.readouterr().err)
        assert "'zebra'" in line and str(folder) in line and "blue, green, red, yellow" in line, line
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "s.offramp").exists()


def test_splits_of_a_plain_folder_label_by_name(bundle, synthetic_folder, tmp_path):
    model = load_bundle(bundle).model
    folder = _subset(synthetic_folder, tmp_path / "two", ["yellow", "red"])
    splits = open_splits(folder, model.backbone.preset, val_fraction=0.25, classes=model.class_names)
    assert splits.classes == model.class_names
    names = {model.class_names[splits.calibration.dataset.targets[i]] for i in splits.calibration.indices}
    assert names == {"red", "yellow"}
    for i in splits.test.indices[:5]:
        src, label = splits.test.dataset.samples[i]
        assert model.class_names[label] == Path(src).parent.name


def test_retraining_on_the_model_classes_in_another_order_keeps_them(bundle, synthetic_folder, tmp_path):
    old = load_bundle(bundle)
    reordered = ["yellow", "blue", "green", "red"]
    old.model.class_names = reordered  # the same classes, in an order that is not the folder's
    new, rep = retrain_on_folder(old, synthetic_folder, epochs=1)
    assert new.model.class_names == reordered and rep["classes"] == reordered
    assert "curve_old" in rep  # scored against the old model with the same (by name) labels


# -- 6. counting and exit codes -----------------------------------------------------------------
def test_evaluate_skips_unreadable_images_and_counts_only_real_ones(bundle, synthetic_folder, tmp_path, capsys):
    folder = _subset(synthetic_folder, tmp_path / "bad", ["red", "blue"])
    good = (folder / "red" / "0001.jpg").read_bytes()
    (folder / "red" / "cut.jpg").write_bytes(good[: len(good) // 3])
    (folder / "blue" / "text.png").write_text("not a picture")
    (folder / "blue" / "empty.jpg").write_bytes(b"")
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(bundle), "--data", str(folder), "--json", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert rep["num_samples"] == 60
    assert sorted(Path(p).name for p, _ in rep["skipped"]) == ["cut.jpg", "empty.jpg", "text.png"]
    captured = capsys.readouterr()
    assert all(name in captured.err for name in ("cut.jpg", "empty.jpg", "text.png"))
    assert "scored 60 images" in captured.out


def test_no_image_counts_twice_even_without_a_check(tmp_path, tiny_model):
    folder = make_image_folder(tmp_path / "f", SYNTH_CLASSES[:2], per_class=5)
    for i in range(3):
        (folder / "red" / f"bad{i}.png").write_text("broken")
    ds = open_dataset(folder, classes=tiny_model.class_names)  # no check: bad files are met while loading
    assert len(ds) == 13
    with pytest.warns(UserWarning, match="skipping"):
        records = record_outputs(tiny_model, ds, batch_size=4)
    assert records.num_samples == 10 and sorted(records.labels.tolist()) == [0] * 5 + [1] * 5
    ds = open_dataset(folder, classes=tiny_model.class_names)
    with pytest.warns(UserWarning, match="skipping"):
        assert len(cache_features(tiny_model, ds, batch_size=4)) == 10


def test_run_exit_codes_name_every_input_it_could_not_read(synthetic_folder, tmp_path, capsys):
    good = str(sorted((synthetic_folder / "red").iterdir())[0])
    junk = tmp_path / "junk.jpg"
    junk.write_text("no image")
    assert main(["run", str(tmp_path / "a.png"), str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert "a.png" in err and "b.png" in err and "nothing was classified" in _one_line(err)
    assert main(["run", str(junk)]) == 2
    err = capsys.readouterr().err
    assert "junk.jpg: not an image" in err and "nothing was classified" in _one_line(err)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", str(empty)]) == 2
    capsys.readouterr()
    assert main(["run", good, str(junk), "--json"]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1 and "1 input skipped" in _one_line(captured.err)
    assert main(["run", good]) == 0


def test_an_empty_class_folder_dropped_from_training_is_announced(synthetic_folder, tmp_path, capsys):
    folder = _subset(synthetic_folder, tmp_path / "d", ["red", "green"])
    (folder / "ghost").mkdir()
    (folder / "ghost" / "broken.jpg").write_text("not an image")
    out = tmp_path / "m.offramp"
    assert main(["train-exits", "--data", str(folder), "--backbone", "cifar_resnet_small", "--epochs", "1",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: class folder {folder / 'ghost'} has no readable image; the model will not have this class" in err
    assert load_bundle(out).model.class_names == ["green", "red"]


BAD_NUMBERS = [
    ("train-exits", "--epochs", "-1"), ("train-exits", "--max-loss", "nan"), ("train-exits", "--val-fraction", "1"),
    ("train-exits", "--val-fraction", "0"), ("train-exits", "--distill", "1.5"), ("train-exits", "--seed", "-3"),
    ("train-exits", "--exits", "1,x"), ("train-backbone", "--lr", "0"), ("train-backbone", "--batch-size", "0"),
    ("train-backbone", "--label-smoothing", "1"), ("train-backbone", "--exit-weights", "1,inf"),
    ("evaluate", "--batch-size", "-8"), ("search", "--budget", "2"), ("search", "--max-loss", "-1"),
    ("train-policy", "--lambdas", "-0.1"), ("train-policy", "--prototype-samples", "0"),
    ("bench", "--timing-images", "0"), ("bench", "--threads", "-1"), ("bench", "--structure-epochs", "2.5"),
    ("export", "--check-images", "-5"), ("run", "--threshold", "inf"), ("search", "--val-fraction", "nan"),
]
REQUIRED = {"train-exits": ["--data", "d", "--backbone", "b", "--out", "o.offramp"],
            "train-backbone": ["--data", "d", "--out", "o.offramp"], "evaluate": ["--data", "d"],
            "search": ["b", "--data", "d"], "train-policy": ["b", "--data", "d", "--kind", "threshold"],
            "bench": ["b", "--data", "d"], "export": ["--out", "x"], "run": ["x.png"]}


@pytest.mark.parametrize("command,option,value", BAD_NUMBERS)
def test_invalid_numbers_are_refused_by_argparse_in_one_line(command, option, value, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, *REQUIRED[command], option, value])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and option in err and value in err, err


def test_every_numeric_option_has_a_checked_type():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.type not in (int, float), f"offramp {name} {action.option_strings}: plain {action.type}"
    assert math.isclose(build_parser().parse_args(["search", "b", "--data", "d", "--budget", "1"]).budget, 1.0)


def _rewrite_manifest(src: Path, dst: Path, change) -> Path:
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        manifest = json.loads(f.metadata()[MANIFEST_KEY])
    change(manifest)
    save_file(tensors, str(dst), metadata={MANIFEST_KEY: json.dumps(manifest)})
    return dst


@pytest.mark.parametrize("change", [
    lambda m: m.update(cost={"stages": "many"}), lambda m: m.update(cost=7), lambda m: m.pop("cost"),
    lambda m: m.update(meta="x"), lambda m: m.update(meta={"evaluation": {"accuracy_per_exit": ["a"]}}),
    lambda m: m.update(meta={"evaluation": {"default_point": {"accuracy": None}}}),
    lambda m: m.update(meta={"search": {"samples": 3}, "front": 5}),
])
def test_info_on_a_malformed_manifest_ends_in_one_line(bundle, tmp_path, capsys, change):
    bad = _rewrite_manifest(bundle, tmp_path / "bad.offramp", change)
    assert main(["info", str(bad)]) == 2
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert len(captured.err.strip().splitlines()) == 1 and str(bad) in line and captured.out == ""


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, "pickle", "foreign", "folder"])
def test_train_backbone_refuses_a_bad_checkpoint_before_any_work(synthetic_folder, tmp_path, capsys, content):
    ckpt = tmp_path / "run.ckpt"
    if content == "pickle":
        import pickle

        class Evil:
            def __reduce__(self):
                return (print, ("code ran",))

        ckpt.write_bytes(pickle.dumps({"model": Evil()}))
    elif content == "foreign":
        torch.save({"model": {}, "epoch": "x"}, ckpt)
    elif content == "folder":
        ckpt.mkdir()
    else:
        ckpt.write_bytes(content)
    assert main(["train-backbone", "--arch", "cifar_resnet_small", "--data", str(synthetic_folder), "--epochs", "1",
                 "--checkpoint", str(ckpt), "--out", str(tmp_path / "n.offramp")]) == 2
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert str(ckpt) in line and "code ran" not in captured.out + captured.err
    assert "decoding images" not in captured.err and not (tmp_path / "n.offramp").exists()

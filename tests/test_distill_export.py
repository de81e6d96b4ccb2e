"""Bring your own model: a torchvision backbone (weights=None, small inputs) gets early exits
distilled from its last exit on unlabelled images, is saved, reloaded and exported to ONNX, and
the exported graphs run by onnxruntime reproduce torch's outputs and early exits."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from engine.backbones import build_backbone
from engine.bundle import load_bundle, save_bundle
from engine.cli import main
from engine.data.checks import check_unlabelled
from engine.data.folders import UNLABELLED, open_dataset, open_unlabelled
from engine.export import ExportError, OnnxRunner, export_bundle
from engine.model import MultiExitNet
from engine.preprocess import eval_transform
from engine.progress import CancelFlag, Cancelled
from engine.train.retrain import distil_exits, early_exits_on, fit_exits
from synth import SYNTH_CLASSES, make_image_folder

pytest.importorskip("onnxruntime")


def _unlabelled_copy(labelled, root):
    """The labelled folder's images without their classes: nested folders, loose files, one corrupt file."""
    root.mkdir()
    for i, f in enumerate(sorted(labelled.rglob("*.*"))):
        target = root / ("captures/day1" if i % 3 == 0 else "captures" if i % 3 == 1 else ".") / f"img{i:04d}{f.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    (root / "captures" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "notes.txt").write_text("ignored")
    return root


@pytest.fixture(scope="module")
def teacher_bundle(tmp_path_factory):
    """resnet18 from weights=None at 32×32 whose own classifier (the last exit) was trained on the
    generated colour classes: a teacher that knows something, as a pretrained classifier would."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("labelled")
    folder = make_image_folder(root, SYNTH_CLASSES, per_class=40, seed=3)
    backbone = build_backbone("resnet18", weights=None, num_classes=len(SYNTH_CLASSES))
    backbone.preset = dataclasses.replace(backbone.preset, crop=32, resize=32)
    model = MultiExitNet.attach(backbone, class_names=list(SYNTH_CLASSES), exit_stages=[3], keep_classifier=True)
    assert model.num_exits == 1 and model.exits[-1].spec.kind == "original"
    data = open_dataset(folder, transform=eval_transform(backbone.preset))
    half = torch.utils.data.Subset(data, list(range(0, len(data), 2)))
    rest = torch.utils.data.Subset(data, list(range(1, len(data), 2)))
    bundle, rep = fit_exits(model, half, rest, epochs=40, train_which=[0])
    assert rep["accuracy_per_exit"][-1] > 0.6  # chance is 25 %
    return bundle, folder


def test_distil_save_reload_export_matches_torch(teacher_bundle, tmp_path):
    teacher, labelled = teacher_bundle
    images_dir = _unlabelled_copy(labelled, tmp_path / "photos")
    check = check_unlabelled(images_dir)
    assert check.count == 160 and [why for _, why in check.skipped] == ["not an image"]
    assert any(f.endswith("notes.txt") for f in check.ignored)
    preset = teacher.model.backbone.preset
    images = open_unlabelled(images_dir, report=check, transform=eval_transform(preset))
    assert len(images) == 160 and images[0][1] == UNLABELLED

    model = early_exits_on(teacher.model, exit_stages=[0, 1, 2])
    assert model.num_exits == 4
    torch.testing.assert_close(model.exits[-1].post[0].weight, teacher.model.exits[-1].post[0].weight)
    bundle, rep = distil_exits(model, images, val_fraction=0.25, epochs=30)
    agree = rep["agreement_per_exit"]
    assert rep["held_out"] == 40 and agree[-1] == 1.0
    assert max(agree[:-1]) > 0.6  # the exits learnt the teacher's answers (chance 25 %) without a label
    assert bundle.meta["evaluation"]["labels"] == "last exit's predictions"
    # the teacher keeps its temperature: it was not calibrated on its own answers
    assert float(bundle.model.temperature[-1]) == float(teacher.model.temperature[-1])
    assert rep["calibration"]["ece_before"][-1] is None and rep["calibration"]["kept"] == [3]

    path = save_bundle(bundle, tmp_path / "distilled.offramp")
    loaded = load_bundle(path)
    labelled_images = open_unlabelled(labelled, transform=eval_transform(preset))
    inputs = torch.stack([labelled_images[i][0] for i in range(0, 160, 5)])  # 32 real images
    manifest = export_bundle(loaded, tmp_path / "onnx", check_inputs=inputs)

    files = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert files["format"] == "offramp-onnx/1" and files["class_names"] == list(SYNTH_CLASSES)
    assert len(files["stages"]) == 4 and len(files["exits"]) == 4
    assert files["policy"]["json"]["thresholds"] == loaded.policy.thresholds
    assert manifest["check"]["exits_agree"] == 32

    # Independently of export_bundle's own check: onnxruntime against the reloaded torch model.
    runner = OnnxRunner(tmp_path / "onnx")
    with torch.no_grad():
        all_logits = loaded.model.forward_all(inputs, calibrated=True)
        out = loaded.model.run(inputs, loaded.policy)
    x = inputs.numpy()
    for s in range(4):
        x = runner.stage(s, x)
        np.testing.assert_allclose(runner.exit(s, x), all_logits[s].numpy(), rtol=1e-3, atol=1e-4)
    fired = []
    for i in range(inputs.shape[0]):
        r = runner.run(inputs[i:i + 1].numpy())
        fired.append(r.exit_index)
        np.testing.assert_allclose(r.logits, out.logits[i].numpy(), rtol=1e-3, atol=1e-4)
        assert r.stages_run == int(out.stages_run[i])
    assert fired == out.exit_index.tolist()
    assert min(fired) < 3  # some images really left early, so the decision graphs were exercised
    # A stage after the exit is never run: the loop stops (stages_run counts what it computed).
    assert min(r for r in out.stages_run.tolist()) < 4


def test_learned_policy_exports_with_its_decision_graphs(tmp_path, trained_cli_bundle):
    bundle = load_bundle(trained_cli_bundle)
    assert "bolukbasi" in bundle.policies
    inputs = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    manifest = export_bundle(bundle, tmp_path / "b", policy="bolukbasi", check_inputs=inputs)
    decisions = manifest["policy"]["decisions"]
    assert [d is not None for d in decisions] == [True, True, False]
    assert manifest["check"]["exits_agree"] == 6


@pytest.fixture(scope="module")
def trained_cli_bundle(tmp_path_factory):
    folder = make_image_folder(tmp_path_factory.mktemp("cls"), SYNTH_CLASSES, per_class=30, seed=2)
    out = tmp_path_factory.mktemp("b") / "b.offramp"
    assert main(["train-exits", "--data", str(folder), "--backbone", "cifar_resnet_small", "--epochs", "10",
                 "--val-fraction", "0.3", "--out", str(out)]) == 0
    assert main(["train-policy", str(out), "--data", str(folder), "--kind", "bolukbasi", "--val-fraction", "0.3",
                 "--lambdas", "0.01"]) == 0
    return out


def test_cli_distils_from_a_bundle_and_exports(trained_cli_bundle, tmp_path, capsys):
    photos = tmp_path / "photos"
    make_image_folder(photos, ["a", "b", "c"], per_class=20, seed=4)  # folders are not classes here
    out = tmp_path / "d.offramp"
    assert main(["train-exits", "--from", str(trained_cli_bundle), "--unlabelled", str(photos), "--epochs", "5",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "agreement with the last exit on 6 held-out images" in text
    assert load_bundle(out).class_names == load_bundle(trained_cli_bundle).class_names
    assert main(["info", str(out)]) == 0
    assert "agrees with the last exit on" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--unlabelled", str(photos), "--json", str(tmp_path / "ev.json")]) == 0
    assert "agreement with the last exit" in capsys.readouterr().out
    assert json.loads((tmp_path / "ev.json").read_text())["accuracy_per_exit"][-1] == 1.0
    # ... and then policies, on the same unlabelled folder's held-out part, scored by agreement
    assert main(["search", str(out), "--unlabelled", str(photos)]) == 0
    assert main(["train-policy", str(out), "--unlabelled", str(photos), "--kind", "bolukbasi",
                 "--lambdas", "0.01"]) == 0
    capsys.readouterr()
    searched = load_bundle(out)
    assert set(searched.policies) == {"threshold", "bolukbasi"} and searched.meta["front"]
    assert searched.meta["policy_fronts"]["bolukbasi"]["split"]["layout"] == "unlabelled"
    assert searched.meta["search"]["full_accuracy"] == 1.0  # the last exit agrees with itself
    assert main(["export", str(out), "--out", str(tmp_path / "x"), "--images", str(photos),
                 "--check-images", "8"]) == 0
    text = capsys.readouterr().out
    assert "the same exit for all 8" in text and "early-exit loop" in text
    assert (tmp_path / "x" / "manifest.json").exists()


def test_bad_input_is_refused_in_one_sentence(trained_cli_bundle, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bad.png").write_bytes(b"")
    assert main(["train-exits", "--from", str(trained_cli_bundle), "--unlabelled", str(empty), "--out",
                 str(tmp_path / "e.offramp")]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "readable images" in err and "Traceback" not in err
    code = main(["train-exits", "--backbone", "resnet18", "--unlabelled", str(empty), "--out", str(tmp_path / "f.offramp")])
    assert code == 2
    assert "--weights" in capsys.readouterr().err
    # export: an existing folder is not overwritten; an unknown policy is named
    (tmp_path / "taken").mkdir()
    assert main(["export", str(trained_cli_bundle), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(trained_cli_bundle), "--out", str(tmp_path / "n"), "--policy", "nope"]) == 2
    assert "'nope'" in capsys.readouterr().err and not (tmp_path / "n").exists()


def test_cancelled_or_failed_export_leaves_nothing(trained_cli_bundle, tmp_path, monkeypatch):
    bundle = load_bundle(trained_cli_bundle)
    flag = CancelFlag()

    def progress(p):
        if p.done >= 2:
            flag.set()

    with pytest.raises(Cancelled):
        export_bundle(bundle, tmp_path / "c", progress=progress, cancel=flag, check=False)
    assert list(tmp_path.iterdir()) == []
    # A graph that does not reproduce torch fails the check, and nothing is written.
    import engine.export as ex
    monkeypatch.setattr(ex, "ATOL", -1.0)
    with pytest.raises(ExportError, match="stage 0"):
        export_bundle(bundle, tmp_path / "d")
    assert list(tmp_path.iterdir()) == []


def test_distil_on_folder_leaves_the_bundle_alone_and_reports_both_curves(trained_cli_bundle, tmp_path):
    from engine.train.retrain import distil_on_folder
    photos = make_image_folder(tmp_path / "p", ["x"], per_class=30, seed=5)
    (photos / "x" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    bundle = load_bundle(trained_cli_bundle)
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    new, rep = distil_on_folder(bundle, photos, epochs=3, val_fraction=0.2)
    assert all(torch.equal(v, bundle.model.state_dict()[k]) for k, v in before.items())
    assert rep["images"] == 30 and rep["skipped"][0][1] == "not an image"
    assert rep["curve_old"] and rep["curve_new"] and rep["held_out"] == 6
    assert new.class_names == bundle.class_names and new.meta["source"]["folder"] == str(photos)
    teacher = bundle.model.exits[-1].state_dict()
    assert all(torch.equal(v, teacher[k]) for k, v in new.model.exits[-1].state_dict().items())
    flag = CancelFlag()
    flag.set()
    with pytest.raises(Cancelled):
        distil_on_folder(bundle, photos, epochs=3, cancel=flag)


def test_distilling_twice_gives_the_same_exits(trained_cli_bundle, tmp_path):
    from engine.train.retrain import distil_on_folder
    photos = make_image_folder(tmp_path / "p", ["x", "y"], per_class=15, seed=6)
    bundle = load_bundle(trained_cli_bundle)
    torch.manual_seed(123)  # whatever the caller's random state, the result is the same
    a, rep_a = distil_on_folder(bundle, photos, epochs=3)
    torch.manual_seed(456)
    b, rep_b = distil_on_folder(bundle, photos, epochs=3)
    assert rep_a["agreement_per_exit"] == rep_b["agreement_per_exit"]
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k


def test_unlabelled_parts_hold_out_what_the_labelled_commands_hold_out(tmp_path):
    from engine.splits import split_indices, unlabelled_parts
    labelled = make_image_folder(tmp_path / "l", ["a", "b", "c"], per_class=10, seed=7)
    ds = open_dataset(labelled)
    images, train, held = unlabelled_parts(labelled, val_fraction=0.2)
    assert (train, held) == split_indices(ds.targets, val_fraction=0.2, seed=0)
    assert [src for src, _ in images.samples] == [src for src, _ in ds.samples]
    assert {y for _, y in images.samples} == {UNLABELLED}
    loose = _unlabelled_copy(labelled, tmp_path / "u")  # no class layout: a plain split of the count
    check = check_unlabelled(loose)
    images, train, held = unlabelled_parts(loose, val_fraction=0.2, report=check)
    assert len(images) == 30 and (train, held) == split_indices(30, val_fraction=0.2, seed=0)

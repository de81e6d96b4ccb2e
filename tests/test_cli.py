"""The `offramp` command end to end on generated data: train exits, inspect, evaluate, run."""
import json

import pytest
import torch

from engine.bundle import load_bundle, read_manifest, save_bundle
from engine.cli import main
from engine.progress import CancelFlag, Cancelled
from engine.train.retrain import retrain_on_folder
from synth import make_image_folder


@pytest.fixture(scope="module")
def ten_class_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ten"), [f"c{i}" for i in range(10)], per_class=30, seed=1)


@pytest.fixture(scope="module")
def trained_bundle(ten_class_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "synth.offramp"
    code = main(["train-exits", "--data", str(ten_class_folder), "--backbone", "cifar_resnet_small",
                 "--epochs", "15", "--val-fraction", "0.25", "--out", str(out)])
    assert code == 0 and out.exists()
    return out


def test_train_exits_writes_a_usable_bundle(trained_bundle, capsys):
    m = read_manifest(trained_bundle)
    assert m["backbone"]["name"] == "cifar_resnet_small" and len(m["class_names"]) == 10
    front = m["meta"]["front"]
    assert front and all(a["flops"] < b["flops"] and a["accuracy"] < b["accuracy"] for a, b in zip(front, front[1:]))
    acc = m["meta"]["evaluation"]["accuracy_per_exit"]
    # 10 easy colour classes on a random (untrained) backbone; chance is 10 %
    assert len(acc) == 3 and max(acc) > 0.35
    assert m["meta"]["evaluation"]["default_point"]["accuracy"] >= acc[-1] - 0.005


def test_info_prints_exits_and_costs(trained_bundle, capsys):
    assert main(["info", str(trained_bundle)]) == 0
    out = capsys.readouterr().out
    assert "cifar_resnet_small" in out and "MFLOPs" in out and "threshold" in out


def test_evaluate_prints_per_exit_accuracy_and_writes_curve(trained_bundle, ten_class_folder, tmp_path, capsys):
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(trained_bundle), "--data", str(ten_class_folder), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "accuracy per exit" in out and "oracle" in out
    rep = json.loads(report.read_text())
    assert len(rep["accuracy_per_exit"]) == 3 and rep["threshold_curve"]
    assert report.with_suffix(".png").stat().st_size > 1000


def test_run_on_a_folder_prints_exit_label_and_cost(trained_bundle, ten_class_folder, capsys):
    images = sorted((ten_class_folder / "c0").iterdir())[:3]
    assert main(["run", str(trained_bundle), *map(str, images), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3
    for r in lines:
        assert 0 <= r["exit"] <= 2 and r["flops"] <= r["full_flops"] * 1.5 and r["label"]
        assert r["ms"] > 0 and r["clock"] in ("thread CPU time", "wall clock")  # what timed it
    assert main(["run", str(trained_bundle), str(images[0]), "--threshold", "0"]) == 0
    assert "at exit E0 of 3" in capsys.readouterr().out


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.offramp")]) == 2
    err = capsys.readouterr().err
    assert "missing.offramp" in err and "Traceback" not in err
    one = tmp_path / "one"
    make_image_folder(one, ["only"], per_class=3)
    assert main(["train-exits", "--data", str(one), "--backbone", "cifar_resnet_small", "--out",
                 str(tmp_path / "x.offramp")]) == 2
    assert "class" in capsys.readouterr().err
    assert not (tmp_path / "x.offramp").exists()


def test_retrain_on_new_classes_keeps_backbone_and_old_bundle(trained_bundle, tmp_path):
    bundle = load_bundle(trained_bundle)
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    folder = make_image_folder(tmp_path / "teacher", ["apple", "pear", "plum"], per_class=12, seed=3)
    seen = []
    new, rep = retrain_on_folder(bundle, folder, epochs=5, progress=lambda p: seen.append(p.stage))
    assert new.model.class_names == ["apple", "pear", "plum"]
    assert {"checking folder", "caching features", "training exits", "evaluating"} <= set(seen)
    for k, v in bundle.model.state_dict().items():  # the current model is untouched
        assert torch.equal(v, before[k]), k
    for k, v in new.model.backbone.state_dict().items():  # the backbone is the same, frozen
        assert torch.equal(v, bundle.model.backbone.state_dict()[k]), k
    assert rep["classes"] == ["apple", "pear", "plum"] and rep["curve_new"]
    path = tmp_path / "teacher.offramp"
    save_bundle(new, path)
    assert load_bundle(path).model.class_names == ["apple", "pear", "plum"]


def test_cancelled_retraining_changes_nothing(trained_bundle, tmp_path):
    bundle = load_bundle(trained_bundle)
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    folder = make_image_folder(tmp_path / "t", 3, per_class=8)
    flag = CancelFlag()

    def progress(p):
        if p.stage == "training exits":
            flag.set()

    with pytest.raises(Cancelled):
        retrain_on_folder(bundle, folder, epochs=5, progress=progress, cancel=flag)
    for k, v in bundle.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_new_commands_explain_themselves(capsys):
    for command, words in (("search", ["DyCE", "--max-loss", "--budget", "calibration"]),
                           ("train-policy", ["--kind", "bolukbasi", "structure", "offramp run --policy"]),
                           ("bench", ["held-out", "--static", "--cascade", "--timing-images", "speed-up"])):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert "example" in text and all(w in text for w in words), command


def test_trained_policy_is_selectable_in_run(trained_bundle, ten_class_folder, tmp_path, capsys):
    out = tmp_path / "policy.offramp"
    assert main(["train-policy", str(trained_bundle), "--data", str(ten_class_folder), "--kind", "bolukbasi",
                 "--lambdas", "0.05", "--val-fraction", "0.25", "--out", str(out)]) == 0
    assert "bolukbasi" in read_manifest(out)["policies"]
    capsys.readouterr()
    image = str(sorted((ten_class_folder / "c1").iterdir())[0])
    assert main(["run", str(out), image, "--policy", "bolukbasi", "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out.splitlines()[0])["exit"] <= 2
    assert main(["run", str(out), image, "--policy", "missing"]) == 2
    assert "unknown policy 'missing'" in capsys.readouterr().err


def test_a_trained_structure_policy_calibrates_the_live_novelty_score(trained_bundle, ten_class_folder, tmp_path,
                                                                       capsys):
    out = tmp_path / "structure.offramp"
    assert main(["train-policy", str(trained_bundle), "--data", str(ten_class_folder), "--kind", "structure",
                 "--lambdas", "0.05", "--epochs", "3", "--val-fraction", "0.25", "--out", str(out)]) == 0
    assert "live novelty calibrated on" in capsys.readouterr().out
    novelty = load_bundle(out).meta["novelty"]
    assert novelty["policy"] == "structure" and novelty["samples"] > 0
    assert set(novelty["quantiles"]) == {"0", "1"}  # every early exit of the 3-exit model

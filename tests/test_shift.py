"""The shift report (engine.shift, `offramp shift`) and the novelty score (engine.novelty): the
equal-FLOPs comparison on hand-made records, the report's fields on a tiny bundle, a novelty score
in 0..1 that ranks an off-distribution input above typical ones."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engine.bundle import Bundle, save_bundle
from engine.cli import main
from engine.cost import CostTable, measure_costs
from engine.novelty import NoveltyScale, auroc
from engine.policies import ThresholdPolicy
from engine.policies.structure import StructurePolicy
from engine.records import Records
from engine.shift import concat_records, corrupted_sets, shift_report, threshold_at_flops
from engine.train.structure import train_structure_policy
from synth import SYNTH_CLASSES, build_tiny_model, make_image_folder

COST = CostTable(exit_stages=[0, 1], stage_flops=[1e6, 1e6], exit_flops=[0.0, 0.0])


def two_exit_records() -> Records:
    """4 samples, 2 classes: exit 0 says class 0 with confidence 0.9, 0.8, 0.7, 0.6 and is right for
    the first and third; the last exit is always right. A shared threshold t lets the samples with
    confidence >= t leave at exit 0 (1 MFLOP), the rest pay 2 MFLOPs."""
    p = torch.tensor([0.9, 0.8, 0.7, 0.6])
    early = torch.stack([p.log(), (1 - p).log()], dim=1)
    labels = torch.tensor([0, 1, 0, 1])
    last = torch.nn.functional.one_hot(labels, 2).float() * 5
    return Records(torch.stack([early, last], dim=1), [], labels, ["a", "b"], [0, 1])


def test_threshold_at_flops_reads_the_sweep_exactly_between_and_beyond():
    r = two_exit_records()
    # two leave early (0.9 right, 0.8 wrong): 1.5 MFLOPs, 3 of 4 right
    exact = threshold_at_flops(r, COST, 1.5e6)
    assert exact["how"] == "exact" and exact["accuracy"] == pytest.approx(0.75)
    # halfway between one leaving early (1.75 MFLOPs, all right) and two leaving (1.5, 3 of 4)
    mid = threshold_at_flops(r, COST, 1.625e6)
    assert mid["how"] == "interpolated" and mid["accuracy"] == pytest.approx(0.875)
    assert len(mid["thresholds"]) == 2
    # cheaper than every threshold: the cheapest point, all at exit 0 (2 of 4 right)
    low = threshold_at_flops(r, COST, 0.5e6)
    assert low["how"] == "nearest" and low["flops"] == pytest.approx(1e6) and low["accuracy"] == pytest.approx(0.5)


def _records(model, n, seed, scale=1.0):
    x = scale * torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, feats = model.forward_all(x, with_features=True, calibrated=True)
    y = torch.arange(n) % model.num_classes
    return Records(torch.stack(logits, 1), feats, y, model.class_names, model.exit_stages)


def test_shift_report_has_its_fields_and_compares_at_equal_flops(tiny_model):
    cost = measure_costs(tiny_model)
    cal, clean = _records(tiny_model, 64, 0), _records(tiny_model, 40, 1)
    noisy = _records(tiny_model, 40, 2, scale=4.0)
    structure = train_structure_policy(cal, cost, 0.2, epochs=3)
    threshold = ThresholdPolicy.uniform(tiny_model.num_exits, 0.5)
    rep = shift_report(clean, {"gaussian_noise-5": noisy}, cost, threshold, structure, cal,
                       extra={"other": structure})
    assert list(rep["sets"]) == ["clean", "gaussian_noise-5"] and set(rep["summary"]) == {"structure", "other"}
    row = rep["sets"]["gaussian_noise-5"]
    assert (row["kind"], row["severity"]) == ("gaussian_noise", 5)
    s = row["policies"]["structure"]
    assert s["loss"] == pytest.approx(row["full_accuracy"] - s["accuracy"])
    eq = row["equal_flops"]["structure"]
    assert eq["threshold"] == {**threshold_at_flops(noisy, cost, s["flops"]), "loss": eq["threshold"]["loss"]}
    assert eq["wins"] == (s["loss"] < eq["threshold"]["loss"])
    assert 0.0 <= row["novelty"]["auroc"] <= 1.0 and rep["sets"]["clean"]["novelty"]["auroc"] is None
    assert rep["summary"]["structure"]["sets"] == 1
    json.dumps(rep)  # JSON-able


def separated_records(n: int, seed: int) -> Records:
    """3 exits, 4 classes; features sit near their class centre (first 4 of 8 dimensions) at every exit."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    centres = 3.0 * torch.eye(4, 8) + 1.0
    feats = [centres[y] + 0.3 * torch.randn(n, 8, generator=g) for _ in range(3)]
    logits = torch.nn.functional.one_hot(y, 4).float()[:, None].repeat(1, 3, 1) * 3
    return Records(logits, feats, y, [f"c{i}" for i in range(4)], [0, 1, 2])


def test_novelty_is_in_0_1_and_ranks_an_unlike_input_highest():
    train, cal, test = separated_records(200, 0), separated_records(200, 1), separated_records(50, 2)
    policy = StructurePolicy([8, 8, 8], 4).set_prototypes(train.features, train.labels)
    scale = NoveltyScale.fit(policy, cal)
    off = test.subset([0])
    off.features = [f + 6.0 * torch.eye(8)[6] for f in off.features]  # along no class's direction
    scores = scale.score(policy, concat_records([test, off]))
    assert scores.min() >= 0.0 and scores.max() <= 1.0
    assert scores[-1] == scores.max() and scores[-1] >= 0.99 and np.median(scores[:-1]) < 0.8
    with pytest.raises(ValueError, match="features"):
        NoveltyScale.fit(policy, Records(cal.logits, [], cal.labels, cal.class_names, cal.exit_stages))


def test_auroc():
    assert auroc([2, 3], [0, 1]) == 1.0 and auroc([0, 1], [2, 3]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5 and math.isclose(auroc([1, 2], [1.5]), 0.5)
    with pytest.raises(ValueError, match="both sets"):
        auroc([], [1])


def test_shift_command_end_to_end(tmp_path, capsys):
    data = tmp_path / "data"
    make_image_folder(data / "train", SYNTH_CLASSES, per_class=12, seed=0)
    make_image_folder(data / "test", SYNTH_CLASSES, per_class=6, seed=1)
    model = build_tiny_model()
    cost = measure_costs(model)
    records = _records(model, 48, 0)
    structure = train_structure_policy(records, cost, 0.2, epochs=2)
    bundle = save_bundle(Bundle(model, {"threshold": ThresholdPolicy.uniform(model.num_exits, 0.5),
                                        "structure": structure}, "threshold", cost), tmp_path / "tiny.offramp")
    out = tmp_path / "c"
    assert main(["corrupt", "--data", str(data), "--out", str(out), "--kinds", "contrast", "--severities", "5"]) == 0
    assert [name for name, _ in corrupted_sets(out)] == ["contrast-5"]
    report = tmp_path / "s.json"
    assert main(["shift", str(bundle), "--data", str(data), "--corrupted", str(out), "--limit", "16",
                 "--val-fraction", "0.25", "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "contrast-5" in text and ("hit" in text or "miss" in text)
    rep = json.loads(report.read_text())
    assert rep["sets"]["contrast-5"]["num_samples"] == 16 and "structure" in rep["summary"]
    # bench prints the same shift goal among its own, from the bundle's stored policies
    bench = tmp_path / "b.json"
    assert main(["bench", str(bundle), "--data", str(data), "--learned", "bundle", "--timing-images", "4",
                 "--overhead-repeats", "0", "--corrupted", str(out), "--corrupted-limit", "16",
                 "--val-fraction", "0.25", "--json", str(bench)]) == 0
    text = capsys.readouterr().out
    table, goals = text.split("goals (test split")
    goal = [line for line in goals.splitlines() if "under shift, structure loses less" in line]
    assert len(goal) == 1 and goal[0].startswith(("[HIT ]", "[MISS]")) and "contrast-5" in table
    brep = json.loads(bench.read_text())
    assert brep["shift"]["summary"] == rep["summary"]
    assert brep["goals"][-1]["goal"].startswith("under shift")


def test_shift_bad_input_gives_one_line(tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", SYNTH_CLASSES, per_class=4)
    model = build_tiny_model()
    bundle = save_bundle(Bundle(model, {"threshold": ThresholdPolicy.uniform(model.num_exits, 0.5)}, "threshold",
                                measure_costs(model)), tmp_path / "t.offramp")
    assert main(["shift", str(bundle), "--data", str(data), "--corrupted", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere is not a folder" in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert main(["shift", str(bundle), "--data", str(data), "--corrupted", str(tmp_path / "empty")]) == 2
    assert "holds no corrupted sets" in capsys.readouterr().err
    (tmp_path / "empty" / "contrast-1" / "test").mkdir(parents=True)
    assert main(["shift", str(bundle), "--data", str(data), "--corrupted", str(tmp_path / "empty")]) == 2
    assert "has no policy 'structure'" in capsys.readouterr().err


def test_shift_goal_is_hit_only_when_every_corrupted_set_is_won():
    from engine.bench_report import goal_lines, shift_goal
    rep = {"summary": {"structure": {"wins": 7, "sets": 8, "mean_loss_gap": -0.002}}}
    goal = shift_goal(rep)
    assert goal["hit"] is False and "7 of 8" in goal["achieved"] and "-0.20 points" in goal["achieved"]
    rep["summary"]["structure"]["wins"] = 8
    assert shift_goal(rep)["hit"] is True
    assert shift_goal({"summary": {}})["hit"] is None
    assert goal_lines([shift_goal(rep)])[0].startswith("[HIT ] under shift")

"""`offramp search`, `offramp train-policy` and `offramp bench` on generated data: the three data
parts are disjoint and match what training held out, a searched bundle round-trips with its
chosen configuration, trained policies load and run by name, the bench report holds every
method with measured speed-ups, and the oracle at equal accuracy and the curve comparisons are
exact on hand-made cases."""
from __future__ import annotations

import itertools
import json
import math
import shutil
import zipfile

import cv2
import pytest
import torch
from synth import make_image_folder

from engine.backbones import build_backbone
from engine.bench import TARGET_LOSSES, at_loss, oracle_at, plain_runner, staged_runner, time_batch1
from engine.bench_report import shortfall
from engine.bundle import load_bundle, read_manifest
from engine.cli import main
from engine.cost import CostTable, with_policy_flops
from engine.evaluate import MARGIN_Z, evaluate_policy, record_outputs
from engine.fronts import model_cost, scored_on
from engine.policies import BolukbasiPolicy, StructurePolicy, ThresholdPolicy
from engine.records import Records
from engine.runtime import Engine
from engine.search import ConfigurationTable, evaluate_configuration
from engine.splits import open_splits, split_indices

PRESET = build_backbone("cifar_resnet_small").preset
VAL = "0.5"  # half the folder held out of training: about 30 calibration and 30 test images of 120


def _indices(subset) -> set[int]:
    return set(subset.indices)


@pytest.fixture(scope="module")
def bundle(synthetic_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "synth.offramp"
    assert main(["train-exits", "--data", str(synthetic_folder), "--backbone", "cifar_resnet_small",
                 "--epochs", "8", "--val-fraction", VAL, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def calibration(bundle, synthetic_folder) -> Records:
    b = load_bundle(bundle)
    splits = open_splits(synthetic_folder, b.model.backbone.preset, val_fraction=float(VAL))
    return record_outputs(b.model, splits.calibration)


# -- splits ---------------------------------------------------------------------------------------
def test_folder_parts_are_disjoint_and_validation_is_what_training_held_out(synthetic_folder):
    s = open_splits(synthetic_folder, PRESET, val_fraction=0.5)
    train, cal, test = _indices(s.train), _indices(s.calibration), _indices(s.test)
    assert s.layout == "folder" and cal and test
    assert not (train & cal) and not (train & test) and not (cal & test)
    assert cal | test == _indices(s.validation)
    tr, va = split_indices(s.train.dataset.targets, val_fraction=0.5, seed=0)  # as train-exits splits
    assert sorted(train) == tr and sorted(cal | test) == va
    d = s.describe()
    assert d["overlap"] == 0 and d["train_test_overlap"] == 0 and d["calibration"] + d["test"] == 60
    # every class is in both halves (stratified)
    for part in (s.calibration, s.test):
        assert {s.train.dataset.targets[i] for i in part.indices} == set(range(4))


@pytest.mark.parametrize("as_zip", [False, True])
def test_split_layout_calibrates_on_held_out_train_and_tests_on_the_test_split(tmp_path, as_zip):
    root = tmp_path / "cifarlike"
    make_image_folder(root / "train", 3, per_class=20, seed=4)
    make_image_folder(root / "test", 3, per_class=6, seed=5)
    data = root
    if as_zip:
        data = tmp_path / "cifarlike.zip"
        with zipfile.ZipFile(data, "w") as zf:
            for f in sorted(root.rglob("*")):
                if f.is_file():
                    zf.write(f, f"cifarlike/{f.relative_to(root)}")
        shutil.rmtree(root)
    s = open_splits(data, PRESET, val_fraction=0.1)
    assert s.layout == "split" and len(s.test) == 18 and s.test.dataset.split == "test"
    _, va = split_indices(s.train.dataset.targets, val_fraction=0.1, seed=0)  # what train-backbone holds out
    assert sorted(s.calibration.indices) == va and not (_indices(s.train) & _indices(s.calibration))
    assert s.describe()["overlap"] == 0 and s.describe()["train_test_overlap"] == 0
    assert s.test.dataset.classes == s.train.dataset.classes


# -- the pieces of the report ---------------------------------------------------------------------
def _hand_records(correct: list[list[bool]]) -> Records:
    """Two-class records whose exit e is right for sample n where correct[n][e]."""
    logits = torch.tensor([[[2.0, 0.0] if ok else [0.0, 2.0] for ok in row] for row in correct])
    n, e, _ = logits.shape
    return Records(logits, [], torch.zeros(n, dtype=torch.long), ["a", "b"], list(range(e)))


def test_oracle_at_accuracy_equals_brute_force():
    rows = [[False, True, True], [True, True, False], [False, False, True], [False, False, False],
            [False, True, False], [True, False, True]]
    records = _hand_records(rows)
    cost = CostTable([0, 1, 2], [10.0, 20.0, 30.0], [1.0, 2.0, 3.0])
    cum = cost.cumulative_flops()
    n = len(rows)
    for need in range(n):  # one sample is wrong everywhere: at most 5 of 6 can be right
        best = min(sum(cum[e] for e in choice) / n for choice in itertools.product(range(3), repeat=n)
                   if sum(rows[i][e] for i, e in enumerate(choice)) >= need)
        got = oracle_at(records, cost, need / n)
        assert got["flops"] == pytest.approx(best) and got["saved"] == pytest.approx(1 - best / cost.full_flops)
        assert got["accuracy"] == need / n
    assert oracle_at(records, cost, 1.0)["accuracy"] == 5 / 6  # capped at what any exit gets right


def test_reading_targets_and_comparing_curves():
    pts = [{"flops": 1.0, "accuracy": 0.80}, {"flops": 2.0, "accuracy": 0.897}, {"flops": 3.0, "accuracy": 0.91}]
    assert at_loss(pts, 0.9, 0.005) == 1 and at_loss(pts, 0.9, 0.2) == 0 and at_loss(pts, 0.95, 0.01) is None
    reference = [{"flops": 1.0, "accuracy": 0.85}, {"flops": 3.0, "accuracy": 0.90}]
    assert shortfall(pts, reference) == pytest.approx(0.05)  # at 1.0 FLOPs the curve has 0.80, the reference 0.85
    better = [{"flops": 0.5, "accuracy": 0.86}, {"flops": 2.0, "accuracy": 0.95}]
    assert shortfall(better, reference) == pytest.approx(0.85 - 0.89)  # at 1.0 the line from 0.86 to 0.95 is at 0.89
    sparse = [{"flops": 1.0, "accuracy": 0.80}, {"flops": 3.0, "accuracy": 0.90}]
    assert shortfall(sparse, [{"flops": 2.0, "accuracy": 0.84}]) == pytest.approx(-0.01)  # mixing the two gives 0.85
    assert shortfall([{"flops": 1.5, "accuracy": 0.84}], reference) == pytest.approx(0.01)  # one point: 0.85 at 1.0
    assert shortfall([{"flops": 0.2, "accuracy": 0.5}], reference) is None  # nothing as cheap to compare with


def test_time_batch1_interleaves_every_runner_per_image():
    calls = []
    runners = {name: (lambda i, name=name: calls.append((name, i))) for name in "abcd"}
    times = time_batch1(runners, 12, warmup=2)
    timed = calls[2 * 4:]  # after the warm-up
    assert [i for _, i in timed] == [i for i in range(12) for _ in range(4)]  # image by image
    orders = {tuple(n for n, i in timed if i == k) for k in range(12)}
    assert all(sorted(o) == list("abcd") for o in orders) and len(orders) > 1  # each once, order shuffled
    assert set(times) == set("abcd") and all(t["mean_ms"] > 0 and t["images"] == 12 for t in times.values())
    assert all(0 < t["p50_ms"] <= t["p95_ms"] <= t["p99_ms"] for t in times.values())  # from the 12 recorded times


def test_plain_and_staged_runners_compute_what_the_model_does(tiny_model):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        every = tiny_model.forward_all(x)
        for k in range(3):
            assert torch.allclose(plain_runner(tiny_model, k, x)(1), every[k][1:2], atol=1e-5)
        out = staged_runner(tiny_model, ThresholdPolicy([None, 0.0, 1.0]), x)(2)
    assert out.exit_index.tolist() == [1] and out.stage_calls == [1, 1]  # exit 1 always: stage 2 never runs


# -- search ---------------------------------------------------------------------------------------
def test_search_round_trips_with_the_chosen_default(bundle, synthetic_folder, calibration, tmp_path, capsys):
    out = tmp_path / "searched.offramp"
    before = bundle.read_bytes()
    assert main(["search", str(bundle), "--data", str(synthetic_folder), "--out", str(out)]) == 0
    assert bundle.read_bytes() == before  # --out leaves the input alone
    text = capsys.readouterr().out
    assert "DyCE front" in text and "shared threshold" in text and "*" in text
    b = load_bundle(out)
    front, k = b.meta["front"], b.meta["default_point"]
    assert b.default_policy == "threshold" and 0 <= k < len(front)
    assert b.policy.thresholds == front[k]["policy"]["thresholds"]
    assert all(p["flops"] < q["flops"] and p["accuracy"] < q["accuracy"] for p, q in zip(front, front[1:]))
    # the default is the cheapest configuration whose out-of-fold accuracy, less its one-sided 95 %
    # margin, is within 0.5 points of the last exit on calibration (none: the most accurate); the
    # point keeps the configuration's own figures on the records it was searched on too
    cost = model_cost(b)
    full = evaluate_configuration(calibration, cost, [None, None, 1.0])["accuracy"]
    chosen = evaluate_configuration(calibration, cost, b.policy)
    assert chosen["accuracy"] == pytest.approx(front[k]["in_sample"]["accuracy"])
    assert chosen["flops"] == pytest.approx(front[k]["in_sample"]["flops"])

    def within(p):
        return p["accuracy"] - MARGIN_Z * p["loss_se"] >= full - 0.005 - 1e-12
    assert within(front[k]) or (k == len(front) - 1 and not any(map(within, front)))
    assert not any(map(within, front[:k]))
    assert b.meta["search"]["samples"] == calibration.num_samples == b.meta["search"]["split"]["calibration"]
    assert b.meta["search"]["split"]["val_fraction"] == float(VAL)  # read from the bundle: train-exits recorded it
    table = ConfigurationTable(front)  # what the app's budget slider and Engine switch between
    assert table.at_budget(1.0).thresholds == front[-1]["policy"]["thresholds"]
    engine = Engine(b, device="cpu", latency_repeats=1)
    engine.set_policy(table.at_budget(0.0))
    assert engine.infer(next((synthetic_folder / "red").iterdir())).exit_index in range(3)


def test_search_by_budget_writes_in_place(bundle, synthetic_folder, tmp_path):
    copy = tmp_path / "copy.offramp"
    shutil.copy(bundle, copy)
    assert main(["search", str(copy), "--data", str(synthetic_folder), "--budget", "0.6"]) == 0
    m = read_manifest(copy)
    search, front, k = m["meta"]["search"], m["meta"]["front"], m["meta"]["default_point"]
    assert search["target"]["budget"] == 0.6 and search["budget"]["budget"] == 0.6
    fitting = [p for p in front if 1 - p["saved"] <= 0.6 + 1e-9]
    assert front[k] == (max(fitting, key=lambda p: p["accuracy"]) if fitting else front[0])
    assert search["budget"]["calibration"]["budget_met"] == bool(fitting)
    assert search["budget"]["test"]["samples"] > 0  # checked on the test split the search never saw
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left nothing behind


# -- train-policy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, extra, cls", [
    ("bolukbasi", ["--lambdas", "0", "0.05", "0.5"], BolukbasiPolicy),
    ("structure", ["--lambdas", "0.01", "0.2", "--epochs", "15"], StructurePolicy),
    ("threshold", [], ThresholdPolicy),
])
def test_train_policy_stores_a_policy_that_loads_and_runs_by_name(kind, extra, cls, bundle, synthetic_folder,
                                                                   calibration, tmp_path, capsys):
    out = tmp_path / f"{kind}.offramp"
    assert main(["train-policy", str(bundle), "--data", str(synthetic_folder), "--kind", kind, *extra,
                 "--out", str(out)]) == 0
    b = load_bundle(out)
    name = {"threshold": "shared-threshold"}.get(kind, kind)
    assert isinstance(b.policies[name], cls) and b.default_policy == "threshold"  # not the default unless asked
    entry = b.meta["policy_fronts"][name]
    stored = entry["points"][entry["chosen"]]
    # the loaded policy decides exactly as the one fitted: same accuracy and cost where it was scored
    scored = scored_on(kind, calibration)
    assert entry["samples"] == scored.num_samples < calibration.num_samples + (kind != "structure")
    ev = evaluate_policy(scored, b.policies[name], with_policy_flops(model_cost(b), b.policies[name]))
    assert ev["accuracy"] == pytest.approx(stored["accuracy"]) and ev["mean_flops"] == pytest.approx(stored["flops"])
    engine = Engine(b, device="cpu", latency_repeats=1)
    engine.set_policy(name)
    image = next((synthetic_folder / "blue").iterdir())
    assert engine.policy_name == name and engine.infer(image).exit_index in range(3)
    capsys.readouterr()
    assert main(["run", str(out), str(image), "--policy", name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["exit"] in range(3)


def test_train_policy_default_flag_and_bad_kind(bundle, synthetic_folder, tmp_path, capsys):
    out = tmp_path / "d.offramp"
    assert main(["train-policy", str(bundle), "--data", str(synthetic_folder), "--kind", "bolukbasi",
                 "--lambdas", "0.1", "--name", "fast", "--default", "--out", str(out)]) == 0
    assert read_manifest(out)["default_policy"] == "fast"
    with pytest.raises(SystemExit):
        main(["train-policy", str(bundle), "--data", str(synthetic_folder), "--kind", "nope"])


# -- bench ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(synthetic_folder, tmp_path_factory):
    """A plain network with a single exit (no early exits): a stand-in for a smaller static model."""
    out = tmp_path_factory.mktemp("small") / "small.offramp"
    assert main(["train-exits", "--data", str(synthetic_folder), "--backbone", "cifar_resnet_small", "--exits", "2",
                 "--epochs", "5", "--val-fraction", VAL, "--seed", "3", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def bench_report(bundle, small, synthetic_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    policy_bundle = folder / "with-policy.offramp"
    assert main(["train-policy", str(bundle), "--data", str(synthetic_folder), "--kind", "bolukbasi",
                 "--lambdas", "0.01", "0.3", "--out", str(policy_bundle)]) == 0
    out = folder / "bench.json"
    assert main(["bench", str(policy_bundle), "--data", str(synthetic_folder), "--static", str(small),
                 "--cascade", str(small), "--timing-images", "8", "--lambdas", "0", "0.05", "0.5",
                 "--structure-lambdas", "0.01", "0.3", "--structure-epochs", "10", "--json", str(out)]) == 0
    return json.loads(out.read_text()), out


def test_bench_report_holds_every_method_scored_on_the_held_out_split(bench_report):
    rep, _ = bench_report
    methods = rep["methods"]
    assert {"full", "truncation", "static:small.offramp", "threshold", "dyce", "bolukbasi", "structure",
            "cascade", "bundle:threshold", "bundle:bolukbasi"} <= set(methods)
    assert rep["splits"]["overlap"] == 0 and rep["splits"]["test"] + rep["splits"]["calibration"] == 60
    assert rep["oracle"]["accuracy"] >= rep["full_accuracy"]
    full = methods["full"]["points"][0]
    assert full["flops"] == rep["full_flops"]
    assert full["accuracy"] == rep["full_accuracy"] == rep["accuracy_per_exit"][-1]
    trunc = methods["truncation"]["points"]
    assert [p["accuracy"] for p in trunc] == rep["accuracy_per_exit"][:-1] and all(p["saved"] > 0 for p in trunc)
    for name in ("threshold", "dyce", "bolukbasi", "structure", "cascade"):
        points = methods[name]["points"]
        assert points and all("calibration" in p and 0 <= p["accuracy"] <= 1 for p in points), name
        assert methods[name]["calibration_choice"] is not None
    # a Bolukbasi decision costs FLOPs: a point that never leaves early costs more than the full model
    assert all(p["flops"] > rep["full_flops"] for p in methods["bolukbasi"]["points"] if p["exit_fractions"][-1] == 1)
    assert methods["static:small.offramp"]["points"][0]["backbone"] == "cifar_resnet_small"


def test_bench_measures_positive_speedups_and_reads_both_targets(bench_report):
    rep, _ = bench_report
    t = rep["timing"]
    assert t["images"] == 8 and t["full_ms"] > 0 and t["full_staged_ms"] > 0 and t["batch_size"] == 1
    assert rep["methods"]["full"]["points"][0]["speedup"] == pytest.approx(1.0)
    timed = 0
    for name, m in rep["methods"].items():
        assert set(m["at_loss"]) == {f"{100 * x:g}" for x in TARGET_LOSSES}
        for key, p in m["at_loss"].items():
            if p is None:
                continue
            assert p["loss"] <= float(key) / 100 + 1e-12 and 0 <= p["oracle_saved"] <= 1
            assert p["ms"] > 0 and math.isfinite(p["speedup"]) and p["speedup"] > 0, (name, key)
            assert p["speedup"] == pytest.approx(t["full_ms"] / p["ms"])
            assert p["flops_speedup"] == pytest.approx(1.0 / (1.0 - p["saved"]))
            assert 0 < p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"], (name, key)
            timed += 1
    assert timed >= 10
    # timed as the app runs (engine.prepared), with the plain modules' full model beside it
    assert "TorchScript" in t["runtime"] and t["full_eager_ms"] > 0
    overhead = t["exit_overhead"]
    assert {"threshold", "bolukbasi", "structure"} <= set(overhead)
    for o in overhead.values():
        assert "error" in o or (len(o["per_exit_us"]) == len(rep["exit_stages"]) - 1 and math.isfinite(o["mean_us"]))


def test_bench_goals_and_plot(bench_report):
    rep, out = bench_report
    goals = rep["goals"]
    assert len(goals) >= 4 and all(g["hit"] in (True, False, None) and g["achieved"] for g in goals)
    assert any("oracle" in g["goal"] for g in goals) and any("2×" in g["goal"] for g in goals)
    png = cv2.imread(str(out.with_suffix(".png")))
    assert png is not None and png.shape[:2] == (600, 1800)  # FLOPs and measured-ms panels side by side


def test_bench_with_bundle_policies_only_prints_the_table(bundle, synthetic_folder, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", str(bundle), "--data", str(synthetic_folder), "--learned", "bundle",
                 "--timing-images", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert "bolukbasi" not in rep["methods"] and "bundle:threshold" in rep["methods"]
    assert "only the policies stored in the bundle" in rep["learned_policies"]
    for name in rep["methods"]:
        assert name.split(",")[0] in text
    assert "goals" in text and ("HIT" in text or "MISS" in text) and "chosen on the calibration split" in text
    assert "p50" in text and "p95" in text and "p99" in text
    assert (tmp_path / "b.png").exists()


def test_bench_refuses_a_static_bundle_of_other_classes(bundle, synthetic_folder, tmp_path, capsys):
    other = make_image_folder(tmp_path / "other", ["x", "y"], per_class=6)
    small = tmp_path / "other.offramp"
    assert main(["train-exits", "--data", str(other), "--backbone", "cifar_resnet_small", "--epochs", "1",
                 "--val-fraction", "0.5", "--out", str(small)]) == 0
    assert main(["bench", str(bundle), "--data", str(synthetic_folder), "--static", str(small),
                 "--learned", "bundle", "--timing-images", "2", "--json", str(tmp_path / "r.json")]) == 2
    assert "same classes" in capsys.readouterr().err and not (tmp_path / "r.json").exists()


def test_the_promise_goal_reads_the_worst_calibration_choice_on_test():
    from engine.bench_report import promise_goal
    rep = {"methods": {"a": {"calibration_choice": {"loss": 0.004}}, "b": {"calibration_choice": {"loss": 0.006}},
                       "full": {"calibration_choice": None}}}
    goal = promise_goal(rep)
    assert goal["method"] == "b" and goal["hit"] is False and "+0.60" in goal["achieved"]
    rep["methods"]["b"]["calibration_choice"]["loss"] = 0.005
    assert promise_goal(rep)["hit"] is True
    assert promise_goal({"methods": {}})["hit"] is None


def test_a_time_charged_search_repeats_by_its_mflops(bundle, synthetic_folder, tmp_path, capsys):
    """--exit-cost-ms is turned into FLOPs at this machine's speed, so the search prints the MFLOPs
    it came to; --exit-cost-mflops with that figure gives the same front on any machine."""
    import re
    by_ms, by_flops = tmp_path / "ms.offramp", tmp_path / "mflops.offramp"
    assert main(["search", str(bundle), "--data", str(synthetic_folder), "--exit-cost-ms", "0.05",
                 "--out", str(by_ms)]) == 0
    said = re.search(r"--exit-cost-mflops (\S+) repeats it", capsys.readouterr().out)
    assert said, "the search did not say the MFLOPs its charge came to"
    charge = load_bundle(by_ms).meta["search"]["exit_cost_flops"]
    assert charge > 0 and float(said.group(1)) == pytest.approx(charge / 1e6, abs=0.005)
    assert main(["search", str(bundle), "--data", str(synthetic_folder), "--exit-cost-mflops", repr(charge / 1e6),
                 "--out", str(by_flops)]) == 0
    again = load_bundle(by_flops).meta
    assert again["search"]["exit_cost_flops"] == pytest.approx(charge)
    assert [p["policy"] for p in again["front"]] == [p["policy"] for p in load_bundle(by_ms).meta["front"]]
    with pytest.raises(SystemExit) as stop:  # one charge or the other
        main(["search", str(bundle), "--data", str(synthetic_folder), "--exit-cost-ms", "0.1", "--exit-cost-mflops", "1"])
    assert stop.value.code == 2

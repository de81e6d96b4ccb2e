"""Evaluation: hand-checked numbers on tiny synthetic records, the vectorised curve against
`simulate`, the oracle bound, fronts, records round trip, recording a real (tiny) model and
agreeing with its staged run, and the plot."""
import json
import math
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from engine.backbones import build_backbone
from engine.cost import CostTable
from engine.evaluate import (accuracy_per_exit, evaluate_policy, evaluation_report, full_model_point,
                             operating_front, oracle, pareto, pick_point, record_outputs, save_report,
                             threshold_curve)
from engine.model import MultiExitNet
from engine.plot import PlotUnavailable, nice_ticks, plot_curves, plotting_problem
from engine.policies import OraclePolicy, ThresholdPolicy, simulate
from engine.progress import CancelFlag, Cancelled
from engine.records import Records

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only wait for each other


# (max-probability, right?) of each sample at exits 0 and 1; exit 2 is right for samples 0-2 only
HAND = [((0.95, True), (0.97, True)),
        ((0.60, False), (0.92, True)),
        ((0.70, False), (0.60, False)),
        ((0.55, False), (0.55, False))]


def _pair(p: float, right: bool) -> list[float]:  # two-class logits with max-probability p; label is class 0
    hi, lo = math.log(p), math.log(1.0 - p)
    return [hi, lo] if right else [lo, hi]


@pytest.fixture
def hand_records() -> Records:
    rows = [[_pair(*a), _pair(*b), _pair(0.9, i < 3)] for i, (a, b) in enumerate(HAND)]
    logits = torch.tensor(rows, dtype=torch.float32)  # (4 samples, 3 exits, 2 classes)
    feats = [torch.randn(4, c) for c in (4, 8, 16)]
    return Records(logits, feats, torch.zeros(4, dtype=torch.long), ["a", "b"], [0, 1, 2])


@pytest.fixture
def hand_cost() -> CostTable:
    # reaching exit 0 costs 10+1 = 11, exit 1: 11+20+1 = 32, exit 2: 32+30+5 = 67; the full model 65
    return CostTable([0, 1, 2], [10.0, 20.0, 30.0], [1.0, 1.0, 5.0], stage_ms=[1.0, 2.0, 3.0], exit_ms=[0.5, 0.5, 1.0])


def _random_records(n=300, e=4, k=5, seed=0) -> Records:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, e, k, generator=g) * 2
    logits += torch.nn.functional.one_hot(labels, k)[:, None, :] * torch.linspace(0.5, 3.0, e)[None, :, None]
    return Records(logits, [torch.randn(n, 3, generator=g) for _ in range(e)], labels, list("abcde")[:k],
                   list(range(e)))


def _random_cost(e=4) -> CostTable:
    return CostTable(list(range(e)), [100.0 * (s + 1) for s in range(e)], [3.0] * e, policy_flops=[1.0] * e)


# -- hand-computed numbers ------------------------------------------------------------------------
def test_accuracy_per_exit(hand_records):
    assert accuracy_per_exit(hand_records) == pytest.approx([0.25, 0.5, 0.75])


def test_threshold_policy_by_hand(hand_records, hand_cost):
    # t = 0.9: sample 0 leaves at exit 0, sample 1 at exit 1, samples 2 and 3 reach exit 2 (3 is wrong)
    ev = evaluate_policy(hand_records, ThresholdPolicy.uniform(3, 0.9), hand_cost)
    assert ev["exit_counts"] == [1, 1, 2]
    assert ev["exit_fractions"] == [0.25, 0.25, 0.5]
    assert ev["exit_accuracy"] == [1.0, 1.0, 0.5]
    assert ev["accuracy"] == pytest.approx(0.75)
    assert ev["mean_flops"] == pytest.approx((11 + 32 + 67 + 67) / 4)
    assert ev["full_flops"] == pytest.approx(65)
    assert ev["saved"] == pytest.approx(1 - 44.25 / 65)
    # time: exit 0 = 1.5 ms, exit 1 = 1.5+2+0.5 = 4, exit 2 = 4+3+1 = 8; full = 6+1 = 7
    assert ev["mean_ms"] == pytest.approx((1.5 + 4 + 8 + 8) / 4)
    assert ev["speedup"] == pytest.approx(7 / 5.375)
    json.dumps(ev)


def test_inactive_exits_and_policy_flops_are_counted(hand_records, hand_cost):
    # exit 0 off: its head never runs, so exit 1 costs 10+20+1 = 31 and exit 2 31+30+5 = 66
    ev = evaluate_policy(hand_records, ThresholdPolicy([None, 0.9, 1.0]), hand_cost)
    assert ev["exit_counts"] == [0, 2, 2]
    assert ev["mean_flops"] == pytest.approx((31 + 31 + 66 + 66) / 4)
    # every decision that ran is paid for, the one that fired included: exits cost 13, 36, 71
    hand_cost.policy_flops = [2.0, 2.0, 0.0]
    ev = evaluate_policy(hand_records, ThresholdPolicy.uniform(3, 0.9), hand_cost)
    assert ev["mean_flops"] == pytest.approx((13 + 36 + 71 + 71) / 4)


def test_oracle_by_hand(hand_records, hand_cost):
    ev = oracle(hand_records, hand_cost)
    assert ev["exit_counts"] == [1, 1, 2]  # sample 3 is never right: last exit
    assert ev["accuracy"] == pytest.approx(0.75)
    assert ev["policy"]["kind"] == "oracle"


def test_curve_by_hand(hand_records, hand_cost):
    points = {p["threshold"]: p for p in threshold_curve(hand_records, hand_cost, thresholds=[0.5, 0.9, 0.96])}
    assert points[0.5]["accuracy"] == 0.25 and points[0.5]["flops"] == pytest.approx(11)
    assert points[0.9]["accuracy"] == 0.75 and points[0.9]["flops"] == pytest.approx(44.25)
    assert points[0.96]["accuracy"] == 0.75 and points[0.96]["flops"] == pytest.approx((32 + 67 * 3) / 4)
    front = pareto([*points.values(), full_model_point(hand_records, hand_cost)])
    assert [p["threshold"] for p in front] == [0.5, 0.9]


def test_cost_mismatch_is_an_error(hand_records):
    with pytest.raises(ValueError, match="exits"):
        evaluate_policy(hand_records, ThresholdPolicy.uniform(3, 0.9), _random_cost(4))


# -- curve, oracle, front, pick ---------------------------------------------------------------------
@pytest.mark.parametrize("measure", ["max_prob", "entropy", "margin"])
def test_threshold_curve_equals_simulate(measure):
    records, cost = _random_records(), _random_cost()
    curve = threshold_curve(records, cost, measure)
    assert 50 <= len(curve) <= 120
    assert [p["threshold"] for p in curve] == sorted(p["threshold"] for p in curve)
    for p in curve:
        policy = ThresholdPolicy.from_json(p["policy"], num_exits=4, num_classes=5)
        ev = evaluate_policy(records, policy, cost)
        assert (p["accuracy"], p["flops"], p["saved"]) == (ev["accuracy"], ev["mean_flops"], ev["saved"])
    # the sweep spans everything-at-exit-0 to almost-nothing-early
    assert curve[0]["threshold"] == 0.0 and curve[0]["flops"] == pytest.approx(cost.cumulative_flops()[0])
    assert curve[-1]["flops"] > cost.full_flops * 0.9


def test_curve_exits_match_simulate_exactly():
    records, cost = _random_records(n=200, seed=3), _random_cost()
    from engine.evaluate import _exit_confidence  # the shared path the curve uses
    reached = torch.cummax(_exit_confidence(records, "max_prob"), dim=1).values
    for p in threshold_curve(records, cost)[::7]:
        exits = simulate(ThresholdPolicy.uniform(4, p["threshold"]), records.logits, records.features)
        assert torch.equal(exits, (reached < p["threshold"]).sum(dim=1))


def test_oracle_bounds_every_exit():
    records, cost = _random_records(), _random_cost()
    ev = oracle(records, cost)
    assert all(ev["accuracy"] >= a for a in accuracy_per_exit(records))
    assert ev["accuracy"] == pytest.approx((records.logits.argmax(-1) == records.labels[:, None]).any(1).double().mean())
    assert ev["mean_flops"] <= cost.cumulative_flops()[-1] + 1e-9
    wrong = ~(records.logits.argmax(-1) == records.labels[:, None]).any(1)
    exits = simulate(OraclePolicy().with_targets(records.labels), records.logits)
    assert (exits[wrong] == 3).all()


def test_pareto_is_non_dominated_and_sorted():
    g = torch.Generator().manual_seed(1)
    points = [{"flops": float(f), "accuracy": float(a)} for f, a in torch.rand(200, 2, generator=g)]
    points += [dict(points[0])]  # an exact duplicate is kept once
    front = pareto(points)
    flops = [p["flops"] for p in front]
    assert flops == sorted(flops)
    assert all(b["accuracy"] > a["accuracy"] for a, b in zip(front, front[1:]))
    for p in front:  # nothing beats a front point
        assert not any(q["flops"] <= p["flops"] and q["accuracy"] >= p["accuracy"]
                       and (q["flops"] < p["flops"] or q["accuracy"] > p["accuracy"]) for q in points)
    for p in points:  # and every point left out is matched or beaten by one on the front
        if p not in front:
            assert any(q["flops"] <= p["flops"] and q["accuracy"] >= p["accuracy"] for q in front)
    assert sum(p == points[0] for p in front) <= 1


def test_pick_point():
    front = [{"flops": 10.0, "accuracy": 0.5}, {"flops": 20.0, "accuracy": 0.8}, {"flops": 30.0, "accuracy": 0.89},
             {"flops": 50.0, "accuracy": 0.9}]
    assert pick_point(front, max_loss=0.0) is front[3]
    assert pick_point(front, max_loss=0.015) is front[2]
    assert pick_point(front, max_loss=0.1, full_accuracy=0.9) is front[1]
    assert pick_point(front, max_loss=0.0, full_accuracy=0.99) is front[3]  # none qualifies: the best
    # budget: a fraction of the full model's FLOPs (50 here), read from each point's "saved"
    front = [{**p, "saved": 1 - p["flops"] / 50.0} for p in front]
    assert pick_point(front, budget=1.0) is front[3]
    assert pick_point(front, budget=0.6) is front[2]  # 30 flops allowed
    assert pick_point(front, budget=0.59) is front[1]
    assert pick_point(front, budget=0.1) is front[0]  # none fits: the cheapest
    for bad in ({}, {"max_loss": 0.1, "budget": 0.5}, {"budget": 1.5}, {"budget": 0.0}):
        with pytest.raises(ValueError):
            pick_point(front, **bad)
    with pytest.raises(ValueError):
        pick_point([], budget=0.5)


# -- records --------------------------------------------------------------------------------------
def test_records_round_trip_and_subset(tmp_path, hand_records):
    path = tmp_path / "records.safetensors"
    hand_records.save(path)
    back = Records.load(path)
    assert torch.equal(back.logits, hand_records.logits) and torch.equal(back.labels, hand_records.labels)
    assert all(torch.equal(a, b) for a, b in zip(back.features, hand_records.features))
    assert (back.class_names, back.exit_stages) == (["a", "b"], [0, 1, 2])
    sub = back.subset([3, 1])
    assert sub.num_samples == 2 and torch.equal(sub.logits[0], hand_records.logits[3])
    assert sub.features[2].shape == (2, 16)
    assert back.subset(torch.tensor([True, False, False, True])).num_samples == 2
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk"):
        Records.load(tmp_path / "junk.safetensors")


def test_records_reject_inconsistent_shapes():
    with pytest.raises(ValueError):
        Records(torch.zeros(4, 3, 2), [], torch.zeros(5, dtype=torch.long), ["a", "b"], [0, 1, 2])
    with pytest.raises(ValueError):
        Records(torch.zeros(4, 3, 2), [], torch.zeros(4, dtype=torch.long), ["a", "b"], [0, 1])


# -- a real model -----------------------------------------------------------------------------------
def test_record_outputs_agrees_with_staged_run():
    torch.manual_seed(0)
    model = MultiExitNet.attach(build_backbone("cifar_resnet_small", num_classes=3), class_names=["x", "y", "z"])
    model.eval()
    x, y = torch.randn(48, 3, 32, 32), torch.randint(0, 3, (48,))
    with torch.no_grad():  # an untrained model is unsure everywhere; temperatures spread its confidences
        raw = model.forward_all(x)
        model.temperature.copy_(torch.tensor([float(raw[0].std()) / 2, float(raw[1].std()) / 2, 1.0]))
    seen, cancel = [], CancelFlag()
    records = record_outputs(model, TensorDataset(x, y), batch_size=20, progress=seen.append, cancel=cancel)
    assert records.logits.shape == (48, 3, 3) and records.exit_stages == [0, 1, 2]
    assert [f.shape[1] for f in records.features] == [16, 32, 64]
    assert torch.equal(records.labels, y)
    assert not records.logits.is_inference() and not records.features[0].is_inference()  # usable for training
    assert {p.stage for p in seen} == {"recording exits"} and seen[-1].done == seen[-1].total == 48
    with torch.no_grad():
        ref = torch.stack(model.forward_all(x, calibrated=True), dim=1)
    torch.testing.assert_close(records.logits, ref, rtol=1e-4, atol=1e-5)

    # thresholds in the widest gap near each early exit's median confidence, so last-bit float
    # differences between batch sizes cannot flip a decision
    from engine.evaluate import _exit_confidence
    conf = _exit_confidence(records, "max_prob")
    thresholds = [_gap_threshold(conf[:, e]) for e in range(2)] + [1.0]
    policy = ThresholdPolicy(thresholds)
    ev = evaluate_policy(records, policy, _random_cost(3))
    assert ev["exit_counts"][0] > 0 and ev["exit_counts"][1] + ev["exit_counts"][2] > 0
    staged = model.run(x, policy)
    assert torch.equal(staged.exit_index, simulate(policy, records.logits, records.features))
    assert ev["accuracy"] == pytest.approx((staged.logits.argmax(-1) == y).double().mean().item())

    cancel.set()
    with pytest.raises(Cancelled):
        record_outputs(model, TensorDataset(x, y), batch_size=20, cancel=cancel)
    assert not model.training


class _PilImages(torch.utils.data.Dataset):
    """Like ImageFolderData without a transform: yields PIL images."""

    def __init__(self, n: int):
        self.transform = None
        self.images = [Image.fromarray(np.full((40, 40, 3), 20 * i, np.uint8)) for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        return (self.transform(img) if self.transform is not None else img), i % 2


def test_record_outputs_inputs():
    torch.manual_seed(0)
    model = MultiExitNet.attach(build_backbone("cifar_resnet_small", num_classes=2), class_names=["a", "b"])
    pil = _PilImages(5)
    records = record_outputs(model, pil, batch_size=2, with_features=False)
    assert records.logits.shape == (5, 3, 2) and records.features == [] and pil.transform is None
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6) % 2
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    a = record_outputs(model, batches)
    b = record_outputs(model, torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=3))
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(a.labels, y) and evaluate_policy(a, ThresholdPolicy.uniform(3, 0.9), _random_cost(3))
    with pytest.raises(ValueError, match="empty"):
        record_outputs(model, [])


def _gap_threshold(c: torch.Tensor) -> float:
    s = c.sort().values
    lo, hi = len(s) // 4, 3 * len(s) // 4
    gaps = s[lo + 1:hi] - s[lo:hi - 1]
    i = lo + int(gaps.argmax())
    assert gaps.max() > 1e-4
    return float((s[i] + s[i + 1]) / 2)


# -- report and plot ----------------------------------------------------------------------------------
def test_report_and_plot(tmp_path):
    records, cost = _random_records(), _random_cost()
    report = evaluation_report(records, cost, {"t=0.8": ThresholdPolicy.uniform(4, 0.8)}, default="t=0.8")
    assert report["full"]["accuracy"] == pytest.approx(accuracy_per_exit(records)[-1])
    assert report["full"]["saved"] == pytest.approx(0.0)
    assert report["front"] == operating_front(records, cost)
    json_path, png_path = tmp_path / "eval.json", tmp_path / "eval.png"
    save_report(report, json_path, png_path)
    back = json.loads(json_path.read_text())
    assert back["policies"]["t=0.8"]["accuracy"] == report["policies"]["t=0.8"]["accuracy"]
    img = cv2.imread(str(png_path))
    assert img is not None and img.shape == (600, 900, 3)
    packed = img.astype(np.uint32) @ np.array([1, 256, 65536], np.uint32)
    assert len(np.unique(packed)) > 20  # colours: something was drawn
    assert not list(tmp_path.glob("*.tmp"))


def test_plot_curves_edge_cases(tmp_path):
    path = tmp_path / "p.png"
    img = plot_curves([{"name": "one", "points": [(1.0, 1.0)], "style": "line", "colour": "#ff0000"},
                       {"name": "nan", "points": [(float("nan"), 2.0)], "style": "points"}],
                      x_label="GFLOPs", y_label="accuracy (%)", title="degenerate × data", path=path, size=(400, 300))
    assert img.shape == (300, 400, 3) and cv2.imread(str(path)).shape == (300, 400, 3)
    with pytest.raises(ValueError):
        plot_curves([{"name": "s", "points": [], "style": "dots"}], x_label="", y_label="", title="")


def test_plot_curves_draws_what_opencv_fonts_could_not(tmp_path):
    """×, ≤, µ and λ are drawn as such (the old OpenCV fonts printed "x", "<=", "u", "?")."""
    labels = {"x_label": "batch-1 µs", "y_label": "accuracy (%)", "title": "≤ 0.5 point"}
    series = [{"name": name, "points": [(1.0, 2.0), (2.0, 3.0)]} for name in ("λ = 2 × 10", "lambda = 2 x 10")]
    drawn = [plot_curves([s], **labels, size=(300, 200)) for s in series]
    assert not np.array_equal(*drawn)
    assert plot_curves(series, **labels, size=(300, 200)).shape == (200, 300, 3)


def _without_matplotlib(monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_without_matplotlib_a_plot_says_how_to_install_it_and_the_report_is_written(tmp_path, monkeypatch):
    report = evaluation_report(_random_records(), _random_cost(), {"t=0.8": ThresholdPolicy.uniform(4, 0.8)})
    assert plotting_problem() is None
    _without_matplotlib(monkeypatch)
    problem = plotting_problem()
    assert problem and "\n" not in problem and "pip install 'offramp[plot]'" in problem
    with pytest.raises(PlotUnavailable, match=r"pip install 'offramp\[plot\]'"):
        plot_curves([{"name": "s", "points": [(1.0, 1.0)]}], x_label="", y_label="", title="")
    with pytest.raises(PlotUnavailable):
        save_report(report, tmp_path / "eval.json", tmp_path / "eval.png")
    assert json.loads((tmp_path / "eval.json").read_text())["policies"] and not (tmp_path / "eval.png").exists()
    save_report(report, tmp_path / "only.json")  # no plot asked for: nothing needs matplotlib
    assert (tmp_path / "only.json").exists()


def test_without_matplotlib_evaluate_writes_its_report_then_says_how_to_plot(tmp_path, monkeypatch, capsys,
                                                                           synthetic_folder):
    from engine.bundle import Bundle, save_bundle
    from engine.cli import main
    from engine.cost import measure_costs
    from synth import build_tiny_model
    model, policy = build_tiny_model(), ThresholdPolicy.uniform(3, 0.8)
    path = save_bundle(Bundle(model=model, policies={"threshold": policy}, default_policy="threshold",
                              cost=measure_costs(model, policy), meta={"name": "tiny"}), tmp_path / "tiny.offramp")
    _without_matplotlib(monkeypatch)
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(path), "--data", str(synthetic_folder), "--json", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # the progress bar writes to stderr too
    assert last == "offramp evaluate: drawing the plot needs matplotlib, an optional extra: pip install 'offramp[plot]'"
    assert json.loads(out.read_text())["accuracy_per_exit"] and not out.with_suffix(".png").exists()


def test_nice_ticks_are_round():
    ticks, decimals = nice_ticks(12.0, 71.0)
    assert ticks[0] <= 12 and ticks[-1] >= 71 and all(t % 10 == 0 for t in ticks) and decimals == 0
    ticks, decimals = nice_ticks(0.999, 1.0)
    assert decimals == 4 and 4 <= len(ticks) <= 8


def test_loss_standard_error_is_the_paired_difference_s_standard_error():
    from engine.evaluate import loss_standard_error
    full = torch.tensor([1, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    picked = torch.tensor([1, 0, 1, 1, 1, 0, 1, 0], dtype=torch.bool)
    d = torch.tensor([0., 1, 0, 0, -1, 1, 0, 0], dtype=torch.float64)
    assert abs(loss_standard_error(picked, full) - (d.var() / 8).sqrt().item()) < 1e-12
    assert loss_standard_error(full, full) == 0.0  # never disagreeing: no doubt about the loss
    assert loss_standard_error(picked[:1], full[:1]) == 0.0


def test_pick_point_keeps_a_margin_for_the_size_of_the_fitting_data():
    """A point that looks within the target only by luck on few samples is not chosen: its measured
    loss plus 1.645 standard errors must fit (a one-sided 95 % bound)."""
    from engine.evaluate import pick_point
    front = [{"flops": 1.0, "accuracy": 0.896, "loss_se": 0.004},  # 0.4 point lost, ± 0.4
             {"flops": 2.0, "accuracy": 0.899, "loss_se": 0.001},  # 0.1 point lost, ± 0.1
             {"flops": 3.0, "accuracy": 0.900, "loss_se": 0.0}]
    assert pick_point(front, max_loss=0.005, full_accuracy=0.9)["flops"] == 2.0
    assert pick_point(front, max_loss=0.005, full_accuracy=0.9, margin_z=0)["flops"] == 1.0
    legacy = [{k: v for k, v in p.items() if k != "loss_se"} for p in front]  # fronts stored before the margin
    assert pick_point(legacy, max_loss=0.005, full_accuracy=0.9)["flops"] == 1.0


def test_every_front_point_carries_its_loss_standard_error():
    from engine.evaluate import evaluate_policy, full_model_point, full_model_policy, operating_front
    records, cost = _random_records(), _random_cost()
    front = operating_front(records, cost)
    assert all(p["loss_se"] >= 0 for p in front)
    assert full_model_point(records, cost)["loss_se"] == 0.0  # the full model against itself
    assert evaluate_policy(records, full_model_policy(records.num_exits), cost)["loss_se"] == 0.0
    assert any(p["loss_se"] > 0 for p in front[:-1])


def test_the_report_counts_each_policys_own_decision_flops(hand_records, hand_cost):
    """A bundle's cost table holds no decision FLOPs (its policies differ); the report prices each
    policy with its own, as `bench` and `Engine` do: a decision that costs 100 FLOPs at every early
    exit adds 100 for each early exit a sample's path decides at."""
    class Priced(ThresholdPolicy):
        def decision_flops(self):
            return [100.0] * (len(self.thresholds) - 1) + [0.0]

    plain, priced = ThresholdPolicy.uniform(3, 0.9), Priced.uniform(3, 0.9)
    report = evaluation_report(hand_records, hand_cost, {"plain": plain, "priced": priced})
    a, b = report["policies"]["plain"], report["policies"]["priced"]
    assert a["accuracy"] == b["accuracy"]
    # sample 0 leaves at exit 0 (one decision); samples 1-3 pass exits 0 and 1 (two each): 7 / 4 decisions
    assert b["mean_flops"] - a["mean_flops"] == pytest.approx(100.0 * 7 / 4)

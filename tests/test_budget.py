"""A compute budget as a fraction of the full model's FLOPs (`engine.budget`, `offramp search --budget`)
and latency percentiles from recorded per-image times (`offramp bench`, `RunningTotals`)."""
from __future__ import annotations

import json

import pytest
from synth import build_tiny_model

from engine.budget import budget_check, check_budget, cost_fraction, within_budget
from engine.bundle import Bundle, load_bundle, save_bundle
from engine.cli import main
from engine.cost import measure_costs
from engine.policies import ThresholdPolicy
from engine.totals import RunningTotals, percentiles_ms

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: more threads only wait on a shared machine

FULL = 100.0
# cheapest first; "saved" as the search writes it. Point 2 is no more accurate than point 1 but dearer
# (not a Pareto front: the choice must still prefer the cheaper of equals).
FRONT = [{"accuracy": 0.50, "flops": 30.0, "saved": 0.70}, {"accuracy": 0.80, "flops": 55.0, "saved": 0.45},
         {"accuracy": 0.80, "flops": 58.0, "saved": 0.42}, {"accuracy": 0.86, "flops": 60.0, "saved": 0.40},
         {"accuracy": 0.90, "flops": 100.0, "saved": 0.0}]


# -- choosing within a budget -------------------------------------------------------------------------
@pytest.mark.parametrize("budget, index", [(1.0, 4), (0.99, 3), (0.6, 3), (0.59, 1), (0.57, 1), (0.3, 0)])
def test_the_most_accurate_point_within_the_budget(budget, index):
    assert within_budget(FRONT, budget) == (index, True)
    assert within_budget(FRONT, budget, full_flops=FULL) == (index, True)  # FLOPs / full, the same here
    assert cost_fraction(FRONT[index]) <= budget + 1e-9


def test_no_point_fits_gives_the_cheapest_and_says_so():
    assert within_budget(FRONT, 0.29) == (0, False)
    assert within_budget(list(reversed(FRONT)), 0.1) == (4, False)  # the cheapest, wherever it is
    assert within_budget(FRONT, 0.5, full_flops=50.0) == (0, False)  # against another full model: 0.6 > 0.5


@pytest.mark.parametrize("bad", [0, 0.0, -0.2, 1.01, 2, float("nan"), float("inf"), "x", None])
def test_a_budget_outside_0_1_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="budget") as err:
        check_budget(bad)
    assert repr(bad) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError):
        within_budget(FRONT, bad)


def test_an_empty_front_is_refused():
    with pytest.raises(ValueError, match="empty"):
        within_budget([], 0.5)


def test_budget_check_reports_the_fraction_and_whether_it_fits():
    assert budget_check(0.9, 60.0, FULL, 0.6) == {"accuracy": 0.9, "flops": 60.0, "fraction": 0.6, "budget_met": True}
    assert budget_check(0.9, 61.0, FULL, 0.6)["budget_met"] is False
    assert budget_check(0.9, 61.0, FULL, None)["budget_met"] is None


# -- offramp search --budget on a tiny bundle -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bundle_path(tmp_path_factory):
    """cifar_resnet_small with random weights and exits after every stage: written in well under a second."""
    model = build_tiny_model()
    bundle = Bundle(model=model, policies={"threshold": ThresholdPolicy([0.9, 0.9, 1.0])}, default_policy="threshold",
                    cost=measure_costs(model), meta={"name": "tiny"})
    return save_bundle(bundle, tmp_path_factory.mktemp("budget") / "tiny.offramp")


def _search(bundle, folder, tmp_path, budget: str, capsys) -> tuple[dict, str, Bundle]:
    out, report = tmp_path / f"s{budget}.offramp", tmp_path / f"s{budget}.json"
    assert main(["search", str(bundle), "--data", str(folder), "--val-fraction", "0.5", "--budget", budget,
                 "--out", str(out), "--json", str(report)]) == 0
    return json.loads(report.read_text()), capsys.readouterr().out, load_bundle(out)


def test_search_picks_the_most_accurate_configuration_within_the_budget(tiny_bundle_path, synthetic_folder,
                                                                         tmp_path, capsys):
    rep, text, searched = _search(tiny_bundle_path, synthetic_folder, tmp_path, "0.6", capsys)
    front, full = rep["front"], rep["full_flops"]
    fitting = [i for i, p in enumerate(front) if p["flops"] <= 0.6 * full]
    assert fitting, "the cheapest exit of this model costs well under 60 %"
    best = max(fitting, key=lambda i: (front[i]["accuracy"], -front[i]["flops"]))
    assert rep["chosen"]["index"] == best == searched.meta["default_point"]
    assert searched.policy.thresholds == front[best]["policy"]["thresholds"]
    cal, test = rep["calibration"], rep["test"]
    assert rep["budget"] == 0.6 and rep["target"] == {"max_loss": None, "budget": 0.6}
    assert cal["budget_met"] is True and cal["fraction"] == pytest.approx(front[best]["flops"] / full)
    assert cal["fraction"] <= 0.6
    assert cal["accuracy"] == front[best]["accuracy"]
    # the honest check: the same configuration on the test split, which the choice never saw
    assert test["samples"] > 0 and test["samples"] + rep["calibration_samples"] == 60  # half the folder held out
    assert 0 < test["fraction"] <= 1.5
    assert test["budget_met"] == (test["fraction"] <= 0.6 + 1e-9)
    assert searched.meta["search"]["budget"] == {k: rep[k] for k in ("budget", "calibration", "test")}
    assert "calibration:" in text and "test:" in text and "≤ 60.0% of the full model's FLOPs" in text


def test_search_with_a_budget_nothing_fits_keeps_the_cheapest(tiny_bundle_path, synthetic_folder, tmp_path, capsys):
    rep, text, searched = _search(tiny_bundle_path, synthetic_folder, tmp_path, "0.05", capsys)
    assert min(p["flops"] for p in rep["front"]) > 0.05 * rep["full_flops"]  # the first stage alone costs more
    assert rep["chosen"]["index"] == 0 == searched.meta["default_point"]  # the cheapest configuration
    assert rep["calibration"]["budget_met"] is False and rep["calibration"]["fraction"] > 0.05
    assert rep["test"]["budget_met"] is False
    assert "no configuration fits a budget of 5.0%" in text and "budget_met false" in text


@pytest.mark.parametrize("value", ["0", "1.5", "-0.3", "nan"])
def test_search_refuses_a_budget_outside_0_1_in_one_line(value, capsys):
    with pytest.raises(SystemExit) as done:
        main(["search", "b.offramp", "--data", "d", "--budget", value])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and len(err.splitlines()) == 1 and "--budget" in err and value in err


# -- latency percentiles ------------------------------------------------------------------------------
def test_percentiles_come_from_the_recorded_times():
    times = [float(t) for t in range(1, 101)]  # 1 .. 100 ms
    p = percentiles_ms(times)
    assert p == {"p50_ms": pytest.approx(50.5), "p95_ms": pytest.approx(95.05), "p99_ms": pytest.approx(99.01)}
    assert percentiles_ms([]) == {"p50_ms": None, "p95_ms": None, "p99_ms": None}


def test_running_totals_percentiles_of_the_frames_shown():
    totals = RunningTotals(3, latency_frames=1000)
    for i, ms in enumerate([5.0, 1.0, 2.0, 3.0, 40.0]):
        totals.count(0, 3, 10.0, 30.0, ms, 20.0, now=i * 0.1)
    js = totals.to_json()
    assert js["latency_frames"] == 5 and js["p50_ms"] == 3.0 and js["p50_ms"] <= js["p95_ms"] <= js["p99_ms"] <= 40.0
    totals.count(0, 3, 10.0, 30.0, 4.0, 20.0, rerun=True)  # the last frame run again replaces its time
    assert list(totals.frame_ms) == [5.0, 1.0, 2.0, 3.0, 4.0] and totals.to_json()["p99_ms"] < 5.0
    assert RunningTotals(3).to_json()["p95_ms"] is None  # keeps no times unless asked (the engine's own)


def test_bench_json_and_table_carry_ordered_percentiles(tiny_bundle_path, synthetic_folder, tmp_path, capsys):
    report = tmp_path / "bench.json"
    assert main(["bench", str(tiny_bundle_path), "--data", str(synthetic_folder), "--val-fraction", "0.5",
                 "--learned", "bundle", "--timing-images", "6", "--overhead-repeats", "0",
                 "--json", str(report)]) == 0
    rep, text = json.loads(report.read_text()), capsys.readouterr().out
    t = rep["timing"]
    assert 0 < t["full_p50_ms"] <= t["full_p95_ms"] <= t["full_p99_ms"]
    timed = [p for m in rep["methods"].values() for p in m["points"] if "ms" in p]
    assert len(timed) >= 3
    for p in timed:
        assert 0 < p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"] and p["ms"] > 0
    full = rep["methods"]["full"]["at_loss"]["0.5"]
    assert "p50" in text and "p99" in text and f"{full['p99_ms']:.2f}" in text

"""DyCE configuration search: exact scoring of configurations (against `evaluate_policy`), the
vectorised per-exit options, one-pass and circular search against brute force on records small
enough to enumerate, fronts, choosing a point, the run-time table, and the search beating one
shared threshold when exits differ in calibration. Synthetic records only."""
import itertools
import math
import time

import pytest
import numpy as np
import torch

from engine.cost import CostTable
from engine.evaluate import evaluate_policy, full_model_policy, pick_point
from engine.policies import ThresholdPolicy
from engine.records import Records
from engine.search import (ConfigurationTable, _Tables, choose, circular, evaluate_configuration, one_pass,
                           search_front)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only wait for each other


def _pair(p: float, right: bool) -> list[float]:
    """Two-class logits with max-probability p; the label is class 0."""
    hi, lo = math.log(p), math.log(1.0 - p)
    return [hi, lo] if right else [lo, hi]


def _hand_records(rows) -> Records:
    """rows: per sample, per exit (max-probability, right?)."""
    logits = torch.tensor([[_pair(p, ok) for p, ok in row] for row in rows], dtype=torch.float32)
    n, e, _ = logits.shape
    return Records(logits, [], torch.zeros(n, dtype=torch.long), ["a", "b"], list(range(e)))


def _random_records(n=200, e=4, k=5, seed=0) -> Records:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, e, k, generator=g) * 2
    logits += torch.nn.functional.one_hot(labels, k)[:, None, :] * torch.linspace(0.5, 3.0, e)[None, :, None]
    return Records(logits, [], labels, list("abcdefghij")[:k], list(range(e)))


def _cost(e=4, latency=False) -> CostTable:
    ms = dict(stage_ms=[1.0 * (s + 1) for s in range(e)], exit_ms=[0.2] * e) if latency else {}
    return CostTable(list(range(e)), [10.0 * (s + 1) for s in range(e)], [2.0] * (e - 1) + [4.0],
                     policy_flops=[0.5] * e, **ms)


def _objective(records, cost, thresholds, lam) -> float:
    """The search objective, computed independently through evaluate_policy."""
    ev = evaluate_policy(records, ThresholdPolicy([*thresholds, 1.0]), cost)
    return ev["accuracy"] - lam * ev["mean_flops"] / cost.full_flops


CANDIDATES = [0.6, 0.75, 0.9]


def _brute_force(records, cost, lam, candidates=CANDIDATES):
    configs = itertools.product([None, *candidates], repeat=records.num_exits - 1)
    return max(((_objective(records, cost, th, lam), th) for th in configs), key=lambda vt: vt[0])


# -- exact scoring ------------------------------------------------------------------------------
@pytest.mark.parametrize("measure", ["max_prob", "entropy", "margin"])
def test_evaluate_configuration_equals_evaluate_policy(measure):
    records, cost = _random_records(seed=1), _cost(latency=True)
    configs = [[None, None, None, 1.0], [0.5, None, 0.3, 1.0], [None, 0.9, None, 1.0], [0.0, 0.0, 0.0, 1.0],
               [0.99, 0.7, 0.4, 0.2], [1.0, 1.0, 1.0, 1.0]]
    for th in configs:
        policy = ThresholdPolicy(th, measure)
        got, want = evaluate_configuration(records, cost, th, measure), evaluate_policy(records, policy, cost)
        assert got["accuracy"] == want["accuracy"] and got["flops"] == want["mean_flops"]
        assert got["saved"] == want["saved"] and got["ms"] == want["mean_ms"] and got["speedup"] == want["speedup"]
        assert evaluate_configuration(records, cost, policy) == got  # a policy brings its own measure


def test_every_option_of_an_exit_is_scored_exactly():
    """The vectorised options of one exit (inactive + every candidate threshold, the others
    fixed) agree with evaluate_policy of each resulting configuration."""
    records, cost = _random_records(n=150, seed=2), _cost()
    tables = _Tables(records, cost, "max_prob", candidates=12)
    for others in ([0.6, None, 0.8], [None, 0.7, None], [0.95, 0.5, 0.5]):
        for j in range(3):
            acc, flops = tables.options(others, j)
            for i, t in enumerate([None, *tables.cand[j].tolist()]):
                th = list(others)
                th[j] = t
                ev = evaluate_policy(records, ThresholdPolicy([*th, 1.0]), cost)
                assert acc[i] == pytest.approx(ev["accuracy"], abs=1e-12)
                assert flops[i] == pytest.approx(ev["mean_flops"], rel=1e-12)


def test_configuration_errors_name_the_problem():
    records, cost = _random_records(), _cost()
    with pytest.raises(ValueError, match="needs 4 thresholds"):
        evaluate_configuration(records, cost, [0.5, None])
    with pytest.raises(ValueError, match="measure 'bogus'"):
        one_pass(records, cost, 0.1, measure="bogus")
    with pytest.raises(ValueError, match="0..1"):
        circular(records, cost, 0.1, candidates=[0.5, 1.5])
    with pytest.raises(ValueError, match="3 exits"):
        search_front(records, _cost(3))
    with pytest.raises(ValueError, match="unknown search method"):
        search_front(records, cost, method="genetic")


# -- search against brute force -----------------------------------------------------------------
# Built so the best configuration is unique: exit 0 at 0.9 (0.75 would let two wrong samples
# out), exit 1 off (never sure, and its head costs), exit 2 at 0.75 (0.6 lets two wrong out).
SOLVABLE = ([((0.95, True), (0.55, False), (0.55, False), (0.6, True))] * 4
            + [((0.80, False), (0.55, False), (0.80, True), (0.6, True))] * 2
            + [((0.55, False), (0.55, False), (0.80, True), (0.6, True))] * 4
            + [((0.55, False), (0.55, False), (0.65, False), (0.6, True))] * 2)


@pytest.mark.parametrize("lam", [0.3, 0.5])
def test_search_finds_the_optimum_of_a_solvable_record(lam):
    records, cost = _hand_records(SOLVABLE), _cost()
    best, th = _brute_force(records, cost, lam)
    assert th == (0.9, None, 0.75)
    for search in (one_pass, circular):
        found = search(records, cost, lam, candidates=CANDIDATES)
        assert found.thresholds == [0.9, None, 0.75, 1.0]
        assert _objective(records, cost, found.thresholds[:-1], lam) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_circular_is_a_local_optimum_no_worse_than_one_pass(seed):
    """On random 12-sample records: brute force ≥ circular ≥ one-pass, and no single change at
    one exit (on/off or another candidate) improves the circular configuration."""
    records, cost = _random_records(n=12, k=3, seed=seed), _cost()
    for lam in (0.0, 0.2, 0.6, 1.5):
        best, _ = _brute_force(records, cost, lam)
        th_c = circular(records, cost, lam, candidates=CANDIDATES).thresholds[:-1]
        th_o = one_pass(records, cost, lam, candidates=CANDIDATES).thresholds[:-1]
        got = _objective(records, cost, th_c, lam)
        assert best + 1e-12 >= got >= _objective(records, cost, th_o, lam) - 1e-12
        for j, t in itertools.product(range(3), [None, *CANDIDATES]):
            changed = list(th_c)
            changed[j] = t
            assert _objective(records, cost, changed, lam) <= got + 1e-12


def test_circular_from_a_given_start_never_gets_worse():
    records, cost = _random_records(n=12, k=3, seed=5), _cost()
    start = ThresholdPolicy([0.6, 0.6, 0.6, 1.0])
    found = circular(records, cost, 0.4, start=start, candidates=CANDIDATES)
    assert _objective(records, cost, found.thresholds[:-1], 0.4) >= _objective(records, cost, [0.6] * 3, 0.4)


def test_lambda_moves_the_configuration_from_accurate_to_cheap():
    records, cost = _random_records(n=300, seed=3), _cost()
    dear, cheap = (evaluate_configuration(records, cost, circular(records, cost, lam)) for lam in (0.0, 5.0))
    assert dear["accuracy"] >= cheap["accuracy"] and dear["flops"] > cheap["flops"]
    # every sample leaves at the first exit when compute is all that counts
    assert cheap["flops"] == pytest.approx(cost.cumulative_flops()[0])


# -- fronts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,measure", [("circular", "max_prob"), ("one_pass", "max_prob"),
                                            ("shared", "max_prob"), ("circular", "entropy")])
def test_front_is_non_dominated_exact_and_holds_the_full_model(method, measure):
    records, cost = _random_records(n=300, seed=4), _cost(latency=True)
    front = search_front(records, cost, method=method, measure=measure)
    assert len(front) >= 2
    for a, b in zip(front, front[1:]):
        assert a["flops"] < b["flops"] and a["accuracy"] < b["accuracy"]
    full = evaluate_policy(records, full_model_policy(4, measure), cost)
    assert any(p["method"] == "full" and p["policy"] == full_model_policy(4, measure).to_json() for p in front) \
        or max(p["accuracy"] for p in front) > full["accuracy"]  # the full model is kept unless beaten
    for p in front:
        assert {"policy", "accuracy", "flops", "saved", "ms", "speedup", "method", "lambda"} <= set(p)
        policy = ThresholdPolicy.from_json(p["policy"], num_exits=4, num_classes=5)
        assert policy.measure == measure
        ev = evaluate_policy(records, policy, cost)
        assert (p["accuracy"], p["flops"], p["ms"]) == (ev["accuracy"], ev["mean_flops"], ev["mean_ms"])


def test_front_contains_the_full_model_point():
    # exits that are never right: nothing beats the full model, which must be the front's top
    rows = [((0.9, False), (0.9, False), (0.6, True))] * 6
    front = search_front(_hand_records(rows), _cost(3))
    assert front[-1]["method"] == "full" and front[-1]["accuracy"] == 1.0
    assert front[-1]["policy"] == full_model_policy(3).to_json()


def _calibration_records(n=1500, k=10, seed=0) -> Records:
    """Exits of rising accuracy and very different calibration: exit 0 overconfident, exit 1
    underconfident, exit 2 about right; one shared threshold cannot suit them all."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    hot = torch.nn.functional.one_hot(labels, k).float()
    exits = [(4.0, 0.8), (0.35, 2.5), (1.0, 3.0), (1.0, 3.5)]  # (logit scale, margin of the true class)
    logits = torch.stack([s * (torch.randn(n, k, generator=g) + m * hot) for s, m in exits], dim=1)
    return Records(logits, [], labels, [str(i) for i in range(k)], [0, 1, 2, 3])


def test_circular_front_beats_one_shared_threshold_when_calibration_differs():
    records, cost = _calibration_records(), _cost()
    shared = search_front(records, cost, method="shared")
    front = search_front(records, cost, method="circular")
    for p in shared:  # at matched cost, never less accurate
        assert max(q["accuracy"] for q in front if q["flops"] <= p["flops"]) >= p["accuracy"]
    # and the search itself (not the shared configurations it starts from) is strictly better somewhere
    own = [q for q in front if q["method"] == "circular"]
    assert any(all(not (p["flops"] <= q["flops"] and p["accuracy"] >= q["accuracy"]) for p in shared) for q in own)
    last = float((records.logits[:, -1].argmax(-1) == records.labels).double().mean())
    saved = {name: pick_point(f, max_loss=0.01, full_accuracy=last)["saved"]
             for name, f in (("shared", shared), ("circular", front))}
    assert saved["circular"] > saved["shared"] + 0.05, saved


def test_a_single_exit_has_one_configuration():
    rows = [((0.9, True),), ((0.7, False),)]
    records, cost = _hand_records(rows), CostTable([0], [10.0], [2.0])
    assert circular(records, cost, 0.5).thresholds == [1.0]
    front = search_front(records, cost)
    assert len(front) == 1 and front[0]["method"] == "full" and front[0]["accuracy"] == 0.5


# -- choosing and the run-time table ------------------------------------------------------------
FRONT = [{"policy": ThresholdPolicy([0.0, None, 1.0]).to_json(), "accuracy": 0.5, "flops": 10.0, "saved": 0.9},
         {"policy": ThresholdPolicy([0.8, None, 1.0]).to_json(), "accuracy": 0.8, "flops": 40.0, "saved": 0.6},
         {"policy": ThresholdPolicy([0.9, 0.9, 1.0]).to_json(), "accuracy": 0.9, "flops": 70.0, "saved": 0.3},
         {"policy": ThresholdPolicy([None, None, 1.0]).to_json(), "accuracy": 0.92, "flops": 100.0, "saved": 0.0}]


def test_choose_by_each_target():
    assert choose(FRONT, max_flops=69.0) is FRONT[1]
    assert choose(FRONT, max_flops=70.0) is FRONT[2]
    assert choose(FRONT, max_flops=1.0) is FRONT[0]  # nothing fits: the cheapest
    assert choose(FRONT, min_accuracy=0.85) is FRONT[2]
    assert choose(FRONT, min_accuracy=0.99) is FRONT[3]  # nothing reaches it: the most accurate
    # budget: a fraction of the full model's FLOPs (cost 1 − saved: 0.1, 0.4, 0.7, 1.0)
    assert choose(FRONT, budget=1.0) is FRONT[3] and choose(FRONT, budget=0.7) is FRONT[2]  # at the budget fits
    assert choose(FRONT, budget=0.5) is FRONT[1] and choose(FRONT, budget=0.05) is FRONT[0]  # none fits: cheapest
    assert choose(FRONT, budget=0.5, full_flops=50.0) is FRONT[0]  # 25 FLOPs: only the 10-FLOP point fits
    for bad in ({}, {"max_flops": 1.0, "budget": 0.5}):
        with pytest.raises(ValueError, match="exactly one target"):
            choose(FRONT, **bad)
    with pytest.raises(ValueError, match="budget 0"):
        choose(FRONT, budget=0.0)
    with pytest.raises(ValueError, match="empty"):
        choose([], budget=0.5)


def test_configuration_table_lookup_matches_pick_point():
    table = ConfigurationTable(FRONT)
    assert len(table) == 4 and all(isinstance(p, ThresholdPolicy) for p in table.policies)
    for i in range(1, 101):
        b = i / 100
        assert table.index_at_budget(b) == FRONT.index(pick_point(FRONT, budget=b)) == FRONT.index(choose(FRONT, budget=b))
        assert table.at_budget(b) is table.policies[table.index_at_budget(b)]  # a lookup, no new object
    assert table.at_budget(-1.0) is table[0] and table.at_budget(2.0) is table[3]
    assert table.at_budget(0.5).thresholds == [0.8, None, 1.0]
    assert table.within_flops(69.0) is table[1] and table.within_flops(0.0) is table[0]
    with pytest.raises(ValueError, match="threshold configurations"):
        ConfigurationTable([{**FRONT[0], "policy": {"kind": "oracle"}}])


def test_configuration_table_from_a_search_runs_the_same_numbers():
    records, cost = _random_records(n=300, seed=6), _cost()
    front = search_front(records, cost)
    table = ConfigurationTable.search(records, cost)
    assert [p.to_json() for p in table.policies] == [p["policy"] for p in front]
    for b in (0.05, 0.3, 0.7, 1.0):
        ev = evaluate_policy(records, table.at_budget(b), cost)
        assert ev["mean_flops"] == pick_point(front, budget=b)["flops"]
        assert ev["mean_flops"] <= b * cost.full_flops or table.index_at_budget(b) == 0


# -- speed --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_search_of_10000_samples_and_6_exits_takes_seconds():
    records, cost = _random_records(n=10_000, e=6, k=10, seed=7), _cost(6)
    start = time.perf_counter()
    front = search_front(records, cost)
    seconds = time.perf_counter() - start
    print(f"\nsearch_front(circular) on 10000 samples x 6 exits: {seconds:.2f} s, {len(front)} points")
    assert seconds < 60 and len(front) > 10



def test_circular_front_is_never_worse_than_the_one_pass_front():
    # the circular search may start from the previous λ's configuration instead of the one-pass one;
    # the one-pass configuration must still be a candidate, or the front loses to it at some costs
    for seed in range(4):
        records, cost = _random_records(n=400, seed=seed), _cost()
        one, front = search_front(records, cost, "one_pass"), search_front(records, cost, "circular")
        for p in one:
            assert max(q["accuracy"] for q in front if q["flops"] <= p["flops"]) >= p["accuracy"], (seed, p)


# -- cross-fitted front ---------------------------------------------------------------------------
def test_the_cross_fitted_front_scores_each_search_on_records_it_did_not_see():
    """A point's figures: each record decided by the configuration searched at that λ on the
    other folds (recomputed here by hand), averaged over the deals; its configuration: the search
    on all the records, with those in-sample figures kept beside."""
    from engine.evaluate import _correct
    from engine.train.dyce import crossfit_dyce_front
    from engine.train.sweep import fold_of
    from engine.policies import simulate
    records, cost = _random_records(n=300, seed=3), _cost(latency=True)
    lam = 0.1
    front = crossfit_dyce_front(records, cost, [lam], folds=3, repeats=2, seed=5)
    assert [p["method"] for p in front if p["method"] != "full"] == ["circular"]
    point = next(p for p in front if p["method"] == "circular")
    policy = circular(records, cost, lam)
    assert point["policy"] == policy.to_json() and point["lambdas"] == [lam]
    own = evaluate_policy(records, policy, cost)
    assert point["in_sample"] == pytest.approx({"accuracy": own["accuracy"], "flops": own["mean_flops"]})
    correct = _correct(records)
    right, flops = torch.zeros(300, dtype=torch.float64), torch.zeros(300, dtype=torch.float64)
    for deal in range(2):
        fold = fold_of(records.labels, 3, 5 + deal)
        for k in range(3):
            held = (fold == k).nonzero().squeeze(1)
            fitted = circular(records.subset((fold != k).nonzero().squeeze(1)), cost, lam)
            exits = simulate(fitted, records.logits[held])
            right[held] += correct[held, exits].double()
            flops[held] += torch.tensor(cost.cumulative_flops(fitted.active_exits(4)), dtype=torch.float64)[exits]
    assert point["accuracy"] == pytest.approx(right.mean().item() / 2)
    assert point["flops"] == pytest.approx(flops.mean().item() / 2)
    assert point["saved"] == pytest.approx(1 - point["flops"] / cost.full_flops)
    assert point["folds"] == 3 and point["repeats"] == 2 and 0 < point["loss_se"] < 0.1 and "ms" in point


def test_too_few_records_to_hold_out_give_the_in_sample_front():
    from engine.train.dyce import crossfit_dyce_front
    few, cost = _random_records(n=3, seed=0), _cost()
    assert crossfit_dyce_front(few, cost) == search_front(few, cost, "circular")


def test_charging_each_active_exit_switches_seldom_firing_ones_off():
    """An exit's graph call and decision cost time beyond its head's FLOPs on every frame that
    passes it; a search charged for that (`step_flops`) keeps fewer exits on, and its points still
    carry the FLOPs that run."""
    from engine.train.dyce import charged, crossfit_dyce_front
    records, cost = _random_records(n=400, seed=2, e=5), _cost(e=5)
    lambdas = [0.02, 0.05, 0.1, 0.2, 0.5]

    def active(front):
        searched = [p for p in front if p["method"] == "circular"]
        return sum(sum(t is not None for t in p["policy"]["thresholds"][:-1]) for p in searched) / len(searched)
    plain = crossfit_dyce_front(records, cost, lambdas, folds=2, repeats=1)
    dear = crossfit_dyce_front(records, cost, lambdas, folds=2, repeats=1, step_flops=cost.full_flops / 4)
    assert active(dear) < active(plain), (active(dear), active(plain))
    for p in dear:  # the FLOPs that run, not the charged ones
        if p["method"] == "circular":
            assert p["in_sample"]["flops"] == pytest.approx(evaluate_policy(
                records, ThresholdPolicy(p["policy"]["thresholds"], p["policy"]["measure"]), cost)["mean_flops"])
    table = charged(cost, 3.0)
    assert table.policy_flops == [3.5, 3.5, 3.5, 3.5, 0.5] and charged(cost, 0.0) is cost


def test_candidate_thresholds_sit_between_confidences_not_on_them():
    """A threshold equal to a recorded confidence is a knife's edge: the staged run computes that
    confidence another way and may land a rounding step below it. Each candidate lets the same
    samples pass as the confidence it stands for, and that confidence one float32 step lower too."""
    from engine.search import _candidates
    conf = torch.tensor([0.31, 0.5, 0.5, 0.77, 0.9, 0.95], dtype=torch.float32)
    got = _candidates(conf, None)
    distinct = sorted(set(conf.tolist()))
    assert len(got) == len(distinct)
    for t, c in zip(got, distinct):
        t32 = np.float32(t)
        assert t32 < np.float32(c) and np.nextafter(np.float32(c), np.float32(0)) >= t32
        assert [bool(x >= t32) for x in conf.numpy()] == [bool(x >= np.float32(c)) for x in conf.numpy()]

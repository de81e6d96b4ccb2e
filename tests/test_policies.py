import math

import pytest
import torch

from engine.policies import Evidence, OraclePolicy, ThresholdPolicy, confidence, policy_from_json, simulate


def test_confidence_measures_are_in_unit_range_and_ordered():
    sure = torch.tensor([[10.0, 0.0, 0.0]])
    unsure = torch.tensor([[1.0, 1.0, 1.0]])
    for m in ("max_prob", "entropy", "margin"):
        assert float(confidence(sure, m)) > float(confidence(unsure, m))
        assert 0.0 <= float(confidence(unsure, m)) <= 1.0
    assert math.isclose(float(confidence(unsure, "entropy")), 0.0, abs_tol=1e-6)
    assert math.isclose(float(confidence(unsure, "margin")), 0.0, abs_tol=1e-6)
    with pytest.raises(ValueError, match="measure 'bogus'"):
        confidence(sure, "bogus")


def test_threshold_policy_json_round_trip_and_validation():
    p = ThresholdPolicy([0.9, None, 0.5, None], "margin")
    q = policy_from_json(p.to_json(), num_exits=4, num_classes=3)
    assert q.thresholds == p.thresholds and q.measure == "margin"
    assert q.active_exits(4) == [True, False, True, True]
    with pytest.raises(ValueError, match="needs 5 thresholds"):
        policy_from_json(p.to_json(), num_exits=5, num_classes=3)
    with pytest.raises(ValueError, match="outside 0..1"):
        ThresholdPolicy([1.5, None])
    with pytest.raises(ValueError, match="unknown policy kind"):
        policy_from_json({"kind": "magic"}, num_exits=2, num_classes=2)


def test_simulate_on_known_records():
    # 3 exits, 2 classes: sample 0 is sure at exit 0, sample 1 at exit 1, sample 2 never.
    logits = torch.tensor([
        [[5.0, 0.0], [5.0, 0.0], [5.0, 0.0]],
        [[0.1, 0.0], [0.0, 5.0], [0.0, 5.0]],
        [[0.1, 0.0], [0.1, 0.0], [0.0, 0.1]],
    ])
    assert simulate(ThresholdPolicy([0.9, 0.9, None]), logits).tolist() == [0, 1, 2]
    assert simulate(ThresholdPolicy([None, 0.9, None]), logits).tolist() == [1, 1, 2]
    assert simulate(ThresholdPolicy([0.0, 0.0, None]), logits).tolist() == [0, 0, 0]
    oracle = OraclePolicy().with_targets(torch.tensor([1, 1, 0]))
    # sample 0 is never right -> last exit; sample 1 right at exit 1; sample 2 right at exit 0
    assert simulate(oracle, logits).tolist() == [2, 1, 0]


def test_oracle_needs_labels():
    ev = Evidence(0, 2, [torch.zeros(1, 2)], [0], torch.zeros(1, 4), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="labels"):
        OraclePolicy().decide(ev)

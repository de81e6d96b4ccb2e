"""The structure policy's novelty veto: an early exit may fire only for inputs near enough to a
class prototype there. Decisions agree on every path (batch, one frame, training computation,
prepared run), the veto is stored in the bundle, fitted on clean records, and the trainer keeps it
only where clean held-out data does not pay for it."""
from __future__ import annotations

import pytest
import torch

from engine.bundle import Bundle, load_bundle, save_bundle
from engine.cost import CostTable, measure_costs
from engine.policies import Evidence, ThresholdPolicy, policy_from_json, simulate
from engine.policies.structure import MEASURES, StructurePolicy
from engine.prepared import prepare
from engine.records import Records
from engine.train.structure import fit_veto, structure_exits, veto_exits, with_veto
from synth import build_tiny_model

COST = CostTable(exit_stages=[0, 1, 2], stage_flops=[1e6, 1e6, 1e6], exit_flops=[1e3, 1e3, 1e3])


def _records(n: int, seed: int, spread: float, k: int = 4, c: int = 8) -> Records:
    """3 exits, every exit confident and right; exit 0's features sit `spread` away from their
    class centre in a random direction (a larger spread: a shifted, atypical input)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    centres = 3.0 * torch.eye(k, c) + 1.0
    feats = [centres[y] + spread * torch.randn(n, c, generator=g), centres[y] + 0.1 * torch.randn(n, c, generator=g),
             centres[y] + 0.1 * torch.randn(n, c, generator=g)]
    logits = torch.zeros(n, 3, k)
    logits[torch.arange(n), :, y] = 3.0
    return Records(logits, feats, y, [f"c{i}" for i in range(k)], [0, 1, 2])


def _vetoed_policy(clean: Records, quantile: float = 0.5) -> StructurePolicy:
    policy = StructurePolicy.from_thresholds([0.5, 0.5, 1.0], "max_prob", [8, 8, 8], 4)  # every exit fires
    policy.set_prototypes(clean.features, clean.labels).eval()
    return fit_veto(policy, clean, quantile, exits=[0])


def test_veto_sends_atypical_inputs_deeper_and_every_path_agrees():
    clean, shifted = _records(400, 0, 0.3), _records(400, 1, 1.5)
    policy = _vetoed_policy(clean)
    assert policy.veto[0] is not None and policy.veto[1] is None and "novelty veto at exit 0" in policy.describe()
    on_clean = simulate(policy, clean.logits, clean.features)
    on_shifted = simulate(policy, shifted.logits, shifted.features)
    assert 0.4 < (on_clean == 0).float().mean() < 0.6  # the quantile: half the firing clean inputs keep exit 0
    assert (on_shifted == 0).float().mean() < 0.2  # atypical inputs go deeper
    assert set(on_shifted.tolist()) <= {0, 1}  # exit 1 has no veto: they leave there
    for records, exits in ((clean, on_clean), (shifted, on_shifted)):
        assert torch.equal(structure_exits(policy, records), exits)  # the training computation
        with torch.no_grad():  # one frame (numpy) decides as the batch does
            alone = [bool(policy.decide(Evidence(0, 3, [records.logits[i:i + 1, 0]], [0],
                                                 records.features[0][i:i + 1]))) for i in range(60)]
        assert alone == (exits[:60] == 0).tolist()


def test_veto_changes_no_flops_and_round_trips_through_json():
    policy = _vetoed_policy(_records(200, 0, 0.3))
    plain = StructurePolicy.from_thresholds([0.5, 0.5, 1.0], "max_prob", [8, 8, 8], 4)
    assert policy.flops_per_exit() == plain.flops_per_exit()  # it reads sim_top1, computed anyway
    d = policy.to_json()
    assert d["veto"] == policy.veto and "veto" not in plain.to_json()
    again = policy_from_json(d, num_exits=3, num_classes=4)
    assert again.veto == policy.veto and again.state_key()[:2] == policy.state_key()[:2]
    assert policy.state_key() != plain.state_key()
    with pytest.raises(ValueError, match="veto"):
        StructurePolicy([8, 8, 8], 4, veto=[0.1])
    with pytest.raises(ValueError, match="veto"):
        StructurePolicy([8, 8, 8], 4, veto=[float("nan"), None])
    with pytest.raises(ValueError, match="quantile"):
        fit_veto(plain, _records(20, 0, 0.3), 0.0)
    assert veto_exits(6) == [0, 1] and veto_exits(2) == [0] and veto_exits(1) == []


def _tiny_policy(model, x: torch.Tensor) -> tuple[StructurePolicy, Records]:
    with torch.no_grad():
        logits, feats = model.forward_all(x, with_features=True, calibrated=True)
    records = Records(torch.stack(logits, 1), feats, torch.arange(x.shape[0]) % model.num_classes,
                      model.class_names, model.exit_stages)
    policy = StructurePolicy.from_thresholds([0.0, 0.0, 1.0], "max_prob", [f.shape[1] for f in feats],
                                             model.num_classes)  # fires everywhere: only the veto decides
    policy.set_prototypes(feats, records.labels).eval()
    return fit_veto(policy, records, 0.5, exits=[0, 1]), records


def test_prepared_run_and_bundle_keep_the_veto(tmp_path):
    torch.manual_seed(0)
    model = build_tiny_model().eval()
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    policy, records = _tiny_policy(model, x)
    with torch.inference_mode():
        want = model.run(x, policy).exit_index
    assert torch.equal(want, simulate(policy, records.logits, records.features))
    assert len(set(want.tolist())) > 1  # the veto sent some images deeper
    form = prepare(model)
    with torch.inference_mode():  # batch 1: the policy's fast rows (StructureRows)
        got = torch.cat([form.run(x[i:i + 1], policy).exit_index for i in range(x.shape[0])])
    assert torch.equal(got, want)
    bundle = Bundle(model, {"structure": policy, "threshold": ThresholdPolicy.uniform(3, 0.9)}, "structure",
                    measure_costs(model, policy))
    again = load_bundle(save_bundle(bundle, tmp_path / "v.offramp")).policies["structure"]
    assert again.veto == policy.veto
    with torch.inference_mode():
        assert torch.equal(model.run(x, again).exit_index, want)


def test_with_veto_keeps_a_veto_only_where_clean_held_out_data_allows():
    fit, select = _records(300, 0, 0.3), _records(300, 1, 0.3)
    plain = StructurePolicy.from_thresholds([0.5, 0.5, 1.0], "max_prob", [8, 8, 8], 4)
    plain.set_prototypes(fit.features, fit.labels).eval()
    point = {"accuracy": 1.0, "flops": 1.0, "policy": plain.to_json()}
    reference = [{"accuracy": 1.0, "flops": 1.0e6}, {"accuracy": 1.0, "flops": 3.0e6}]
    # every exit is right here: the veto only adds FLOPs, so a limit of 0 keeps it (no accuracy lost) ...
    points, policies = with_veto([point], [plain], fit, select, COST, reference, exits=[0], limit=0.0)
    assert policies[0].veto[0] is not None and points[0]["veto"] == policies[0].veto
    assert points[0]["policy"] == policies[0].to_json() and points[0]["flops"] > 1e6
    # ... and a reference the vetoed point falls below by more than the limit keeps the plain one
    better = [{"accuracy": 1.0, "flops": 1.0e6}, {"accuracy": 1.5, "flops": 3.0e6}]
    points, policies = with_veto([point], [plain], fit, select, COST, better, exits=[0], limit=0.001)
    assert policies[0] is plain and points[0] is point
    assert MEASURES[0] == "sim_top1"  # the veto reads this column


def test_choose_veto_prefers_a_veto_when_shifted_inputs_fool_exit_0():
    from engine.shift import choose_veto
    clean, shifted = _records(300, 0, 0.3), _records(300, 1, 1.5)
    shifted.logits[:, 0] = shifted.logits[:, 0].roll(1, dims=1)  # exit 0 confidently wrong under shift
    policy = StructurePolicy.from_thresholds([0.5, 0.5, 1.0], "max_prob", [8, 8, 8], 4)
    policy.set_prototypes(clean.features, clean.labels).eval()
    rows = choose_veto(policy, clean, shifted, COST, quantiles=(0.5, 0.9), depths=(0.5, 1.0))
    assert [r["gap"] for r in rows] == sorted(r["gap"] for r in rows)
    plain = next(r for r in rows if r["quantile"] is None)
    assert rows[0]["exits"][:1] == [0] and rows[0]["gap"] < plain["gap"] - 0.2
    assert all(r["clean_gap"] <= plain["clean_gap"] + 0.001 for r in rows)

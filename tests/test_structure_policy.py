"""Category-structure policy network: measures on hand-made inputs, decisions equal to the training
computation, learning on records where structure predicts correctness, FLOPs, bundles, fronts."""
from __future__ import annotations

import math

import pytest
import torch

from engine.bundle import Bundle, load_bundle, save_bundle
from engine.cost import CostTable, measure_costs, measure_policy_flops, with_policy_flops
from engine.evaluate import evaluate_policy
from engine.policies import ThresholdPolicy, confidence, policy_from_json, simulate
from engine.policies.structure import MEASURES, StructurePolicy, compute_prototypes, structure_measures
from engine.progress import CancelFlag, Cancelled
from engine.records import Records
from engine.train.structure import (_surrogate, log_halting_distribution, structure_exits, structure_front,
                                    train_structure_policy)


COL = {name: i for i, name in enumerate(MEASURES)}
COST = CostTable(exit_stages=[0, 1, 2], stage_flops=[1e6, 1e6, 1e6], exit_flops=[1e3, 1e3, 1e3])


def structured_records(n: int, seed: int, k: int = 4, c: int = 8) -> tuple[Records, torch.Tensor]:
    """3 exits, k classes. Half the samples ("near") sit on their class prototype at exit 0 and
    exit 0 is right for them; the other half sit halfway between their class and another, and
    exit 0 names the other class, with the very same confidence. Exits 1 and 2 are always right.
    So only the category structure at exit 0 tells who may leave there. Returns (records, near)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    other = (y + torch.randint(1, k, (n,), generator=g)) % k
    near = torch.arange(n) % 2 == 0
    centres = 3.0 * torch.eye(k, c) + 1.0  # (k, c), positive like pooled ReLU features
    f0 = torch.where(near[:, None], centres[y], 0.5 * (centres[y] + centres[other]))
    f0 = f0 + 0.2 * torch.randn(n, c, generator=g)
    f1 = centres[y] + 0.2 * torch.randn(n, c, generator=g)
    f2 = centres[y] + 0.2 * torch.randn(n, c, generator=g)
    answer0 = torch.where(near, y, other)
    logits = torch.zeros(n, 3, k)
    logits[torch.arange(n), 0, answer0] = 2.0
    logits[torch.arange(n), 1, y] = 2.0
    logits[torch.arange(n), 2, y] = 3.0
    names = [f"c{i}" for i in range(k)]
    return Records(logits, [f0, f1, f2], y, names, [0, 1, 2]), near


def random_records(n: int, widths=(6, 10, 12), k: int = 5, seed: int = 0) -> Records:
    g = torch.Generator().manual_seed(seed)
    return Records(2 * torch.randn(n, len(widths), k, generator=g), [torch.rand(n, w, generator=g) for w in widths],
                   torch.randint(0, k, (n,), generator=g), [f"c{i}" for i in range(k)], list(range(len(widths))))


# -- measures -------------------------------------------------------------------------------------
def test_compute_prototypes_are_normalised_class_means():
    feats = [torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 3.0]])]
    labels = torch.tensor([0, 0, 1])
    (p,) = compute_prototypes(feats, labels, num_classes=3)
    assert torch.allclose(p[0], torch.tensor([1.0, 0.0])) and torch.allclose(p[1], torch.tensor([0.0, 1.0]))
    assert torch.equal(p[2], torch.zeros(2))  # no sample of class 2: a zero prototype
    (q,) = compute_prototypes(feats, labels, 2, centre=[torch.tensor([1.0, 1.0])])
    assert torch.allclose(q[0], torch.nn.functional.normalize(torch.tensor([2.0, -1.0]), dim=0))
    with pytest.raises(ValueError, match="shape"):
        compute_prototypes([torch.zeros(2, 2)], labels, 2)


def test_structure_measures_on_a_hand_made_case():
    prototypes = torch.eye(3)  # (K=3, C=3), unit rows
    features = torch.tensor([[2.0, 0.0, 0.0],  # exactly on prototype 0 (scaled)
                             [1.0, 0.9, 0.0]])  # between prototypes 0 and 1, nearer 0
    previous = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    current = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    m = structure_measures([previous, current], features, prototypes, proto_temperature=0.1)
    assert m.shape == (2, len(MEASURES))
    a, b = 1.0 / math.sqrt(1.81), 0.9 / math.sqrt(1.81)
    soft = [math.exp(10) / (math.exp(10) + 2), math.exp(10 * a) / (math.exp(10 * a) + math.exp(10 * b) + 1)]
    expect = {"sim_top1": [1.0, a], "sim_top2": [0.0, b], "sim_gap": [1.0, a - b], "separability": soft,
              "sim_margin": [1.0, a - b / 2], "agree_prototype": [1.0, 1.0],
              "agree_previous": [0.0, 1.0], "agree_last": [0.0, 1.0]}
    for name, want in expect.items():
        assert torch.allclose(m[:, COL[name]], torch.tensor(want), atol=1e-5), name
    for name in ("max_prob", "entropy", "margin"):
        assert torch.allclose(m[:, COL[name]], confidence(current, name)), name
    first = structure_measures([current], features, prototypes)  # the first exit: nothing to agree with
    assert torch.equal(first[:, COL["agree_previous"]], torch.zeros(2))


def test_a_feature_at_its_class_mean_has_similarity_one():
    records, _ = structured_records(200, seed=1)
    policy = StructurePolicy([8, 8, 8], 4).set_prototypes(records.features, records.labels)
    class_mean = records.features[0][records.labels == 2].mean(0, keepdim=True)
    _, m = policy.fixed_inputs(0, [records.logits[:1, 0]], class_mean)
    assert m[0, COL["sim_top1"]].item() == pytest.approx(1.0, abs=1e-5)
    prototypes = policy.buffers_of(0)[0]
    second = sorted((prototypes @ prototypes[2]).tolist())[-2]  # the nearest other class's prototype
    assert m[0, COL["sim_top2"]].item() == pytest.approx(second, abs=1e-5)
    assert m[0, COL["sim_gap"]].item() == pytest.approx(1.0 - second, abs=1e-5)


def test_halting_distribution():
    x = torch.tensor([[0.0, 0.0], [30.0, -0.85], [-30.0, -30.0]])  # h = [.5, .5], [1, .3], [0, 0]
    p = log_halting_distribution(x).exp()
    assert torch.allclose(p, torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), atol=1e-3)
    assert torch.allclose(p.sum(1), torch.ones(3))


def test_surrogate_gradient_points_where_the_objective_gradient_does():
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(64, 3, generator=g)).requires_grad_()
    target = torch.rand(64, 4, generator=g)
    (log_halting_distribution(x).exp() * target).sum(1).mean().backward()
    plain, x.grad = x.grad.clone(), None
    _surrogate(x, target).backward()
    nonzero = plain.abs() > 1e-7
    assert torch.equal(torch.sign(plain[nonzero]), torch.sign(x.grad[nonzero]))
    assert (x.grad.abs() >= plain.abs() - 1e-7).all()  # never weaker: saturation divided out


# -- decisions ------------------------------------------------------------------------------------
def test_decide_from_evidence_equals_the_training_computation():
    train, test = random_records(300, seed=0), random_records(200, seed=1)
    policy = train_structure_policy(train, COST, 0.3, epochs=5)
    h = policy.halting_probabilities(test.logits, test.features).detach()
    policy.tau = float(h[:, 0].sort().values[99:101].mean())  # half the samples leave at exit 0
    exits = simulate(policy, test.logits, test.features)  # decide() on the Evidence, as run() gives it
    assert torch.equal(exits, structure_exits(policy, test))
    assert 0 < (exits == 0).sum() < len(exits) and (exits == 1).any()


def test_learns_to_exit_the_near_samples_early_and_more_with_larger_lambda():
    train, _ = structured_records(300, seed=0)
    test, near = structured_records(600, seed=1)
    small = train_structure_policy(train, COST, 0.05, epochs=100, seed=0)
    ev = evaluate_policy(test, small, with_policy_flops(COST, small))
    exits = simulate(small, test.logits, test.features)
    assert ev["accuracy"] >= 0.98  # the last exit is always right: accuracy kept
    assert (exits[near] == 0).float().mean() >= 0.9  # near ones leave at exit 0 ...
    assert (exits[~near] == 1).float().mean() >= 0.9  # ... far ones at exit 1, where they are right
    large = train_structure_policy(train, COST, 5.0, epochs=100, seed=0)
    ev_large = evaluate_policy(test, large, with_policy_flops(COST, large))
    assert ev_large["saved"] > ev["saved"] + 0.05 and ev_large["accuracy"] < ev["accuracy"]


def test_training_is_deterministic_and_cancellable():
    records, _ = structured_records(200, seed=0)
    a = train_structure_policy(records, COST, 0.1, epochs=3, seed=7)
    b = train_structure_policy(records, COST, 0.1, epochs=3, seed=7)
    c = train_structure_policy(records, COST, 0.1, epochs=3, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    seen, flag = [], CancelFlag()

    def on_progress(p):
        seen.append(p)
        if p.done == 2:
            flag.set()

    with pytest.raises(Cancelled):
        train_structure_policy(records, COST, 0.1, epochs=50, progress=on_progress, cancel=flag)
    assert [p.done for p in seen] == [1, 2] and seen[0].stage == "training structure policy"
    with pytest.raises(ValueError, match="features"):
        train_structure_policy(Records(records.logits, [], records.labels, records.class_names, [0, 1, 2]), COST, 0.1)


# -- cost, JSON, bundles, fronts ------------------------------------------------------------------
def _tiny_records(model, n: int = 48, seed: int = 0) -> tuple[Records, torch.Tensor]:
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, feats = model.forward_all(x, with_features=True, calibrated=True)
    y = torch.arange(n) % model.num_classes
    return Records(torch.stack(logits, 1), feats, y, model.class_names, model.exit_stages), x


def test_analytic_flops_equal_the_measured_ones(tiny_model):
    widths = [tiny_model.backbone.taps[s].channels for s in tiny_model.exit_stages]
    policy = StructurePolicy(widths, tiny_model.num_classes, proj_dim=16, hidden=24)
    assert measure_policy_flops(policy, tiny_model) == policy.flops_per_exit()
    assert policy.flops_per_exit()[-1] == 0.0 and min(policy.flops_per_exit()[:-1]) > 0
    assert measure_costs(tiny_model, policy).policy_flops == policy.flops_per_exit()


def test_json_round_trip_and_validation():
    p = StructurePolicy([6, 10, 12], 5, proj_dim=8, hidden=16, tau=0.7, info={"lambda": 0.1})
    q = policy_from_json(p.to_json(), num_exits=3, num_classes=5)
    assert isinstance(q, StructurePolicy) and q.to_json() == p.to_json()
    with pytest.raises(ValueError, match="needs 4 feature widths"):
        policy_from_json(p.to_json(), num_exits=3 + 1, num_classes=5)
    with pytest.raises(ValueError, match="classes"):
        policy_from_json(p.to_json(), num_exits=3, num_classes=4)
    with pytest.raises(ValueError, match="tau"):
        p.tau = 1.5


def test_bundle_round_trip_keeps_decisions(tiny_model, tmp_path):
    records, x = _tiny_records(tiny_model)
    policy = train_structure_policy(records, COST, 0.2, epochs=5)
    h = policy.halting_probabilities(records.logits, records.features).detach()[:, 0].sort().values
    policy.tau = float(h[23:25].mean())  # half leave at exit 0
    before = tiny_model.run(x, policy).exit_index
    assert torch.equal(before, simulate(policy, records.logits, records.features))  # run() decides as training does
    cost = measure_costs(tiny_model, policy)
    bundle = Bundle(tiny_model, {"structure": policy, "threshold": ThresholdPolicy.uniform(3, 0.9)}, "structure", cost)
    loaded = load_bundle(save_bundle(bundle, tmp_path / "s.offramp"))
    again = loaded.policies["structure"]
    assert isinstance(again, StructurePolicy) and again.tau == policy.tau
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in policy.state_dict().items())
    assert torch.equal(loaded.model.run(x, again).exit_index, before)
    assert 0 < (before == 0).sum() < len(before)


def test_structure_front_points_are_evaluate_policy_with_policy_flops():
    train, _ = structured_records(300, seed=0)
    test, _ = structured_records(200, seed=1)
    points, policies = structure_front(train, test, COST, [0.05, 5.0], taus=(0.3, 0.7), epochs=20,
                                       return_policies=True)
    assert [(p["lambda"], p["tau"]) for p in points] == [(0.05, 0.3), (0.05, 0.7), (5.0, 0.3), (5.0, 0.7)]
    for point, policy in zip(points, policies):
        ev = evaluate_policy(test, policy, with_policy_flops(COST, policy))
        assert point["accuracy"] == ev["accuracy"] and point["flops"] == ev["mean_flops"]
        assert point["policy"] == policy.to_json() and policy.tau == point["tau"]
        without = evaluate_policy(test, policy, COST)["mean_flops"]
        assert point["flops"] > without  # the policy's own decisions are paid for


@pytest.mark.parametrize("proj_dim", [0, 4])
def test_one_frame_path_matches_the_batched_one(proj_dim):
    """The live case (batch 1, numpy) gives the same measures and decisions as a batch."""
    from engine.policies import Evidence
    from engine.policies.structure import structure_measures, structure_measures_one
    train, test = random_records(300, seed=0), random_records(100, seed=1)
    policy = train_structure_policy(train, COST, 0.3, epochs=5, proj_dim=proj_dim)
    for e in range(2):
        prototypes, centre, _ = policy.buffers_of(e)
        history = [test.logits[:, j] for j in range(e + 1)]
        batched = structure_measures(history, test.features[e], prototypes, centre=centre,
                                     proto_temperature=policy.proto_temperature)
        ones = torch.stack([torch.from_numpy(structure_measures_one(
            [h[i].numpy() for h in history], test.features[e][i].numpy(), prototypes.numpy(), centre.numpy(),
            policy.proto_temperature)) for i in range(100)])
        assert torch.allclose(batched, ones, atol=1e-5)
        h = policy.halting_probabilities(test.logits, test.features).detach()[:, e]
        policy.tau = float(h.median())
        with torch.no_grad():
            together = policy.decide(Evidence(e, 3, history, list(range(e + 1)), test.features[e]))
            alone = torch.cat([policy.decide(Evidence(e, 3, [x[i:i + 1] for x in history], list(range(e + 1)),
                                                      test.features[e][i:i + 1])) for i in range(100)])
        close = (h - policy.tau).abs() < 1e-5  # float32 rounding may tip a probability sitting on tau
        assert torch.equal(together[~close], alone[~close]) and 20 < int(alone.sum()) < 80


# -- a threshold is a special case ----------------------------------------------------------------
@pytest.mark.parametrize("measure", ["max_prob", "entropy", "margin"])
def test_from_thresholds_decides_as_the_threshold_policy(measure):
    records = random_records(400, seed=3)
    for thresholds in ([0.6, 0.4, 1.0], [None, 0.3, 1.0], [0.2, None, 1.0]):
        policy = StructurePolicy.from_thresholds(thresholds, measure, [6, 10, 12], 5)
        policy.set_prototypes(records.features, records.labels).eval()
        assert policy.info["origin"] == "threshold" and "fixed threshold" in policy.describe()
        got = simulate(policy, records.logits, records.features)
        want = simulate(ThresholdPolicy(thresholds, measure), records.logits)
        assert (got != want).sum() <= 1, measure  # equal but for a float rounding tie at most
    with pytest.raises(ValueError, match="measure"):
        StructurePolicy.from_thresholds([0.5, 0.5, 1.0], "sim_top1", [6, 10, 12], 5)


def test_training_from_a_threshold_keeps_it_unless_an_epoch_beats_it_on_held_out_data():
    from engine.train.structure import threshold_start
    records, _ = structured_records(400, seed=5)
    start = threshold_start(records, COST, 0.05)
    assert start.info["origin"] == "threshold"
    # lr 0: no epoch changes anything, so the start (epoch 0) is kept
    kept = train_structure_policy(records, COST, 0.05, init=start, epochs=3, lr=0.0)
    assert kept.info["best_epoch"] == 0 and kept.info["init"] == "threshold"
    start.set_prototypes(records.features, records.labels)
    assert torch.equal(structure_exits(kept, records), structure_exits(start.eval(), records))
    # here the structure at exit 0 tells who may leave, which no threshold can: training improves on it
    moved = train_structure_policy(records, COST, 0.05, init=start, epochs=40)
    objective = {name: evaluate_policy(records, p, COST) for name, p in (("start", start), ("moved", moved))}
    assert moved.info["best_epoch"] > 0
    assert objective["moved"]["accuracy"] - 0.05 * objective["moved"]["mean_flops"] / COST.full_flops > \
        objective["start"]["accuracy"] - 0.05 * objective["start"]["mean_flops"] / COST.full_flops


def test_the_trainer_keeps_fixed_thresholds_where_training_does_not_clearly_beat_them():
    from engine.train.registry import get_trainer
    records, _ = structured_records(600, seed=7)
    trainer = get_trainer("structure")
    points, policies = trainer.front(records, COST, lambdas=[0.05, 0.3], epochs=5)
    assert [p["flops"] for p in points] == sorted(p["flops"] for p in points)
    assert [p["policy"] for p in points] == [q.to_json() for q in policies]
    assert all(isinstance(q, StructurePolicy) for q in policies)
    origins = {p["origin"] for p in points}
    assert "threshold" in origins and origins <= {"threshold", "learned"}
    _, select = trainer.split(records)
    for p, q in zip(points, policies):  # every point is its policy's score on the part it was chosen on
        ev = evaluate_policy(select, q, with_policy_flops(COST, q))
        assert ev["accuracy"] == pytest.approx(p["accuracy"]) and ev["mean_flops"] == pytest.approx(p["flops"])

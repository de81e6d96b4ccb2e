"""engine.prepared: the inference form gives the plain model's answers (same exit, logits within
1e-5) for every kind of policy at batch 1 and batch > 1, and the Engine keeps it in step with the
model's weights and the thresholds."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from engine.backbones import build_backbone
from engine.bundle import Bundle
from engine.cost import measure_costs
from engine.model import MultiExitNet
from engine.policies import BolukbasiPolicy, Policy, StructurePolicy, ThresholdPolicy, register_policy
from engine.policies.bolukbasi import evidence_features, evidence_row
from engine.policies.structure import structure_measures, structure_measures_row
from engine.prepared import PreparedModel, prepare
from engine.runtime import Engine
from qt_helpers import tiny_bundle
from synth import build_tiny_model

TOLERANCE = 1e-5


@register_policy
class _LastBelowZero(Policy):
    """A policy the prepared form has no shortcut for: exits where the exit's first logit < 0."""

    kind = "test_prepared_first_logit"

    def decide(self, evidence):
        return evidence.current[:, 0] < 0

    @classmethod
    def from_json(cls, d, *, num_exits, num_classes):
        return cls()


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images of varied contrast, so that confident and unsure exits both occur."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g) * torch.linspace(0.2, 4.0, n).view(n, 1, 1, 1)


def _learned(model: MultiExitNet, images: torch.Tensor, seed: int = 0) -> dict[str, Policy]:
    """Untrained Bolukbasi and structure policies whose random decisions fire at some exits."""
    torch.manual_seed(seed)
    n, k = model.num_exits, model.num_classes
    bolukbasi = BolukbasiPolicy(n, k, top_k=3)
    with torch.no_grad():
        logits, feats = model.forward_all(images, with_features=True, calibrated=True)
        structure = StructurePolicy([f.shape[1] for f in feats], k, proj_dim=4, hidden=8)
        structure.set_prototypes(feats, torch.arange(images.shape[0]) % k)
        sparse = copy.deepcopy(structure)  # hidden units with output weight 0: the fast rows leave them out
        sparse.trunk[2].weight[0, ::2] = 0.0
        for policy in (structure, sparse):
            h = policy.halting_probabilities(torch.stack(logits, 1), feats)[:, 0].sort().values
            m = h.shape[0] // 2
            policy.tau = float((h[m - 1] + h[m]) / 2)  # about half the images halt at exit 0
        # a threshold on the margin at each early exit's median, as a structure network (one unit, one
        # measure read), with a novelty veto at exit 0 at its median atypicality (the prototype measures)
        stacked = torch.stack(logits, 1)
        top = torch.softmax(stacked, -1).topk(2, -1).values
        margins = _between_middle(top[..., 0] - top[..., 1]).tolist()
        from_threshold = StructurePolicy.from_thresholds(margins, "margin", [f.shape[1] for f in feats], k)
        from_threshold.set_prototypes(feats, torch.arange(images.shape[0]) % k)
        atypical = 1.0 - from_threshold.fixed_inputs(0, [logits[0]], feats[0])[1][:, 0]
        from_threshold.veto = [float(_between_middle(atypical))] + [None] * (n - 2)
    with_hidden = BolukbasiPolicy(n, k, hidden=4, offset=0.1)
    return {"bolukbasi": bolukbasi.eval(), "bolukbasi_mlp": with_hidden.eval(), "structure": structure.eval(),
            "structure_sparse": sparse.eval(), "structure_from_threshold": from_threshold.eval()}


def _between_middle(values: torch.Tensor) -> torch.Tensor:
    """Per column, halfway between the two middle values: no sample sits on it."""
    c, m = values.sort(dim=0).values, values.shape[0] // 2
    return (c[m - 1] + c[m]) / 2


def _policies(model: MultiExitNet, images: torch.Tensor) -> dict[str, Policy]:
    n = model.num_exits
    with torch.no_grad():  # thresholds at each exit's median confidence: about half the images leave there
        conf = torch.softmax(torch.stack(model.forward_all(images, calibrated=True), 1), -1).amax(-1)
    middle = _between_middle(conf).tolist()  # between two images: no image sits on a threshold
    return {"max_prob": ThresholdPolicy(middle),
            "entropy": ThresholdPolicy([0.05] * (n - 1) + [None], "entropy"),
            "margin": ThresholdPolicy([None] + [0.1] * (n - 1), "margin"),
            "last only": ThresholdPolicy([None] * (n - 1) + [1.0]),
            "other": _LastBelowZero(), **_learned(model, images)}


def _assert_same(model: MultiExitNet, form: PreparedModel, policy: Policy, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        want, got = model.run(x, policy), form.run(x, policy)
    assert torch.equal(got.exit_index, want.exit_index)
    assert torch.equal(got.ran, want.ran) and torch.equal(got.stages_run, want.stages_run)
    assert torch.allclose(got.logits, want.logits, rtol=0, atol=TOLERANCE)
    assert torch.equal(torch.isnan(got.exit_logits), torch.isnan(want.exit_logits))
    ran = want.ran
    assert torch.allclose(got.exit_logits[ran], want.exit_logits[ran], rtol=0, atol=TOLERANCE)
    return want.exit_index


@pytest.mark.parametrize("head", ["linear", "conv", "deep"])
def test_tiny_model_answers_as_the_plain_one_for_every_policy(head):
    model = build_tiny_model(head)
    model.temperature.copy_(torch.tensor([1.3, 0.8, 1.0]))
    form = prepare(model)
    assert form.input_shape == (1, 3, 32, 32) and "TorchScript" in form.runtime
    images = _images(24)
    for name, policy in _policies(model, images).items():
        exits = [int(_assert_same(model, form, policy, images[i:i + 1])[0]) for i in range(images.shape[0])]
        _assert_same(model, form, policy, images)  # batch > 1: the folded modules
        if name in ("max_prob", "bolukbasi", "structure", "structure_sparse", "structure_from_threshold"):
            assert len(set(exits)) > 1, f"{name}: every image left at one exit; the test shows nothing"


def test_tiny_bundle_policies():
    bundle = tiny_bundle()
    form = prepare(bundle.model)
    images = _images(8)
    for policy in bundle.policies.values():
        for i in range(images.shape[0]):
            _assert_same(bundle.model, form, policy, images[i:i + 1])
        _assert_same(bundle.model, form, policy, images)


def test_default_architecture_with_random_weights():
    torch.manual_seed(0)
    model = MultiExitNet.attach(build_backbone("cifar_resnet20"), class_names=[f"c{i}" for i in range(10)]).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding them matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.temperature.uniform_(0.7, 1.3)
    form = prepare(model)
    images = _images(16, seed=1)
    for policy in _policies(model, images).values():
        for i in range(images.shape[0]):
            _assert_same(model, form, policy, images[i:i + 1])
        _assert_same(model, form, policy, images)


def test_other_sizes_and_the_cut_model():
    model = build_tiny_model()
    form = prepare(model)
    policy = ThresholdPolicy([0.4, 0.4, 1.0])
    _assert_same(model, form, policy, _images(1, size=40))  # another size: the folded modules
    x = _images(3)
    with torch.inference_mode():
        full = model.forward_all(x, calibrated=True)
        for e in range(model.num_exits):
            assert torch.allclose(form.run_to(x[:1], e), full[e][:1], atol=TOLERANCE)
            assert torch.allclose(form.run_to(x, e), full[e], atol=TOLERANCE)
        logits, tap = form.run_to(x[:1], with_tap=True)
        assert torch.allclose(logits, full[-1][:1], atol=TOLERANCE) and tap.shape[0] == 1


def test_row_functions_match_the_batched_evidence():
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(6, 7, generator=g) * 3 for _ in range(3)]
    feats = torch.randn(6, 5, generator=g)
    protos = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=1)
    want = evidence_features(logits, 4)
    want_m = structure_measures(logits, feats, protos, proto_temperature=0.2)
    for i in range(6):
        classes, previous = [], None
        for e in range(3):
            f, previous, cls = evidence_row(logits[e][i].tolist(), 4, classes, previous)
            classes.append(cls)
        assert np.allclose(f, want[i].numpy(), atol=1e-5)
        sims = (torch.nn.functional.normalize(feats[i:i + 1], dim=1) @ protos.T)[0].tolist()
        answers = [int(l[i].argmax()) for l in logits[:-1]]
        m, answer = structure_measures_row(logits[-1][i].tolist(), sims, answers, 0.2)
        assert answer == int(logits[-1][i].argmax())
        assert np.allclose(m, want_m[i].numpy(), atol=1e-5)


def test_weights_changed_in_place_are_noticed():
    model = build_tiny_model()
    form = prepare(model)
    assert form.is_current()
    with torch.no_grad():
        model.exits[0].post.weight.mul_(2.0)
    assert not form.is_current()
    x = _images(1)
    policy = ThresholdPolicy([0.4, 0.4, 1.0])
    _assert_same(model, prepare(model), policy, x)


def test_a_learned_policy_edited_in_place_or_given_new_layers_gets_a_new_plan():
    """The plan cache keys a learned policy on its tensors (listed again only after a module
    registered one): an in-place edit, a replaced layer and a copy all decide as the policy does."""
    model = build_tiny_model()
    x = _images(8)
    policy = _learned(model, x)["bolukbasi"]

    def _each(model, form, policy, x):  # one image at a time: the prepared plan's path
        return [int(_assert_same(model, form, policy, x[i:i + 1])[0]) for i in range(x.shape[0])]
    form = prepare(model)
    _each(model, form, policy, x)
    first = form.plan(policy)
    assert form.plan(policy) is first  # unchanged: found again
    with torch.no_grad():
        for net in policy.classifiers:
            net.bias.add_(50.0)  # in place: every image leaves at exit 0
    assert form.plan(policy) is not first
    assert _each(model, form, policy, x) == [0] * x.shape[0]
    edited = form.plan(policy)
    fresh = torch.nn.Linear(policy.width, 1)
    with torch.no_grad():
        fresh.weight.zero_()
        fresh.bias.fill_(-50.0)  # never fires at exit 0
    policy.classifiers[0] = fresh
    assert form.plan(policy) is not edited
    assert 0 not in _each(model, form, policy, x)
    twin = copy.deepcopy(policy)
    with torch.no_grad():
        twin.classifiers[0].bias.fill_(50.0)
    assert _each(model, form, twin, x) == [0] * x.shape[0]
    assert 0 not in _each(model, form, policy, x)


def test_preparing_in_several_threads_leaves_the_others_running():
    """Making a prepared form must not disturb modules other threads run meanwhile (torch.fx's
    tracer, which folding once used, swaps nn.Module.__call__ for the whole process: seen as an
    abort when two app workers prepared at once)."""
    import threading
    failures: list[BaseException] = []
    x = _images(4)

    def work() -> None:
        try:
            for _ in range(12):
                model = build_tiny_model()
                form = prepare(model)
                with torch.inference_mode():
                    model.run(x, ThresholdPolicy([0.5, 0.5, 1.0]))  # eager modules, as training and evaluation run
                    form.run(x[:1], ThresholdPolicy([0.5, 0.5, 1.0]))
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            failures.append(err)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]


def test_batchnorm_is_folded_only_where_nothing_else_reads_the_convolution():
    """A convolution whose output a BatchNorm and a skip both read keeps its BatchNorm; the folded
    copy gives the module's output; a module that does not trace is kept whole."""
    from engine.prepared import fold_batchnorm

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3)
            self.conv2, self.bn2 = torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn2(self.conv2(self.bn(y) + y))

    module = Shared().eval()
    with torch.no_grad():
        for bn in (module.bn, module.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    folded = fold_batchnorm(module, (x,))
    assert isinstance(folded.bn, torch.nn.BatchNorm2d) and isinstance(folded.bn2, torch.nn.Identity)
    with torch.no_grad():
        assert torch.allclose(folded(x), module(x), atol=1e-5)
    assert isinstance(fold_batchnorm(module).bn2, torch.nn.BatchNorm2d)  # no example: a plain copy


# -- the engine ---------------------------------------------------------------------------------------
def _engine_bundle() -> Bundle:
    model = build_tiny_model()
    policies = {"threshold": ThresholdPolicy([0.5, 0.5, 1.0]), **_learned(model, _images(12))}
    return Bundle(model, policies, "threshold", measure_costs(model, policies["threshold"]), {})


def _probe(engine: Engine, x: torch.Tensor):
    results = [engine.infer(x[i:i + 1]) for i in range(x.shape[0])]
    return [r.exit_index for r in results], [r.exits[-1].top_k for r in results]


def test_engine_runs_the_prepared_form_and_a_threshold_edit_reuses_it():
    bundle = _engine_bundle()
    engine = Engine(bundle, device="cpu", latency_repeats=2)
    form = engine._prepared
    assert isinstance(form, PreparedModel) and engine.runtime == form.runtime
    x = _images(10)
    result = engine.infer(x[:1])
    assert result.runtime == engine.runtime and "TorchScript" in result.runtime
    for thresholds in ([0.0, None, 1.0], [None, 0.0, 1.0], [None, None, 1.0], [0.45, 0.4, 1.0]):
        engine.set_thresholds(thresholds)
        policy = ThresholdPolicy(thresholds)
        with torch.inference_mode():
            want = [int(bundle.model.run(x[i:i + 1], policy).exit_index[0]) for i in range(x.shape[0])]
        assert _probe(engine, x)[0] == want
    assert engine._prepared is form  # thresholds are read on the host: nothing was made again
    for name in ("bolukbasi", "structure"):
        engine.set_policy(name)
        with torch.inference_mode():
            want = [int(bundle.model.run(x[i:i + 1], bundle.policies[name]).exit_index[0])
                    for i in range(x.shape[0])]
        assert _probe(engine, x)[0] == want


def test_engine_follows_retrained_weights():
    bundle = _engine_bundle()
    engine = Engine(bundle, device="cpu", latency_repeats=2)
    engine.set_thresholds([None, None, 1.0])
    x = _images(6)
    before = _probe(engine, x)[1]
    retrained = copy.deepcopy(bundle)  # a retrain makes a new bundle: a new engine prepares it
    with torch.no_grad():
        retrained.model.exits[-1].post[-1].weight.neg_()
    fresh = Engine(retrained, device="cpu", latency_repeats=2)
    fresh.set_thresholds([None, None, 1.0])
    assert _probe(fresh, x)[1] != before
    with torch.no_grad():  # weights changed in place under a running engine
        bundle.model.exits[-1].post[-1].weight.neg_()
    engine.model_changed()
    after = _probe(engine, x)[1]
    assert after == _probe(fresh, x)[1] and after != before
    with torch.no_grad():  # changed again: the next threshold edit notices it
        bundle.model.exits[-1].post[-1].weight.neg_()
    engine.set_thresholds([None, None, 1.0])
    assert _probe(engine, x)[1] == before


def test_exit_overhead_in_blocks_times_every_variant_and_refuses_a_bad_block():
    """`engine.speed.exit_overhead` with `block`: the same per-exit figures, each variant run in
    blocks (one policy frame after frame), and a block below 1 refused in one sentence."""
    from engine.speed import exit_overhead
    model = build_tiny_model()
    form = prepare(model)
    cost = measure_costs(model, ThresholdPolicy([0.5, 0.5, 1.0]))
    x = _images(4)
    policy = ThresholdPolicy([0.5, 0.5, 1.0])
    o = exit_overhead(form, policy, x, cost, repeats=12, block=4)
    assert o["block"] == 4 and len(o["per_exit_us"]) == model.num_exits - 1
    assert all(np.isfinite(o["per_exit_us"])) and o["full_ms"] > 0
    with pytest.raises(ValueError, match="block must be"):
        exit_overhead(form, policy, x, cost, repeats=12, block=0)


def test_structure_rows_compute_only_what_the_decision_reads():
    """A structure network made from a threshold reads one hidden unit and one measure: its fast
    rows ask the graph for that unit's product alone, and for the prototype products only at the
    exit with a novelty veto; a dense network asks for everything. Answers: the tests above."""
    model = build_tiny_model()
    learned = _learned(model, _images(24))
    k, spatial = model.num_classes, [16, 16, 16]
    rows = learned["structure_from_threshold"].row_decider(k, spatial)
    widths = learned["structure_from_threshold"].feature_widths
    vetoed, plain = rows.columns(0), rows.columns(1)
    assert plain[0].shape == (1, widths[1]) and plain[2] is None  # the one unit, no prototypes
    assert vetoed[0].shape == (k + 1 + widths[0], widths[0])  # prototypes, the unit, the sum itself
    dense = learned["structure"].row_decider(k, spatial)
    assert dense.columns(1)[0].shape == (k + 8 + widths[1], widths[1])
    sparse = learned["structure_sparse"].row_decider(k, spatial)
    assert sparse.columns(1)[0].shape == (k + 4 + widths[1], widths[1])

"""Network selection cascade: a small and a larger random CIFAR network on synthetic images, a
Bolukbasi selection policy between them, and proof that the large one really is skipped."""
from __future__ import annotations

import pytest
import torch
from synth import SYNTH_CLASSES

from engine.backbones import build_backbone
from engine.cascade import Cascade, evaluate_cascade, record_cascade
from engine.cost import measure_costs
from engine.model import MultiExitNet
from engine.policies import BolukbasiPolicy, simulate
from engine.train.bolukbasi import records_evidence, train_bolukbasi


def _net(name: str, seed: int) -> MultiExitNet:
    torch.manual_seed(seed)
    backbone = build_backbone(name, num_classes=len(SYNTH_CLASSES))
    return MultiExitNet.attach(backbone, class_names=list(SYNTH_CLASSES)).eval()


@pytest.fixture
def cascade() -> Cascade:
    return Cascade([_net("cifar_resnet_small", 0), _net("cifar_resnet20", 1)])


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 32, 32, generator=g)
    return x, torch.randint(0, len(SYNTH_CLASSES), (40,), generator=g)


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = []
    module.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls


def test_run_skips_the_large_model_when_the_policy_exits(cascade, batch):
    x, _ = batch
    calls = _count_calls(cascade.models[1].backbone.stages[0])
    out = cascade.run(x, BolukbasiPolicy(2, len(SYNTH_CLASSES), offset=1e6))  # always exits after model 0
    assert calls == [] and out.model_calls == [40, 0]
    assert out.exit_index.tolist() == [0] * 40 and not out.ran[:, 1].any()
    assert torch.isnan(out.model_logits[:, 1]).all() and torch.equal(out.logits, out.model_logits[:, 0])
    out = cascade.run(x, BolukbasiPolicy(2, len(SYNTH_CLASSES), offset=-1e6))  # never exits early
    assert calls == [40] and out.model_calls == [40, 40] and out.exit_index.tolist() == [1] * 40


def test_records_and_run_agree_and_evaluation_reports_speedup(cascade, batch):
    x, y = batch
    records = record_cascade(cascade, [(x[:24], y[:24]), (x[24:], y[24:])])
    assert records.logits.shape == (40, 2, len(SYNTH_CLASSES)) and records.exit_stages == [0, 1]
    assert [f.shape[1] for f in records.features] == [64, 64]
    cost = cascade.measure_cost()
    small, large = (measure_costs(m).full_flops for m in cascade.models)
    assert cost.exit_flops == [small, large] and cost.full_flops == large and small < large

    policy = train_bolukbasi(records, cost, 0.1, epochs=30)
    scores = policy.classifiers[0](records_evidence(records, 0, policy.top_k)).squeeze(-1).detach()
    policy.offset = -float(scores.median())  # about half stop after the small model, whatever it learned
    cascade.policy = policy
    calls = _count_calls(cascade.models[1].backbone.stages[0])
    out = cascade.run(x)
    assert torch.equal(out.exit_index, simulate(policy, records.logits))
    n_large = int((out.exit_index == 1).sum())
    assert 0 < n_large < 40 and calls == [n_large] and out.model_calls == [40, n_large]
    assert torch.allclose(out.model_logits[:, 0], records.logits[:, 0], atol=1e-5)
    ran = out.exit_index == 1
    assert torch.allclose(out.model_logits[ran, 1], records.logits[ran, 1], atol=1e-5)

    measured = cascade.measure_cost(policy)
    assert measured.policy_flops == policy.decision_flops()  # FLOP counter == layer sizes
    assert measured.cumulative_flops() == [small + measured.policy_flops[0], small + measured.policy_flops[0] + large]
    ev = evaluate_cascade(records, policy, measured)
    assert ev["speedup_basis"] == "flops" and ev["largest_flops"] == large
    expected = large / ((40 - n_large) * measured.cumulative_flops()[0] + n_large * measured.cumulative_flops()[1]) * 40
    assert ev["speedup"] == pytest.approx(expected) and ev["speedup"] > 1.0
    assert ev["exit_counts"] == [40 - n_large, n_large]
    assert ev["largest_accuracy"] == pytest.approx((records.logits[:, 1].argmax(-1) == y).double().mean().item())


def test_measured_latency_gives_a_speedup_in_ms(cascade, batch):
    x, y = batch
    records = record_cascade(cascade, [(x, y)])
    cost = cascade.measure_cost(latency=True, repeats=2)
    assert cost.has_latency and cost.stage_ms == [0.0, 0.0] and cost.full_ms == cost.exit_ms[1]
    ev = evaluate_cascade(records, BolukbasiPolicy(2, len(SYNTH_CLASSES), offset=1e6), cost)
    assert ev["speedup_basis"] == "ms" and ev["speedup"] == pytest.approx(cost.exit_ms[1] / cost.exit_ms[0])


def test_cascade_refuses_models_that_do_not_fit():
    small = _net("cifar_resnet_small", 0)
    torch.manual_seed(0)
    other = MultiExitNet.attach(build_backbone("cifar_resnet_small", num_classes=3), class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="same classes"):
        Cascade([small, other])
    with pytest.raises(ValueError, match="at least 2 models"):
        Cascade([small])
    with pytest.raises(ValueError, match="no selection policy"):
        Cascade([small, _net("cifar_resnet_small", 1)]).run(torch.zeros(1, 3, 32, 32))

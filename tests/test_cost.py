"""Cost: the table's arithmetic, FLOPs that add up and match what run() really computes, torchvision's
published operation counts, latency profiles."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from engine.backbones import build_backbone, list_backbones
from engine.cost import CostTable, count_flops, measure_costs, measure_policy_flops, profile_latency
from engine.model import MultiExitNet
from engine.policies import OraclePolicy, Policy, ThresholdPolicy

META_UNSAFE = {"regnet_y_400mf"}  # its builder reads tensor values while choosing widths


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores shared by several people: spinning OpenMP threads make every forward many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def skeleton(module_fn):
    """`module_fn()` with every tensor zero: built on the meta device (no random init, instant), then given
    CPU memory. Right shapes and FLOPs, meaningless values."""
    with torch.device("meta"):
        module = module_fn()
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for t in itertools.chain(module.parameters(), module.buffers()):
            t.zero_()
    return module


def small_model(exit_stages=None) -> MultiExitNet:
    torch.manual_seed(0)
    backbone = build_backbone("cifar_resnet_small", num_classes=4)
    return MultiExitNet.attach(backbone, class_names=list("abcd"), exit_stages=exit_stages).eval()


class LinearPolicy(Policy):
    """A learned-looking policy: one Linear on the exit's logits; exits at `fire_at` whatever it says."""

    kind = "test-linear"

    def __init__(self, num_classes: int, fire_at: int):
        super().__init__()
        self.fc = nn.Linear(num_classes, 1)
        self.fire_at = fire_at

    def decide(self, evidence):
        score = self.fc(evidence.current).squeeze(-1)  # (batch,)
        return torch.full_like(score, evidence.exit_index == self.fire_at, dtype=torch.bool)


# -- the table's arithmetic -----------------------------------------------------------------------
def test_cumulative_cost_counts_heads_that_ran_and_decisions():
    table = CostTable(exit_stages=[0, 1, 3], stage_flops=[10, 20, 30, 40], exit_flops=[1, 2, 3],
                      policy_flops=[0.5, 0.25, 7])
    # exit 0: stage 0, head 0, decision 0; exit 1 adds stage 1, head 1, decision 1; the last decides nothing
    assert table.cumulative_flops() == [11.5, 33.75, 106.75]
    # exit 0 inactive: neither its head nor its decision is paid on the way
    assert table.cumulative_flops([False, True, True]) == [11.5, 32.25, 105.25]
    assert table.full_flops == 103  # every stage and the last head only
    assert table.mean_flops(torch.tensor([0, 2, 2])) == pytest.approx((11.5 + 2 * 106.75) / 3)
    assert CostTable.from_json(table.to_json()) == table
    with pytest.raises(ValueError, match="profile_latency"):
        table.cumulative_ms()


def test_stage_flops_and_last_head_add_up_to_the_whole_backbone():
    torch.manual_seed(0)
    backbone = build_backbone("cifar_resnet_small", num_classes=4).eval()
    whole = count_flops(backbone, torch.zeros(1, 3, 32, 32))
    model = MultiExitNet.attach(backbone, class_names=list("abcd"))
    table = measure_costs(model)
    assert len(table.stage_flops) == 3 and all(f > 0 for f in table.stage_flops)
    assert table.full_flops == pytest.approx(whole, rel=1e-6)
    assert table.exit_flops[0] == 2 * 16 * 4  # pool + Linear(16 -> 4): one multiply-add per weight
    assert table.policy_flops == [0.0, 0.0, 0.0] and table.stage_ms == []


DEEP = {"resnet101", "resnet152"}  # built like resnet50, only longer: checked in the slow run


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in DEEP else [])
                                  for n in list_backbones("torchvision")])
def test_torchvision_stages_add_up_to_the_unsplit_model(name):
    make_original = lambda: tvm.get_model(name, weights=None).eval()  # noqa: E731
    make_multi_exit = lambda: MultiExitNet.attach(  # noqa: E731
        build_backbone(name), class_names=[str(i) for i in range(1000)])
    if name in META_UNSAFE:
        original, model = make_original(), make_multi_exit().eval()
    else:
        original, model = skeleton(make_original), skeleton(make_multi_exit).eval()
    whole = count_flops(original, torch.zeros(1, 3, 64, 64))
    table = measure_costs(model, input_size=64)
    assert table.full_flops == pytest.approx(whole, rel=0.01)


# -- torchvision's published operation counts -----------------------------------------------------
PUBLISHED = ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"]


@pytest.mark.parametrize("name", PUBLISHED)
def test_macs_agree_with_torchvision_published_ops(name):
    torch.manual_seed(0)
    model = MultiExitNet.attach(build_backbone(name), class_names=[str(i) for i in range(1000)])
    assert model.backbone.preset.crop == 224
    measured = measure_costs(model).full_flops / 2e9  # at the preset's crop; a multiply-add counts 2
    published = tvm.get_model_weights(name).DEFAULT.meta["_ops"]  # GMACs; no download: the enum carries it
    assert measured == pytest.approx(published, rel=0.03)


# -- policies and the real run --------------------------------------------------------------------
def test_threshold_policies_cost_nothing_learned_ones_cost_their_layers():
    model = small_model()
    assert measure_policy_flops(ThresholdPolicy([0.5, None, None], "entropy"), model) == [0.0, 0.0, 0.0]
    learned = LinearPolicy(num_classes=4, fire_at=99)
    assert measure_policy_flops(learned, model) == [8.0, 8.0, 0.0]  # Linear(4 -> 1) at every exit but the last
    assert measure_policy_flops(OraclePolicy(), model) == [0.0, 0.0, 0.0]  # evaluation only
    with pytest.raises(ValueError, match="thresholds"):
        measure_policy_flops(ThresholdPolicy([0.5, 0.5]), model)


@pytest.mark.parametrize("policy, fired", [
    (ThresholdPolicy([None, 0.0, None]), 1),  # exit 0 inactive, exit 1 always confident enough
    (ThresholdPolicy([None, None, None]), 2),  # nothing active: the full model
    (LinearPolicy(num_classes=4, fire_at=1), 1),
    (LinearPolicy(num_classes=4, fire_at=0), 0),
])
def test_cumulative_cost_is_what_run_really_computes(policy, fired):
    model = small_model()
    table = measure_costs(model, policy)
    x = torch.randn(1, 3, 32, 32)
    out = model.run(x, policy)
    assert int(out.exit_index) == fired
    used = count_flops(model.run, x, policy)
    assert used == pytest.approx(table.cumulative_flops(policy.active_exits(model.num_exits))[fired])


def test_full_model_cost_skips_earlier_heads():
    model = small_model()
    table = measure_costs(model, LinearPolicy(num_classes=4, fire_at=99))
    only_last = ThresholdPolicy([None, None, None])
    x = torch.randn(1, 3, 32, 32)
    assert count_flops(model.run, x, only_last) == pytest.approx(table.full_flops)
    assert table.cumulative_flops()[-1] > table.full_flops  # every head and decision on the way


def test_measuring_leaves_the_training_mode_alone():
    model = small_model().train()
    measure_costs(model, ThresholdPolicy.uniform(3, 0.5))
    assert model.training


# -- latency --------------------------------------------------------------------------------------
def test_profile_latency_fills_every_stage_and_exit():
    model = small_model(exit_stages=[0])
    table = measure_costs(model)
    timed = profile_latency(model, table, device="cpu", repeats=3, warmup=1)
    assert table.stage_ms == []  # the input table is left as it was
    assert len(timed.stage_ms) == 3 and len(timed.exit_ms) == 2
    assert all(ms > 0 for ms in timed.stage_ms + timed.exit_ms)
    assert timed.device == "cpu" and timed.stage_flops == table.stage_flops
    assert timed.full_ms == pytest.approx(sum(timed.stage_ms) + timed.exit_ms[-1])
    assert timed.cumulative_ms()[0] == pytest.approx(timed.stage_ms[0] + timed.exit_ms[0])
    assert CostTable.from_json(timed.to_json()) == timed

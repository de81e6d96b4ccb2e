"""Deep exit heads (strided convolutions up to the last stage's width) and how early heads learn
when backbone and exits train together: a bundle round trip, their FLOPs, the per-head learning rate."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.backbones import build_backbone
from engine.bundle import Bundle, load_bundle, save_bundle
from engine.cost import measure_costs
from engine.model import MultiExitNet
from engine.policies import ThresholdPolicy
from engine.train.network import NetworkConfig, build_network, train_network, with_new_exits

CLASSES = [f"c{i}" for i in range(10)]


def _deep(arch="cifar_resnet20", **kw) -> MultiExitNet:
    torch.manual_seed(0)
    return MultiExitNet.attach(build_backbone(arch, num_classes=10, **kw), class_names=CLASSES, head="deep").eval()


def _convs(head) -> list[nn.Conv2d]:
    return [m for m in head.modules() if isinstance(m, nn.Conv2d)]


def _expected(c: int, width: int = 64) -> list[tuple[int, int, int]]:
    out = []
    while c * 2 <= width:
        out.append((c, c * 2, 2))
        c *= 2
    return out or [(c, c, 1)]


def test_deep_heads_widen_to_the_last_stage_and_reach_its_resolution():
    model = _deep()
    taps = [model.backbone.taps[h.spec.stage] for h in model.exits[:-1]]
    assert {t.channels for t in taps} == {16, 32, 64}
    for head, tap in zip(model.exits[:-1], taps):
        assert [(c.in_channels, c.out_channels, c.stride[0]) for c in _convs(head)] == _expected(tap.channels)
        assert head.spec.hidden == 64
    assert _expected(16) == [(16, 32, 2), (32, 64, 2)]
    outs = model.forward_all(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(2, 10)] * model.num_exits


def test_a_deep_head_on_the_last_width_is_one_stride_1_convolution():
    model = MultiExitNet.attach(build_backbone("cifar_resnet56a", num_classes=10, stages_per_group=3),
                                class_names=CLASSES, head="deep", keep_classifier=True)
    late = [h for h in model.exits[:-1] if h.spec.channels == 64]
    assert late and all([(c.in_channels, c.out_channels, c.stride[0]) for c in _convs(h)] == [(64, 64, 1)] for h in late)


def test_deep_heads_cost_more_than_linear_ones_and_are_counted():
    deep = measure_costs(_deep())
    torch.manual_seed(0)
    linear = measure_costs(MultiExitNet.attach(build_backbone("cifar_resnet20", num_classes=10), class_names=CLASSES))
    assert deep.stage_flops == linear.stage_flops
    # 16→32 at 16×16 and 32→64 at 8×8, 3×3, a multiply-add counted as 2, plus the Linear layer
    assert deep.exit_flops[0] == pytest.approx(2 * (16 * 32 * 9 * 256 + 32 * 64 * 9 * 64 + 64 * 10), rel=0.02)
    assert deep.exit_flops[0] > 20 * linear.exit_flops[0]


def test_a_bundle_with_deep_heads_round_trips(tmp_path: Path):
    model = _deep()
    bundle = Bundle(model, {"t": ThresholdPolicy([0.7] * (model.num_exits - 1) + [None])}, "t", measure_costs(model))
    loaded = load_bundle(save_bundle(bundle, tmp_path / "deep.offramp"))
    assert [e.spec for e in loaded.model.exits] == [e.spec for e in model.exits]
    x = torch.randn(3, 3, 32, 32)
    for a, b in zip(model.forward_all(x), loaded.model.forward_all(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_with_new_exits_keeps_backbone_and_last_exit_and_makes_new_early_heads():
    cfg = NetworkConfig(arch="cifar_resnet_small", head="conv")
    old = build_network(cfg, CLASSES).state_dict()
    new_cfg = replace(cfg, head="deep")
    state = with_new_exits(new_cfg, CLASSES, old)
    model = build_network(new_cfg, CLASSES, state)  # loads strictly: every key and shape fits
    assert all(torch.equal(state[k], old[k]) for k in old if k.startswith("backbone."))
    last = f"exits.{model.num_exits - 1}."
    assert all(torch.equal(state[k], old[k]) for k in old if k.startswith(last))
    assert model.exits[0].spec.kind == "deep"


def test_early_heads_learn_at_their_own_rate():
    """With head_lr_scale s the early heads' parameters move s times as far in the first step (the
    one-cycle schedule and momentum are the same for every group), the backbone's as before."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(16) % 10
    base = NetworkConfig(arch="cifar_resnet_small", head="linear", epochs=1, batch_size=16, lr=0.01,
                         weight_decay=0.0, pad=0)
    start = build_network(base, CLASSES).state_dict()

    def moved(cfg):
        model, _ = train_network(cfg, images, labels, CLASSES, init=start, log=lambda m: None)
        after = model.state_dict()
        return {k: (after[k] - start[k]).abs().sum().item() for k in start if start[k].is_floating_point()}

    one, five = moved(base), moved(replace(base, head_lr_scale=5.0))
    head_w, stem_w = "exits.0.post.weight", "backbone.stages.0.0.0.weight"
    assert stem_w in one
    assert five[head_w] == pytest.approx(5 * one[head_w], rel=1e-3)
    assert five[stem_w] == pytest.approx(one[stem_w], rel=1e-3)
    last_w = next(k for k in one if k.startswith("exits.2.") and k.endswith("weight"))
    assert five[last_w] == pytest.approx(one[last_w], rel=1e-3)

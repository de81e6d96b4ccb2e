"""MultiExitNet: staged runs really stop, batched runs let samples leave, records agree with runs."""
import pytest
import torch

from engine.backbones import build_backbone
from engine.model import MultiExitNet, resolve_index
from engine.policies import OraclePolicy, ThresholdPolicy, simulate


def _model(name="cifar_resnet20", classes=4, **kw):
    torch.manual_seed(0)
    return MultiExitNet.attach(build_backbone(name, num_classes=classes),
                               class_names=[f"c{i}" for i in range(classes)], **kw).eval()


def _count_calls(model):
    calls = [0] * model.backbone.num_stages
    for k, stage in enumerate(model.backbone.stages):
        stage.register_forward_hook(lambda mod, inp, out, k=k: calls.__setitem__(k, calls[k] + 1))
    return calls


def test_exit_zero_skips_every_later_stage():
    model = _model()
    calls = _count_calls(model)
    out = model.run(torch.randn(1, 3, 32, 32), ThresholdPolicy.uniform(model.num_exits, 0.0))
    assert out.exit_index.tolist() == [0]
    assert calls == [1] + [0] * (model.backbone.num_stages - 1)
    assert out.stages_run.tolist() == [1]
    assert out.ran[0].tolist() == [True] + [False] * (model.num_exits - 1)


def test_no_early_exit_runs_every_stage_once():
    model = _model()
    calls = _count_calls(model)
    out = model.run(torch.randn(2, 3, 32, 32), ThresholdPolicy.uniform(model.num_exits, 1.0 + 0.0))
    # a max-probability of exactly 1.0 is practically unreachable with random weights
    assert out.exit_index.tolist() == [model.num_exits - 1] * 2
    assert calls == [1] * model.backbone.num_stages


def test_batched_run_samples_leave_the_batch():
    model = _model()
    x = torch.randn(6, 3, 32, 32)
    labels = model.forward_all(x)[2].argmax(1)  # exit 2 is right for everyone by construction
    labels[:2] = model.forward_all(x)[0].argmax(1)[:2]
    oracle = OraclePolicy().with_targets(labels)
    out = model.run(x, oracle)
    assert (out.exit_index <= 2).all()
    assert out.stage_calls[0] == 6
    # samples that exited at 0 are no longer in the batch for stage 1
    assert out.stage_calls[1] == 6 - int((out.exit_index == 0).sum())
    assert len(out.stage_calls) <= model.exit_stages[2] + 1  # nothing after exit 2's stage ran


def test_inactive_exits_are_not_evaluated():
    model = _model()
    evaluated = []
    for e, head in enumerate(model.exits):
        head.register_forward_hook(lambda mod, inp, out, e=e: evaluated.append(e))
    policy = ThresholdPolicy([None, 0.0] + [None] * (model.num_exits - 2))
    out = model.run(torch.randn(3, 3, 32, 32), policy)
    assert evaluated == [1]
    assert out.exit_index.tolist() == [1, 1, 1]
    assert torch.isnan(out.exit_logits[:, 0]).all()


def test_run_agrees_with_forward_all_and_simulate():
    model = _model()
    with torch.no_grad():
        model.temperature.copy_(torch.linspace(0.7, 1.5, model.num_exits))
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        logits = torch.stack(model.forward_all(x, calibrated=True), 1)
    conf = torch.softmax(logits, -1).max(-1).values
    t = float(conf[:, :-1].max(1).values.median())  # about half never reach it
    policy = ThresholdPolicy.uniform(model.num_exits, t)
    out = model.run(x, policy)
    assert torch.equal(out.exit_index, simulate(policy, logits))
    assert torch.allclose(out.logits, logits[torch.arange(16), out.exit_index], atol=1e-5)
    assert 0 < int((out.exit_index < model.num_exits - 1).sum()) < 16


def test_last_exit_is_the_original_classifier_and_forward_matches_backbone():
    torch.manual_seed(0)
    backbone = build_backbone("cifar_resnet20", num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    expected = backbone.eval()(x)
    model = MultiExitNet.attach(backbone, class_names=list("abcd")).eval()
    assert model.exits[-1].spec.kind == "original"
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_exit_placement_and_errors():
    model = _model(exit_stages=[1, -3])
    assert model.exit_stages == [1, 3, 5]
    with pytest.raises(ValueError, match="out of range"):
        _model(exit_stages=[99])
    with pytest.raises(ValueError, match="exit index 7"):
        resolve_index(7, 3)
    assert resolve_index(-1, 3) == 2
    with pytest.raises(ValueError, match="conv"):
        _model(head="transformer")


def test_conv_heads_work():
    model = _model(head="conv")
    outs = model.forward_all(torch.randn(2, 3, 32, 32))
    assert [o.shape for o in outs] == [(2, 4)] * model.num_exits
    assert model.exits[0].spec.kind == "conv" and model.exits[0].spec.hidden > 0

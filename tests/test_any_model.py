"""Bring any model: a timm ResNet, a timm ViT-Tiny, a Swin, a torchvision model and a user's own
module (tests/byo_models.py), cut after named layers (weights=None, small inputs, offline). Each
staged run skips the stages after its exit, each bundle round-trips with identical logits, each
exports to ONNX with the same exits; impossible cuts are refused in one sentence naming the layer."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from engine.backbones import build_backbone
from engine.bundle import Bundle, BundleError, load_bundle, save_bundle
from engine.cli import main
from engine.cost import measure_costs
from engine.exits import TokenPool
from engine.features import cache_features
from engine.model import MultiExitNet
from engine.policies import ThresholdPolicy, confidence
from engine.prepared import prepare
from engine.runtime import Engine
from synth import SYNTH_CLASSES, make_image_folder

CLASSES = ["a", "b", "c", "d"]
VIT = dict(model="timm:vit_tiny_patch16_224", taps=["blocks.3", "blocks.7"], input_size=32,
           model_kwargs={"img_size": 32})
TIMM_RESNET = dict(model="timm:resnet18", taps=["layer1", "layer3"], input_size=32, num_classes=4)
TORCHVISION = dict(model="mobilenet_v3_small", taps=["features.3", "features.8"], input_size=64)
MODULE = dict(model="module:byo_models:small_net", taps=["block1", "block2"], input_size=32)


def _model(kw: dict) -> MultiExitNet:
    torch.manual_seed(0)
    return MultiExitNet.attach(build_backbone("cut", **kw), class_names=CLASSES).eval()


def _images(model: MultiExitNet, n: int = 8) -> torch.Tensor:
    crop = model.backbone.preset.crop
    return torch.randn(n, 3, crop, crop, generator=torch.Generator().manual_seed(1))


def _halving_policy(model: MultiExitNet, x: torch.Tensor) -> ThresholdPolicy:
    """Exit 0 alone is active, its threshold halfway between the middle two confidences there: half
    the images leave at once, none of them near the threshold."""
    with torch.no_grad():
        conf = confidence(model.forward_all(x)[0], "max_prob").sort().values
    middle = x.shape[0] // 2
    thresholds = [float(conf[middle - 1] + conf[middle]) / 2] + [None] * (model.num_exits - 2) + [1.0]
    return ThresholdPolicy(thresholds)


def _count_calls(model: MultiExitNet) -> list[int]:
    calls = [0] * model.backbone.num_stages
    for k, stage in enumerate(model.backbone.stages):
        stage.register_forward_hook(lambda mod, inp, out, k=k: calls.__setitem__(k, calls[k] + int(out.shape[0])))
    return calls


def _check_skips(model: MultiExitNet, x: torch.Tensor, policy: ThresholdPolicy) -> torch.Tensor:
    """Stage 0 sees every image, later stages only those that did not leave at exit 0."""
    calls = _count_calls(model)
    out = model.run(x, policy)
    left = int((out.exit_index == 0).sum())
    assert 0 < left < x.shape[0], "the policy should let some images leave at exit 0 and keep others"
    assert calls == [x.shape[0]] + [x.shape[0] - left] * (model.backbone.num_stages - 1)
    assert out.stage_calls == calls
    one = model.run(x[:1], ThresholdPolicy.uniform(model.num_exits, 0.0))  # everyone leaves at exit 0
    assert one.exit_index.tolist() == [0] and one.stage_calls == [1]
    return out.exit_index


def _check_round_trip(model: MultiExitNet, x: torch.Tensor, policy, tmp_path) -> Bundle:
    bundle = Bundle(model, {"t": policy}, "t", measure_costs(model))
    path = save_bundle(bundle, tmp_path / "model.offramp")
    loaded = load_bundle(path)
    assert loaded.model.backbone.spec == model.backbone.spec
    assert [t for t in loaded.model.backbone.taps] == [t for t in model.backbone.taps]
    with torch.no_grad():
        for a, b in zip(model.forward_all(x), loaded.model.forward_all(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    return loaded


def _check_export(bundle: Bundle, x: torch.Tensor, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from engine.export import OnnxRunner, export_bundle
    manifest = export_bundle(bundle, tmp_path / "onnx", check_inputs=x)
    assert manifest["check"]["exits_agree"] == x.shape[0]
    runner = OnnxRunner(tmp_path / "onnx")  # independently of export_bundle's own check
    want = bundle.model.run(x, bundle.policy)
    fired = [runner.run(x[i:i + 1].numpy()) for i in range(x.shape[0])]
    assert [r.exit_index for r in fired] == want.exit_index.tolist()
    assert [r.stages_run for r in fired] == want.stages_run.tolist()
    assert min(r.stages_run for r in fired) < bundle.model.backbone.num_stages  # ONNX stages really skipped
    for r, logits in zip(fired, want.logits):
        np.testing.assert_allclose(r.logits, logits.numpy(), rtol=1e-3, atol=1e-4)


def _whole(kw: dict, tmp_path) -> MultiExitNet:
    model = _model(kw)
    x = _images(model)
    policy = _halving_policy(model, x)
    _check_skips(model, x, policy)
    loaded = _check_round_trip(model, x, policy, tmp_path)
    _check_export(loaded, x, tmp_path)
    return model


# -- the four kinds of model, end to end --------------------------------------------------------------
def test_timm_resnet_cut_at_named_layers(tmp_path):
    pytest.importorskip("timm", reason="timm is the optional extra offramp[timm]")
    model = _whole(TIMM_RESNET, tmp_path)
    taps = model.backbone.taps
    assert [(t.name, t.layout, t.channels, t.stride) for t in taps] == [
        ("layer1", "map", 64, 4), ("layer3", "map", 256, 16), ("fc", "vector", 512, 0)]
    assert [e.spec.kind for e in model.exits] == ["linear", "linear", "original"]


def test_timm_vit_tiny_exits_read_the_class_token(tmp_path):
    pytest.importorskip("timm", reason="timm is the optional extra offramp[timm]")
    model = _whole(VIT, tmp_path)
    taps = model.backbone.taps
    assert [(t.layout, t.channels, t.pool) for t in taps[:2]] == [("tokens", 192, "cls")] * 2
    head = model.exits[0]
    assert isinstance(head.pre, TokenPool) and head.pre.how == "cls" and not head.pre_is_pooled
    tokens = model.backbone.stages[0](_images(model, 2))
    assert tokens.shape == (2, 5, 192)  # the class token and 2x2 patches of 16 pixels
    torch.testing.assert_close(head.pre(tokens), tokens[:, 0])


def test_torchvision_model_cut_at_user_named_layers(tmp_path):
    model = _whole(TORCHVISION, tmp_path)
    assert [t.name for t in model.backbone.taps] == ["features.3", "features.8", "classifier.3"]
    assert [t.channels for t in model.backbone.taps] == [24, 48, 1024]


def test_a_users_own_module(tmp_path):
    model = _whole(MODULE, tmp_path)
    assert [(t.name, t.channels, t.stride) for t in model.backbone.taps] == [("block1", 8, 1), ("block2", 16, 2),
                                                                              ("fc", 32, 0)]


def test_a_sequential_that_fx_cannot_trace_is_cut_at_its_children(tmp_path):
    model = _model(dict(model="module:byo_models:small_sequential", taps=["2", "4"], input_size=32))
    assert all(isinstance(s, torch.nn.Sequential) for s in model.backbone.stages)  # the children, not fx graphs
    x = _images(model)
    policy = _halving_policy(model, x)
    _check_skips(model, x, policy)
    _check_round_trip(model, x, policy, tmp_path)


def test_swin_tokens_laid_out_channels_last_reach_exits_as_maps(tmp_path):
    pytest.importorskip("timm", reason="timm is the optional extra offramp[timm]")
    kw = dict(model="timm:swin_tiny_patch4_window7_224", taps=["layers.0", "layers.1"], input_size=64,
              model_kwargs={"img_size": 64, "window_size": 2})
    model = _model(kw)
    assert [(t.layout, t.channels, t.stride) for t in model.backbone.taps[:2]] == [("map", 96, 4), ("map", 192, 8)]
    assert model.backbone.stages[0](_images(model, 1)).shape == (1, 96, 16, 16)
    x = _images(model)
    policy = _halving_policy(model, x)
    _check_skips(model, x, policy)
    _check_round_trip(model, x, policy, tmp_path)


# -- the rest of the engine with such models ------------------------------------------------------------
def test_prepared_form_and_feature_cache_agree_with_the_model():
    pytest.importorskip("timm", reason="timm is the optional extra offramp[timm]")
    model = _model(VIT)
    x = _images(model)
    policy = _halving_policy(model, x)
    prepared = prepare(model)
    for i in range(x.shape[0]):
        want, got = model.run(x[i:i + 1], policy), prepared.run(x[i:i + 1], policy)
        assert got.exit_index.tolist() == want.exit_index.tolist()
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    data = torch.utils.data.TensorDataset(x, torch.arange(x.shape[0]) % 4)
    cache = cache_features(model, data, batch_size=4)
    with torch.no_grad():
        taps = [model.backbone.stages[0](x)]
        torch.testing.assert_close(cache.exit_logits(model), torch.stack(model.forward_all(x), 1), rtol=1e-4,
                                   atol=1e-4)
    # exit 0 reads the class token, but the policies' features are the mean of the tokens
    torch.testing.assert_close(cache.inputs[0], taps[0][:, 0])
    torch.testing.assert_close(cache.features[0], taps[0].mean(1))
    costs = measure_costs(model)
    assert costs.exit_flops[0] == 2 * 192 * 4  # the head's Linear (LayerNorm is element-wise)


def test_engine_runs_a_bundle_of_a_users_module(tmp_path):
    model = _model(MODULE)
    bundle = Bundle(model, {"t": ThresholdPolicy.uniform(model.num_exits, 0.0)}, "t", measure_costs(model))
    engine = Engine(save_bundle(bundle, tmp_path / "m.offramp"), device="cpu")
    frame = np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    result = engine.infer(frame)
    assert result.exit_index == 0 and result.saved > 0.5


# -- refusals -------------------------------------------------------------------------------------------
def test_a_cut_that_a_skip_connection_crosses_is_refused_naming_the_layer():
    with pytest.raises(ValueError, match=r"after 'block2.conv1': a skip connection crosses it") as err:
        build_backbone("cut", model=MODULE["model"], taps=["block1", "block2.conv1"], input_size=32)
    assert str(err.value).count(".") <= 1 + str(err.value).count("block2.conv1")  # one sentence
    with pytest.raises(ValueError, match=r"no layer named 'block9'"):
        build_backbone("cut", model=MODULE["model"], taps=["block9"], input_size=32)
    with pytest.raises(ValueError, match=r"after 'fc'.*classifier"):
        build_backbone("cut", model=MODULE["model"], taps=["fc"], input_size=32)
    with pytest.raises(ValueError, match=r"returned a str, not an nn.Module"):
        build_backbone("cut", model="module:byo_models:not_a_model", taps=["x"])
    with pytest.raises(ValueError, match=r"'no_such_module'.*cannot be imported"):
        build_backbone("cut", model="module:no_such_module:make", taps=["x"])
    with pytest.raises(ValueError, match=r"model argument 'weights'='/etc/passwd' of 'resnet18' is refused"):
        build_backbone("cut", model="resnet18", taps=["layer1"], model_kwargs={"weights": "/etc/passwd"})
    with pytest.raises(ValueError, match=r"model spec 'timm:' is not"):
        build_backbone("cut", model="timm:", taps=["layer1"])


def test_timm_missing_is_said_in_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now fails as if it were not installed
    with pytest.raises(ValueError, match=r"needs timm.*pip install 'offramp\[timm\]'"):
        build_backbone("cut", model="timm:resnet18", taps=["layer1"])


def test_a_bundle_whose_module_is_gone_says_so(tmp_path, monkeypatch):
    model = _model(MODULE)
    path = save_bundle(Bundle(model, {"t": ThresholdPolicy.uniform(3, 0.5)}, "t", measure_costs(model)),
                       tmp_path / "m.offramp")
    monkeypatch.setitem(sys.modules, "byo_models", None)
    with pytest.raises(BundleError, match=r"needs the Python module 'byo_models', which cannot be imported"):
        load_bundle(path)


# -- the command line -------------------------------------------------------------------------------------
def test_layers_lists_the_cut_points_with_shapes_and_flops(capsys):
    assert main(["layers", MODULE["model"], "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if line.startswith("  ")}
    assert list(rows) == ["stem.0", "stem.1", "stem", "block1", "block2", "block3"]  # in order, stem.2 is stem
    assert "block1.conv1" not in rows  # inside a skip connection: no cut there
    assert rows["block2"][0] == "16x16x16" and rows["block3"][0] == "32x8x8"
    flops = [float(r[1]) for r in rows.values()]
    assert flops == sorted(flops) and flops[0] > 0


def test_train_exits_on_a_users_module_from_the_command_line(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "data", SYNTH_CLASSES, per_class=12, seed=0)
    out = tmp_path / "m.offramp"
    assert main(["train-exits", "--model", MODULE["model"], "--taps", "block1,block2", "--input-size", "32",
                 "--data", str(folder), "--epochs", "2", "--out", str(out)]) == 0
    bundle = load_bundle(out)
    assert bundle.model.backbone.spec["kwargs"]["taps"] == ["block1", "block2"]
    assert bundle.model.num_exits == 3 and bundle.class_names == sorted(SYNTH_CLASSES)
    assert main(["train-exits", "--model", MODULE["model"], "--data", str(folder), "--out", str(out)]) == 2
    assert "needs --taps" in capsys.readouterr().err

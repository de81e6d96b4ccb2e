"""engine.features and engine.train: one backbone pass into a cache, exit heads trained from it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from synth import SYNTH_CLASSES, build_tiny_model

from engine.backbones import build_backbone
from engine.backbones.cifar import CIFAR_PRESET
from engine.data.folders import open_dataset
from engine.features import FeatureCache, cache_features
from engine.model import MultiExitNet
from engine.preprocess import eval_transform
from engine.progress import CancelFlag, Cancelled
from engine.splits import split_indices
from engine.train import (calibrate_exits, default_exits_to_train, expected_calibration_error, fit_temperature,
                          train_exits)

FAST = dict(epochs=12, lr=3e-2, batch_size=16)


@pytest.fixture(scope="module")
def dataset(synthetic_folder: Path):
    return open_dataset(synthetic_folder, transform=eval_transform(CIFAR_PRESET))


@pytest.fixture(scope="module")
def cache(dataset) -> FeatureCache:
    """Features of build_tiny_model() (the tiny_model fixture's weights) over the synthetic folder."""
    return cache_features(build_tiny_model(), dataset, batch_size=64)


@pytest.fixture(scope="module")
def conv_cache(dataset) -> FeatureCache:
    small = torch.utils.data.Subset(dataset, list(range(0, 120, 5)))
    return cache_features(build_tiny_model(head="conv"), small, batch_size=8)


def _heads(model: MultiExitNet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.exits.state_dict().items()}


# -- the cache ----------------------------------------------------------------------------------
def test_cache_shapes_and_teacher(cache, dataset, tiny_model):
    assert [tuple(x.shape) for x in cache.inputs] == [(120, 16), (120, 32), (120, 64)]
    assert all(x.dtype == torch.float32 for x in cache.inputs)
    assert all(f is x for f, x in zip(cache.features, cache.inputs))  # pooled heads: features are inputs
    assert cache.labels.tolist() == dataset.targets and cache.class_names == list(SYNTH_CLASSES)
    x = torch.stack([dataset[i][0] for i in (0, 119)])
    with torch.no_grad():
        logits = tiny_model.forward_all(x)
    assert torch.allclose(cache.teacher_logits[[0, 119]], logits[-1], atol=1e-5)
    assert torch.allclose(cache.exit_logits(tiny_model)[[0, 119]], torch.stack(logits, 1), atol=1e-5)


def test_cache_conv_heads_store_half_precision_maps(conv_cache):
    assert [tuple(x.shape) for x in conv_cache.inputs[:2]] == [(24, 16, 32, 32), (24, 32, 16, 16)]
    assert conv_cache.inputs[0].dtype == torch.float16 and conv_cache.inputs[2].dtype == torch.float32
    assert conv_cache.features[0].shape == (24, 16) and conv_cache.features[0].dtype == torch.float32
    pooled = conv_cache.inputs[0].float().mean(dim=(2, 3))
    assert torch.allclose(pooled, conv_cache.features[0], atol=1e-2)


def test_cache_progress_and_cancel(dataset):
    seen = []
    model = build_tiny_model()
    cache_features(model, dataset, batch_size=50, progress=seen.append)
    assert [(p.stage, p.done, p.total) for p in seen] == [("caching features", d, 120) for d in (0, 50, 100, 120)]
    flag = CancelFlag()

    def stop_after_first(p):
        if p.done > 0:
            flag.set()

    model.train()
    with pytest.raises(Cancelled):
        cache_features(model, dataset, batch_size=50, progress=stop_after_first, cancel=flag)
    assert model.training  # the caller's mode is given back


def test_cache_save_load_subset(cache, conv_cache, tmp_path: Path):
    for c in (cache, conv_cache):
        c.save(tmp_path / "c.safetensors")
        back = FeatureCache.load(tmp_path / "c.safetensors")
        assert back.class_names == c.class_names and back.specs == c.specs
        for a, b in zip(back.inputs + back.features, c.inputs + c.features):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert [f is x for f, x in zip(back.features, back.inputs)] == [f is x for f, x in zip(c.features, c.inputs)]
        assert torch.equal(back.labels, c.labels) and torch.equal(back.teacher_logits, c.teacher_logits)
    part = cache.subset([5, 1, 7])
    assert len(part) == 3 and part.labels.tolist() == cache.labels[[5, 1, 7]].tolist()
    assert part.features[0] is part.inputs[0]
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk"):
        FeatureCache.load(tmp_path / "junk.safetensors")


# -- training -----------------------------------------------------------------------------------
def test_train_exits_learns_every_exit(cache, tiny_model):
    train_idx, val_idx = split_indices(cache.labels, val_fraction=0.3, seed=0)
    seen = []
    history = train_exits(tiny_model, cache.subset(train_idx), val_cache=cache.subset(val_idx),
                          train_exits=[0, 1, 2], progress=seen.append, **FAST)
    assert history["exits"] == [0, 1, 2] and len(history["loss"]) == FAST["epochs"]
    assert history["loss"][-1] < history["loss"][0]
    assert all(acc > 0.8 for acc in history["val_acc"][-1]), history["val_acc"][-1]  # chance is 0.25
    assert [(p.stage, p.done, p.total) for p in seen] == [("training exits", e, 12) for e in range(13)]
    assert "loss" in seen[-1].message and "val acc" in seen[-1].message
    assert not any(h.training for h in tiny_model.exits)
    logits = cache.subset(val_idx).exit_logits(tiny_model)  # the trained heads, as the model holds them
    assert (logits.argmax(2) == cache.labels[val_idx, None]).float().mean() > 0.8


def test_default_exits_skip_the_original_classifier(tiny_model):
    assert default_exits_to_train(tiny_model) == [0, 1]
    torch.manual_seed(0)
    other = MultiExitNet.attach(build_backbone("cifar_resnet_small", num_classes=10), class_names=["a", "b", "c"])
    assert default_exits_to_train(other) == [0, 1, 2]  # a new last head: the class count changed


def test_cancel_restores_heads_bit_exactly(conv_cache):
    model = build_tiny_model(head="conv")
    before = _heads(model)
    flag = CancelFlag()

    def cancel_in_epoch_two(p):
        if p.done == 2:
            flag.set()

    with pytest.raises(Cancelled):
        train_exits(model, conv_cache, epochs=5, lr=1e-2, batch_size=8, progress=cancel_in_epoch_two, cancel=flag)
    after = _heads(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(h.training for h in model.exits)


def test_training_is_deterministic(cache):
    runs = []
    for seed in (0, 0, 1):
        model = build_tiny_model()
        train_exits(model, cache, epochs=2, lr=1e-2, batch_size=32, seed=seed)
        runs.append(_heads(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_distillation_and_argument_checks(cache, conv_cache):
    model = build_tiny_model()
    history = train_exits(model, cache, epochs=2, lr=1e-2, batch_size=32, distill=0.5)
    assert all(torch.isfinite(torch.tensor(history["loss"])))
    with pytest.raises(ValueError, match="last exit"):
        train_exits(model, cache, epochs=1, distill=0.5, train_exits=[0, 2])
    with pytest.raises(ValueError, match="distill"):
        train_exits(model, cache, epochs=1, distill=2.0)
    with pytest.raises(ValueError, match="cache again"):
        train_exits(model, conv_cache, epochs=1)
    with pytest.raises(ValueError, match="out of range"):
        train_exits(model, cache, epochs=1, train_exits=[5])


# -- calibration --------------------------------------------------------------------------------
def test_temperature_scaling_fixes_overconfidence():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 5, generator=g) * 2
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)  # calibrated at T = 1
    t = fit_temperature(3 * z, labels)
    assert 2.5 < t < 3.5
    assert expected_calibration_error(3 * z / t, labels) < expected_calibration_error(3 * z, labels) / 2
    with torch.inference_mode():  # callers may hold inference tensors; fitting still works
        assert fit_temperature(3 * z, labels) == pytest.approx(t, rel=1e-4)
    with pytest.raises(ValueError):
        fit_temperature(z, labels[:10])


def test_calibrate_exits_sets_model_temperature(cache):
    model = build_tiny_model()
    temps = calibrate_exits(model, cache)
    assert len(temps) == 3 and all(t > 0 for t in temps)
    assert model.temperature.tolist() == pytest.approx(temps)


def test_calibration_report_gives_ece_before_and_after(cache):
    from engine.train.calibrate import calibrate_with_report
    model = build_tiny_model()
    model.temperature.fill_(3.0)  # a stale temperature must not leak into "before"
    rep = calibrate_with_report(model, cache)
    raw = cache.exit_logits(model) * 1.0  # temperature is applied by the caller, not exit_logits
    assert model.temperature.tolist() == pytest.approx(rep["temperatures"])
    for e in range(3):
        assert rep["ece_before"][e] == pytest.approx(expected_calibration_error(raw[:, e], cache.labels))
        t = rep["temperatures"][e]
        assert rep["ece_after"][e] == pytest.approx(expected_calibration_error(raw[:, e] / t, cache.labels))

"""The built-in model shipped in resources/: it loads offline, is what `Engine()` and `offramp run`
use when no bundle is named, and has what the app needs (CIFAR-10 classes, 4+ exits, a live
policy, a measured cost table, a Pareto front for the budget slider)."""
from pathlib import Path

import numpy as np
import pytest

from engine.bundle import SUFFIX, default_bundle_path, load_bundle
from engine.runtime import Engine

SHIPPED = Path(__file__).resolve().parents[1] / "resources" / f"default{SUFFIX}"
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def shipped():
    if not SHIPPED.is_file():
        pytest.fail(f"the built-in model {SHIPPED} is missing from the checkout")
    return load_bundle(SHIPPED)


def test_shipped_bundle_is_small_and_complete(shipped):
    assert SHIPPED.stat().st_size < 20 * 2**20
    assert shipped.model.class_names == CIFAR10
    assert shipped.model.num_exits >= 4
    stages = shipped.model.exit_stages
    assert stages[0] < shipped.model.backbone.num_stages // 2  # exits spread over depth
    assert not shipped.policy.evaluation_only
    flops = shipped.cost.cumulative_flops()
    assert all(a < b for a, b in zip(flops, flops[1:])) and flops[0] < 0.5 * shipped.cost.full_flops


def test_engine_uses_it_when_no_bundle_is_named(monkeypatch):
    monkeypatch.delenv("OFFRAMP_DEFAULT_BUNDLE", raising=False)
    assert default_bundle_path() == SHIPPED
    engine = Engine(device="cpu", latency_repeats=2)
    frame = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    result = engine.infer(frame)
    assert result.label in CIFAR10 and 0 <= result.exit_index < engine.num_exits
    assert result.stages_run == engine.model.exit_stages[result.exit_index] + 1
    assert 0 < result.flops <= max(engine.cost.cumulative_flops())

"""docs/ARCHITECTURE.md's three recipes, carried out step by step: add a backbone, add a policy, add a
panel. If a recipe stops being true, this file fails. (A trained policy family's registry path is
tests/test_architecture.py's toy family.)"""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from engine.backbones import InputPreset, StagedBackbone, Tap, build_backbone, list_backbones  # noqa: E402
from engine.backbones import _base as backbone_registry  # noqa: E402
from engine.bundle import Bundle, load_bundle, save_bundle  # noqa: E402
from engine.cost import measure_costs  # noqa: E402
from engine.model import MultiExitNet  # noqa: E402
from engine.policies import Policy, ThresholdPolicy, register_policy  # noqa: E402
from engine.policies import base as policy_registry  # noqa: E402
from engine.runtime import Engine  # noqa: E402

CLASSES = ["a", "b", "c"]


# -- recipe: add a backbone --------------------------------------------------------------------------
def _register_recipe_backbone():
    @backbone_registry.register_backbone("recipe_net", family="recipe", description="two conv stages")
    def recipe_net(*, weights: str | None = None, num_classes: int = 3) -> StagedBackbone:
        stages = [nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU()), nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())]
        taps = [Tap("block1", channels=8, stride=2), Tap("block2", channels=16, stride=4)]
        classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(16, num_classes))
        preset = InputPreset(crop=32, resize=32)
        return StagedBackbone(stages, taps, classifier, preset, {"name": "recipe_net",
                                                                 "kwargs": {"num_classes": num_classes}})
    return recipe_net


@pytest.fixture
def recipe_backbone():
    _register_recipe_backbone()
    yield "recipe_net"
    backbone_registry._REGISTRY.pop("recipe_net", None)


def test_recipe_add_a_backbone(recipe_backbone, tmp_path):
    assert "recipe_net" in list_backbones("recipe")
    torch.manual_seed(0)
    model = MultiExitNet.attach(build_backbone("recipe_net"), class_names=CLASSES).eval()
    assert model.num_exits == 2  # an exit on every stage, the backbone's classifier as the last
    policy = ThresholdPolicy([0.5, 0.0])
    cost = measure_costs(model, policy)
    assert 0 < cost.cumulative_flops()[0] < cost.full_flops
    out = model.run(torch.randn(4, 3, 32, 32), policy)
    assert out.exit_index.shape == (4,)
    # a bundle rebuilds it from its spec alone
    path = save_bundle(Bundle(model, {"threshold": policy}, "threshold", cost, {"name": "recipe"}), tmp_path / "r.offramp")
    again = load_bundle(path)
    x = torch.randn(2, 3, 32, 32)
    assert all(torch.allclose(a, b) for a, b in zip(again.model.forward_all(x), model.forward_all(x)))
    with pytest.raises(ValueError, match="already registered"):
        _register_recipe_backbone()


# -- recipe: add a policy -----------------------------------------------------------------------------
@pytest.fixture
def recipe_policy():
    @register_policy
    class MarginPolicy(Policy):
        """Exit when the top two classes are `margin` apart."""
        kind = "recipe_margin"

        def __init__(self, margin: float):
            super().__init__()
            self.margin = float(margin)

        def decide(self, evidence):
            top2 = evidence.current.softmax(-1).topk(2, dim=-1).values
            return (top2[:, 0] - top2[:, 1]) >= self.margin

        def to_json(self) -> dict:
            return {"kind": self.kind, "margin": self.margin}

        @classmethod
        def from_json(cls, d, *, num_exits, num_classes):
            return cls(d["margin"])

    yield MarginPolicy
    policy_registry._POLICIES.pop("recipe_margin", None)


def test_recipe_add_a_policy(recipe_policy, tiny_model, tmp_path):
    model = tiny_model.eval()
    always, never = recipe_policy(0.0), recipe_policy(2.0)
    x = torch.randn(5, 3, 32, 32)
    assert (model.run(x, always).exit_index == 0).all()
    assert (model.run(x, never).exit_index == model.num_exits - 1).all()
    cost = measure_costs(model, always)
    path = save_bundle(Bundle(model, {"margin": recipe_policy(0.3)}, "margin", cost, {}), tmp_path / "m.offramp")
    loaded = load_bundle(path)
    assert loaded.policies["margin"].kind == "recipe_margin" and loaded.policies["margin"].margin == 0.3
    engine = Engine(loaded, device="cpu")
    result = engine.infer(np.zeros((32, 32, 3), np.uint8))
    assert 0 <= result.exit_index < model.num_exits


# -- recipe: add a panel --------------------------------------------------------------------------------
def test_recipe_add_a_panel(qtbot, tmp_path):
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QLabel

    from app.main_window import MainWindow
    from app.session import Session
    from app.widgets.live import LiveView
    from qt_helpers import write_tiny_bundle

    class LastExitPanel(QLabel):
        """Shows which exit fired, in one line."""

        def __init__(self):
            super().__init__("–")
            self.seen, self.exits = [], 0

        def set_model(self, info):
            self.exits = info.num_exits
            self.clear()

        def show_result(self, result, frame):
            if result is not None:
                self.seen.append(result)
                self.setText(f"exit E{result.exit_index}")

        def set_theme(self, theme):
            self.setStyleSheet(f"color: {theme.foreground}")

        def clear(self):
            self.setText(f"{self.exits} exits")

    panel = LastExitPanel()
    assert isinstance(panel, LiveView)
    window = MainWindow(Session(device="cpu"), settings=QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(window)
    window.add_panel("last_exit", "Last exit", panel)
    window.show()
    with qtbot.waitSignal(window.session.model_loaded, timeout=20000):
        window.session.load_bundle(str(write_tiny_bundle(tmp_path / "t.offramp")))
    assert panel.text() == "3 exits"
    still = tmp_path / "still.png"
    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(still)
    with qtbot.waitSignal(window.session.result, timeout=20000, check_params_cb=lambda r, f: r is not None):
        window.open_source(str(still))
    window.render_now()
    assert panel.seen and panel.seen[-1] is window.shown_result
    assert panel.text() == f"exit E{window.shown_result.exit_index}"
    assert window.docks["last_exit"].toggleViewAction() in window.actions.view_menu.actions()
    with pytest.raises(ValueError, match="already in the window"):
        window.add_panel("last_exit", "Again", QLabel())
    window.session.close_source()


def test_recipe_a_panel_added_while_the_docks_are_built_is_in_the_menu_and_fed(qtbot, tmp_path):
    """The recipe's own place for the line: the end of `MainWindow._build_docks`."""
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QLabel

    from app.main_window import MainWindow
    from app.session import Session

    class Counter(QLabel):
        def __init__(self):
            super().__init__("0")
            self.models = 0

        def set_model(self, info):
            self.models += 1

        def show_result(self, result, frame):
            pass

        def set_theme(self, theme):
            pass

        def clear(self):
            pass

    class Window(MainWindow):
        def _build_docks(self) -> None:
            super()._build_docks()
            self.counter = Counter()
            self.add_panel("counter", "Counter", self.counter)

    window = Window(Session(device="cpu"), settings=QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(window)
    assert window.docks["counter"].toggleViewAction() in window.actions.view_menu.actions()
    assert window.counter in window.live_views
    from qt_helpers import write_tiny_bundle
    with qtbot.waitSignal(window.session.model_loaded, timeout=20000):
        window.session.load_bundle(str(write_tiny_bundle(tmp_path / "t.offramp")))
    assert window.counter.models == 1

"""The layers: engine/ never imports Qt or the app (DESIGN.md: the engine knows nothing of Qt), no
import cycles, engine.policies decides only; and a new trained policy family needs no edits outside
its own module."""
import pkgutil
import subprocess
import sys

import pytest

import engine


def test_engine_imports_no_qt_and_no_app():
    modules = [m.name for m in pkgutil.walk_packages(engine.__path__, "engine.")]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph', 'app', 'shiboken6'))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"engine imported {out.stdout.strip()}"
    assert len(modules) >= 10


# -- the same contracts read from the source: imports inside functions count too ------------------
from import_graph import cycles, project_modules, violations  # noqa: E402

QT = ("PySide6", "shiboken6", "pyqtgraph")
# the app's modules that hold state and logic, not widgets: testable without Qt, so they never import it
PURE_APP = ("app.state", "app.stats", "app.dataset", "app.tasks", "app.platform_check")


def test_engine_never_imports_qt_or_the_app_even_inside_functions():
    assert violations(("engine",), QT + ("app",)) == []


def test_pure_app_modules_never_import_qt():
    assert set(PURE_APP) <= set(project_modules())
    assert violations(PURE_APP, QT) == []


def test_no_import_cycles_at_module_level():
    assert cycles("engine", module_level_only=True) == []
    assert cycles("app", module_level_only=True) == []


def test_the_contract_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The checker itself: a deferred import of Qt in an engine-like module is found."""
    import import_graph
    pkg = tmp_path / "engine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sneaky.py").write_text("def f():\n    from PySide6 import QtCore\n    from ..app import x\n")
    monkeypatch.setattr(import_graph, "ROOT", tmp_path)
    monkeypatch.setattr(import_graph, "PACKAGES", ("engine",))
    found = import_graph.violations(("engine",), QT)
    assert found == ["engine/sneaky.py:2 imports PySide6", "engine/sneaky.py:2 imports PySide6.QtCore"]


def test_no_import_cycles_even_through_imports_inside_functions():
    assert cycles("engine") == []
    assert cycles("app") == []


# engine.policies decides and nothing else: what trains, scores, searches, benchmarks or reads data
# builds on it, never the other way round. It does not read engine.records either: a policy sees
# one exit's Evidence, and `simulate` takes plain tensors, so recordings stay the trainers' business.
NOT_FOR_POLICIES = ("engine.train", "engine.evaluate", "engine.bench", "engine.bench_report", "engine.search",
                    "engine.fronts", "engine.records", "engine.data", "engine.splits", "engine.features",
                    "engine.model", "engine.cost", "engine.prepared", "engine.runtime", "engine.cli")


def test_policies_never_import_training_evaluation_or_data():
    assert violations(("engine.policies",), NOT_FOR_POLICIES) == []


# -- a new trained policy family: one module, no edits elsewhere --------------------------------
@pytest.fixture
def toy_family(monkeypatch):
    """A trained policy kind "toy" registered as a new family would be: a policy class and its
    trainer, both in this test (the registries are copies, restored afterwards)."""
    import torch

    import engine.policies.base as policy_base
    import engine.train.registry as trainer_registry
    from engine.policies import Policy, register_policy
    from engine.train import lambda_sweep, register_trainer

    monkeypatch.setattr(policy_base, "_POLICIES", dict(policy_base._POLICIES))
    monkeypatch.setattr(trainer_registry, "_TRAINERS", dict(trainer_registry._TRAINERS))

    @register_policy
    class ToyPolicy(Policy):
        """Exit where the max-probability reaches a learned cut (a tensor, stored in the bundle)."""

        kind = "toy"

        def __init__(self, cut: float = 1.0):
            super().__init__()
            self.register_buffer("cut", torch.tensor(float(cut)))

        def decide(self, evidence):
            return torch.softmax(evidence.current.float(), dim=-1).max(dim=-1).values >= self.cut

        def decision_flops(self):  # what the λ sweep charges each decision: no matrix products
            return [0.0, 0.0, 0.0]

        @classmethod
        def from_json(cls, d, *, num_exits, num_classes):
            return cls()

    @register_trainer("toy", summary="a learned cut on the max-probability")
    def fit_toy(records, score_records, cost, *, lambdas=None, progress=None, cancel=None, **unused):
        return lambda_sweep(lambda lam: ToyPolicy(cut=1.0 - lam), score_records, cost, lambdas or (0.0, 0.3, 0.6),
                            progress=progress, cancel=cancel)

    return ToyPolicy


def test_a_registered_trained_policy_is_offered_everywhere_without_other_edits(toy_family, tiny_model, tmp_path,
                                                                                capsys):
    import torch

    from engine import bench, bench_report, fronts
    from engine.bundle import Bundle, load_bundle, save_bundle
    from engine.cli import build_parser, main
    from engine.cost import measure_costs
    from engine.policies import ThresholdPolicy
    from engine.records import Records
    from engine.runtime import Engine

    # the lists: the CLI's --kind choices and help, the fronts it fits, the families bench fits and judges
    args = build_parser().parse_args(["train-policy", "b.offramp", "--data", "d", "--kind", "toy"])
    assert args.kind == "toy"
    with pytest.raises(SystemExit):
        main(["train-policy", "--help"])
    assert "toy: a learned cut on the max-probability" in " ".join(capsys.readouterr().out.split())
    assert "toy" in fronts.policy_kinds() and "toy" in bench.fitted_kinds()
    assert "toy" in bench_report.learned_families() and "toy" in bench_report.adaptive_families()

    # and it works through them: fitted into a bundle, saved, loaded and run live
    x = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, feats = tiny_model.forward_all(x, with_features=True, calibrated=True)
    logits = torch.stack(logits, 1)
    records = Records(logits, feats, logits[:, -1].argmax(-1), tiny_model.class_names, tiny_model.exit_stages)
    bundle = Bundle(tiny_model, {"threshold": ThresholdPolicy.uniform(3, 0.9)}, "threshold", measure_costs(tiny_model))
    trained, summary = fronts.train_policy_bundle(bundle, "toy", records, make_default=True)
    assert summary["name"] == "toy" and len(summary["front"]) >= 1
    assert trained.meta["policy_fronts"]["toy"]["kind"] == "toy"
    loaded = load_bundle(save_bundle(trained, tmp_path / "toy.offramp"))
    assert isinstance(loaded.policies["toy"], toy_family)
    assert float(loaded.policies["toy"].cut) == float(trained.policies["toy"].cut)
    engine = Engine(loaded, device="cpu", latency_repeats=1)
    assert engine.policy_name == "toy" and engine.thresholds is None
    assert engine.infer(x[0]).exit_index in range(3)

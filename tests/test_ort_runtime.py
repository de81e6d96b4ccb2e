"""engine.ort_runtime: the onnxruntime form gives the torch prepared form's answers (same exit,
logits within 1e-4) for every kind of decision, at batch 1 and batch > 1; the Engine switches
runtimes back and forth, applies threshold edits on the next frame with no new graph, and says in
one sentence why a runtime cannot be used, staying on torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

import engine.ort_runtime as ort_runtime  # noqa: E402
from engine.bench_report import runtime_lines  # noqa: E402
from engine.model import MultiExitNet  # noqa: E402
from engine.ort_runtime import OrtPreparedModel  # noqa: E402
from engine.policies import BolukbasiPolicy, Policy, StructurePolicy, ThresholdPolicy, register_policy  # noqa: E402
from engine.prepared import prepare  # noqa: E402
from engine.runtime import Engine  # noqa: E402
from qt_helpers import tiny_bundle  # noqa: E402
from synth import build_tiny_model  # noqa: E402

TOLERANCE = 1e-4


@register_policy
class _FirstLogitBelowZero(Policy):
    """A policy with no row decider: its own `decide` on an Evidence runs on the host."""

    kind = "test_ort_first_logit"

    def decide(self, evidence):
        return evidence.current[:, 0] < 0

    @classmethod
    def from_json(cls, d, *, num_exits, num_classes):
        return cls()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g) * torch.linspace(0.2, 4.0, n).view(n, 1, 1, 1)


def _policies(model: MultiExitNet, images: torch.Tensor) -> dict[str, Policy]:
    """Thresholds at each exit's median confidence, and untrained learned policies that fire at some exits."""
    torch.manual_seed(0)
    n, k = model.num_exits, model.num_classes
    with torch.no_grad():
        logits, feats = model.forward_all(images, with_features=True, calibrated=True)
        conf = torch.softmax(torch.stack(logits, 1), -1).amax(-1).sort(dim=0).values
        m = images.shape[0] // 2
        structure = StructurePolicy([f.shape[1] for f in feats], k, proj_dim=4, hidden=8)
        structure.set_prototypes(feats, torch.arange(images.shape[0]) % k)
        h = structure.halting_probabilities(torch.stack(logits, 1), feats)[:, 0].sort().values
        structure.tau = float((h[m - 1] + h[m]) / 2)
    return {"max_prob": ThresholdPolicy(((conf[m - 1] + conf[m]) / 2).tolist()),
            "margin": ThresholdPolicy([None] + [0.1] * (n - 1), "margin"),
            "bolukbasi": BolukbasiPolicy(n, k, top_k=3).eval(), "structure": structure.eval(),
            "other": _FirstLogitBelowZero()}


@pytest.mark.parametrize("head", ["linear", "conv"])
def test_same_exits_and_logits_as_the_torch_prepared_form(head):
    model = build_tiny_model(head)
    model.temperature.copy_(torch.tensor([1.3, 0.8, 1.0]))
    form, torch_form = OrtPreparedModel(model), prepare(model)
    assert form.runtime.startswith("onnxruntime ") and form.input_shape == (1, 3, 32, 32)
    images = _images(16)
    for name, policy in _policies(model, images).items():
        exits = set()
        with torch.inference_mode():
            for i in range(images.shape[0]):
                x = images[i:i + 1]
                want, taps = torch_form.run(x, policy), {}
                got = form.run(x, policy, taps)
                assert torch.equal(got.exit_index, want.exit_index), (name, i)
                assert torch.equal(got.ran, want.ran) and torch.equal(got.stages_run, want.stages_run)
                ran = want.ran
                assert torch.allclose(got.exit_logits[ran], want.exit_logits[ran], rtol=0, atol=TOLERANCE)
                assert torch.isnan(got.exit_logits[~ran]).all()
                assert set(taps) == {e for e in range(model.num_exits - 1) if ran[0, e]}
                exits.add(int(want.exit_index[0]))
            batch_want, batch_got = model.run(images, policy), form.run(images, policy)  # batch > 1: torch
            assert torch.equal(batch_got.exit_index, batch_want.exit_index)
        if name in ("max_prob", "structure"):
            assert len(exits) > 1, f"{name}: every image left at one exit; the test shows nothing"
    with torch.inference_mode():  # the full model, for the live reference timing
        x = images[:1]
        assert torch.allclose(form.run_to(x), torch_form.run_to(x), atol=TOLERANCE)
        logits, tap = form.run_to(x, 0, with_tap=True)
        assert logits.shape == (1, model.num_classes) and tap.shape[0] == 1


def _frame(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8)


def test_engine_switches_runtimes_and_applies_thresholds_on_the_next_frame():
    engine = Engine(tiny_bundle(), device="cpu", latency_repeats=3, reference_every=1)
    assert engine.runtime_name == "torch" and engine.available_runtimes() == ["torch", "onnxruntime"]
    frame = _frame()
    want = engine.infer(frame)
    engine.set_runtime("onnxruntime")
    assert engine.runtime_name == "onnxruntime" and engine.cost.has_latency
    got = engine.infer(frame)
    assert got.runtime.startswith("onnxruntime") and got.full_ms_live
    assert got.exit_index == want.exit_index == 2 and got.confidence == pytest.approx(want.confidence, abs=1e-5)
    sessions = len(engine._prepared._sessions)
    engine.set_thresholds([0.0, 0.0, 0.0])  # every exit stays active: the next frame, no new graph
    assert engine.infer(frame).exit_index == 0 and len(engine._prepared._sessions) == sessions
    engine.set_thresholds([None, 0.0, 0.0])
    assert engine.infer(frame).exit_index == 1
    engine.set_policy("learned")  # a learned policy decides on the host too
    assert engine.infer(frame).runtime.startswith("onnxruntime")
    batch = engine.infer_batch([frame, _frame(1), _frame(2)])  # batch > 1: the torch folded modules
    assert len(batch) == 3
    engine.set_runtime("torch")
    assert engine.runtime_name == "torch" and "TorchScript" in engine.infer(frame).runtime


def test_a_runtime_that_cannot_run_says_why_and_the_engine_stays_on_torch(monkeypatch, caplog):
    engine = Engine(tiny_bundle(), device="cpu", latency_repeats=3)
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'; choose one of torch, onnxruntime"):
        engine.set_runtime("tensorrt")
    assert "CPU only" in ort_runtime.unavailable_reason("cuda:0")

    def failing(model, **kw):
        raise RuntimeError("no exporter for this layer")
    monkeypatch.setattr(ort_runtime, "prepare_ort", failing)  # an export failure
    with pytest.raises(ValueError, match=r"the onnxruntime runtime could not run this model \(no exporter for this "
                                         r"layer\); it stays on torch"):
        engine.set_runtime("onnxruntime")
    assert "could not prepare the model for the onnxruntime runtime" in caplog.text  # the traceback is logged
    assert engine.runtime_name == "torch" and "TorchScript" in engine.infer(_frame()).runtime

    monkeypatch.setattr(ort_runtime.importlib.util, "find_spec", lambda name: None)  # onnxruntime missing
    assert engine.available_runtimes() == ["torch"]
    with pytest.raises(ValueError, match=r"needs the onnx and onnxruntime packages: pip install 'offramp\[export\]'"):
        engine.set_runtime("onnxruntime")
    with pytest.raises(ValueError, match="onnxruntime packages"):
        Engine(engine.bundle, device="cpu", runtime="onnxruntime")
    assert engine.runtime_name == "torch"


def test_bench_prints_a_row_per_runtime():
    point = {"ms": 0.5, "by_runtime": {"prepared": {"ms": 0.8, "speedup": 1.5},
                                       "onnxruntime": {"ms": 0.4, "speedup": 1.5}}}
    rep = {"timing": {"by_runtime": {"prepared": {"runtime": "torch TorchScript, BatchNorm folded", "full_ms": 1.2,
                                                  "full_staged_ms": 1.25},
                                     "onnxruntime": {"runtime": "onnxruntime 1.32 CPU", "full_ms": 0.6,
                                                     "full_staged_ms": 0.62}}},
           "methods": {"full": {"family": "full", "at_loss": {"0.5": {"ms": 1.2}}},
                       "threshold": {"family": "threshold", "at_loss": {"0.5": point}}}}
    lines = runtime_lines(rep)
    assert len(lines) == 5 and "threshold" in lines[1] and "full" in lines[1]
    assert lines[2].startswith("torch TorchScript ") and "0.80  1.50×" in lines[2] and "1.20" in lines[2]
    assert lines[3].startswith("onnxruntime 1.32 CPU") and "0.40  1.50×" in lines[3]
    assert "0.50×" in lines[4]
    assert runtime_lines({"timing": {}, "methods": {}}) == []

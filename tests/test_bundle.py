"""Bundles: one safetensors file, bit-exact round trip, atomic saves, a clear error for every bad file."""
from __future__ import annotations

import datetime
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import engine
import engine.bundle as bundle_module
from engine.backbones import build_backbone
from engine.bundle import (Bundle, BundleError, default_bundle_path, load_bundle, manifest_of, read_manifest,
                           save_bundle)
from engine.cost import CostTable
from engine.model import MultiExitNet
from engine.policies import Policy, ThresholdPolicy, register_policy

CLASSES = [f"class{i}" for i in range(10)]


@register_policy
class _GatePolicy(Policy):
    """A policy with tensors of its own: exits where a linear gate on the pooled features says so."""

    kind = "test_bundle_gate"

    def __init__(self, channels: int = 16, num_classes: int = 10):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, channels))
        self.register_buffer("bias", torch.randn(num_classes))

    def decide(self, evidence):
        return (evidence.features[:, : self.weight.shape[1]] @ self.weight.T + self.bias).max(-1).values > 0

    def to_json(self) -> dict:
        return {"kind": self.kind, "channels": self.weight.shape[1]}

    @classmethod
    def from_json(cls, d, *, num_exits, num_classes):
        return cls(d["channels"], num_classes)


def _model(seed: int = 0) -> MultiExitNet:
    torch.manual_seed(seed)
    model = MultiExitNet.attach(build_backbone("cifar_resnet_small"), class_names=CLASSES)
    with torch.no_grad():  # non-trivial state everywhere, so equality means something
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t).abs() + 0.1 if "running_var" in name else torch.randn_like(t))
        model.temperature.copy_(torch.tensor([1.5, 0.75, 2.25]))
    return model.eval()


def _bundle(seed: int = 0) -> Bundle:
    model = _model(seed)
    policies = {"fast": ThresholdPolicy([0.6, None, None]), "entropy": ThresholdPolicy([0.3, 0.5, 1.0], "entropy"),
                "gate": _GatePolicy()}
    cost = CostTable([0, 1, 2], [1e6, 2e6, 3e6], [1e3, 2e3, 3e3], [0.0, 0.0, 0.0], [0.5, 0.25, 0.125],
                     [0.01, 0.02, 0.03], "cpu")
    meta = {"trained_on": "random", "curve": [[0.1, 0.9], [0.5, 0.95]], "accuracy": 0.123456789012345}
    return Bundle(model, policies, "fast", cost, meta)


@pytest.fixture
def saved(tmp_path) -> tuple[Bundle, Path]:
    b = _bundle()
    path = tmp_path / "model.offramp"
    save_bundle(b, path)
    return b, path


def _rewrite(path: Path, out: Path, *, tensors=None, manifest=None, metadata=None) -> Path:
    """Copy the bundle at `path` to `out`, editing its tensors (a function) and/or manifest (a function)."""
    t = load_file(str(path))
    m = read_manifest(path)
    if tensors is not None:
        t = tensors(t)
    if manifest is not None:
        m = manifest(m) or m
    save_file(t, str(out), metadata=metadata if metadata is not None else {"offramp": json.dumps(m)})
    return out


# -- round trip -----------------------------------------------------------------------------------
def test_round_trip_is_bit_exact(saved):
    b, path = saved
    loaded = load_bundle(path)
    want, got = b.model.state_dict(), loaded.model.state_dict()
    assert list(want) == list(got)
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    assert torch.equal(loaded.model.temperature, torch.tensor([1.5, 0.75, 2.25]))
    assert loaded.policies.keys() == b.policies.keys() and loaded.default_policy == "fast"
    for name, p in b.policies.items():
        assert type(loaded.policies[name]) is type(p) and loaded.policies[name].to_json() == p.to_json()
        for k, v in p.state_dict().items():
            assert torch.equal(loaded.policies[name].state_dict()[k], v)
    assert loaded.policies["fast"].thresholds == [0.6, None, None]
    assert loaded.cost == b.cost and loaded.meta == b.meta
    assert loaded.class_names == CLASSES and loaded.model.exit_specs == b.model.exit_specs
    assert loaded.model.backbone.preset == b.model.backbone.preset
    assert not loaded.model.training

    x = torch.randn(4, 3, 32, 32)
    for a, c in zip(b.model.forward_all(x, calibrated=True), loaded.model.forward_all(x, calibrated=True)):
        assert torch.equal(a, c)
    for name in b.policies:
        ra, rb = b.model.run(x, b.policies[name]), loaded.model.run(x, loaded.policies[name])
        assert torch.equal(ra.exit_index, rb.exit_index) and torch.equal(ra.logits, rb.logits)


def test_manifest_survives_a_second_round_trip(saved, tmp_path):
    b, path = saved
    again = save_bundle(load_bundle(path), tmp_path / "again.offramp")
    first, second = read_manifest(path), read_manifest(again)
    first.pop("created"), second.pop("created")
    assert first == second
    assert load_file(str(path)).keys() == load_file(str(again)).keys()


def test_file_layout(saved):
    b, path = saved
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert list(metadata) == ["offramp"]
    assert keys == {"model." + k for k in b.model.state_dict()} | {"policy.gate.weight", "policy.gate.bias"}
    m = json.loads(metadata["offramp"])
    assert m["format"] == "offramp-bundle" and m["format_version"] == 1
    assert m["backbone"] == {"name": "cifar_resnet_small", "kwargs": {"num_classes": 10}}
    assert m["preset"]["crop"] == 32 and m["class_names"] == CLASSES and len(m["exits"]) == 3
    assert m["policies"]["fast"] == {"kind": "threshold", "measure": "max_prob", "thresholds": [0.6, None, None]}
    assert m["default_policy"] == "fast" and m["meta"] == b.meta and m["cost"] == b.cost.to_json()
    assert m["offramp_version"] == engine.__version__ and m["torch_version"] == torch.__version__
    assert datetime.datetime.fromisoformat(m["created"]).tzinfo is not None
    assert read_manifest(path) == m


def test_shared_and_strided_tensors_are_saved(tmp_path):
    b = _bundle()
    gate = b.policies["gate"]
    gate.weight = b.model.exits[0].post.weight  # the same Parameter in two places: shared storage
    b.model.exits[1].post.weight.data = b.model.exits[1].post.weight.data.t().contiguous().t()  # not contiguous
    loaded = load_bundle(save_bundle(b, tmp_path / "shared.offramp"))
    assert torch.equal(loaded.policies["gate"].weight, b.model.exits[0].post.weight)
    assert torch.equal(loaded.model.exits[1].post.weight, b.model.exits[1].post.weight)


def test_bundle_checks_its_policies():
    b = _bundle()
    with pytest.raises(ValueError, match="default policy 'nope'"):
        Bundle(b.model, b.policies, "nope", b.cost)
    with pytest.raises(ValueError, match="at least one policy"):
        Bundle(b.model, {}, "fast", b.cost)


def test_meta_that_is_not_json_is_refused_before_writing(tmp_path):
    b = _bundle()
    b.meta = {"when": datetime.datetime.now()}
    with pytest.raises(ValueError, match="not JSON-able"):
        save_bundle(b, tmp_path / "x.offramp")
    assert os.listdir(tmp_path) == []


# -- atomic saves and no pickle ------------------------------------------------------------------
def _fail_midway(tmp, data):
    with open(tmp, "wb") as f:
        f.write(data[:1000])  # half a file on disk, then the disk "fills up"
    raise OSError(28, "No space left on device")


def _fail_rename(src, dst):
    raise PermissionError(f"cannot replace {dst}")


@pytest.mark.parametrize("where, fail", [("write", _fail_midway), ("os.replace", _fail_rename)])
def test_failed_save_keeps_the_previous_bundle(saved, monkeypatch, where, fail):
    _, path = saved
    before = path.read_bytes()
    if where == "write":
        monkeypatch.setattr(bundle_module, "_write", fail)
    else:
        monkeypatch.setattr(bundle_module.os, "replace", fail)
    with pytest.raises(OSError):
        save_bundle(_bundle(seed=1), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]  # no temp file left behind
    load_bundle(path)


def test_loading_never_unpickles(saved, monkeypatch):
    _, path = saved

    def refuse(*args, **kwargs):
        raise AssertionError("load_bundle must not unpickle")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(mod, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    assert load_bundle(path).default_policy == "fast"
    assert read_manifest(path)["format"] == "offramp-bundle"


# -- every bad file raises BundleError ------------------------------------------------------------
def _truncated(path, out):
    out.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return out


def _garbage(path, out):
    out.write_bytes(os.urandom(4096))
    return out


def _empty(path, out):
    out.write_bytes(b"")
    return out


def _no_manifest(path, out):
    return _rewrite(path, out, metadata={"other": "thing"})


def _bad_json(path, out):
    return _rewrite(path, out, metadata={"offramp": "{not json"})


def _edit(**changes):
    def make(path, out):
        return _rewrite(path, out, manifest=lambda m: m.update(changes))
    return make


def _drop(path, out):
    return _rewrite(path, out, tensors=lambda t: {k: v for k, v in t.items() if k != "model.exits.1.post.weight"})


def _extra(path, out):
    return _rewrite(path, out, tensors=lambda t: {**t, "model.exits.9.post.weight": torch.zeros(2)})


def _reshape(path, out):
    return _rewrite(path, out, tensors=lambda t: {**t, "model.exits.0.post.weight": torch.zeros(10, 17)})


def _unknown_policy(path, out):
    return _rewrite(path, out, manifest=lambda m: m["policies"].update(fast={"kind": "telepathy"}))


BAD = {
    "truncated": (_truncated, "not a readable safetensors file"),
    "garbage": (_garbage, "not a readable safetensors file"),
    "empty": (_empty, "not a readable safetensors file"),
    "no manifest": (_no_manifest, "without an Offramp manifest"),
    "invalid json": (_bad_json, "not valid JSON"),
    "wrong format": (_edit(format="something-else"), "not an Offramp bundle"),
    "newer version": (_edit(format_version=2), "newer Offramp"),
    "unknown version": (_edit(format_version="one"), "unknown bundle format version"),
    "unknown backbone": (_edit(backbone={"name": "resnet9000", "kwargs": {}}), "backbone 'resnet9000'"),
    "unknown policy": (_unknown_policy, "policy 'fast'.*unknown policy kind 'telepathy'"),
    "bad default": (_edit(default_policy="gone"), "default policy 'gone'"),
    "missing tensor": (_drop, "lacks 1 tensor.*model.exits.1.post.weight"),
    "unexpected tensor": (_extra, "does not have: model.exits.9.post.weight"),
    "wrong shape": (_reshape, r"model.exits.0.post.weight of shape \(10, 17\), expected \(10, 16\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_bundles_raise_bundle_error(saved, tmp_path, case):
    _, path = saved
    make, message = BAD[case]
    bad = make(path, tmp_path / "bad.offramp")
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(bad)
    assert str(bad) in str(info.value) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nothing.offramp")
    with pytest.raises(BundleError, match="does not exist"):
        read_manifest(tmp_path / "nothing.offramp")
    with pytest.raises(BundleError, match="is not a file"):
        load_bundle(tmp_path)


def test_manifest_checks_apply_to_read_manifest(saved, tmp_path):
    _, path = saved
    with pytest.raises(BundleError, match="newer Offramp"):
        read_manifest(_edit(format_version=7)(path, tmp_path / "v7.offramp"))


def test_manifest_of_describes_the_bundle():
    b = _bundle()
    m = manifest_of(b)
    assert m["exits"] == [s.to_json() for s in b.model.exit_specs] and m["policies"]["gate"]["channels"] == 16


# -- default path ---------------------------------------------------------------------------------
def test_default_bundle_path(monkeypatch, tmp_path):
    monkeypatch.delenv("OFFRAMP_DEFAULT_BUNDLE", raising=False)
    repo = Path(engine.__file__).resolve().parent.parent
    assert default_bundle_path() == repo / "resources" / "default.offramp"
    monkeypatch.setenv("OFFRAMP_DEFAULT_BUNDLE", str(tmp_path / "mine.offramp"))
    assert default_bundle_path() == tmp_path / "mine.offramp"


def test_saved_files_get_the_usual_permissions(saved, tmp_path):
    import os
    import stat
    from engine.bundle import load_bundle, save_bundle
    from engine.files import current_umask
    out = save_bundle(load_bundle(saved[1]), tmp_path / "copy.offramp")
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~current_umask()


# -- checksums and invalid numbers (issue 11, item 4) ---------------------------------------------
from engine.bundle_checks import CHECKSUM_KEY, tensors_checksum  # noqa: E402


def _resum(m: dict, t: dict) -> dict:
    """The manifest `m` with the checksum of tensors `t`: a deliberately made bad bundle, not a damaged one."""
    return {**m, CHECKSUM_KEY: tensors_checksum(t)}


def _rewrite_checked(path: Path, out: Path, edit_tensors) -> Path:
    t = edit_tensors(load_file(str(path)))
    save_file(t, str(out), metadata={"offramp": json.dumps(_resum(read_manifest(path), t))})
    return out


def test_saved_bundles_carry_a_checksum_of_their_tensors(saved):
    _, path = saved
    m = read_manifest(path)
    assert m[CHECKSUM_KEY] == tensors_checksum(load_file(str(path)))
    assert len(m[CHECKSUM_KEY]) == 64


def test_flipped_bytes_in_the_weights_are_refused(saved, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # tensor data follow the header
    for i in range(100):
        data[start + (i * 7919) % (len(data) - start)] ^= 0xFF
    bad = tmp_path / "flipped.offramp"
    bad.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="is damaged: its weights do not match their checksum") as info:
        load_bundle(bad)
    assert str(bad) in str(info.value)


def test_bundles_without_a_checksum_still_load(saved, tmp_path):
    b, path = saved
    old = _rewrite(path, tmp_path / "old.offramp", manifest=lambda m: m.pop(CHECKSUM_KEY) and None)
    assert CHECKSUM_KEY not in read_manifest(old)
    loaded = load_bundle(old)
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in b.model.state_dict().items())


def _set(key, value):
    def edit(t):
        t = dict(t)
        x = t[key].clone()
        x.view(-1)[0] = value
        t[key] = x
        return t
    return edit


@pytest.mark.parametrize("key, value, message", [
    ("model.exits.0.post.weight", float("nan"), "NaN or infinite values in tensor model.exits.0.post.weight"),
    ("model.backbone.stages.1.0.conv1.weight", float("inf"), "NaN or infinite values"),
    ("policy.gate.bias", float("-inf"), "NaN or infinite values in tensor policy.gate.bias"),
    ("model.temperature", float("nan"), "NaN or infinite values in tensor model.temperature"),
    ("model.temperature", 0.0, "every temperature must be positive"),
    ("model.temperature", -1.5, "every temperature must be positive"),
])
def test_invalid_numbers_in_the_weights_are_refused(saved, tmp_path, key, value, message):
    _, path = saved
    bad = _rewrite_checked(path, tmp_path / "bad.offramp", _set(key, value))
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def _policy_edit(name, **changes):
    def edit(m):
        m["policies"][name].update(changes)
    return edit


@pytest.mark.parametrize("edit, message", [
    (_policy_edit("fast", thresholds=[float("nan"), None, None]), r"policies.fast.thresholds\[0\] is not a finite"),
    (_policy_edit("fast", thresholds=[float("inf"), None, None]), "is not a finite number"),
    (lambda m: m["preset"].update(std=[0.2, 0.0, 0.2]), "preset std .* not positive"),
    (lambda m: m["preset"].update(mean=[float("nan"), 0.0, 0.2]), r"preset.mean\[0\] is not a finite number"),
    (lambda m: m["cost"].update(stage_flops=[1e6, float("inf"), 3e6]), "cost.stage_flops.* is not a finite"),
    (lambda m: m["cost"].update(exit_flops=[1e3, -2e3, 3e3]), "cost exit_flops has a value that is not a non-neg"),
])
def test_invalid_numbers_in_the_manifest_are_refused(saved, tmp_path, edit, message):
    _, path = saved
    bad = _rewrite(path, tmp_path / "bad.offramp", manifest=edit)
    for read in (read_manifest, load_bundle):
        with pytest.raises(BundleError, match=message) as info:
            read(bad)
        assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_thresholds_outside_0_to_1_are_refused_at_load(saved, tmp_path):
    _, path = saved
    bad = _rewrite(path, tmp_path / "bad.offramp", manifest=_policy_edit("entropy", thresholds=[1.5, 0.5, 1.0]))
    with pytest.raises(BundleError, match=f"{bad}.*policy 'entropy'.*threshold 1.5 is outside 0..1"):
        load_bundle(bad)


def test_policies_refuse_non_finite_numbers():
    from engine.policies import BolukbasiPolicy, StructurePolicy
    with pytest.raises(ValueError, match="outside 0..1"):
        ThresholdPolicy([float("inf"), None])
    with pytest.raises(ValueError, match="outside 0..1"):
        ThresholdPolicy([float("nan"), None])
    for t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="proto_temperature must be a positive number"):
            StructurePolicy([4, 4], 3, proto_temperature=t)
    with pytest.raises(ValueError, match="offset must be a finite number"):
        BolukbasiPolicy(3, 4, offset=float("nan"))


def test_the_manifest_is_strict_json_even_when_meta_holds_nan(tmp_path):
    b = _bundle()
    b.meta = {"ece": float("nan"), "speedup": float("inf"), "nested": [1.0, float("-inf")]}
    path = save_bundle(b, tmp_path / "nan.offramp")
    with safe_open(str(path), framework="pt") as f:
        text = f.metadata()["offramp"]

    def refuse(name):
        raise AssertionError(f"bare {name} in the manifest")

    m = json.loads(text, parse_constant=refuse)
    assert m["meta"] == {"ece": None, "speedup": None, "nested": [1.0, None]}
    assert load_bundle(path).meta == m["meta"]


# -- small files must not allocate much (issue 11, item 5) ----------------------------------------
class _LargestAllocation:
    """Records the largest tensor (bytes) made on a real device while active (meta tensors are free)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Spy(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor) and not t.is_meta:
                        outer.largest = max(outer.largest, t.numel() * t.element_size())
                return out

        self.largest, self.mode = 0, Spy()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def _backbone_classes(n):
    def edit(m):
        m["backbone"]["kwargs"]["num_classes"] = n
        m["exits"][-1]["kind"] = "original"  # the backbone's own classifier as the last exit
    return edit


def _conv_hidden(n):
    def edit(m):
        m["exits"][0].update(kind="conv", hidden=n)
    return edit


def _policy_widths(n):
    def edit(m):
        m["policies"]["wide"] = {"kind": "structure", "feature_widths": [n, n, n], "num_classes": 10, "hidden": n}
    return edit


@pytest.mark.parametrize("edit, message", [
    (_backbone_classes(2_500_000), r"of shape \(10, 64\), expected \(2500000, 64\)"),
    (_conv_hidden(1_000_000), r"lacks 10 tensor\(s\) its model needs: model.exits.0.post.0.weight"),
    (_policy_widths(3_000_000), r"lacks 14 tensor\(s\) its model needs: policy.wide"),
    (lambda m: m["exits"][0].update(num_classes=2_500_000), "exit 0 declares 2500000 classes but the bundle names 10"),
    (lambda m: m.update(class_names=[f"c{i}" for i in range(100_001)]), "it names 100001 classes; a bundle has 1 to"),
    (lambda m: m["preset"].update(crop=100_000, resize=100_000), "preset crop is 100000, not a size of 1 to 4096"),
    (lambda m: m["meta"].update(deep=json.loads("[" * 100 + "]" * 100)), "nested deeper than the 64 levels"),
    (lambda m: m["meta"].update(big="x" * (9 * 2**20)), "manifest, more than the"),
])
def test_declared_sizes_are_checked_before_allocating(saved, tmp_path, edit, message):
    _, path = saved
    bad = _rewrite(path, tmp_path / "big.offramp", manifest=edit)
    with _LargestAllocation() as spy, pytest.raises(BundleError, match=message) as info:
        load_bundle(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    assert spy.largest < 4 * 2**20, f"{spy.largest / 2**20:.0f} MiB allocated for a {bad.stat().st_size}-byte file"


def test_a_header_longer_than_its_file_is_refused_from_its_first_bytes(tmp_path):
    bad = tmp_path / "claims.offramp"
    bad.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(BundleError, match="not a readable safetensors file .*truncated"):
        load_bundle(bad)


@pytest.mark.parametrize("name", ["cifar_resnet_small", "resnet18", "mobilenet_v3_small", "efficientnet_b0",
                                  "convnext_tiny", "regnet_y_400mf"])
def test_every_backbone_family_is_built_without_allocating_and_loads(name):
    """What load_bundle does for each family: build with large tensors on meta, then load real ones."""
    from engine.bundle_checks import large_tensors_on_meta, meta_tensors_left
    with _LargestAllocation() as spy, large_tensors_on_meta():
        model = MultiExitNet.attach(build_backbone(name, num_classes=10), class_names=CLASSES)
    assert spy.largest < 4 * 2**20
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    assert meta_tensors_left(model) == []


def test_the_shipped_bundle_carries_a_checksum_of_its_weights():
    shipped = Path(engine.__file__).resolve().parent.parent / "resources" / "default.offramp"
    assert read_manifest(shipped)[CHECKSUM_KEY] == tensors_checksum(load_file(str(shipped)))

"""Data parallelism under torchrun (gloo, CPU) and caches on disk: two ranks give the bundle one
process gives, recording gathers every sample in order, and a killed caching run resumes after
its finished chunks.

Tolerance (stated in the README). Linear heads: the two runs add the same numbers in another order
(each rank sums its share of a batch's loss, DDP sums the ranks' gradients), so exit weights,
temperatures and thresholds agree to 1e-4 (measured: about 1e-5 after 5 epochs), and the
accuracies reported, counts of right answers on the same images, are equal. Conv heads
(BatchNorm): each rank normalises its half of every batch, as DistributedDataParallel does, and
the running statistics are averaged over the ranks, so the heads differ slightly; see
test_two_ranks_train_batchnorm_heads_close_to_one_process for the bounds.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import distributed as dist
from engine.bundle import load_bundle
from engine.cli import main
from engine.data.folders import open_dataset
from engine.evaluate import record_outputs
from engine.features import cache_features
from engine.preprocess import eval_transform
from engine.recording import record_sharded
from synth import SYNTH_CLASSES, build_tiny_model, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
OFFRAMP = Path(sys.executable).with_name("offramp")  # the installed command, as the README runs it
TOL = 1e-4
pytestmark = pytest.mark.skipif(not dist.dist.is_gloo_available(), reason="torch.distributed without gloo")


COMMON = ["train-exits", "--backbone", "cifar_resnet_small", "--epochs", "5", "--val-fraction", "0.25"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("scale"), SYNTH_CLASSES, per_class=12, seed=3)


@pytest.fixture(scope="module")
def one_process(folder, tmp_path_factory):
    """A bundle with linear heads trained in one process."""
    out = tmp_path_factory.mktemp("one") / "one.offramp"
    assert main([*COMMON, "--data", str(folder), "--out", str(out)]) == 0
    return out


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("OFFRAMP_DEBUG", None)
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(OFFRAMP), *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def test_parts_cover_every_sample_once_and_every_class():
    for n in (0, 1, 5, 17):
        for w in (1, 2, 3, 8):
            parts = [dist.part(n, r, w) for r in range(w)]
            assert sorted(i for p in parts for i in p) == list(range(n))
    labels = torch.arange(40) // 10  # a folder listed class by class: 4 classes of 10
    for r in range(2):
        assert torch.bincount(labels[list(dist.part(40, r, 2))]).tolist() == [5, 5, 5, 5]
    assert dist.world() == 1 and dist.is_main() and dist.gather(torch.ones(2)).tolist() == [1.0, 1.0]


def test_parts_with_dropped_samples_join_in_the_original_order():
    parts = [torch.tensor([i for i in dist.part(11, r, 3) if i not in (4, 9)]) for r in range(3)]  # 4, 9 unreadable
    joined = torch.cat(parts)
    t = dist.in_order({"x": joined * 10}, joined)
    assert t["x"].tolist() == [i * 10 for i in range(11) if i not in (4, 9)]


def test_two_ranks_train_the_bundle_one_process_trains(folder, one_process, tmp_path):
    done = _torchrun([*COMMON, "--data", str(folder), "--cache-dir", str(tmp_path / "cache"),
                      "--out", str(tmp_path / "two.offramp")], tmp_path)
    assert done.stdout.count("saved ") == 1  # rank 0 alone reports and writes
    assert (tmp_path / "cache" / "train" / "part-1-of-2" / "manifest.json").exists()
    one, two = load_bundle(one_process), load_bundle(tmp_path / "two.offramp")
    a, b = one.model.state_dict(), two.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), atol=TOL, rtol=TOL, msg=k)
    torch.testing.assert_close(two.model.temperature, one.model.temperature, atol=TOL, rtol=TOL)
    ta, tb = one.policies["threshold"].to_json()["thresholds"], two.policies["threshold"].to_json()["thresholds"]
    assert [t is None for t in ta] == [t is None for t in tb]
    assert all(abs(x - y) <= TOL for x, y in zip(ta, tb) if x is not None)
    ea, eb = one.meta["evaluation"], two.meta["evaluation"]
    assert ea["samples"] == eb["samples"] == 12
    assert ea["accuracy_per_exit"] == eb["accuracy_per_exit"]
    assert ea["default_point"]["accuracy"] == eb["default_point"]["accuracy"]
    assert one.meta["exit_training"]["train_samples"] == two.meta["exit_training"]["train_samples"] == 36


def test_two_ranks_train_batchnorm_heads_close_to_one_process(folder, tmp_path):
    """Conv heads: each rank's BatchNorm normalises its half of every batch (interleaved parts hold
    every class), and the running statistics are averaged over the ranks. Bounds, measured here
    with margin (36 training images: every epoch is one step of 18 + 18 against 36): each exit's
    validation accuracy within 1 of the 12 images (measured: equal, equal, 1 apart), each head's
    weights within 30 % of one process's in relative norm (measured: at most 20 %; BatchNorm running
    means follow the weights before them, so they differ as much)."""
    args = [*COMMON, "--data", str(folder), "--head", "conv"]
    assert main([*args, "--out", str(tmp_path / "one.offramp")]) == 0
    _torchrun([*args, "--out", str(tmp_path / "two.offramp")], tmp_path)
    one, two = load_bundle(tmp_path / "one.offramp"), load_bundle(tmp_path / "two.offramp")
    ea, eb = one.meta["evaluation"]["accuracy_per_exit"], two.meta["evaluation"]["accuracy_per_exit"]
    assert all(abs(a - b) <= 1 / 12 + 1e-9 for a, b in zip(ea, eb)), (ea, eb)
    a, b = one.model.state_dict(), two.model.state_dict()
    gaps = {k: float((a[k] - b[k]).norm() / a[k].norm()) for k in a if k.startswith("exits.") and k.endswith("weight")}
    assert gaps and max(gaps.values()) <= 0.3, gaps


def test_two_ranks_evaluate_as_one_process(folder, one_process, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    (data / SYNTH_CLASSES[0] / "broken.jpg").write_bytes(b"not an image")  # listed once, by rank 0
    args = ["evaluate", str(one_process), "--data", str(data)]
    assert main([*args, "--json", str(tmp_path / "one.json")]) == 0
    done = _torchrun([*args, "--cache-dir", str(tmp_path / "records"), "--json", str(tmp_path / "two.json")],
                     tmp_path)
    assert done.stderr.count("broken.jpg") == 1, done.stderr[-2000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["num_samples"] == two["num_samples"] == 48
    assert one["accuracy_per_exit"] == two["accuracy_per_exit"]
    assert one["oracle"]["accuracy"] == two["oracle"]["accuracy"] and one["full"]["accuracy"] == two["full"]["accuracy"]
    assert [p["accuracy"] for p in one["threshold_curve"]] == [p["accuracy"] for p in two["threshold_curve"]]
    assert {k: v["accuracy"] for k, v in one["policies"].items()} == {k: v["accuracy"] for k, v in two["policies"].items()}


def test_records_on_disk_equal_records_in_memory(folder, tmp_path, caplog):
    model = build_tiny_model()
    ds = open_dataset(folder)
    ds.transform = eval_transform(model.backbone.preset)
    want = record_outputs(model, ds)
    (tmp_path / "rec" / "part-1-of-2").mkdir(parents=True)  # left by a run of 2 ranks: other samples per part
    got = record_sharded(model, ds, store=tmp_path / "rec", memory_limit=40_000, batch_size=8)
    assert not (tmp_path / "rec" / "part-1-of-2").exists()
    assert "holds a cache made by 2 processes, this run has 1: caching again" in caplog.text
    assert len(json.loads((tmp_path / "rec" / "part-0-of-1" / "manifest.json").read_text())["chunks"]) > 1
    assert torch.equal(got.logits, want.logits) and torch.equal(got.labels, want.labels)
    assert all(torch.equal(f, g) for f, g in zip(got.features, want.features))


KILL_AFTER_FIRST_CHUNK = """
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from synth import build_tiny_model
from engine.data.folders import open_dataset
from engine.features import cache_features
manifest = Path({store!r}) / "part-0-of-1" / "manifest.json"
def progress(p):
    if manifest.exists() and json.loads(manifest.read_text())["chunks"]:
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-run, as by the OOM killer or a pre-empted node
cache_features(build_tiny_model(), open_dataset({folder!r}), batch_size=8, store={store!r}, memory_limit=40_000,
               progress=progress)
"""


def test_a_killed_cache_resumes_from_its_finished_chunks(folder, tmp_path, monkeypatch):
    store = tmp_path / "cache"
    script = KILL_AFTER_FIRST_CHUNK.format(tests=str(Path(__file__).parent), store=str(store), folder=str(folder))
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    finished = json.loads((store / "part-0-of-1" / "manifest.json").read_text())["chunks"]
    assert len(finished) == 1
    import engine.features as features
    computed = []
    real = features._cache_in_memory
    monkeypatch.setattr(features, "_cache_in_memory", lambda m, d, *a, **k: computed.append(len(d)) or real(m, d, *a, **k))
    model = build_tiny_model()
    resumed = cache_features(model, open_dataset(folder), batch_size=8, store=store, memory_limit=40_000)
    chunk = finished[0]["chunk"][1] - finished[0]["chunk"][0]
    assert sum(computed) == 48 - chunk  # the finished chunk was verified and skipped
    fresh = cache_features(model, open_dataset(folder))
    assert torch.equal(resumed.labels, fresh.labels) and torch.equal(resumed.teacher_logits, fresh.teacher_logits)
    assert all(torch.equal(x, y) for x, y in zip(resumed.inputs, fresh.inputs))
    # a damaged finished chunk fails its CRC and is computed again, not trusted
    with open(store / "part-0-of-1" / "inputs.0.bin", "r+b") as f:
        f.write(b"\xff\xff\xff\xff")
    computed.clear()
    again = cache_features(model, open_dataset(folder), batch_size=8, store=store, memory_limit=40_000)
    assert sum(computed) == 48 and torch.equal(again.inputs[0], fresh.inputs[0])
    shutil.rmtree(store)

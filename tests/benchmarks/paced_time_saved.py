"""Benchmark: the time a staged run saves when frames come paced, as from a camera, against back to
back. The built-in bundle's (or --bundle's) default policy runs on CIFAR-10 test images through `Engine.infer`,
exactly as the window's inference thread runs it (one thread; every 10th frame the full model is
timed first, on the caches the frame meets; frames timed by the thread's CPU time where that is
the model's whole compute, `Engine`'s clock="auto"). Between frames the thread sleeps `gap` ms.
Prints, per gap and clock, the typical frame's time (`RunningTotals.typical_ms`), the full model's
live median and the time and FLOPs saved that the window's compute panel shows, and each exit's
median time (of the latest frames that left there).

`--off E [E ...]` also runs the default policy with those early exits switched off (an exit that
seldom fires still costs every frame that passes it a graph call and a decision, which cost most
after a pause), and prints each variant's accuracy on the whole test split.

    .venv/bin/python tests/benchmarks/paced_time_saved.py --data ../shared/data/cifar10-jpg.zip \
        [--frames 1000 --gaps 0 5 33 --runtime torch|onnxruntime --off 0 1 3]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.bundle import default_bundle_path, load_bundle  # noqa: E402
from engine.evaluate import accuracy_per_exit, evaluate_policy, record_outputs  # noqa: E402
from engine.fronts import model_cost  # noqa: E402
from engine.policies import ThresholdPolicy  # noqa: E402
from engine.runtime import Engine  # noqa: E402
from engine.splits import open_splits  # noqa: E402

REFERENCE_EVERY = 10  # as app.workers runs the engine


def frames_from(data: str | None, n: int, seed: int = 0) -> list[np.ndarray]:
    """n BGR test images from the CIFAR-10 zip or folder (its test/ part), else random 32×32 ones."""
    rng = random.Random(seed)
    if data is None:
        gen = np.random.default_rng(seed)
        return [gen.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
    if zipfile.is_zipfile(data):
        with zipfile.ZipFile(data) as z:
            names = sorted(m for m in z.namelist() if "/test/" in f"/{m}" and m.lower().endswith((".jpg", ".png")))
            return [cv2.imdecode(np.frombuffer(z.read(m), np.uint8), cv2.IMREAD_COLOR)
                    for m in rng.sample(names, min(n, len(names)))]
    files = sorted(p for p in Path(data, "test").rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    return [cv2.imread(str(p)) for p in rng.sample(files, min(n, len(files)))]


def run(images: list[np.ndarray], frames: int, gap_ms: float, clock: str, runtime: str = "torch",
        policy=None, bundle=None) -> dict:
    engine = Engine(bundle, device="cpu", reference_every=REFERENCE_EVERY, clock=clock, runtime=runtime)
    if policy is not None:
        engine.set_policy(policy)
    engine.infer(images[0])  # graphs made before the count starts, as the window's load does
    engine.reset_totals()
    result = None
    for i in range(frames):
        result = engine.infer(images[i % len(images)])
        if gap_ms:
            time.sleep(gap_ms / 1000.0)
    t = result.totals
    per_exit = [(len(times), statistics.median(times)) if times else (0, None) for times in t.exit_ms]
    return {"clock": result.clock, "typical_ms": t.typical_ms, "full_ms": result.full_ms, "saved_ms": t.saved_ms,
            "saved": t.saved, "per_exit": per_exit}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="the CIFAR-10 zip or folder (default: random images)")
    p.add_argument("--frames", type=int, default=1000, help="frames per gap and clock")
    p.add_argument("--gaps", type=float, nargs="+", default=[0.0, 5.0, 33.0], help="ms between frames")
    p.add_argument("--clocks", nargs="+", default=["auto", "wall"], choices=["auto", "wall"])
    p.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"])
    p.add_argument("--off", type=int, nargs="+", help="also the default policy with these early exits off")
    p.add_argument("--bundle", default=str(default_bundle_path()), help="default: the built-in bundle")
    args = p.parse_args()
    torch.set_num_threads(1)
    images = frames_from(args.data, 200)
    bundle = load_bundle(args.bundle)
    default = bundle.policies[bundle.default_policy]
    variants = {"default policy": None}
    if args.off:
        if default.thresholds is None or not all(0 <= e < len(default.thresholds) - 1 for e in args.off):
            p.error(f"--off takes early exits of the default threshold policy, 0..{bundle.model.num_exits - 2}")
        limits = [None if e in args.off else t for e, t in enumerate(default.thresholds)]
        variants[f"exits {', '.join(map(str, args.off))} off"] = ThresholdPolicy(limits, default.measure)
    if args.data:
        accuracy_on_test(bundle, args.data, {k: v or default for k, v in variants.items()})
    for name, policy in variants.items():
        for gap in args.gaps:
            for clock in args.clocks:
                r = run(images, args.frames, gap, clock, args.runtime, policy, bundle)
                print(f"{name}, gap {gap:4.0f} ms, {r['clock']:15s}: typical frame {r['typical_ms']:.3f} ms, full "
                      f"model {r['full_ms']:.3f} ms: time saved {100 * r['saved_ms']:5.1f} % (FLOPs saved "
                      f"{100 * r['saved']:.1f} %)", flush=True)
                print("    per exit, median ms (frames): " + ", ".join(
                    f"E{e} {ms:.3f} ({n})" for e, (n, ms) in enumerate(r["per_exit"]) if n), flush=True)
    return 0


def accuracy_on_test(bundle, data: str, policies: dict) -> None:
    """Each policy's accuracy and FLOPs saved on the whole test split, against the last exit's."""
    model = bundle.model.eval()
    test = record_outputs(model, open_splits(data, model.backbone.preset, classes=model.class_names).test)
    cost = model_cost(bundle)
    full = accuracy_per_exit(test)[-1]
    for name, policy in policies.items():
        ev = evaluate_policy(test, policy, cost)
        print(f"{name}: test accuracy {100 * ev['accuracy']:.2f} % ({100 * (ev['accuracy'] - full):+.2f} points), "
              f"{100 * ev['saved']:.1f} % of the FLOPs saved", flush=True)


if __name__ == "__main__":
    sys.exit(main())

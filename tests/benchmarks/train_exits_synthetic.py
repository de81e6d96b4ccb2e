"""Benchmark: `offramp train-exits` on 10 classes × 100 generated images with a built-in CIFAR
backbone, then `offramp evaluate` on the same folder. Prints the wall-clock time of each.

    python tests/benchmarks/train_exits_synthetic.py [--backbone cifar_resnet20] [--keep DIR]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synth import make_image_folder  # noqa: E402

from engine.cli import main  # noqa: E402


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default="cifar_resnet20")
    p.add_argument("--keep", help="folder to write the data and bundle into (default: a temporary one)")
    args = p.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="offramp-bench-"))
    data = make_image_folder(root / "data", [f"class{i}" for i in range(10)], per_class=100, seed=0)
    bundle = root / "synthetic.offramp"
    t0 = time.perf_counter()
    assert main(["train-exits", "--data", str(data), "--backbone", args.backbone, "--out", str(bundle)]) == 0
    t1 = time.perf_counter()
    assert main(["evaluate", str(bundle), "--data", str(data), "--json", str(root / "evaluation.json")]) == 0
    t2 = time.perf_counter()
    print(f"train-exits on 10 classes x 100 images ({args.backbone}): {t1 - t0:.1f} s")
    print(f"evaluate on the same 1000 images: {t2 - t1:.1f} s")


if __name__ == "__main__":
    run()

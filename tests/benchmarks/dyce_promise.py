"""Benchmark: does the DyCE front keep on the test split what it says on calibration? For the
built-in bundle (or BUNDLE), the DyCE front is fitted on the calibration split twice, scored in
sample (`engine.search.search_front`, what it used to show) and out of fold
(`engine.train.dyce.crossfit_dyce_front`, what `offramp search` keeps). For each front's points it
prints the loss against the last exit that each claims on calibration and the loss on the test
split, and the point each would choose "within 0.5 point" (with the one-sided 95 % margin).

    .venv/bin/python tests/benchmarks/dyce_promise.py --data ../shared/data/cifar10-jpg.zip [--bundle B]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.bundle import default_bundle_path, load_bundle  # noqa: E402
from engine.evaluate import accuracy_per_exit, evaluate_policy, pick_point, record_outputs  # noqa: E402
from engine.fronts import model_cost  # noqa: E402
from engine.policies import ThresholdPolicy  # noqa: E402
from engine.search import search_front  # noqa: E402
from engine.splits import open_splits, recorded_val_fraction  # noqa: E402
from engine.train.dyce import crossfit_dyce_front  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the CIFAR-10 zip or folder")
    p.add_argument("--bundle", default=str(default_bundle_path()))
    p.add_argument("--max-loss", type=float, default=0.5, help="points")
    args = p.parse_args()
    torch.set_num_threads(2)
    bundle = load_bundle(args.bundle)
    model, cost = bundle.model.eval(), model_cost(bundle)
    splits = open_splits(args.data, model.backbone.preset, val_fraction=recorded_val_fraction(bundle.meta),
                         classes=model.class_names)
    cal, test = record_outputs(model, splits.calibration), record_outputs(model, splits.test)
    full_cal, full_test = accuracy_per_exit(cal)[-1], accuracy_per_exit(test)[-1]
    fronts = {"in sample": search_front(cal, cost, "circular"), "out of fold": crossfit_dyce_front(cal, cost)}
    print(f"{cal.num_samples} calibration images (last exit {100 * full_cal:.2f} %), {test.num_samples} test "
          f"images (last exit {100 * full_test:.2f} %); loss in points against the last exit")
    for name, front in fronts.items():
        gaps = []
        print(f"\nDyCE front scored {name}: {len(front)} points")
        print("  saved  claimed loss  test loss  test saved")
        for point in front:
            policy = ThresholdPolicy(point["policy"]["thresholds"], point["policy"]["measure"])
            ev = evaluate_policy(test, policy, cost)
            claimed, lost = 100 * (full_cal - point["accuracy"]), 100 * (full_test - ev["accuracy"])
            gaps.append(lost - claimed)
            print(f"  {100 * point['saved']:5.1f}  {claimed:+12.2f}  {lost:+9.2f}  {100 * ev['saved']:10.1f}")
        chosen = pick_point(front, max_loss=args.max_loss / 100, full_accuracy=full_cal)
        ev = evaluate_policy(test, ThresholdPolicy(chosen["policy"]["thresholds"], chosen["policy"]["measure"]), cost)
        print(f"  test loss minus claimed loss: mean {statistics.fmean(gaps):+.2f}, median "
              f"{statistics.median(gaps):+.2f} points")
        print(f"  chosen within {args.max_loss:g} point (with the margin): claimed "
              f"{100 * (full_cal - chosen['accuracy']):+.2f} at {100 * chosen['saved']:.1f} % saved; "
              f"test {100 * (full_test - ev['accuracy']):+.2f} at {100 * ev['saved']:.1f} % saved")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which exit heads, and how fast they learn, for the built-in ResNet-56 (issue 14's recipe).

Starts from the recipe's phase A network (the published weights fine-tuned on the JPEG train part),
trains backbone and exits jointly for `--epochs` on the `--train` random images of the train part, and
prints each exit's accuracy on `--val` random calibration images with each exit's share of FLOPs,
for every variant named in `--variants` (head kind : early-head lr scale):

    python tests/benchmarks/exit_heads_ablation.py --data ../shared/data/cifar10-jpg.zip \
        --phase-a runs/resnet56/phase_a.pt --variants conv:1 conv:9 deep:9
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from engine.backbones import build_backbone  # noqa: E402
from engine.cost import measure_costs  # noqa: E402
from engine.splits import open_splits  # noqa: E402
from engine.train.network import (NetworkConfig, accuracy_per_exit, build_network, decode_dataset,  # noqa: E402
                                  train_network, with_new_exits)
from resnet56_default import read_phase  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--phase-a", required=True)
    p.add_argument("--variants", nargs="+", default=["conv:1", "conv:9", "deep:9"])
    p.add_argument("--train", type=int, default=12000)
    p.add_argument("--val", type=int, default=2500)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    state, info = read_phase(Path(args.phase_a))
    base = NetworkConfig(**{**info["config"], "exit_weights": [], "epochs": args.epochs, "lr": args.lr,
                            "distill": 0.5, "seed": 1})
    preset = build_backbone(base.arch, **base.arch_kwargs).preset
    splits = open_splits(args.data, preset, val_fraction=0.2)
    for ds in (splits.train, splits.validation):
        ds.dataset.transform = None
    g = torch.Generator().manual_seed(0)  # the splits list files class by class: take random subsets
    pick = [torch.randperm(len(ds), generator=g)[:n].tolist() for ds, n in ((splits.train, args.train),
                                                                            (splits.validation, args.val))]
    x, y = decode_dataset(torch.utils.data.Subset(splits.train, pick[0]), preset.crop)
    vx, vy = decode_dataset(torch.utils.data.Subset(splits.validation, pick[1]), preset.crop)
    teacher = build_network(base, splits.classes, state)
    results = []
    for variant in args.variants:
        kind, scale = variant.split(":")
        cfg = replace(base, head=kind, head_lr_scale=float(scale))
        t0 = time.perf_counter()
        model, _ = train_network(cfg, x, y, splits.classes, init=with_new_exits(cfg, splits.classes, state),
                                 teacher=teacher, log=lambda m: None)
        acc = accuracy_per_exit(model, vx, vy, "cpu")
        table = measure_costs(model)
        share = [c / table.full_flops for c in table.cumulative_flops()]
        results.append({"variant": variant, "accuracy": acc, "flops_share": share, "seconds": time.perf_counter() - t0})
        print(f"{variant:8s} " + " ".join(f"E{e}:{a:.1%}@{s:.0%}" for e, (a, s) in enumerate(zip(acc, share)))
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

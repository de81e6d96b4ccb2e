"""The built-in model's recipe: ResNet-56 from the published CIFAR-10 weights, with early exits
trained into it. Resumable: every phase writes its result (and every epoch a checkpoint) under OUT,
and a rerun skips what is done. About 2 hours on a 2-core CPU; CUDA is used when present.

    python tests/benchmarks/resnet56_default.py --data ../shared/data/cifar10-jpg.zip \
        --init ../shared/weights/resnet56-4bfd9763.th --out runs/resnet56

Phases (the calibration split, `--val-fraction` of the train split, is never trained on):
  A  fine-tune the published network on the JPEG train part (its exits have loss weight 0);
  B  joint fine-tuning: backbone and every exit, each exit learning from the labels and from phase
     A's network (distillation), which keeps the last exit's accuracy; with `--epochs-b2 N`, N more
     joint epochs (a second one-cycle to `--lr-b2`) continue from phase B's result (`phase_b2.pt`);
  C  calibrate and search on the calibration split, write the bundle (`default.offramp`);
  D  the report every built-in model ends with (tests/benchmarks/policies_and_report.sh): DyCE
     search, Bolukbasi and structure policies, `evaluate` and `bench` on the test split;
  F  the comparison: the same exit heads trained on phase A's network kept FROZEN (as DyCE does),
     same data, epochs and distillation, calibrated the same way (`frozen.offramp`), and
     `offramp evaluate` of it on the test split (`frozen-evaluation.json`).
Ship it with `cp OUT/default.offramp resources/default.offramp`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.backbones import build_backbone  # noqa: E402
from engine.backbones.published import load_published, sha256_of  # noqa: E402
from engine.files import json_text, replacing  # noqa: E402
from engine.preprocess import eval_transform  # noqa: E402
from engine.splits import open_splits  # noqa: E402
from engine.train.network import (NetworkConfig, build_network, decode_dataset, train_network,  # noqa: E402
                                  with_new_exits)

PUBLISHED_SHA256 = {  # the published checkpoints' hashes (../shared/weights/SHA256SUMS)
    "cifar_resnet20a": "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
    "cifar_resnet32a": "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850",
    "cifar_resnet44a": "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4",
    "cifar_resnet56a": "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
}
LICENCE = "LICENSE-akamaster-resnet-cifar10.txt"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def configs(args) -> tuple[NetworkConfig, NetworkConfig, NetworkConfig]:
    arch_kwargs = {"stages_per_group": args.stages_per_group}
    n_exits = 3 * args.stages_per_group
    a = NetworkConfig(arch=args.arch, head=args.head, epochs=args.epochs_a, batch_size=128, lr=args.lr_a,
                      weight_decay=5e-4, label_smoothing=0.1, exit_weights=[0.0] * (n_exits - 1) + [1.0],
                      arch_kwargs=arch_kwargs, seed=0)
    b = NetworkConfig(arch=args.arch, head=args.head, epochs=args.epochs_b, batch_size=128, lr=args.lr_b,
                      weight_decay=5e-4, label_smoothing=0.1, exit_weights=[],
                      arch_kwargs=arch_kwargs, distill=args.distill, distill_temperature=3.0, seed=1,
                      head_lr_scale=args.head_lr_scale)
    f = replace(b, epochs=args.epochs_f, freeze_backbone=True, seed=2)
    return a, b, f


def save_state(model, path: Path, extra: dict) -> None:
    with replacing(path) as tmp:
        torch.save({"model": model.state_dict(), "info": json_text(extra)}, tmp)


def read_phase(path: Path) -> tuple[dict, dict]:
    """(state dict, info) of a finished phase's file: tensors and JSON only (weights_only)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return saved["model"], json.loads(saved["info"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--init", required=True, help="resnet56-4bfd9763.th (../shared/weights or the publisher's site)")
    p.add_argument("--out", default="runs/resnet56")
    p.add_argument("--arch", default="cifar_resnet56a", choices=sorted(PUBLISHED_SHA256),
                   help="the published network (--init its checkpoint); ResNet-20 makes a cascade's small model")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--stages-per-group", type=int, default=3, help="exits after every 9/N blocks of each group")
    p.add_argument("--head", default="deep", choices=["linear", "conv", "deep"],
                   help="early exit heads (measured: tests/benchmarks/exit_heads_ablation.py)")
    p.add_argument("--head-lr-scale", type=float, default=9.0,
                   help="early heads learn at this × the backbone's lr (the loss is the mean over the exits)")
    p.add_argument("--epochs-a", type=int, default=3)
    p.add_argument("--lr-a", type=float, default=0.04)
    p.add_argument("--epochs-b", type=int, default=7)
    p.add_argument("--lr-b", type=float, default=0.05)
    p.add_argument("--epochs-b2", type=int, default=0, help="more joint epochs continuing phase B (0: none)")
    p.add_argument("--lr-b2", type=float, default=0.02)
    p.add_argument("--distill", type=float, default=0.5)
    p.add_argument("--epochs-f", type=int, default=3, help="epochs of the frozen-backbone comparison (0: skip it)")
    p.add_argument("--skip-report", action="store_true", help="stop after the bundle (phase C)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cfg_a, cfg_b, cfg_f = configs(args)
    bundle_path = out / "default.offramp"
    t_start = time.perf_counter()

    published = load_published(build_backbone(args.arch, **cfg_a.arch_kwargs), args.init,
                               sha256=PUBLISHED_SHA256[args.arch])
    preset = published.preset
    splits = open_splits(args.data, preset, val_fraction=args.val_fraction)
    classes = splits.classes
    log(f"train {len(splits.train)} images, calibration {len(splits.validation)} (val_fraction {args.val_fraction})")
    images = labels = None

    def train_data():
        nonlocal images, labels
        if images is None:
            full = splits.train.dataset
            full.transform = None
            t0 = time.perf_counter()
            images, labels = decode_dataset(splits.train, preset.crop)
            full.transform = eval_transform(preset)
            log(f"decoded {len(images)} training images in {time.perf_counter() - t0:.0f} s")
        return images, labels

    history: dict = {}
    a_path, b_path = out / "phase_a.pt", out / "phase_b.pt"
    if not a_path.exists():
        log(f"phase A: fine-tune the published network, {cfg_a.epochs} epochs to lr {cfg_a.lr} on {device}")
        x, y = train_data()
        model_a, history["a"] = train_network(cfg_a, x, y, classes, device=device, checkpoint=out / "phase_a.ckpt",
                                              init=published.state_dict(), log=log)
        save_state(model_a, a_path, {"config": asdict(cfg_a), "history": history["a"]})
    else:
        log(f"phase A done: {a_path}")
    state_a, info_a = read_phase(a_path)  # phase A may have run with other (untrained) early heads
    model_a = build_network(NetworkConfig(**info_a["config"]), classes, state_a)

    if not b_path.exists():
        log(f"phase B: joint fine-tuning of backbone and {model_a.num_exits} exits, {cfg_b.epochs} epochs to lr "
            f"{cfg_b.lr}, distillation {cfg_b.distill} from phase A")
        x, y = train_data()
        model_b, history["b"] = train_network(cfg_b, x, y, classes, device=device, checkpoint=out / "phase_b.ckpt",
                                              init=with_new_exits(cfg_b, classes, state_a), teacher=model_a, log=log)
        save_state(model_b, b_path, {"config": asdict(cfg_b), "history": history["b"]})
    else:
        log(f"phase B done: {b_path}")
    joint, cfg_joint = "b", cfg_b
    if args.epochs_b2 > 0:
        joint, cfg_joint = "b2", replace(cfg_b, epochs=args.epochs_b2, lr=args.lr_b2, seed=3)
        b2_path = out / "phase_b2.pt"
        if not b2_path.exists():
            log(f"phase B2: {cfg_joint.epochs} more joint epochs to lr {cfg_joint.lr}, continuing phase B")
            x, y = train_data()
            model_b2, history["b2"] = train_network(cfg_joint, x, y, classes, device=device,
                                                    checkpoint=out / "phase_b2.ckpt", init=read_phase(b_path)[0],
                                                    teacher=model_a, log=log)
            save_state(model_b2, b2_path, {"config": asdict(cfg_joint), "history": history["b2"]})
        else:
            log(f"phase B2 done: {b2_path}")

    if not bundle_path.exists():
        bundle_path = phase_c(args, out, cfg_joint, classes, splits, device, joint, bundle_path)
    else:
        log(f"phase C done: {bundle_path}")
    if args.skip_report:
        return 0
    if not (out / "bench.json").exists():
        log("phase D: search, learned policies, evaluate and bench on the test split")
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        subprocess.run([str(ROOT / "tests/benchmarks/policies_and_report.sh"), str(bundle_path), args.data, str(out)],
                       check=True, env=env)
    frozen = out / "frozen.offramp"
    if args.epochs_f > 0 and not (out / "frozen-evaluation.json").exists():
        f_path = out / "phase_f.pt"
        if not f_path.exists():
            log(f"phase F: the same exits on phase A's network kept frozen, {cfg_f.epochs} epochs")
            x, y = train_data()
            model_f, hist = train_network(cfg_f, x, y, classes, device=device, checkpoint=out / "phase_f.ckpt",
                                          init=with_new_exits(cfg_f, classes, state_a), teacher=model_a, log=log)
            save_state(model_f, f_path, {"config": asdict(cfg_f), "history": hist})
        if not frozen.exists():
            phase_c(args, out, cfg_f, classes, splits, device, "f", frozen)
        subprocess.run([str(Path(sys.executable).parent / "offramp"), "evaluate", str(frozen), "--data", args.data,
                        "--json", str(out / "frozen-evaluation.json")], check=True)
    log(f"all done in {time.perf_counter() - t_start:.0f} s; ship it with: cp {bundle_path} resources/default.offramp")
    return 0


def phase_c(args, out: Path, cfg, classes, splits, device, phase: str, path: Path) -> Path:
    """Calibrate the network trained in `phase` ("b": jointly, "f": frozen) on the calibration split,
    search the thresholds, and write the bundle `path` with where its weights come from."""
    from engine.bundle import save_bundle
    from engine.train.retrain import fit_exits
    state, info_phase = read_phase(out / f"phase_{phase}.pt")
    model = build_network(cfg, classes, state).eval()
    info = {"a": read_phase(out / "phase_a.pt")[1], phase: info_phase}
    earlier = {"phase_b": read_phase(out / "phase_b.pt")[1]} if phase == "b2" else {}
    meta = {"name": path.stem,
            "description": f"ResNet-{cfg.arch[len('cifar_resnet'):-1]} (option-A shortcuts) from the published CIFAR-10 weights of "
                           "akamaster/pytorch_resnet_cifar10 (BSD-2-Clause, see " + LICENCE + "), fine-tuned on "
                           "the JPEG train split with early exits trained into it",
            "licence": {"weights_from": "github.com/akamaster/pytorch_resnet_cifar10 (Yerlan Idelbayev, 2018)",
                        "file": LICENCE, "spdx": "BSD-2-Clause"},
            "training": {"recipe": "tests/benchmarks/resnet56_default.py", "command": " ".join(sys.argv),
                         "init": {"file": Path(args.init).name, "sha256": sha256_of(args.init)},
                         "phase_a": info["a"], **earlier,
                         f"phase_{phase}": info[phase]},
            "split": {"val_fraction": args.val_fraction, "seed": 0}}
    log(f"calibrate and search {path.name} on the calibration split")
    bundle, rep = fit_exits(model, splits.train, splits.validation, epochs=0, device=device, meta=meta)
    save_bundle(bundle, path)
    acc = rep["accuracy_per_exit"]
    log("calibration accuracy per exit: " + " ".join(f"E{e}:{a:.2%}" for e, a in enumerate(acc)))
    p = rep["default_point"]
    log(f"default point on calibration: {p['accuracy']:.2%}, {p['saved']:.1%} of FLOPs saved; wrote {path}")
    return path


if __name__ == "__main__":
    sys.exit(main())

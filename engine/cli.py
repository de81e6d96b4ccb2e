"""The `offramp` command: everything the app does, scriptable.

    offramp info [BUNDLE]                      what a bundle holds
    offramp run [--bundle B] PATH...           classify images, folders, videos with early exits
    offramp train-exits --data DIR ...         exits on a frozen backbone -> bundle
    offramp train-backbone --arch A --data D   a whole multi-exit network from scratch -> bundle
    offramp evaluate [BUNDLE] --data DIR       per-exit accuracy, policy cost, curve (JSON + PNG)
    offramp list-backbones                     the registered backbones
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .progress import Cancelled, Progress


class TerminalProgress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.last, self.stage, self.t0 = stream, 0.0, None, time.perf_counter()

    def __call__(self, p: Progress) -> None:
        now = time.perf_counter()
        if p.stage != self.stage:
            if self.stage is not None:
                self.stream.write("\n")
            self.stage, self.t0 = p.stage, now
        if now - self.last < 0.1 and p.done < p.total:
            return
        self.last = now
        frac = p.fraction
        eta = (now - self.t0) * (1 - frac) / frac if frac > 0 else 0
        bar = "#" * int(frac * 30)
        self.stream.write(f"\r{p.stage:<18} [{bar:<30}] {p.done}/{p.total} {p.message} "
                          f"{'' if frac >= 1 else f'~{eta:.0f}s left'}   ")
        self.stream.flush()

    def close(self) -> None:
        if self.stage is not None:
            self.stream.write("\n")
            self.stage = None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _load(path: str | None):
    from .bundle import default_bundle_path, load_bundle
    return load_bundle(path or default_bundle_path())


def cmd_list_backbones(args) -> int:
    from .backbones import backbone_family, list_backbones
    for name in list_backbones():
        print(f"{name:<22} {backbone_family(name)}")
    return 0


def cmd_info(args) -> int:
    from .bundle import default_bundle_path, read_manifest
    path = args.bundle or default_bundle_path()
    m = read_manifest(path)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    cost = m["cost"]
    from .cost import CostTable
    table = CostTable.from_json(cost)
    cum = table.cumulative_flops()
    print(f"bundle      {path}")
    print(f"backbone    {m['backbone']['name']} {m['backbone'].get('kwargs', {})}")
    print(f"input       {m['preset']['crop']}x{m['preset']['crop']} (resize {m['preset']['resize']})")
    print(f"classes     {len(m['class_names'])}: {', '.join(m['class_names'][:12])}{' …' if len(m['class_names']) > 12 else ''}")
    print(f"full model  {table.full_flops / 1e6:.2f} MFLOPs" + (f", {table.full_ms:.2f} ms on {table.device}" if table.has_latency else ""))
    acc = m.get("meta", {}).get("evaluation", {}).get("accuracy_per_exit")
    print("exits       #  stage  head      MFLOPs to reach  of full" + ("  val. accuracy" if acc else ""))
    for e, spec in enumerate(m["exits"]):
        line = f"            {e}  {spec['stage']:>5}  {spec['kind']:<8} {cum[e] / 1e6:>15.2f}  {_pct(cum[e] / table.full_flops):>7}"
        print(line + (f"  {_pct(acc[e]):>13}" if acc else ""))
    kinds = ", ".join(f"{k} ({v['kind']})" for k, v in m["policies"].items())
    print(f"policies    {kinds}; default: {m['default_policy']}")
    point = m.get("meta", {}).get("evaluation", {}).get("default_point")
    if point:
        print(f"default     accuracy {_pct(point['accuracy'])}, saved {_pct(point['saved'])} of FLOPs (validation split)")
    return 0


def cmd_run(args) -> int:
    from .media import iter_frames
    from .runtime import Engine
    paths = list(args.paths)
    bundle = args.bundle
    if bundle is None and paths and paths[0].endswith(".offramp"):
        bundle = paths.pop(0)
    if not paths:
        raise SystemExit("offramp run: name at least one image, folder or video")
    engine = Engine(bundle, device=args.device)
    if args.threshold is not None:
        engine.set_thresholds([args.threshold] * engine.model.num_exits)
    for source, frame in iter_frames(paths, on_error=lambda msg: print(f"skipped: {msg}", file=sys.stderr)):
        r = engine.infer(frame)
        if args.json:
            print(json.dumps({"source": source, "exit": r.exit_index, "label": r.label, "confidence": r.confidence,
                              "flops": r.flops, "full_flops": r.full_flops, "saved": r.saved, "ms": r.ms,
                              "exits": [{"exit": x.exit_index, "confidence": x.confidence, "top": x.top_k[0][0]}
                                        for x in r.exits]}))
        else:
            print(f"{source}: {r.label} ({_pct(r.confidence)}) at exit {r.exit_index}/{r.num_exits - 1}, "
                  f"{r.flops / 1e6:.2f} of {r.full_flops / 1e6:.2f} MFLOPs ({_pct(r.saved)} saved), {r.ms:.2f} ms")
    t = engine.totals
    if t.frames and not args.json:
        print(f"{t.frames} frames: {_pct(t.saved)} of FLOPs saved, exits taken {t.exit_counts}", file=sys.stderr)
    return 0


def _train_val_sets(data: str, preset, val_fraction: float):
    """(train set, validation set, class names) from a class folder (checked first: bad files are
    listed and skipped) or from the train split of the CIFAR-10 layout (zip or folder)."""
    import torch
    from .data import check_folder, open_dataset, preset_transform, split_indices
    try:
        ds = open_dataset(data, split="train")
    except ValueError:
        check = check_folder(data)
        for path, reason in check.skipped:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        check.raise_if_unusable()
        ds = open_dataset(data, report=check)
    if len(ds.classes) < 2:
        raise ValueError(f"{data} has a single class; exits need at least two classes to tell apart")
    ds.transform = preset_transform(preset)
    tr, va = split_indices(ds.targets, val_fraction=val_fraction, seed=0)
    return torch.utils.data.Subset(ds, tr), torch.utils.data.Subset(ds, va), list(ds.classes)


def cmd_train_exits(args) -> int:
    from .backbones import build_backbone
    from .bundle import save_bundle
    from .model import MultiExitNet
    from .train.retrain import fit_exits
    import torch
    torch.manual_seed(args.seed)  # a new backbone's random init and the heads' init are reproducible
    progress = TerminalProgress()
    if args.from_bundle:
        base = _load(args.from_bundle)
        backbone = base.model.backbone
    else:
        if not args.backbone:
            raise SystemExit("offramp train-exits: give --backbone NAME (see `offramp list-backbones`) or --from BUNDLE")
        backbone = build_backbone(args.backbone, weights=args.weights)
    train_set, val_set, classes = _train_val_sets(args.data, backbone.preset, args.val_fraction)
    stages = [int(s) for s in args.exits.split(",")] if args.exits else None
    keep = backbone.classifier is not None and args.weights is not None
    model = MultiExitNet.attach(backbone, class_names=classes, exit_stages=stages or (base.model.exit_stages if args.from_bundle else None),
                                head=args.head, keep_classifier=keep)
    meta = {"name": Path(args.out).stem, "source": {"command": " ".join(sys.argv[1:]), "data": args.data}}
    bundle, rep = fit_exits(model, train_set, val_set, epochs=args.epochs, max_loss=args.max_loss / 100,
                            distill=args.distill, progress=progress, meta=meta)
    progress.close()
    save_bundle(bundle, args.out)
    acc = rep["accuracy_per_exit"]
    print("validation accuracy per exit: " + "  ".join(f"{e}:{_pct(a)}" for e, a in enumerate(acc)))
    p = rep["default_point"]
    print(f"default policy: {_pct(p['accuracy'])} accuracy, {_pct(p['saved'])} of FLOPs saved")
    print(f"saved {args.out}")
    return 0


def cmd_train_backbone(args) -> int:
    from .bundle import save_bundle
    from .backbones import build_backbone
    from .train.network import NetworkConfig, decode_dataset, train_network
    from .train.retrain import fit_exits
    from .data import preset_transform, split_indices
    from dataclasses import asdict
    progress = TerminalProgress()
    device = _pick_device(args.device)
    preset = build_backbone(args.arch).preset
    train_set, val_set, classes = _train_val_sets(args.data, preset, args.val_fraction)
    full = train_set.dataset
    full.transform = None
    images, labels = decode_dataset(full, preset.crop, progress=progress)
    tr, _ = split_indices(labels.tolist(), val_fraction=args.val_fraction, seed=0)
    cfg = NetworkConfig(arch=args.arch, head=args.head, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        label_smoothing=args.label_smoothing, seed=args.seed)
    checkpoint = args.checkpoint or str(Path(args.out).with_suffix(".ckpt"))
    model, history = train_network(cfg, images[tr], labels[tr], classes, device=device, checkpoint=checkpoint,
                                   progress=progress, log=lambda s: (progress.close(), print(s)))
    full.transform = preset_transform(preset)
    meta = {"name": Path(args.out).stem, "training": {"config": asdict(cfg), "history": history,
                                                      "command": "offramp " + " ".join(sys.argv[1:])}}
    # Exits were trained jointly with the network; here they are only calibrated and the
    # thresholds searched on the held-out split (no further head training).
    bundle, rep = fit_exits(model, train_set, val_set, epochs=0, progress=progress, meta=meta)
    progress.close()
    save_bundle(bundle, args.out)
    print("validation accuracy per exit: " + "  ".join(f"{e}:{_pct(a)}" for e, a in enumerate(rep["accuracy_per_exit"])))
    print(f"saved {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from .data import open_dataset, preset_transform
    from .evaluate import evaluation_report, record_outputs, save_report
    from .cost import profile_latency
    bundle = _load(args.bundle)
    model = bundle.model
    try:
        ds = open_dataset(args.data, split=args.split)
    except ValueError:
        ds = open_dataset(args.data)
    ds.transform = preset_transform(model.backbone.preset)
    progress = TerminalProgress()
    records = record_outputs(model, ds, batch_size=args.batch_size, progress=progress)
    progress.close()
    cost = bundle.cost if bundle.cost.has_latency and not args.profile else profile_latency(model, bundle.cost)
    rep = evaluation_report(records, cost, bundle.policies, default=bundle.default_policy)
    out_json = args.json or f"{Path(args.bundle or 'default').stem}-evaluation.json"
    out_png = args.png or str(Path(out_json).with_suffix(".png"))
    save_report(rep, out_json, out_png)
    _print_report(rep)
    print(f"wrote {out_json} and {out_png}")
    return 0


def _print_report(rep: dict) -> None:
    print("accuracy per exit: " + "  ".join(f"{e}:{_pct(a)}" for e, a in enumerate(rep["accuracy_per_exit"])))
    rows = [("full model", rep["full"])] + [(k, v) for k, v in rep["policies"].items()] + [("oracle", rep["oracle"])]
    print(f"{'method':<24}{'accuracy':>10}{'MFLOPs':>10}{'saved':>8}{'ms':>8}{'speed-up':>10}")
    for name, r in rows:
        ms = f"{r['mean_ms']:.2f}" if r.get("mean_ms") is not None else "-"
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        print(f"{name:<24}{_pct(r['accuracy']):>10}{r['mean_flops'] / 1e6:>10.2f}{_pct(r['saved']):>8}{ms:>8}{speedup:>10}")


def _pick_device(name: str) -> str:
    import torch
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="offramp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("list-backbones", help="list the registered backbones")
    s.set_defaults(fn=cmd_list_backbones)

    s = sub.add_parser("info", help="show what a bundle holds (default: the built-in model)")
    s.add_argument("bundle", nargs="?", help="a .offramp bundle file")
    s.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("run", help="classify images, folders and videos with early exits")
    s.add_argument("paths", nargs="+", metavar="PATH", help="images, folders or video files (a leading .offramp file is the bundle)")
    s.add_argument("--bundle", help="bundle to use (default: the built-in model)")
    s.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    s.add_argument("--threshold", type=float, help="one max-probability threshold for every exit, instead of the bundle's policy")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("train-exits", help="train exit heads on a frozen backbone and save a bundle")
    s.add_argument("--data", required=True, help="labelled image folder (one sub-folder per class) or the CIFAR-10 zip")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--backbone", help="registered backbone name (see list-backbones)")
    src.add_argument("--from", dest="from_bundle", metavar="BUNDLE", help="keep this bundle's trained backbone, put new exits on it")
    s.add_argument("--weights", help="pretrained torchvision weights, e.g. DEFAULT (needs them cached or a network)")
    s.add_argument("--head", default="linear", choices=["linear", "conv"], help="exit head design (default: linear)")
    s.add_argument("--exits", help="comma-separated stage indices to put exits after (default: every stage)")
    s.add_argument("--epochs", type=int, default=30)
    s.add_argument("--distill", type=float, default=0.0, help="weight of distillation from the last exit (0..1)")
    s.add_argument("--val-fraction", type=float, default=0.1, help="held out for calibration and threshold search")
    s.add_argument("--max-loss", type=float, default=0.5, help="default policy: accuracy points below the last exit allowed")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="bundle file to write (.offramp)")
    s.set_defaults(fn=cmd_train_exits)

    s = sub.add_parser("train-backbone", help="train a built-in CIFAR network with its exits from scratch")
    s.add_argument("--arch", default="cifar_resnet20", help="built-in backbone (see list-backbones)")
    s.add_argument("--data", required=True, help="CIFAR-10 zip or extracted folder (its train split is used)")
    s.add_argument("--epochs", type=int, default=30)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--lr", type=float, default=0.1)
    s.add_argument("--label-smoothing", type=float, default=0.1)
    s.add_argument("--head", default="linear", choices=["linear", "conv"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--device", default="auto")
    s.add_argument("--checkpoint", help="checkpoint to resume from and write each epoch (default: OUT with .ckpt)")
    s.add_argument("--out", required=True, help="bundle file to write (.offramp)")
    s.set_defaults(fn=cmd_train_backbone)

    s = sub.add_parser("evaluate", help="accuracy per exit, cost of each policy, oracle bound, curve")
    s.add_argument("bundle", nargs="?", help="bundle (default: the built-in model)")
    s.add_argument("--data", required=True, help="labelled image folder or the CIFAR-10 zip")
    s.add_argument("--split", default="test", help="split of the CIFAR-10 layout to use (default: test)")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--profile", action="store_true", help="re-measure latency on this machine first")
    s.add_argument("--json", help="report file (default: <bundle>-evaluation.json)")
    s.add_argument("--png", help="plot file (default: next to the JSON)")
    s.set_defaults(fn=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except Cancelled:
        print("\ncancelled; nothing was written", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"offramp {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Training commands: `train-exits` (exits on a frozen backbone, or distilled on unlabelled images),
`train-backbone` (a whole CIFAR network with its exits) and `train-policy` (a learned exit policy)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import args as num
from .common import (TerminalProgress, bundle_and_data, calibration_records, check_out, checked_unlabelled, load, pct,
                     pick_device,
                     print_calibration, print_skipped, print_warning, record, save_bundle_or_keep, tell)


def add_train_exits(sub) -> None:
    """The `train-exits` command."""
    raw = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("train-exits", help="train exit heads on a frozen backbone and save a bundle",
                       formatter_class=raw, epilog=TRAIN_EXITS_EPILOG)
    data = s.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="labelled image folder (one sub-folder per class) or the CIFAR-10 zip")
    data.add_argument("--unlabelled", metavar="FOLDER", help="images without labels (any sub-folders, or a zip): "
                      "the early exits learn the last exit's answers (distillation); needs --weights or --from")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--backbone", help="registered backbone name (see list-backbones)")
    src.add_argument("--from", dest="from_bundle", metavar="BUNDLE", help="keep this bundle's trained backbone, put new exits on it")
    src.add_argument("--model", metavar="SPEC", help="any model, cut after the layers --taps names: a torchvision "
                     "name, timm:NAME or module:pkg.mod:factory (see `offramp layers SPEC`)")
    s.add_argument("--taps", metavar="NAME,NAME,...", type=_layer_names,
                   help="with --model: the layers to put exits after; the model's own classifier is the last exit")
    s.add_argument("--input-size", type=num.integer(8, 4096), metavar="PIXELS",
                   help="with --model: side of the square input image (default: what the model expects)")
    s.add_argument("--token-pool", choices=["cls", "mean"], help="with --model: exits on tokens read the class "
                   "token or the mean of the tokens (default: cls when the model has a class token)")
    s.add_argument("--weights", help="pretrained weights, e.g. DEFAULT (needs them cached or a network)")
    s.add_argument("--head", default="linear", choices=["linear", "conv", "deep"], help="exit head design (default: linear)")
    s.add_argument("--exits", type=num.number_list(num.integer(), what="stage indices"),
                   help="comma-separated stage indices to put exits after (default: every stage)")
    s.add_argument("--epochs", type=num.positive_int, default=30)
    s.add_argument("--distill", type=num.unit, help="weight of distillation from the last exit (0..1; default 0 with "
                   "--data, 1 with --unlabelled)")
    s.add_argument("--val-fraction", type=num.held_out, default=0.1,
                   help="held out for calibration and threshold search (between 0 and 1)")
    s.add_argument("--max-loss", type=num.points, default=0.5,
                   help="default policy: accuracy points below the last exit allowed (0..100)")
    s.add_argument("--seed", type=num.seed, default=0)
    add_scale_out(s)
    s.add_argument("--out", required=True, help="bundle file to write (.offramp)")
    s.set_defaults(fn=cmd_train_exits)


def add_scale_out(s) -> None:
    """--cache-dir, --cache-memory and --device: what lets a command outgrow one process's memory
    and, under torchrun, one process."""
    s.add_argument("--cache-dir", metavar="DIR", help="keep the feature caches on disk here (memory-mapped, one part "
                   "per torchrun rank, resumable: a rerun skips finished chunks); on a cluster, storage every "
                   "node shares")
    s.add_argument("--cache-memory", type=num.positive, metavar="GiB", help="memory the cache may hold (default: "
                   "80%% of what is free): larger caches need --cache-dir, whose chunks stay within a quarter of it")
    s.add_argument("--device", default="cpu", help="where the backbone runs and the heads train: cpu (default), "
                   "cuda, or auto (under torchrun: each rank's own GPU)")


def memory_limit(args) -> int | None:
    """--cache-memory in bytes (None: the default)."""
    return None if args.cache_memory is None else int(args.cache_memory * 2**30)


def _layer_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer names, e.g. layer1,layer2")
    return names


def _new_backbone(args):
    """The backbone --backbone names, or --model cut after --taps; with --weights."""
    from ..backbones import build_backbone
    if args.model is None:
        if args.taps or args.input_size or args.token_pool:
            raise ValueError("--taps, --input-size and --token-pool go with --model SPEC")
        return build_backbone(args.backbone, weights=args.weights)
    if not args.taps:
        raise ValueError(f"--model {args.model} needs --taps NAME,NAME,...: the layers to put exits after "
                         f"(`offramp layers {args.model}` lists them)")
    return build_backbone("cut", model=args.model, taps=args.taps, weights=args.weights, input_size=args.input_size,
                          token_pool=args.token_pool)


def _train_val_sets(data: str, preset, val_fraction: float):
    """(train set, validation set, class names) from a class folder (checked first: bad files are
    listed and skipped) or from the train split of the CIFAR-10 layout (zip or folder)."""
    from ..splits import open_splits
    splits = open_splits(data, preset, val_fraction=val_fraction, on_skipped=print_skipped, on_warning=print_warning)
    return splits.train, splits.validation, splits.classes


def cmd_train_exits(args) -> int:
    from .. import distributed as dist
    dist.init(args.device)  # under torchrun: join the other ranks (each caches and trains on its part)
    try:
        return _train_exits(args)
    finally:
        dist.finish()


def _train_exits(args) -> int:
    from .. import distributed as dist
    from ..model import MultiExitNet
    from ..train.retrain import fit_exits
    import torch
    check_out(args.out)
    torch.manual_seed(args.seed)  # a new backbone's random init and the heads' init are reproducible
    progress = TerminalProgress() if dist.is_main() else None  # rank 0 alone reports
    stages = args.exits or None
    base = load(args.from_bundle) if args.from_bundle else None
    if base is None and not args.backbone and not args.model:
        raise SystemExit("offramp train-exits: give --backbone NAME (see `offramp list-backbones`), --model SPEC "
                         "--taps NAME,... or --from BUNDLE")
    meta = {"name": Path(args.out).stem, "source": {"command": "offramp " + " ".join(sys.argv[1:]),
                                                    "data": args.data or args.unlabelled},
            "split": {"val_fraction": args.val_fraction, "seed": 0}}
    if args.unlabelled:
        return _distil_exits(args, base, stages, meta, progress)
    backbone = base.model.backbone if base is not None else _new_backbone(args)
    train_set, val_set, classes = _train_val_sets(args.data, backbone.preset, args.val_fraction)
    keep = backbone.classifier is not None and args.weights is not None
    model = MultiExitNet.attach(backbone, class_names=classes, exit_stages=stages or (base.model.exit_stages if base else None),
                                head=args.head, keep_classifier=keep)
    bundle, rep = fit_exits(model, train_set, val_set, epochs=args.epochs, max_loss=args.max_loss / 100,
                            distill=args.distill or 0.0, progress=progress, meta=meta, device=dist.device(args.device),
                            cache_dir=args.cache_dir, memory_limit=memory_limit(args))
    if bundle is None:  # another rank than 0: its part is done, rank 0 writes and reports
        return 0
    progress.close()
    save_bundle_or_keep(bundle, args.out)
    acc = rep["accuracy_per_exit"]
    print("validation accuracy per exit: " + "  ".join(f"E{e}:{pct(a)}" for e, a in enumerate(acc)))
    print_calibration(rep["calibration"])
    p = rep["default_point"]
    print(f"default policy: {pct(p['accuracy'])} accuracy, {pct(p['saved'])} of FLOPs saved")
    print(f"saved {args.out}")
    return 0


def _distil_exits(args, base, stages, meta, progress) -> int:
    """train-exits --unlabelled: early exits learn the last exit's answers on unlabelled images."""
    from .. import distributed as dist
    from ..backbones.generic import categories
    from ..model import MultiExitNet
    from ..preprocess import eval_transform
    from ..splits import unlabelled_parts
    from ..train.retrain import distil_exits, early_exits_on
    if base is not None:
        model = early_exits_on(base.model, exit_stages=stages, head=args.head, seed=args.seed)
    else:
        if args.weights is None:
            raise ValueError("distilling needs a trained last exit to learn from; give --weights DEFAULT (the "
                             "pretrained torchvision classifier) or --from BUNDLE")
        backbone = _new_backbone(args)
        spec = args.model or args.backbone  # a registered torchvision name is a model SPEC too
        k = backbone.spec["kwargs"].get("num_classes", 1000)
        model = MultiExitNet.attach(backbone, class_names=categories(spec, args.weights, k),
                                    exit_stages=stages, head=args.head, keep_classifier=True)
    split, check = checked_unlabelled(args.unlabelled, progress)
    images, train_idx, val_idx = unlabelled_parts(args.unlabelled, split, val_fraction=args.val_fraction, report=check,
                                                  transform=eval_transform(model.backbone.preset))
    tell(f"{check.count} images in {check.path}" + (f" ({len(check.skipped)} skipped)" if check.skipped else ""))
    distill = 1.0 if args.distill is None else args.distill
    bundle, rep = distil_exits(model, images, epochs=args.epochs, parts=(train_idx, val_idx),
                               max_loss=args.max_loss / 100, distill=distill, progress=progress, meta=meta,
                               device=dist.device(args.device), cache_dir=args.cache_dir,
                               memory_limit=memory_limit(args))
    if bundle is None:
        return 0
    progress.close()
    save_bundle_or_keep(bundle, args.out)
    agree = rep["agreement_per_exit"]
    print(f"agreement with the last exit on {rep['held_out']} held-out images: "
          + "  ".join(f"E{e}:{pct(a)}" for e, a in enumerate(agree[:-1])))
    print_calibration(rep["calibration"])
    p = rep["default_point"]
    print(f"default policy: answers as the last exit on {pct(p['accuracy'])} of held-out images, "
          f"{pct(p['saved'])} of FLOPs saved")
    print(f"saved {args.out}")
    return 0


def add_train_backbone(sub) -> None:
    """The `train-backbone` command."""
    s = sub.add_parser("train-backbone", help="train a built-in CIFAR network with its exits from scratch")
    s.add_argument("--arch", default="cifar_resnet20", help="built-in backbone (see list-backbones)")
    s.add_argument("--data", required=True, help="CIFAR-10 zip or extracted folder (its train split is used)")
    s.add_argument("--epochs", type=num.positive_int, default=30)
    s.add_argument("--batch-size", type=num.positive_int, default=128)
    s.add_argument("--lr", type=num.positive, default=0.1)
    s.add_argument("--label-smoothing", type=num.smoothing, default=0.1)
    s.add_argument("--exit-weights", metavar="W,W,...", type=num.number_list(num.nonnegative, what="weights"),
                   help="loss weight of each exit, comma-separated (default: all 1, joint training); "
                        "0,...,0,1 trains the backbone alone, for exits put on it afterwards with train-exits --from")
    s.add_argument("--head", default="linear", choices=["linear", "conv", "deep"])
    s.add_argument("--seed", type=num.seed, default=0)
    s.add_argument("--val-fraction", type=num.held_out, default=0.1)
    s.add_argument("--device", default="auto")
    s.add_argument("--checkpoint", help="checkpoint to resume from and write each epoch (default: OUT with .ckpt)")
    s.add_argument("--init", metavar="FILE", help="start from a published CIFAR-10 ResNet checkpoint "
                   "(akamaster/pytorch_resnet_cifar10, read as plain tensors) with --arch cifar_resnet20a, 32a, 44a "
                   "or 56a (a resumed --checkpoint keeps its own weights)")
    s.add_argument("--init-sha256", type=num.sha256_hex, metavar="HEX", help="refuse an --init file without this "
                   "SHA-256 (as sha256sum prints it)")
    s.add_argument("--out", required=True, help="bundle file to write (.offramp)")
    s.set_defaults(fn=cmd_train_backbone)


def cmd_train_backbone(args) -> int:
    from ..backbones import build_backbone
    from ..train.network import NetworkConfig, decode_dataset, read_checkpoint, train_network
    from ..train.retrain import fit_exits
    from ..preprocess import eval_transform
    from dataclasses import asdict
    check_out(args.out)
    progress = TerminalProgress()
    device = pick_device(args.device)
    preset = build_backbone(args.arch).preset
    if args.exit_weights and not any(args.exit_weights):
        raise ValueError("--exit-weights are all 0; give at least one exit a positive weight, e.g. 0,0,1")
    cfg = NetworkConfig(arch=args.arch, head=args.head, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        label_smoothing=args.label_smoothing, seed=args.seed,
                        exit_weights=list(args.exit_weights or []))
    checkpoint = args.checkpoint or str(Path(args.out).with_suffix(".ckpt"))
    check_out(checkpoint, suffixes=(), what="checkpoint", option="--checkpoint")
    read_checkpoint(checkpoint, cfg)  # a damaged or foreign checkpoint is refused before any work
    init, init_meta = _published_init(args)  # so is an --init file that does not fit --arch
    train_set, val_set, classes = _train_val_sets(args.data, preset, args.val_fraction)
    if init_meta and init_meta["classes"] != len(classes):
        raise ValueError(f"--init {args.init} classifies {init_meta['classes']} classes but {args.data} has "
                         f"{len(classes)}; published checkpoints are CIFAR-10's: train on its 10 classes")
    full = train_set.dataset
    full.transform = None
    images, labels = decode_dataset(train_set, preset.crop, progress=progress)  # the training part only
    model, history = train_network(cfg, images, labels, classes, device=device, checkpoint=checkpoint,
                                   progress=progress, init=init, log=lambda s: (progress.close(), print(s)))
    full.transform = eval_transform(preset)
    meta = {"name": Path(args.out).stem, "training": {"config": asdict(cfg), "history": history,
                                                      "command": "offramp " + " ".join(sys.argv[1:])},
            "split": {"val_fraction": args.val_fraction, "seed": 0}}
    if init_meta:
        meta["training"]["init"] = init_meta
    # Exits were trained jointly with the network; here they are only calibrated and the
    # thresholds searched on the held-out split (no further head training).
    bundle, rep = fit_exits(model, train_set, val_set, epochs=0, progress=progress, meta=meta)
    progress.close()
    save_bundle_or_keep(bundle, args.out)
    print("validation accuracy per exit: " + "  ".join(f"E{e}:{pct(a)}" for e, a in enumerate(rep["accuracy_per_exit"])))
    print_calibration(rep["calibration"])
    print(f"saved {args.out}")
    return 0


def _published_init(args) -> tuple[dict | None, dict | None]:
    """(state dict of the backbone, {"file", "sha256", "classes"}) from train-backbone's --init (None, None
    without it); raises CheckpointError (a ValueError, one sentence) for a file that does not fit --arch."""
    if args.init is None:
        if args.init_sha256 is not None:
            raise ValueError("--init-sha256 checks an --init file; give --init FILE too")
        return None, None
    from ..backbones import backbone_family, build_backbone
    from ..backbones.published import load_published, sha256_of
    if backbone_family(args.arch) != "cifar":
        raise ValueError(f"--init loads published CIFAR-10 ResNets: give --arch cifar_resnet20a, 32a, 44a or 56a, "
                         f"not {args.arch}")
    backbone = load_published(build_backbone(args.arch), args.init, sha256=args.init_sha256)
    meta = {"file": str(args.init), "sha256": args.init_sha256 or sha256_of(args.init),
            "classes": backbone.spec["kwargs"]["num_classes"]}
    return backbone.state_dict(), meta


def add_train_policy(sub) -> None:
    """The `train-policy` command."""
    raw = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("train-policy", formatter_class=raw, help="train a learned exit policy (threshold, bolukbasi, "
                       "structure) on the calibration split and store it in the bundle", description=TRAIN_POLICY_HELP)
    bundle_and_data(s, "the .offramp bundle (written back unless --out)", unlabelled=True)
    kind = s.add_argument("--kind", required=True, choices=num.LazyChoices(_policy_kinds), metavar="KIND",
                          help="the policy family to fit: %(families)s")
    kind.families = num.Deferred(_policy_families)  # the registered trainers, read when the help is printed
    s.add_argument("--lambdas", type=num.nonnegative, nargs="+", metavar="λ", help="price of compute to sweep (accuracy traded "
                   "per full model's FLOPs); larger = cheaper policies (default: the family's own sweep)")
    s.add_argument("--epochs", type=num.positive_int, help="structure: training epochs per λ (default 150)")
    s.add_argument("--prototype-samples", type=num.positive_int, default=5000, metavar="N",
                   help="structure: training images whose features give the class prototypes (default: 5000)")
    s.add_argument("--max-loss", type=num.points, default=0.5, metavar="POINTS", help="keep the cheapest policy within this "
                   "many accuracy points of the last exit on the calibration split (default: 0.5)")
    s.add_argument("--name", help="its name in the bundle (default: the family's, e.g. shared-threshold, bolukbasi)")
    s.add_argument("--default", action="store_true", help="make it the default policy (the app starts with it)")
    s.add_argument("--out", help="write the bundle here instead of over BUNDLE (.offramp)")
    s.set_defaults(fn=cmd_train_policy)


def cmd_train_policy(args) -> int:
    from ..splits import UnlabelledSplits, spread_subset, stratified_subset
    from ..bench_report import front_table
    from ..fronts import train_policy_bundle
    from ..train import get_trainer
    bundle, splits, progress, records = calibration_records(args)
    unlabelled = isinstance(splits, UnlabelledSplits)
    proto = None
    if get_trainer(args.kind).uses_prototypes:  # class means of TRAINING features, never calibration ones
        if unlabelled:  # no labels to stratify by: an even spread
            train = spread_subset(splits.train, args.prototype_samples)
        else:
            train = stratified_subset(splits.train, args.prototype_samples)
        proto = record(bundle.model, train, progress, teacher_labels=unlabelled)
    trained, rep = train_policy_bundle(bundle, args.kind, records, name=args.name, lambdas=args.lambdas,
                                       prototype_records=proto, epochs=args.epochs, max_loss=args.max_loss / 100,
                                       make_default=args.default, split=splits.describe(), progress=progress)
    progress.close()
    live = _calibrate_novelty(trained, rep["name"], records)
    print(f"{args.kind} front on {records.num_samples} calibration images; * = the stored policy "
          f"(cheapest within {args.max_loss:g} points of the last exit's {pct(rep['full_accuracy'])}):")
    print("\n".join(front_table(rep["front"], rep["index"], rep["full_flops"], rep["full_accuracy"])))
    out = args.out or args.bundle
    save_bundle_or_keep(trained, out)
    default = " (now the default)" if args.default else ""
    print(f"saved {out} with policy {rep['name']!r}{default}; use it with `offramp run --policy {rep['name']}`")
    if live:
        print(live)
    return 0


def _calibrate_novelty(bundle, name: str, records) -> str:
    """With a structure policy `name` in `bundle`: calibrate the app's live novelty score ("unlike my
    classes") on the calibration `records` (images none of its prototypes came from); the line to
    print, or "" for other policies."""
    from ..novelty import calibrate_live
    from ..policies.structure import StructurePolicy
    if not isinstance(bundle.policies.get(name), StructurePolicy):
        return ""
    try:
        entry = calibrate_live(bundle, records, policy=name)
    except ValueError as err:
        return f"live novelty not calibrated: {err}"
    return (f"live novelty calibrated on {entry['samples']} calibration images: the app says \"unlike my classes\" "
            f"for the {entry['false_alarm']:.0%} least typical of images like them")


def _policy_kinds() -> list[str]:
    from ..train import list_trainers  # imports torch: only when argparse reads the choices
    return list_trainers()


def _policy_families() -> str:
    from ..train import get_trainer, list_trainers
    return "; ".join(f"{k}: {get_trainer(k).summary}" if get_trainer(k).summary else k for k in list_trainers())


TRAIN_POLICY_HELP = """Train an exit policy on the calibration split and store it in the bundle by name.

For a sweep of the price of compute (λ), each family's policies are fitted, the Pareto front of
accuracy against mean FLOPs (decision cost included) is kept, and its cheapest policy within
--max-loss points of the last exit is stored. Pick it at run time with
`offramp run --policy NAME` or in the app's policy list.

examples:
  offramp train-policy model.offramp --data cifar10-jpg.zip --kind bolukbasi
  offramp train-policy model.offramp --data cifar10-jpg.zip --kind structure --lambdas 0.01 0.05 0.2
"""


TRAIN_EXITS_EPILOG = """examples:
  offramp train-exits --backbone resnet18 --weights DEFAULT --data my_classes/ --out r18.offramp
  offramp train-exits --backbone resnet50 --weights DEFAULT --unlabelled photos/ --out r50.offramp
  offramp train-exits --from resources/default.offramp --head conv --data cifar10-jpg.zip --out b.offramp
  offramp train-exits --model timm:vit_tiny_patch16_224 --taps blocks.3,blocks.7 --data my_classes/ --out vit.offramp
"""

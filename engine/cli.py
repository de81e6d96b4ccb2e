"""The `offramp` command: everything the app does, scriptable.

    offramp info [BUNDLE]                      what a bundle holds
    offramp run [--bundle B] PATH...           classify images, folders, videos with early exits
    offramp train-exits --data DIR ...         exits on a frozen backbone -> bundle
    offramp train-backbone --arch A --data D   a whole multi-exit network from scratch -> bundle
    offramp evaluate [BUNDLE] --data DIR       per-exit accuracy, policy cost, curve (JSON + PNG)
    offramp search BUNDLE --data DIR           DyCE per-exit thresholds: front + default configuration
    offramp train-policy BUNDLE --data DIR --kind K   a learned exit policy (threshold, bolukbasi, structure)
    offramp bench BUNDLE --data DIR            every method on a held-out split: FLOPs, measured speed-up
    offramp export [BUNDLE] --out DIR          ONNX graphs per stage, exit and decision + a manifest
    offramp list-backbones                     the registered backbones

Data splits (search, train-policy, bench): "calibration" is the part of the data the exits were
not trained on (for the CIFAR-10 zip: the validation part of its train split, as train-exits and
train-backbone hold it out); bench reports on a "test" part used by nothing else (the CIFAR-10
test split; for a plain class folder, half of that validation part, the other half calibrating).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from . import cli_args as num
from .cli_info import cmd_info
from .files import json_text
from .logs import LEVELS, setup_logging
from .progress import Cancelled, Progress

log = logging.getLogger("offramp")


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


# -- where results go: checked before any work, kept somewhere if the write fails after it ----------
def _check_out(path: str, *, suffixes: tuple[str, ...] = (".offramp",), what: str = "bundle",
               option: str = "--out") -> None:
    """Refuse (OutputPathError, one sentence) an output that could not be written, before any work."""
    from .files import check_output_path
    check_output_path(path, suffixes=suffixes, what=what, option=option)


def _save_bundle(bundle, out: str) -> None:
    """save_bundle; when that fails (disk full, permissions changed), the bundle is kept in a spare
    folder and SaveFailed says where, so finished training is never thrown away."""
    from .bundle import save_bundle
    from .files import save_or_keep
    save_or_keep(lambda p: save_bundle(bundle, p), out, what="bundle")


def _write_outputs(outputs) -> None:
    """Write each (write, path, what) with `save_or_keep`: one that fails is kept in a spare folder
    and the others are still written; then SaveFailed names every failure."""
    from .files import SaveFailed, save_or_keep
    failed = []
    for write, path, what in outputs:
        try:
            save_or_keep(write, path, what=what)
        except SaveFailed as e:
            failed.append(str(e))
    if failed:
        raise SaveFailed("; ".join(failed))


def cmd_list_backbones(args) -> int:
    from .backbones import backbone_family, list_backbones
    for name in list_backbones():
        print(f"{name:<22} {backbone_family(name)}")
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
    missing = [p for p in paths if not os.path.lexists(p)]
    if len(missing) == len(paths):  # nothing to do: say so before loading any model
        for p in missing:
            print(f"skipped: {p} does not exist", file=sys.stderr)
        print(f"offramp run: nothing was classified: {_listing(missing)} "
              f"{'does' if len(missing) == 1 else 'do'} not exist", file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(1)  # one image at a time: more threads only spin (and the latency profile uses 1)
    engine = Engine(bundle, device=args.device)
    if args.policy is not None:
        engine.set_policy(args.policy)
    if args.threshold is not None:
        engine.set_thresholds([args.threshold] * engine.model.num_exits)
    failed: list[str] = []

    def skip(msg: str) -> None:
        failed.append(msg)
        print(f"skipped: {msg}", file=sys.stderr)

    classified = 0
    for source, frame in iter_frames(paths, on_error=skip):  # RGB frames, decoded as training decodes
        r = engine.infer(frame, rgb=True)
        classified += 1
        if args.json:
            print(json_text({"source": source, "exit": r.exit_index, "label": r.label, "confidence": r.confidence,
                              "flops": r.flops, "full_flops": r.full_flops, "saved": r.saved, "ms": r.ms,
                              "exits": [{"exit": x.exit_index, "confidence": x.confidence, "top": x.top_k[0][0]}
                                        for x in r.exits]}))
        else:
            print(f"{source}: {r.label} ({_pct(r.confidence)}) at exit E{r.exit_index} of {r.num_exits}, "
                  f"{r.flops / 1e6:.2f} of {r.full_flops / 1e6:.2f} MFLOPs ({_pct(r.saved)} saved), {r.ms:.2f} ms")
    t = engine.totals
    if t.frames and not args.json:
        print(f"{t.frames} frames: {_pct(t.saved)} of FLOPs saved, exits taken {t.exit_counts}", file=sys.stderr)
    if not classified:
        print(f"offramp run: nothing was classified: every input was missing or unreadable ({_listing(paths)})",
              file=sys.stderr)
        return 2
    if failed:
        print(f"offramp run: {len(failed)} input{'s' if len(failed) > 1 else ''} skipped (see above)", file=sys.stderr)
        return 1
    return 0


def _listing(items: list[str], most: int = 5) -> str:
    shown = ", ".join(map(str, items[:most]))
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def _print_skipped(path: str, reason: str) -> None:
    print(f"skipped {path}: {reason}", file=sys.stderr)


def _print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _train_val_sets(data: str, preset, val_fraction: float):
    """(train set, validation set, class names) from a class folder (checked first: bad files are
    listed and skipped) or from the train split of the CIFAR-10 layout (zip or folder)."""
    from .splits import open_splits
    splits = open_splits(data, preset, val_fraction=val_fraction, on_skipped=_print_skipped, on_warning=_print_warning)
    return splits.train, splits.validation, splits.classes


def cmd_train_exits(args) -> int:
    from .backbones import build_backbone
    from .model import MultiExitNet
    from .train.retrain import fit_exits
    import torch
    _check_out(args.out)
    torch.manual_seed(args.seed)  # a new backbone's random init and the heads' init are reproducible
    progress = TerminalProgress()
    stages = args.exits or None
    base = _load(args.from_bundle) if args.from_bundle else None
    if base is None and not args.backbone:
        raise SystemExit("offramp train-exits: give --backbone NAME (see `offramp list-backbones`) or --from BUNDLE")
    meta = {"name": Path(args.out).stem, "source": {"command": "offramp " + " ".join(sys.argv[1:]),
                                                    "data": args.data or args.unlabelled},
            "split": {"val_fraction": args.val_fraction, "seed": 0}}
    if args.unlabelled:
        return _distil_exits(args, base, stages, meta, progress)
    backbone = base.model.backbone if base is not None else build_backbone(args.backbone, weights=args.weights)
    train_set, val_set, classes = _train_val_sets(args.data, backbone.preset, args.val_fraction)
    keep = backbone.classifier is not None and args.weights is not None
    model = MultiExitNet.attach(backbone, class_names=classes, exit_stages=stages or (base.model.exit_stages if base else None),
                                head=args.head, keep_classifier=keep)
    bundle, rep = fit_exits(model, train_set, val_set, epochs=args.epochs, max_loss=args.max_loss / 100,
                            distill=args.distill or 0.0, progress=progress, meta=meta)
    progress.close()
    _save_bundle(bundle, args.out)
    acc = rep["accuracy_per_exit"]
    print("validation accuracy per exit: " + "  ".join(f"E{e}:{_pct(a)}" for e, a in enumerate(acc)))
    _print_calibration(rep["calibration"])
    p = rep["default_point"]
    print(f"default policy: {_pct(p['accuracy'])} accuracy, {_pct(p['saved'])} of FLOPs saved")
    print(f"saved {args.out}")
    return 0


def _distil_exits(args, base, stages, meta, progress) -> int:
    """train-exits --unlabelled: early exits learn the last exit's answers on unlabelled images."""
    from .backbones import build_backbone
    from .model import MultiExitNet
    from .preprocess import eval_transform
    from .splits import unlabelled_parts
    from .train.retrain import distil_exits, early_exits_on
    if base is not None:
        model = early_exits_on(base.model, exit_stages=stages, head=args.head, seed=args.seed)
    else:
        if args.weights is None:
            raise ValueError("distilling needs a trained last exit to learn from; give --weights DEFAULT (the "
                             "pretrained torchvision classifier) or --from BUNDLE")
        from .backbones.torchvision_models import torchvision_categories
        backbone = build_backbone(args.backbone, weights=args.weights)
        model = MultiExitNet.attach(backbone, class_names=torchvision_categories(args.backbone, args.weights),
                                    exit_stages=stages, head=args.head, keep_classifier=True)
    split, check = _checked_unlabelled(args.unlabelled, progress)
    images, train_idx, val_idx = unlabelled_parts(args.unlabelled, split, val_fraction=args.val_fraction, report=check,
                                                  transform=eval_transform(model.backbone.preset))
    print(f"{check.count} images in {check.path}" + (f" ({len(check.skipped)} skipped)" if check.skipped else ""),
          file=sys.stderr)
    distill = 1.0 if args.distill is None else args.distill
    bundle, rep = distil_exits(model, images, epochs=args.epochs, parts=(train_idx, val_idx),
                               max_loss=args.max_loss / 100, distill=distill, progress=progress, meta=meta)
    progress.close()
    _save_bundle(bundle, args.out)
    agree = rep["agreement_per_exit"]
    print(f"agreement with the last exit on {rep['held_out']} held-out images: "
          + "  ".join(f"E{e}:{_pct(a)}" for e, a in enumerate(agree[:-1])))
    _print_calibration(rep["calibration"])
    p = rep["default_point"]
    print(f"default policy: answers as the last exit on {_pct(p['accuracy'])} of held-out images, "
          f"{_pct(p['saved'])} of FLOPs saved")
    print(f"saved {args.out}")
    return 0


def _checked_unlabelled(path: str, progress=None, split: str = "train"):
    """(split, UnlabelledReport) of the images under `path` (`split_or_whole`): bad files printed,
    ValueError naming the path when too few are readable."""
    from .data.checks import check_unlabelled
    from .splits import split_or_whole
    split = split_or_whole(path, split)
    check = check_unlabelled(path, split, progress=progress)
    if progress is not None:
        progress.close()
    for bad, reason in check.skipped:
        _print_skipped(bad, reason)
    check.raise_if_unusable()
    return split, check


def cmd_train_backbone(args) -> int:
    from .backbones import build_backbone
    from .train.network import NetworkConfig, decode_dataset, read_checkpoint, train_network
    from .train.retrain import fit_exits
    from .preprocess import eval_transform
    from dataclasses import asdict
    _check_out(args.out)
    progress = TerminalProgress()
    device = _pick_device(args.device)
    preset = build_backbone(args.arch).preset
    if args.exit_weights and not any(args.exit_weights):
        raise ValueError("--exit-weights are all 0; give at least one exit a positive weight, e.g. 0,0,1")
    cfg = NetworkConfig(arch=args.arch, head=args.head, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        label_smoothing=args.label_smoothing, seed=args.seed,
                        exit_weights=list(args.exit_weights or []))
    checkpoint = args.checkpoint or str(Path(args.out).with_suffix(".ckpt"))
    _check_out(checkpoint, suffixes=(), what="checkpoint", option="--checkpoint")
    read_checkpoint(checkpoint, cfg)  # a damaged or foreign checkpoint is refused before any work
    train_set, val_set, classes = _train_val_sets(args.data, preset, args.val_fraction)
    full = train_set.dataset
    full.transform = None
    images, labels = decode_dataset(train_set, preset.crop, progress=progress)  # the training part only
    model, history = train_network(cfg, images, labels, classes, device=device, checkpoint=checkpoint,
                                   progress=progress, log=lambda s: (progress.close(), print(s)))
    full.transform = eval_transform(preset)
    meta = {"name": Path(args.out).stem, "training": {"config": asdict(cfg), "history": history,
                                                      "command": "offramp " + " ".join(sys.argv[1:])},
            "split": {"val_fraction": args.val_fraction, "seed": 0}}
    # Exits were trained jointly with the network; here they are only calibrated and the
    # thresholds searched on the held-out split (no further head training).
    bundle, rep = fit_exits(model, train_set, val_set, epochs=0, progress=progress, meta=meta)
    progress.close()
    _save_bundle(bundle, args.out)
    print("validation accuracy per exit: " + "  ".join(f"E{e}:{_pct(a)}" for e, a in enumerate(rep["accuracy_per_exit"])))
    _print_calibration(rep["calibration"])
    print(f"saved {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from .preprocess import eval_transform
    from .evaluate import evaluation_report, plot_report, record_outputs
    from .cost import profile_latency
    from .files import write_json
    out_json = args.json or f"{Path(args.bundle or 'default').stem}-evaluation.json"
    out_png = args.png or str(Path(out_json).with_suffix(".png"))
    _check_out(out_json, suffixes=(".json",), what="report", option="--json")
    _check_out(out_png, suffixes=(".png",), what="plot", option="--png")
    bundle = _load(args.bundle)
    model = bundle.model
    if args.unlabelled:
        from .data.folders import open_unlabelled
        split, check = _checked_unlabelled(args.unlabelled, split=args.split)
        ds = open_unlabelled(args.unlabelled, split, report=check)
    else:
        from .splits import open_labelled_part
        ds, check = open_labelled_part(args.data, args.split, classes=model.class_names, on_skipped=_print_skipped)
    ds.transform = eval_transform(model.backbone.preset)
    progress = TerminalProgress()
    records = record_outputs(model, ds, batch_size=args.batch_size, progress=progress)
    progress.close()
    if args.unlabelled:  # no labels: score every exit and policy by agreement with the last exit
        records.labels = records.logits[:, -1].argmax(-1)
        print(f"{records.num_samples} unlabelled images: 'accuracy' below is agreement with the last exit")
    cost = profile_latency(model, bundle.cost)  # this machine's batch-1 latency, not the one stored
    rep = evaluation_report(records, cost, bundle.policies, default=bundle.default_policy)
    unread = sorted(set(ds.bad) - {src for src, _ in check.skipped})  # failed after the check passed them
    rep["data"] = str(args.data or args.unlabelled)
    rep["skipped"] = [[str(p), why] for p, why in check.skipped] + [[ds._name(src), ds.bad[src]] for src in unread]
    if args.unlabelled:
        rep.pop("classes_scored")
    else:
        print(f"scored {records.num_samples} images of {len(rep['classes_scored'])} of the model's "
              f"{len(model.class_names)} classes: {', '.join(rep['classes_scored'])}")
    if rep["skipped"]:
        print(f"skipped {len(rep['skipped'])} unreadable files (listed above and in the report)")
    _print_report(rep)
    _write_outputs([(lambda p: write_json(p, rep), out_json, "report"), (lambda p: plot_report(rep, p), out_png, "plot")])
    print(f"wrote {out_json} and {out_png}")
    return 0


def _splits_for(bundle, args):
    """The data splits for search / train-policy / bench: the validation fraction given, else the
    one the bundle was trained with (meta["split"]), else 0.1 (train-exits' default)."""
    from .splits import open_splits, recorded_val_fraction
    fraction = recorded_val_fraction(bundle.meta, args.val_fraction)
    if getattr(args, "unlabelled", None):
        return _unlabelled_splits(bundle, args.unlabelled, fraction)
    splits = open_splits(args.data, bundle.model.backbone.preset, val_fraction=fraction, on_skipped=_print_skipped,
                         on_warning=_print_warning, classes=bundle.model.class_names)  # labels by class name
    d = splits.describe()
    print(f"data: {d['train']} training, {d['calibration']} calibration ({d['calibration_source']}), "
          f"{d['test']} test images ({d['test_source']})", file=sys.stderr)
    return splits


def _unlabelled_splits(bundle, path: str, fraction: float):
    """train-exits --unlabelled's parts of `path` (`UnlabelledSplits`), bad files printed."""
    from .splits import UnlabelledSplits
    split, check = _checked_unlabelled(path)
    splits = UnlabelledSplits.open(path, split, bundle.model.backbone.preset, val_fraction=fraction, report=check)
    print(f"data: {len(splits.calibration)} held-out unlabelled images, scored against the last exit's answers",
          file=sys.stderr)
    return splits


def _record(model, subset, progress, with_features=True, teacher_labels=False):
    """Every exit's outputs on `subset`; with `teacher_labels` the labels are the last exit's answers."""
    from .evaluate import record_outputs
    if len(subset) == 0:
        raise ValueError("the calibration split is empty; use more images or a larger --val-fraction")
    records = record_outputs(model, subset, with_features=with_features, progress=progress)
    progress.close()
    if teacher_labels:
        records.labels = records.logits[:, -1].argmax(-1)
    return records


def cmd_search(args) -> int:
    from .bench_report import front_table
    from .fronts import search_bundle
    from .splits import UnlabelledSplits
    if args.out:
        _check_out(args.out)
    bundle = _load(args.bundle)
    _check_out(args.out or args.bundle, suffixes=())  # written back over BUNDLE without --out
    splits = _splits_for(bundle, args)
    progress = TerminalProgress()
    unlabelled = isinstance(splits, UnlabelledSplits)
    records = _record(bundle.model, splits.calibration, progress, with_features=False, teacher_labels=unlabelled)
    searched, rep = search_bundle(bundle, records, max_loss=args.max_loss / 100, budget=args.budget,
                                  measure=args.measure, split=splits.describe())
    full, flops = rep["full_accuracy"], rep["full_flops"]
    print(f"DyCE front on {records.num_samples} calibration images ({len(rep['front'])} configurations; "
          f"last exit {_pct(full)}); * = the default configuration:")
    print("\n".join(front_table(rep["front"], rep["index"], flops, full)))
    target = f"budget {args.budget:g}" if args.budget is not None else f"≤ {args.max_loss:g}-point loss"
    for method, label in (("circular", "DyCE circular"), ("one_pass", "DyCE one-pass"), ("shared", "shared threshold")):
        p = rep["at_target"][method]
        print(f"{label + ':':<18} {_pct(p['accuracy'])} accuracy, {_pct(1 - p['flops'] / flops)} of FLOPs saved "
              f"at {target}")
    out = args.out or args.bundle
    _save_bundle(searched, out)
    print(f"saved {out} (default policy 'threshold' = point {rep['index']}; its front drives the app's budget slider)")
    return 0


def cmd_train_policy(args) -> int:
    from .splits import UnlabelledSplits, spread_subset, stratified_subset
    from .bench_report import front_table
    from .fronts import train_policy_bundle
    from .train import get_trainer
    if args.out:
        _check_out(args.out)
    bundle = _load(args.bundle)
    _check_out(args.out or args.bundle, suffixes=())  # written back over BUNDLE without --out
    splits = _splits_for(bundle, args)
    progress = TerminalProgress()
    unlabelled = isinstance(splits, UnlabelledSplits)
    records = _record(bundle.model, splits.calibration, progress, teacher_labels=unlabelled)
    proto = None
    if get_trainer(args.kind).uses_prototypes:  # class means of TRAINING features, never calibration ones
        if unlabelled:  # no labels to stratify by: an even spread
            train = spread_subset(splits.train, args.prototype_samples)
        else:
            train = stratified_subset(splits.train, args.prototype_samples)
        proto = _record(bundle.model, train, progress, teacher_labels=unlabelled)
    trained, rep = train_policy_bundle(bundle, args.kind, records, name=args.name, lambdas=args.lambdas,
                                       prototype_records=proto, epochs=args.epochs, max_loss=args.max_loss / 100,
                                       make_default=args.default, split=splits.describe(), progress=progress)
    progress.close()
    print(f"{args.kind} front on {records.num_samples} calibration images; * = the stored policy "
          f"(cheapest within {args.max_loss:g} points of the last exit's {_pct(rep['full_accuracy'])}):")
    print("\n".join(front_table(rep["front"], rep["index"], rep["full_flops"], rep["full_accuracy"])))
    out = args.out or args.bundle
    _save_bundle(trained, out)
    default = " (now the default)" if args.default else ""
    print(f"saved {out} with policy {rep['name']!r}{default}; use it with `offramp run --policy {rep['name']}`")
    return 0


def cmd_export(args) -> int:
    from .export import OnnxRunner, export_bundle
    import torch
    from .files import check_output_path
    check_output_path(args.out, what="export folder", folder=True)
    torch.set_num_threads(1)
    bundle = _load(args.bundle)
    inputs = _check_images(args.images, bundle, args.check_images) if args.images else None
    progress = TerminalProgress()
    manifest = export_bundle(bundle, args.out, policy=args.policy, check=not args.no_check, check_inputs=inputs,
                             overwrite=args.overwrite, progress=progress)
    progress.close()
    files = sorted(Path(args.out).iterdir())
    size = sum(f.stat().st_size for f in files)
    pol = manifest["policy"]
    print(f"wrote {len(files)} files ({size / 1e6:.1f} MB) to {args.out}: {len(manifest['stages'])} stages, "
          f"{len(manifest['exits'])} exits, policy {pol['name']!r} ({pol['kind']}) with "
          f"{sum(d is not None for d in pol['decisions'])} decision graphs")
    check = manifest.get("check")
    if check:
        worst = max(check["max_abs_diff"].values())
        print(f"checked with onnxruntime on {check['samples']} {'images' if inputs is not None else 'random inputs'}: "
              f"largest difference from torch {worst:.2g} (stages and exits), the same exit for all "
              f"{check['exits_agree']} (exits taken {check['exit_counts']}), logits within {check['max_logit_diff']:.2g}")
        if inputs is not None:
            runner = OnnxRunner(args.out)
            ms = _mean_ms(lambda x: runner.run(x.numpy()), inputs)
            full = _mean_ms(lambda x: runner.run_full(x.numpy()), inputs)
            ms_again = _mean_ms(lambda x: runner.run(x.numpy()), inputs)  # interleaved: load drifts
            print(f"onnxruntime, batch 1, 1 thread, mean over the {inputs.shape[0]} images: early-exit loop "
                  f"{min(ms, ms_again):.2f} ms, every stage {full:.2f} ms ({full / min(ms, ms_again):.2f}x)")
    return 0


def _check_images(path: str, bundle, limit: int):
    """Up to `limit` preprocessed images from a folder or zip (its test split when it has one), spread over it."""
    from .data.folders import open_unlabelled
    from .preprocess import eval_transform
    from .splits import split_or_whole, spread_indices
    import torch
    transform = eval_transform(bundle.model.backbone.preset)
    images = open_unlabelled(path, split_or_whole(path, "test"), transform=transform)
    return torch.stack([images[i][0] for i in spread_indices(len(images), limit)])


def _mean_ms(fn, inputs) -> float:
    """Mean milliseconds per image of `fn` over `inputs`, one image at a time, after a warm-up image."""
    fn(inputs[:1])
    t = time.perf_counter()
    for i in range(inputs.shape[0]):
        fn(inputs[i:i + 1])
    return (time.perf_counter() - t) * 1e3 / inputs.shape[0]


def cmd_bench(args) -> int:
    import torch
    from . import bench_report
    from .bench import run_benchmark
    from .files import write_json
    out_json = args.json or f"{Path(args.bundle).stem}-bench.json"
    out_png = args.png or str(Path(out_json).with_suffix(".png"))
    _check_out(out_json, suffixes=(".json",), what="report", option="--json")
    _check_out(out_png, suffixes=(".png",), what="plot", option="--png")
    bundle = _load(args.bundle)
    if args.threads:
        torch.set_num_threads(args.threads)
    statics = {Path(p).name: _load(p) for p in args.static}
    cascade = {Path(p).name: _load(p) for p in args.cascade}
    splits = _splits_for(bundle, args)
    progress = TerminalProgress()
    rep = run_benchmark(bundle, splits, statics=statics, cascade=cascade, learned=args.learned, lambdas=args.lambdas,
                        structure_lambdas=args.structure_lambdas, structure_epochs=args.structure_epochs,
                        prototype_samples=args.prototype_samples, timing_images=args.timing_images,
                        runtime=args.runtime, overhead_repeats=args.overhead_repeats, progress=progress)
    progress.close()
    rep = {"bundle": str(args.bundle), "data": str(args.data),
           "command": "offramp " + " ".join(sys.argv[1:]), **rep}
    rep["goals"] = bench_report.assess_goals(rep)
    rep["notes"] = bench_report.notes(rep)
    print("\n".join(bench_report.table(rep)))
    print("chosen on the calibration split (cheapest within 0.5 point there), as it does on the test split:")
    print("\n".join(bench_report.choice_lines(rep)))
    if rep["timing"].get("exit_overhead"):
        print("time an active exit that does not fire adds beyond its FLOPs (batch 1):")
        print("\n".join(bench_report.overhead_lines(rep)))
    print(f"learned policies: {rep['learned_policies']}")
    print("goals (test split, cheapest point within 0.5 point of the full model):")
    print("\n".join(bench_report.goal_lines(rep["goals"])))
    for note in rep["notes"]:
        print(f"note: {note}")
    _write_outputs([(lambda p: write_json(p, rep), out_json, "report"),
                    (lambda p: bench_report.plot(rep, p), out_png, "plot")])
    print(f"wrote {out_json} and {out_png}")
    return 0


def _print_calibration(cal: dict) -> None:
    """Temperature and expected calibration error (ECE) per exit, before and after scaling."""
    print("calibration (held-out split): " + "  ".join(
        f"{e}: T={t:.2f} " + ("kept (the teacher)" if b is None else f"ECE {b * 100:.1f}->{a * 100:.1f}%")
        for e, (t, b, a) in enumerate(zip(cal["temperatures"], cal["ece_before"], cal["ece_after"]))))


def _print_report(rep: dict) -> None:
    print("accuracy per exit: " + "  ".join(f"E{e}:{_pct(a)}" for e, a in enumerate(rep["accuracy_per_exit"])))
    print("calibration error (ECE) per exit: " + "  ".join(f"E{e}:{_pct(a)}" for e, a in enumerate(rep["ece_per_exit"])))
    rows = [("full model", rep["full"])] + [(k, v) for k, v in rep["policies"].items()] + [("oracle", rep["oracle"])]
    print(f"{'method':<24}{'accuracy':>10}{'MFLOPs':>10}{'saved':>8}{'ms':>8}{'speed-up':>10}")
    for name, r in rows:
        ms = f"{r['mean_ms']:.2f}" if r.get("mean_ms") is not None else "-"
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        print(f"{name:<24}{_pct(r['accuracy']):>10}{r['mean_flops'] / 1e6:>10.2f}{_pct(r['saved']):>8}{ms:>8}{speedup:>10}")
    print("ms and speed-up: expected batch-1 latency from this machine's per-stage profile (1 thread); "
          "`offramp bench` times whole runs, decisions included")


def _pick_device(name: str) -> str:
    import torch
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bundle_and_data(s: argparse.ArgumentParser, bundle_help: str, unlabelled: bool = False) -> None:
    """The arguments search, train-policy and bench share: the bundle and the data it was trained on."""
    s.add_argument("bundle", metavar="BUNDLE", help=bundle_help)
    data = s.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="the labelled data the bundle was trained on: the CIFAR-10 zip or "
                      "folder (train/ and test/), or a folder with one sub-folder per class")
    if unlabelled:
        data.add_argument("--unlabelled", metavar="FOLDER", help="the unlabelled images the exits were distilled on "
                          "(train-exits --unlabelled): accuracy means agreement with the last exit")
    s.add_argument("--val-fraction", type=num.held_out, metavar="F", help="fraction of the training data held out of "
                   "training, as given to train-exits / train-backbone (default: what the bundle records, else 0.1)")


SEARCH_HELP = """Search per-exit confidence thresholds (DyCE, arXiv 2403.01695) on the calibration split.

A configuration says which exits are active and the threshold of each. The search records every
exit's answer once, then sweeps the accuracy/compute trade-off (one-pass search, then circular
search: the single best change until none helps) and keeps the Pareto front. The bundle gets the
front (the app's budget slider walks it) and, as its default policy "threshold", the cheapest
configuration within --max-loss points of the last exit (or the one at --budget).

example:
  offramp search model.offramp --data cifar10-jpg.zip --out model-searched.offramp
"""

TRAIN_POLICY_HELP = """Train an exit policy on the calibration split and store it in the bundle by name.

For a sweep of the price of compute (λ), each family's policies are fitted, the Pareto front of
accuracy against mean FLOPs (decision cost included) is kept, and its cheapest policy within
--max-loss points of the last exit is stored. Pick it at run time with
`offramp run --policy NAME` or in the app's policy list.

examples:
  offramp train-policy model.offramp --data cifar10-jpg.zip --kind bolukbasi
  offramp train-policy model.offramp --data cifar10-jpg.zip --kind structure --lambdas 0.01 0.05 0.2
"""

BENCH_HELP = """Benchmark every way to save compute on a held-out test split that nothing was fitted on.

Methods: the full model; the network cut after exit k (a fixed-depth smaller network); --static
networks; one shared threshold; the DyCE front; Bolukbasi and structure policy fronts; a --cascade;
the bundle's own policies; the oracle (the bound). Thresholds, fronts and policies are fitted on
the calibration split only. Mean FLOPs count every exit head that ran and did not fire and every
policy decision. Batch-1 wall-clock is measured on this CPU for the full model and each method's
table points, interleaved in one process, so speed-up = full-model ms / method ms.

Prints, per method, accuracy, FLOPs saved and measured speed-up at the cheapest point within 0.5
and within 1.0 accuracy points of the full model, then the goals (hit or miss). Writes a JSON
report and a PNG plot (accuracy vs FLOPs and vs measured ms).

example:
  offramp bench model.offramp --data cifar10-jpg.zip --static small.offramp --timing-images 300
"""


EXPORT_HELP = """Export a bundle for runtimes outside Offramp (needs onnx, onnxruntime, onnxscript:
pip install 'offramp[export]').

Every stage, every exit head (calibrated) and the policy's decision at every active exit becomes
its own ONNX graph, so a runtime computes only the stages an image needs; manifest.json says how
to preprocess, the order to run them in and when to stop (thresholds are also listed in plain
JSON for threshold policies). Every graph is run with onnxruntime and compared with torch, and the
whole early-exit loop must pick the same exit as the bundle's staged run for every check image.

example:
  offramp export resources/default.offramp --out default-onnx --images cifar10-jpg.zip
"""

TRAIN_EXITS_EPILOG = """examples:
  offramp train-exits --backbone resnet18 --weights DEFAULT --data my_classes/ --out r18.offramp
  offramp train-exits --backbone resnet50 --weights DEFAULT --unlabelled photos/ --out r50.offramp
  offramp train-exits --from resources/default.offramp --head conv --data cifar10-jpg.zip --out b.offramp
"""


def _policy_kinds() -> list[str]:
    from .train import list_trainers  # imports torch: only when argparse reads the choices
    return list_trainers()


def _policy_families() -> str:
    from .train import get_trainer, list_trainers
    return "; ".join(f"{k}: {get_trainer(k).summary}" if get_trainer(k).summary else k for k in list_trainers())


def build_parser() -> argparse.ArgumentParser:
    p = num.Parser(prog="offramp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", type=str.upper, choices=LEVELS, default="WARNING",
                   help="log records of this level and above go to stderr (default WARNING; OFFRAMP_DEBUG=1: DEBUG)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    s = sub.add_parser("list-backbones", help="list the registered backbones")
    s.set_defaults(fn=cmd_list_backbones)

    s = sub.add_parser("info", help="show what a bundle holds (default: the built-in model)")
    s.add_argument("bundle", nargs="?", help="a .offramp bundle file")
    s.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("run", help="classify images, folders and videos with early exits",
                       description="Classify images, folders and videos with early exits. Exit status: 0 when "
                       "every input was classified, 1 when some were skipped (missing or unreadable, each "
                       "named on stderr), 2 when nothing was classified.")
    s.add_argument("paths", nargs="+", metavar="PATH", help="images, folders or video files (a leading .offramp file is the bundle)")
    s.add_argument("--bundle", help="bundle to use (default: the built-in model)")
    s.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    pick = s.add_mutually_exclusive_group()
    pick.add_argument("--policy", metavar="NAME", help="a policy stored in the bundle by name, e.g. bolukbasi or "
                      "structure after train-policy (see `offramp info`; default: the bundle's default policy)")
    pick.add_argument("--threshold", type=num.unit,
                      help="one max-probability threshold (0..1) for every exit, instead of the bundle's policy")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("train-exits", help="train exit heads on a frozen backbone and save a bundle",
                       formatter_class=raw, epilog=TRAIN_EXITS_EPILOG)
    data = s.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="labelled image folder (one sub-folder per class) or the CIFAR-10 zip")
    data.add_argument("--unlabelled", metavar="FOLDER", help="images without labels (any sub-folders, or a zip): "
                      "the early exits learn the last exit's answers (distillation); needs --weights or --from")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--backbone", help="registered backbone name (see list-backbones)")
    src.add_argument("--from", dest="from_bundle", metavar="BUNDLE", help="keep this bundle's trained backbone, put new exits on it")
    s.add_argument("--weights", help="pretrained torchvision weights, e.g. DEFAULT (needs them cached or a network)")
    s.add_argument("--head", default="linear", choices=["linear", "conv"], help="exit head design (default: linear)")
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
    s.add_argument("--out", required=True, help="bundle file to write (.offramp)")
    s.set_defaults(fn=cmd_train_exits)

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
    s.add_argument("--head", default="linear", choices=["linear", "conv"])
    s.add_argument("--seed", type=num.seed, default=0)
    s.add_argument("--val-fraction", type=num.held_out, default=0.1)
    s.add_argument("--device", default="auto")
    s.add_argument("--checkpoint", help="checkpoint to resume from and write each epoch (default: OUT with .ckpt)")
    s.add_argument("--out", required=True, help="bundle file to write (.offramp)")
    s.set_defaults(fn=cmd_train_backbone)

    s = sub.add_parser("evaluate", help="accuracy per exit, cost of each policy, oracle bound, curve")
    s.add_argument("bundle", nargs="?", help="bundle (default: the built-in model)")
    data = s.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="labelled image folder or the CIFAR-10 zip")
    data.add_argument("--unlabelled", metavar="FOLDER", help="images without labels: every exit and policy is "
                      "scored by agreement with the last exit (e.g. new photos for a distilled bundle)")
    s.add_argument("--split", default="test", help="split of the CIFAR-10 layout to use (default: test)")
    s.add_argument("--batch-size", type=num.positive_int, default=256)
    s.add_argument("--json", help="report file (default: <bundle>-evaluation.json)")
    s.add_argument("--png", help="plot file (default: next to the JSON)")
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("search", formatter_class=raw, help="DyCE search: per-exit thresholds, a Pareto front and a "
                       "default configuration, stored in the bundle", description=SEARCH_HELP)
    _bundle_and_data(s, "the .offramp bundle to search (written back unless --out)", unlabelled=True)
    target = s.add_mutually_exclusive_group()
    target.add_argument("--max-loss", type=num.points, default=0.5, metavar="POINTS",
                        help="default configuration: the cheapest within this many accuracy points of the last exit "
                             "on the calibration split (default: 0.5)")
    target.add_argument("--budget", type=num.unit, metavar="B", help="default configuration: this far along the front "
                        "instead, 0 = the cheapest point, 1 = the most accurate")
    s.add_argument("--measure", default="max_prob", choices=["max_prob", "entropy", "margin"],
                   help="the confidence every threshold is compared with (default: max_prob)")
    s.add_argument("--out", help="write the searched bundle here instead of over BUNDLE (.offramp)")
    s.set_defaults(fn=cmd_search)

    s = sub.add_parser("train-policy", formatter_class=raw, help="train a learned exit policy (threshold, bolukbasi, "
                       "structure) on the calibration split and store it in the bundle", description=TRAIN_POLICY_HELP)
    _bundle_and_data(s, "the .offramp bundle (written back unless --out)", unlabelled=True)
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

    s = sub.add_parser("export", help="export a bundle to ONNX graphs (one per stage, exit and decision) + manifest",
                       formatter_class=raw, description=EXPORT_HELP)
    s.add_argument("bundle", nargs="?", help="bundle (default: the built-in model)")
    s.add_argument("--out", required=True, metavar="FOLDER", help="folder to write (must not exist, or --overwrite)")
    s.add_argument("--policy", metavar="NAME", help="the bundle's policy to export (default: its default policy)")
    s.add_argument("--images", metavar="PATH", help="check on these images (a folder or zip; its test split if it "
                   "has one) instead of random inputs, and time the exported loop")
    s.add_argument("--check-images", type=num.positive_int, default=64, metavar="N", help="how many images to check on (default 64)")
    s.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    s.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("bench", formatter_class=raw, help="compare every method on a held-out split: accuracy, FLOPs "
                       "saved, measured batch-1 CPU speed-up (JSON + PNG + table)", description=BENCH_HELP)
    _bundle_and_data(s, "the multi-exit .offramp bundle to benchmark")
    s.add_argument("--static", nargs="+", action="extend", default=[], metavar="SMALL.offramp",
                   help="separately trained smaller networks on the same classes, compared at their last exit "
                        "(is a plain small model as good?)")
    s.add_argument("--cascade", nargs="+", action="extend", default=[], metavar="SMALL.offramp",
                   help="cheaper networks, cheapest first, to run before BUNDLE in a Bolukbasi selection cascade")
    s.add_argument("--timing-images", type=num.positive_int, default=300, metavar="N",
                   help="test images each timed configuration runs at batch 1 (default: 300)")
    s.add_argument("--threads", type=num.nonnegative_int, default=1,
                   help="CPU threads for the batch-1 timing (default 1, as the app runs a frame; 0 = PyTorch's)")
    s.add_argument("--learned", default="fit", choices=["fit", "bundle"], help="fit: fit the Bolukbasi and "
                   "structure fronts here on the calibration split (default); bundle: only the bundle's own policies")
    s.add_argument("--lambdas", type=num.nonnegative, nargs="+", metavar="λ", help="Bolukbasi (and cascade) λ sweep")
    s.add_argument("--structure-lambdas", type=num.nonnegative, nargs="+", metavar="λ",
                   help="structure policy λ sweep")
    s.add_argument("--structure-epochs", type=num.positive_int,
                   help="structure policy training epochs per λ (default 150)")
    s.add_argument("--prototype-samples", type=num.positive_int, default=5000, metavar="N",
                   help="training images whose features give the structure policy's prototypes (default: 5000)")
    s.add_argument("--runtime", default="prepared", choices=["prepared", "eager"],
                   help="what runs the timed configurations: prepared (BatchNorm folded, TorchScript graphs, as the "
                        "app runs; default) or eager (the plain modules training uses)")
    s.add_argument("--overhead-repeats", type=num.nonnegative_int, default=300, metavar="N",
                   help="runs of each variant when timing what an exit that does not fire costs (default 300; 0: skip)")
    s.add_argument("--json", help="report file (default: <bundle>-bench.json)")
    s.add_argument("--png", help="plot file (default: next to the JSON)")
    s.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status. Every error ends in one line on stderr (the
    traceback is logged at debug level: set OFFRAMP_DEBUG=1, or give --log-level DEBUG, to see it)."""
    args = build_parser().parse_args(argv)
    setup_logging("DEBUG" if os.environ.get("OFFRAMP_DEBUG") else args.log_level)
    try:
        return args.fn(args)
    except Cancelled:
        print("\ncancelled; nothing was written", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        log.debug("offramp %s failed", args.command, exc_info=True)
        print(f"offramp {args.command}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug or an input no check foresaw: one line, not a traceback
        log.debug("offramp %s failed", args.command, exc_info=True)
        print(f"offramp {args.command}: unexpected {type(exc).__name__}: {exc} (set OFFRAMP_DEBUG=1 for the "
              "details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

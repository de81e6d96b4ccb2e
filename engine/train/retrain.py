"""From a frozen backbone and labelled images to a ready bundle: cache features, train exits,
calibrate, search a threshold front, pick the default operating point, measure cost.

`fit_exits` is what `offramp train-exits` runs; `retrain_on_folder` is what the app's retraining
panel runs (a teacher's own classes on the built-in backbone).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from ..bundle import Bundle
from ..cost import measure_costs
from ..data.checks import check_folder, check_unlabelled
from ..data.folders import open_dataset
from ..evaluate import accuracy_per_exit, operating_front, pick_point, threshold_curve
from ..features import FeatureCache, cache_features, gather_cache
from ..model import MultiExitNet
from ..policies import ThresholdPolicy
from ..preprocess import eval_transform
from ..progress import CancelFlag, ProgressFn, report
from ..records import Records
from ..splits import unlabelled_parts, usable_split
from .calibrate import calibrate_with_report
from .exits import train_exits

DEFAULT_MAX_LOSS = 0.005  # the default operating point: at most 0.5 points below the last exit


def records_from_cache(model: MultiExitNet, cache: FeatureCache) -> Records:
    """Calibrated logits of every exit computed from cached head inputs (no backbone pass)."""
    return Records(logits=cache.exit_logits(model, calibrated=True), features=[f.float() for f in cache.features],
                   labels=cache.labels, class_names=list(model.class_names), exit_stages=model.exit_stages)


def fit_exits(model: MultiExitNet, train_set, val_set, *, epochs: int = 30, max_loss: float = DEFAULT_MAX_LOSS,
              distill: float = 0.0, train_which: list[int] | None = None, teacher_labels: bool = False,
              device: str = "cpu", meta: dict | None = None, cache_dir: str | Path | None = None,
              memory_limit: int | None = None, progress: ProgressFn | None = None,
              cancel: CancelFlag | None = None) -> tuple[Bundle | None, dict]:
    """Train `model`'s exits on `train_set` (backbone frozen), calibrate and search thresholds on
    `val_set`, and return a bundle whose default policy is the cheapest threshold configuration
    within `max_loss` of the last exit on `val_set`, plus a report. Raises Cancelled.

    `teacher_labels`: the sets' labels are ignored; every image is labelled with the last exit's
    prediction, so "accuracy" throughout (training, calibration, the front, the report) means
    agreement with the last exit, and the last exit itself agrees 100 %.

    `cache_dir`: the feature caches live on disk there (train/ and val/, memory-mapped, resumable;
    see `cache_features`), `memory_limit` bytes at most in memory. Under torchrun every rank caches
    and trains on its part of the data (DistributedDataParallel); rank 0 gathers the validation
    part, calibrates, searches and returns the bundle, the other ranks return (None, {})."""
    t0 = time.perf_counter()
    model.eval()
    store = (lambda name: Path(cache_dir) / name) if cache_dir is not None else (lambda name: None)  # noqa: E731
    kw = {"device": device, "memory_limit": memory_limit, "progress": progress, "cancel": cancel}
    val_part = _cache(model, val_set, teacher_labels, store=store("val"), **kw)
    history, train_samples = [], 0
    if epochs > 0:  # 0: exits already trained (jointly with the network); only calibrate and search
        train_cache = _cache(model, train_set, teacher_labels, store=store("train"), **kw)
        home = next(model.parameters()).device
        try:  # the heads train where the backbone ran (each rank's GPU under torchrun on CUDA)
            history = train_exits(model.to(device), train_cache, epochs=epochs, val_cache=val_part, distill=distill,
                                  train_exits=train_which, progress=progress, cancel=cancel)
        finally:
            model.to(home)
        train_samples = train_cache.samples
    val_cache = gather_cache(val_part, store("val"))
    if val_cache is None:  # not rank 0: its part is done
        return None, {}
    if teacher_labels:  # parts read back from disk carry the data's labels
        val_cache.labels = val_cache.teacher_logits.argmax(1)
    report(progress, cancel, "evaluating", 0, 1)
    calibration = calibrate_with_report(model, val_cache, keep=[model.num_exits - 1] if teacher_labels else ())
    records = records_from_cache(model, val_cache)
    cost = measure_costs(model)
    per_exit = accuracy_per_exit(records)
    curve = threshold_curve(records, cost)
    front = operating_front(records, cost)
    point = pick_point(front, max_loss=max_loss, full_accuracy=per_exit[-1])
    policy = ThresholdPolicy.from_json(point["policy"], num_exits=model.num_exits, num_classes=model.num_classes)
    report(progress, cancel, "evaluating", 1, 1)
    evaluation = {"split": "validation", "samples": len(records.labels), "accuracy_per_exit": per_exit,
                  "labels": "last exit's predictions" if teacher_labels else "the data's labels",
                  "temperatures": calibration["temperatures"], "ece_before": calibration["ece_before"],
                  "ece_after": calibration["ece_after"], "default_point": point}
    bundle_meta = dict(meta or {})
    bundle_meta.update({"front": front, "default_point": front.index(point), "evaluation": evaluation,
                        "exit_training": {"epochs": epochs, "distill": distill, "teacher_labels": teacher_labels,
                                          "history": history, "train_samples": train_samples,
                                          "seconds": round(time.perf_counter() - t0, 1)}})
    bundle = Bundle(model=model, policies={"threshold": policy}, default_policy="threshold", cost=cost,
                    meta=bundle_meta)
    return bundle, {"accuracy_per_exit": per_exit, "curve": curve, "front": front, "default_point": point,
                    "history": history, "calibration": calibration}


def _cache(model: MultiExitNet, dataset, teacher_labels: bool, device: str = "cpu", progress=None, cancel=None,
           store: Path | None = None, memory_limit: int | None = None) -> FeatureCache:
    """This rank's part of the cache of `dataset` (the whole in one process)."""
    cache = cache_features(model, dataset, device=device, shard=True, store=store, memory_limit=memory_limit,
                           progress=progress, cancel=cancel)
    if teacher_labels:
        cache.labels = cache.teacher_logits.argmax(1)
    return cache


def _attach_seeded(backbone, seed: int, **kwargs) -> MultiExitNet:
    """MultiExitNet.attach with the new heads' initial weights fixed by `seed` (the caller's random
    state is left as it was), so the same data trains the same exits."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MultiExitNet.attach(backbone, **kwargs)


def early_exits_on(base: MultiExitNet, *, exit_stages: list[int] | None = None, head: str = "linear",
                   seed: int = 0) -> MultiExitNet:
    """New, untrained early exits after `exit_stages` (default: every stage) on a copy of `base`'s
    backbone, with a copy of `base`'s last exit (and its temperature) as the last exit: the teacher
    that `distil_exits` learns from. `base` is untouched; `seed` fixes the new heads' initial weights."""
    # The last exit always reads the last stage, in `base` as in the new model (attach adds it).
    model = _attach_seeded(copy.deepcopy(base.backbone), seed, class_names=base.class_names, exit_stages=exit_stages,
                           head=head, keep_classifier=False)
    model.exits[-1] = copy.deepcopy(base.exits[-1])
    model.temperature[-1] = base.temperature[-1]
    return model


def distil_exits(model: MultiExitNet, images, *, val_fraction: float = 0.1, epochs: int = 30,
                 max_loss: float = DEFAULT_MAX_LOSS, distill: float = 1.0, device: str = "cpu",
                 parts: tuple[list[int], list[int]] | None = None, meta: dict | None = None,
                 cache_dir: str | Path | None = None, memory_limit: int | None = None,
                 progress: ProgressFn | None = None, cancel: CancelFlag | None = None) -> tuple[Bundle | None, dict]:
    """Early exits without labels: every exit but the last learns the last exit's predictions on
    `images` (a dataset of (image tensor, anything), e.g. `open_unlabelled`), with the loss
    (1 - distill) * cross-entropy on the last exit's argmax + distill * KL to its softened output.
    A held-out `val_fraction` (or `parts` = (train indices, held-out indices), e.g. from
    `engine.splits.unlabelled_parts`) calibrates the exits and picks the thresholds; the report's
    "agreement_per_exit" is how often each exit's answer equals the last exit's there.
    The last exit is the teacher: it must already be trained (e.g. the torchvision classifier).
    Raises ValueError for fewer than 2 images or a single-exit model; Cancelled."""
    if model.num_exits < 2:
        raise ValueError("the model has a single exit, so there is no early exit to distil")
    if len(images) < 2:
        raise ValueError(f"distilling exits needs at least 2 images, got {len(images)}")
    train_idx, val_idx = parts or usable_split(len(images), val_fraction, str(getattr(images, "root", "the images")))
    train_set = torch.utils.data.Subset(images, train_idx)
    val_set = torch.utils.data.Subset(images, val_idx)
    bundle, rep = fit_exits(model, train_set, val_set, epochs=epochs, max_loss=max_loss, distill=distill,
                            train_which=list(range(model.num_exits - 1)), teacher_labels=True, device=device,
                            meta=meta, cache_dir=cache_dir, memory_limit=memory_limit, progress=progress,
                            cancel=cancel)
    if bundle is None:  # not rank 0 under torchrun
        return None, rep
    rep["agreement_per_exit"] = rep["accuracy_per_exit"]
    rep["held_out"] = len(val_idx)
    return bundle, rep


RETRAIN_VAL_FRACTION = 0.2  # held out by `retrain_on_folder`: a folder's check tells whether it can be split so


def retrain_on_folder(bundle: Bundle, folder: str | Path, *, head: str = "linear", epochs: int = 30,
                      val_fraction: float = RETRAIN_VAL_FRACTION, progress: ProgressFn | None = None,
                      cancel: CancelFlag | None = None) -> tuple[Bundle, dict]:
    """New exits for the classes of `folder` on `bundle`'s frozen backbone; `bundle` is untouched.

    When the folder holds the bundle's own classes (by name, in any order) its images are labelled
    by the bundle's class names, the exits keep the bundle's class order and the report has the
    bundle's curve on the same held-out images ("curve_old"); otherwise the new exits predict the
    folder's classes. The report lists "empty_classes", class folders without a readable image
    (left out of the classes). Raises ValueError for an unusable folder, Cancelled when cancelled."""
    report(progress, cancel, "checking folder", 0, 1)
    check = check_folder(folder)
    check.raise_if_unusable(val_fraction)
    report(progress, cancel, "checking folder", 1, 1)
    backbone = copy.deepcopy(bundle.model.backbone)
    same_classes = set(check.classes) == set(bundle.model.class_names)  # by name: the order may differ
    if same_classes:
        model = copy.deepcopy(bundle.model)
        train_which = [e for e in range(model.num_exits) if model.exits[e].spec.kind != "original"]
    else:
        model = _attach_seeded(backbone, 0, class_names=check.classes, exit_stages=bundle.model.exit_stages,
                               head=head, keep_classifier=False)
        train_which = None
    model.temperature.fill_(1.0)
    dataset = open_dataset(folder, report=check, classes=model.class_names)  # label i = the model's class i
    dataset.transform = eval_transform(model.backbone.preset)
    train_idx, val_idx = usable_split(dataset.targets, val_fraction, str(folder))
    train_set = torch.utils.data.Subset(dataset, train_idx)
    val_set = torch.utils.data.Subset(dataset, val_idx)
    meta = {"source": {"retrained_from": bundle.meta.get("name", "bundle"), "folder": str(folder)},
            "name": f"{Path(folder).name} exits on {bundle.model.backbone.spec['name']}"}
    new, rep = fit_exits(model, train_set, val_set, epochs=epochs, train_which=train_which, meta=meta,
                         progress=progress, cancel=cancel)
    rep.update({"classes": list(model.class_names), "counts": dict(check.counts),
                "empty_classes": list(check.empty_classes),
                "skipped": [list(map(str, s)) for s in check.skipped]})
    if same_classes:
        old_records = records_from_cache(bundle.model, cache_features(bundle.model, val_set, cancel=cancel))
        rep["curve_old"] = threshold_curve(old_records, bundle.cost)
    rep["curve_new"] = rep["curve"]
    return new, rep


def distil_on_folder(bundle: Bundle, folder: str | Path, *, head: str = "linear", epochs: int = 30,
                     val_fraction: float = 0.1, progress: ProgressFn | None = None,
                     cancel: CancelFlag | None = None) -> tuple[Bundle, dict]:
    """New early exits for `bundle`, distilled from its last exit on the unlabelled images of
    `folder` (any sub-folders); same classes, same last exit; `bundle` is untouched.

    The report holds what `distil_exits` reports, the images counted and skipped, and both curves
    scored by agreement with the last exit on the same held-out images: "curve_old" (the bundle's
    exits) and "curve_new". Raises ValueError for a folder without enough readable images,
    Cancelled when cancelled."""
    check = check_unlabelled(folder, progress=progress, cancel=cancel)
    check.raise_if_unusable()
    model = early_exits_on(bundle.model, exit_stages=bundle.model.exit_stages, head=head)
    images, train_idx, val_idx = unlabelled_parts(folder, val_fraction=val_fraction, report=check,
                                                  transform=eval_transform(model.backbone.preset))
    meta = {"source": {"distilled_from": bundle.meta.get("name", "bundle"), "folder": str(folder)},
            "name": f"{bundle.meta.get('name', 'model')} with exits distilled on {Path(folder).name}",
            "split": {"val_fraction": val_fraction, "seed": 0}}
    new, rep = distil_exits(model, images, epochs=epochs, parts=(train_idx, val_idx), meta=meta, progress=progress,
                            cancel=cancel)
    old_cache = _cache(bundle.model, torch.utils.data.Subset(images, val_idx), True, cancel=cancel)
    rep.update({"images": check.count, "skipped": [list(map(str, s)) for s in check.skipped],
                "curve_old": threshold_curve(records_from_cache(bundle.model, old_cache), bundle.cost),
                "curve_new": rep["curve"]})
    return new, rep

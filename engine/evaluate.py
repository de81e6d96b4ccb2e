"""Evaluation of a multi-exit model: record every exit's outputs once (`engine.records.Records`),
then score any policy on the records — accuracy, mean cost (FLOPs, and time when measured),
compute saved, speed-up, exit histogram — against the full model and the oracle; sweep a shared
threshold into a curve, keep its Pareto front, pick an operating point on it; write a JSON report
and a PNG plot.

Scoring uses `engine.policies.simulate`, the same decision sequence `MultiExitNet.run` executes,
so every number here is what the staged model really does on these samples.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .budget import within_budget
from .cost import CostTable, with_policy_flops
from .model import MultiExitNet
from .policies import OraclePolicy, Policy, ThresholdPolicy, confidence, simulate
from .files import finite, write_json
from .progress import CancelFlag, ProgressFn, report
from .records import Records


# -- recording ----------------------------------------------------------------------------------
def as_loader(dataset_or_loader, preset, batch_size: int, workers: int | None):
    """A map-style dataset becomes an unshuffled DataLoader (one whose `transform` is None gets
    `preset`'s on a shallow copy, since it would yield PIL images); loaders and other iterables of
    (images, labels) batches pass through."""
    loader = dataset_or_loader
    if isinstance(loader, Dataset) and not isinstance(loader, torch.utils.data.IterableDataset):
        from .data.folders import make_loader
        from .preprocess import eval_transform
        if getattr(loader, "transform", "absent") is None:
            loader = copy.copy(loader)
            loader.transform = eval_transform(preset)
        loader = make_loader(loader, batch_size, shuffle=False, workers=workers)
    return loader


def record_outputs(model: MultiExitNet, dataset_or_loader: Dataset | DataLoader | Iterable, *, batch_size: int = 256,
                   device: str | torch.device = "cpu", with_features: bool = True, workers: int | None = None,
                   progress: ProgressFn | None = None, cancel: CancelFlag | None = None,
                   keep_skipped: bool = False) -> Records:
    """Run every exit of `model` on every (image, label) sample and return the Records.

    `dataset_or_loader` is a map-style dataset of (image tensor, label), a DataLoader, or any
    iterable of (images, labels) batches; a dataset whose `transform` is None gets the model's
    preset on a shallow copy, and is loaded by `workers` processes (default: data.default_workers). The model runs in eval mode on `device`; its mode and device are
    restored afterwards. Progress stage: "recording exits". Samples whose file could not be read are
    dropped (`drop_skipped`), or kept with the label SKIPPED when `keep_skipped`. Raises Cancelled,
    and ValueError for an empty dataset.
    """
    loader = as_loader(dataset_or_loader, model.backbone.preset, batch_size, workers)
    total = _length(loader)
    was_training = model.training
    old_device = next(model.parameters()).device
    device = torch.device(device)
    model.eval().to(device)
    logits, feats, labels, done = [], [], [], 0
    try:
        report(progress, cancel, "recording exits", 0, total)
        for batch in loader:
            x, y = batch[0], batch[1]
            with torch.inference_mode():
                out, f = model.forward_all(x.to(device), with_features=True, calibrated=True)
                logits.append(torch.stack(out, dim=1).float().cpu())  # (batch, exits, classes)
                if with_features:
                    feats.append([t.float().cpu() for t in f])
            labels.append(torch.as_tensor(y).long().reshape(-1).cpu())
            done += x.shape[0]
            report(progress, cancel, "recording exits", done, max(total, done))
    finally:
        model.to(old_device).train(was_training)
    if not logits:
        raise ValueError("the dataset is empty: there is nothing to evaluate")
    # concatenated outside inference mode, so the records are ordinary tensors (usable to train policies)
    features = [torch.cat(col) for col in zip(*feats)] if with_features else []
    records = Records(torch.cat(logits), features, torch.cat(labels), model.class_names, model.exit_stages)
    return records if keep_skipped else drop_skipped(records)


def drop_skipped(records: Records) -> Records:
    """`records` without the samples whose file could not be read (label `data.folders.SKIPPED`: the
    dataset filled their place in the batch with another image), so no image counts twice.
    Raises ValueError when none is left."""
    from .data.folders import SKIPPED
    keep = records.labels != SKIPPED
    if bool(keep.all()):
        return records
    if not bool(keep.any()):
        raise ValueError("none of the images could be read: there is nothing to evaluate")
    return records.subset(keep)


def _length(loader) -> int:
    """Number of samples, when known (0 otherwise)."""
    ds = getattr(loader, "dataset", None)
    try:
        return len(ds) if ds is not None else 0
    except TypeError:
        return 0


# -- scoring ------------------------------------------------------------------------------------
def accuracy_per_exit(records: Records) -> list[float]:
    """Top-1 accuracy (0..1) of each exit on all samples, as if every sample stopped there."""
    return _correct(records).double().mean(dim=0).tolist()


def _correct(records: Records) -> torch.Tensor:
    return records.logits.argmax(dim=-1) == records.labels[:, None]  # (N, E) bool


def _check_cost(records: Records, cost: CostTable) -> None:
    if cost.num_exits != records.num_exits:
        raise ValueError(f"the cost table describes {cost.num_exits} exits but the records have {records.num_exits}; "
                         "measure the cost of the same model")


def _summary(exits: torch.Tensor, correct: torch.Tensor, cost: CostTable, active: Sequence[bool]) -> dict:
    """Accuracy and mean cost of samples that take `exits` (N,). Shared by every scorer, so a
    curve point and evaluate_policy of its policy give identical numbers."""
    picked = correct[torch.arange(exits.numel()), exits]
    flops = torch.tensor(cost.cumulative_flops(active), dtype=torch.float64)[exits].mean().item()
    out = {"accuracy": picked.double().mean().item(), "flops": flops, "saved": 1.0 - flops / cost.full_flops,
           "loss_se": loss_standard_error(picked, correct[:, -1])}
    if cost.has_latency:
        ms = torch.tensor(cost.cumulative_ms(active), dtype=torch.float64)[exits].mean().item()
        out["ms"] = ms
        out["speedup"] = cost.full_ms / ms if ms > 0 else math.inf
    return out


def loss_standard_error(picked: torch.Tensor, full: torch.Tensor) -> float:
    """Standard error of the accuracy lost against the full model, from the paired per-sample
    differences (full right − policy right, each −1, 0 or 1) on the same N samples: it shrinks with
    N and with how rarely the two disagree. 0 for N < 2."""
    d = full.double() - picked.double()
    n = d.numel()
    return math.sqrt(max(d.var().item(), 0.0) / n) if n >= 2 else 0.0


def evaluate_policy(records: Records, policy: Policy, cost: CostTable) -> dict:
    """Score `policy` on the records; a JSON-able dict.

    Keys: policy (to_json), num_samples, accuracy (0..1), mean_flops (every stage and head that
    ran, heads that did not fire and policy decisions included), full_flops, saved (1 −
    mean/full), flops_speedup, [mean_ms, full_ms, speedup when `cost` has latency], exit_counts,
    exit_fractions, exit_accuracy (accuracy of the samples that took each exit; None if none did).
    Raises ValueError when cost and records disagree on the number of exits.
    """
    _check_cost(records, cost)
    num_exits = records.num_exits
    exits = simulate(policy, records.logits, records.features_or_none)
    correct = _correct(records)
    s = _summary(exits, correct, cost, policy.active_exits(num_exits))
    counts = torch.bincount(exits, minlength=num_exits)
    took = correct[torch.arange(exits.numel()), exits]
    exit_acc = [took[exits == e].double().mean().item() if counts[e] else None for e in range(num_exits)]
    out = {"policy": policy.to_json(), "num_samples": records.num_samples, "accuracy": s["accuracy"],
           "loss_se": s["loss_se"], "mean_flops": s["flops"], "full_flops": cost.full_flops, "saved": s["saved"],
           "flops_speedup": cost.full_flops / s["flops"] if s["flops"] > 0 else math.inf}
    if "ms" in s:
        out.update(mean_ms=s["ms"], full_ms=cost.full_ms, speedup=s["speedup"])
    n = max(records.num_samples, 1)
    out.update(exit_counts=counts.tolist(), exit_fractions=[c / n for c in counts.tolist()], exit_accuracy=exit_acc)
    return out


def oracle(records: Records, cost: CostTable) -> dict:
    """`evaluate_policy` for the oracle: each sample exits at the earliest exit that is right;
    samples no exit gets right go to the last exit. The bound of any policy on these exits."""
    return evaluate_policy(records, OraclePolicy().with_targets(records.labels), cost)


def full_model_policy(num_exits: int, measure: str = "max_prob") -> ThresholdPolicy:
    """The full model as a threshold policy: every early exit off, only the last exit runs."""
    return ThresholdPolicy([None] * (num_exits - 1) + [1.0], measure)


def full_model_point(records: Records, cost: CostTable, measure: str = "max_prob") -> dict:
    """The full model as a curve point (threshold None), so it can join a front."""
    _check_cost(records, cost)
    policy = full_model_policy(records.num_exits, measure)
    exits = torch.full((records.num_samples,), records.num_exits - 1, dtype=torch.long)
    return {"threshold": None, "policy": policy.to_json(),
            **_summary(exits, _correct(records), cost, policy.active_exits(records.num_exits))}


# -- curves and fronts --------------------------------------------------------------------------
def _exit_confidence(records: Records, measure: str) -> torch.Tensor:
    """(N, E−1) confidence at every early exit, computed exactly as ThresholdPolicy does."""
    cols = [confidence(records.logits[:, e].contiguous(), measure) for e in range(records.num_exits - 1)]
    conf = torch.stack(cols, dim=1) if cols else torch.empty(records.num_samples, 0)
    return torch.nan_to_num(conf, nan=-math.inf)  # a NaN confidence never exits, like `>=` in decide


def default_thresholds(conf: torch.Tensor, n: int = 100) -> list[float]:
    """About `n` shared thresholds: quantiles of the early exits' confidences (dense where the
    confidences are, i.e. near 1 for a trained model) plus fixed values from 0 to 1. A quantile
    becomes the point halfway down to the next lower confidence (`below_each`): it lets the same
    samples exit, and a run that computes a confidence a rounding step apart still agrees."""
    fixed = [0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0]
    values = conf[torch.isfinite(conf)].numpy()
    values = values[(values >= 0.0) & (values <= 1.0)]
    quant = np.quantile(values, np.linspace(0.0, 1.0, max(n - len(fixed), 2)), method="lower") if values.size else []
    quant = below_each(np.unique(values.astype(np.float32)), np.asarray(quant, dtype=np.float32)) if values.size else []
    return sorted({float(np.float32(t)) for t in [*fixed, *quant] if 0.0 <= t <= 1.0})


def below_each(distinct: np.ndarray, picks: np.ndarray) -> list[float]:
    """For each of `picks` (values among `distinct`, float32, ascending and distinct): a threshold
    that lets exactly the confidences >= it pass, halfway between it and the next lower distinct
    value (0 below the lowest), as float64 values that are distinct as float32.

    A threshold equal to a recorded confidence sits on a knife's edge: the staged run computes that
    confidence another way (BatchNorm folded, graphs, Python floats) and may land one rounding step
    below, so that sample would not exit where the records said (seen: 22 of 47 such cases on the
    built-in model's front). Halfway, both ways agree. Where the two values are adjacent float32
    numbers nothing lies between them, and the value itself is kept."""
    idx = np.searchsorted(distinct, picks)
    below = np.where(idx > 0, distinct[np.maximum(idx - 1, 0)], np.float32(0.0)).astype(np.float64)
    mid = np.float32((below + picks.astype(np.float64)) / 2.0)
    keep = (mid > below.astype(np.float32)) & (mid <= picks) & (picks > 0)
    out = np.where(keep, mid, picks).astype(np.float64)
    _, first = np.unique(out.astype(np.float32), return_index=True)
    return out[np.sort(first)].tolist()


def threshold_curve(records: Records, cost: CostTable, measure: str = "max_prob",
                    thresholds: Sequence[float] | None = None) -> list[dict]:
    """Sweep one threshold shared by every exit; one point per threshold, ascending.

    Each point: threshold, policy (ThresholdPolicy.to_json()), accuracy, flops (mean), saved,
    [ms, speedup when `cost` has latency]. Vectorised, and equal to evaluate_policy of each
    point's policy (a sample takes the first early exit whose confidence reaches t).
    """
    _check_cost(records, cost)
    num_exits = records.num_exits
    conf = _exit_confidence(records, measure)
    ts = list(thresholds) if thresholds is not None else default_thresholds(conf)
    reached = torch.cummax(conf, dim=1).values if conf.shape[1] else conf  # (N, E−1) best confidence so far
    correct = _correct(records)
    points = []
    for t in ts:
        policy = ThresholdPolicy.uniform(num_exits, float(t), measure)
        # first exit e with conf >= t == number of early exits whose running best is still < t;
        # `t` stays a Python float so it is rounded to float32 exactly as in ThresholdPolicy.decide
        exits = (reached < float(t)).sum(dim=1)
        points.append({"threshold": float(t), "policy": policy.to_json(),
                       **_summary(exits, correct, cost, policy.active_exits(num_exits))})
    return points


def pareto(points: Sequence[dict], *, x: str = "flops", y: str = "accuracy") -> list[dict]:
    """The points no other point beats (lower or equal `x` and higher or equal `y`, one strictly),
    sorted by `x` ascending (so `y` rises strictly); of exact ties the first is kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i][x], -points[i][y], i))
    front, best = [], -math.inf
    for i in order:
        if points[i][y] > best:
            front.append(points[i])
            best = points[i][y]
    return front


# One-sided 95 % normal bound: a point promised within `max_loss` on the data it was chosen on must
# keep that promise on new data, so its measured loss plus this many standard errors must fit.
MARGIN_Z = 1.645


def pick_point(front: Sequence[dict], *, max_loss: float | None = None, full_accuracy: float | None = None,
               budget: float | None = None, margin_z: float = MARGIN_Z) -> dict:
    """An operating point of a front (cheapest first, as `pareto` returns it).

    max_loss: the cheapest point whose accuracy, lowered by `margin_z` standard errors of its loss
    (the point's "loss_se", when it has one: the margin for the size of the fitting data), is
    >= full_accuracy − max_loss (full_accuracy defaults to the front's best; when no point
    qualifies, the most accurate one). margin_z=0 compares the measured accuracy alone.
    budget (0 < budget <= 1, a fraction of the full model's FLOPs, read from each point's
    "saved"): the most accurate point within it, none: the cheapest (`engine.budget.within_budget`).
    Give exactly one; ValueError otherwise, or for a budget outside (0, 1].
    The index of the result is `front.index(point)`.
    """
    if not front:
        raise ValueError("the front is empty: there is no operating point to pick")
    if (max_loss is None) == (budget is None):
        raise ValueError("give exactly one of max_loss (accuracy you may lose) or budget (a fraction of the full "
                         "model's FLOPs)")
    if max_loss is not None:
        ref = max(p["accuracy"] for p in front) if full_accuracy is None else full_accuracy
        ok = [p for p in front if p["accuracy"] - margin_z * p.get("loss_se", 0.0) >= ref - max_loss - 1e-12]
        return min(ok, key=lambda p: p["flops"]) if ok else max(front, key=lambda p: p["accuracy"])
    return front[within_budget(front, budget)[0]]


def operating_front(records: Records, cost: CostTable, measure: str = "max_prob",
                    thresholds: Sequence[float] | None = None) -> list[dict]:
    """Pareto front of the threshold curve plus the full model (cheapest first): what a bundle
    stores as meta["front"]."""
    return pareto([*threshold_curve(records, cost, measure, thresholds), full_model_point(records, cost, measure)])


# -- report -------------------------------------------------------------------------------------
def evaluation_report(records: Records, cost: CostTable, policies: dict[str, Policy] | None = None, *,
                      default: str | None = None, measure: str = "max_prob",
                      thresholds: Sequence[float] | None = None) -> dict:
    """Everything about these exits on these samples, JSON-able: per-exit accuracy, the full
    model, each named policy's `evaluate_policy`, the oracle, the threshold curve and its front
    (with the full model). Keys: num_samples, class_names (the model's), classes_scored (those
    among the labels, in the model's order), exit_stages, measure, cost,
    accuracy_per_exit, ece_per_exit (of the calibrated
    exits), full, policies {name: ...}, default_policy, oracle, threshold_curve, front.
    `default` names the policy the app starts with (marked in the plot)."""
    full = evaluate_policy(records, full_model_policy(records.num_exits, measure), cost)
    curve = threshold_curve(records, cost, measure, thresholds)
    return {
        "num_samples": records.num_samples, "class_names": records.class_names,
        "classes_scored": [records.class_names[i] for i in sorted(set(records.labels.tolist()))
                           if 0 <= i < records.num_classes],
        "exit_stages": records.exit_stages, "measure": measure, "cost": cost.to_json(),
        "accuracy_per_exit": accuracy_per_exit(records),
        "ece_per_exit": [expected_calibration_error(records.logits[:, e], records.labels)
                         for e in range(records.num_exits)],
        "full": full,
        "policies": {name: evaluate_policy(records, p, _priced(cost, p)) for name, p in (policies or {}).items()},
        "default_policy": default,
        "oracle": oracle(records, cost),
        "threshold_curve": curve,
        "front": pareto([*curve, full_model_point(records, cost, measure)]),
    }


def _priced(cost: CostTable, policy: Policy) -> CostTable:
    """`cost` with `policy`'s own decision FLOPs (a bundle's table holds none: its policies differ),
    as `bench` and `Engine` count them; `cost` as it is for a policy whose decisions only a model
    can count (`engine.cost.with_policy_flops`)."""
    try:
        return with_policy_flops(cost, policy)
    except ValueError:
        return cost


def save_report(report: dict, json_path: str | Path, png_path: str | Path | None = None) -> None:
    """Write the report as JSON (non-finite numbers become null) and, if asked, its plot as PNG;
    both atomically."""
    write_json(json_path, report, indent=1)
    if png_path is not None:
        plot_report(report, png_path)


def plot_report(report: dict, path: str | Path | None = None, size: tuple[int, int] = (900, 600)) -> np.ndarray:
    """Accuracy (%) vs compute (% of the full model) of a report: threshold sweep, its front, the
    full model, the oracle and each policy. Returns the BGR image; writes a PNG if `path`."""
    from .plot import plot_curves

    full = report["full"]["full_flops"]

    def xy(p: dict, flops_key: str = "flops") -> tuple[float, float]:
        return 100.0 * p[flops_key] / full, 100.0 * p["accuracy"]

    series = [{"name": "threshold sweep", "points": [xy(p) for p in report["threshold_curve"]], "style": "line",
               "colour": (200, 170, 130), "width": 1},
              {"name": "Pareto front", "points": [xy(p) for p in report["front"]], "style": "line",
               "marker": "o" if len(report["front"]) <= 30 else None},
              {"name": "full model", "points": [xy(report["full"], "mean_flops")], "style": "points",
               "marker": "s"},
              {"name": "oracle", "points": [xy(report["oracle"], "mean_flops")], "style": "points", "marker": "^"}]
    for name, ev in report["policies"].items():
        label = f"{name} (default)" if name == report.get("default_policy") and name != "default" else name
        series.append({"name": label, "points": [xy(ev, "mean_flops")], "style": "points", "marker": "D"})
    x_max = max([100.0] + [x for s in series for x, _ in s["points"] if math.isfinite(x)])
    title = f"Accuracy vs compute: {report['num_samples']} images, {len(report['exit_stages'])} exits"
    return plot_curves(series, x_label="compute (% of full model)", y_label="accuracy (%)", title=title,
                       path=path, size=size, x_range=(0.0, 1.04 * x_max))


_finite = finite  # non-finite numbers become null (engine.files.finite)


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: the mean |accuracy − confidence| over `bins` equal-width confidence bins, weighted by
    how many samples fall in each (Naeini et al. 2015). 0 is perfectly calibrated."""
    probs = torch.softmax(logits.detach().float(), dim=1)
    conf, pred = probs.max(dim=1)
    right = (pred == labels.long()).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.float().mean().item() * abs(right[inside].mean().item() - conf[inside].mean().item())
    return ece

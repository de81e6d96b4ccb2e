"""The honest benchmark behind `offramp bench`: which images each step may see, every method
fitted on a calibration split and scored on a held-out split, and measured batch-1 wall-clock
speed-up. (Fitting the fronts: `engine.fronts`; goals, table and plot: `engine.bench_report`.)

The train, calibration and test parts of the data come from `engine.splits.open_splits`: every
method is fitted on calibration only and every number reported is read on test.

Read top to bottom: methods scored on the test split, batch-1 timing, the report.
"""
from __future__ import annotations

import copy
import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.data import Subset

from .bundle import Bundle
from .cascade import Cascade
from .cost import CostTable
from .cost import with_policy_flops
from .evaluate import accuracy_per_exit, evaluate_policy, oracle, record_outputs
from .fronts import fit_front, model_cost, scored_on, target_index
from .model import MultiExitNet
from .policies import Policy, ThresholdPolicy
from .preprocess import eval_transform
from .progress import CancelFlag, ProgressFn, report
from .records import Records
from .speed import FORM_RUNTIMES, Runner, exit_overhead, form_for, plain_runner, staged_runner
from .splits import Splits, stratified_subset
from .totals import LATENCY_KEYS, percentiles_ms
from .train import get_trainer, list_trainers
from .train.bolukbasi import bolukbasi_front

TARGET_LOSSES = (0.005, 0.01)  # accuracy below the full model at which the table reads each method
# what runs the timed configurations: engine.prepared (torch, as the app by default), engine.ort_runtime
# (onnxruntime), the plain modules; or "both": prepared and onnxruntime side by side in one timing
RUNTIMES = ("prepared", "onnxruntime", "eager", "both")
SIDE_BY_SIDE = ("prepared", "onnxruntime")


# -- methods scored on the test split -------------------------------------------------------------
def with_preset(subset: Subset, preset) -> Subset:
    """The same images through another model's preset (a static bundle's may differ)."""
    ds = copy.copy(subset.dataset)
    ds.transform = eval_transform(preset)
    return Subset(ds, subset.indices)


@dataclass
class Method:
    """One way to classify the test split: its points (accuracy, flops, saved, policy; cheapest on
    calibration first) and how to run point j at batch 1 (`runner(j, runtime)` gives a Runner)."""

    name: str
    family: str  # full, truncation, static, threshold, dyce, each of fitted_kinds(), bundle, cascade
    source: str  # what it was fitted on, or where it came from
    points: list[dict]
    runner: Callable[[int, str], Runner] | None = None
    choice: int | None = None  # the point chosen on calibration at the first target loss
    time_all: bool = False  # time every point (few, fixed ones), not only the table's
    policies: list[Policy] | None = None  # the policy of each point, for a fitted front


def score_on(records: Records, cost: CostTable, policies: Sequence[Policy]) -> list[dict]:
    """Each policy's point on `records`: accuracy, flops (its decision FLOPs counted), saved,
    exit_fractions, policy."""
    out = []
    for policy in policies:
        ev = evaluate_policy(records, policy, with_policy_flops(cost, policy))
        out.append({"accuracy": ev["accuracy"], "loss_se": ev["loss_se"], "flops": ev["mean_flops"], "saved": ev["saved"],
                    "exit_fractions": ev["exit_fractions"], "policy": ev["policy"]})
    return out


def _held_out(cal: Records, cal_points: list[dict], policies: list[Policy], test: Records,
              cost: CostTable) -> tuple[list[dict], int]:
    """A front fitted on calibration, scored on test (each point keeps its calibration numbers), and
    the index of the point a user would pick on calibration at the first target loss."""
    points = score_on(test, cost, policies)
    for p, c in zip(points, cal_points):
        p["calibration"] = {"accuracy": c["accuracy"], "flops": c["flops"]}
    return points, target_index(cal_points, accuracy_per_exit(cal)[-1], max_loss=TARGET_LOSSES[0])


def _fitted(kind: str, cal: Records, test: Records, cost: CostTable, model, images: torch.Tensor,
            source: str, **fit_kw) -> Method:
    cal_points, policies = fit_front(kind, cal, cost, **fit_kw)
    points, choice = _held_out(scored_on(kind, cal), cal_points, policies, test, cost)
    return Method(kind, kind, source, points, lambda j, rt: staged_runner(model, policies[j], images, rt), choice,
                  policies=policies)


def _truncations(model: MultiExitNet, test: Records, cost: CostTable, images: torch.Tensor) -> Method:
    """Exit k always, earlier heads never run: a fixed-depth smaller network, for every early exit."""
    e = model.num_exits
    policies = [ThresholdPolicy([None] * k + [0.0] + [None] * (e - 2 - k) + [1.0]) for k in range(e - 1)]
    points = score_on(test, cost, policies)
    for k, p in enumerate(points):
        p["exit"] = k
    return Method("truncation", "truncation", "exit k always (stages after it dropped)", points,
                  lambda j, rt: plain_runner(model, j, images, rt), time_all=True)


def _static(name: str, other: Bundle, test_split: Subset, full_flops: float, timing_idx: list[int],
            progress, cancel) -> Method:
    """A separately trained smaller network, evaluated at its last exit on the same test images."""
    model = other.model.eval()
    subset = with_preset(test_split, model.backbone.preset)
    records = record_outputs(model, subset, with_features=False, progress=progress, cancel=cancel)
    flops = model_cost(other).full_flops
    accuracy = accuracy_per_exit(records)[-1]
    point = {"accuracy": accuracy, "flops": flops, "saved": 1.0 - flops / full_flops,
             "backbone": model.backbone.spec["name"]}
    images = _images(subset, timing_idx)
    return Method(f"static:{name}", "static", f"separately trained network {name} (its last exit)", [point],
                  lambda j, rt: plain_runner(model, -1, images, rt), time_all=True)


def _bundle_policies(bundle: Bundle, test: Records, cost: CostTable, images: torch.Tensor) -> list[Method]:
    """Every live policy stored in the bundle (train-exits, search, train-policy), as one point each."""
    out = []
    for name, policy in bundle.policies.items():
        if policy.evaluation_only:
            continue
        [point] = score_on(test, cost, [policy])
        out.append(Method(f"bundle:{name}", "bundle", f"bundle policy {name!r}: {policy.describe()}", [point],
                          lambda j, rt, p=policy: staged_runner(bundle.model, p, images, rt), time_all=True))
    return out


def _cascade(bundle: Bundle, others: dict[str, Bundle], cal: Records, test: Records, splits: Splits,
             images: torch.Tensor, lambdas, progress, cancel) -> Method:
    """Bolukbasi network selection over the `others` (cheapest first) and then the benchmarked
    bundle, each answering with its last exit; the selection policy is fitted on calibration."""
    models = [b.model.eval() for b in others.values()]
    cascade = Cascade([*models, bundle.model])
    recs = {}
    for part, split, own in (("cal", splits.calibration, cal), ("test", splits.test, test)):
        per_model = [record_outputs(m, split, progress=progress, cancel=cancel) for m in models] + [own]
        recs[part] = Records(torch.stack([r.logits[:, -1] for r in per_model], 1), [r.features[-1] for r in per_model],
                             own.labels, own.class_names, list(range(len(per_model))))
    ccost = cascade.measure_cost()
    kw = {} if lambdas is None else {"lambdas": [float(x) for x in lambdas]}
    cal_points, policies = bolukbasi_front(recs["cal"], recs["cal"], ccost, return_policies=True, progress=progress,
                                           cancel=cancel, **kw)
    points, choice = _held_out(recs["cal"], cal_points, policies, recs["test"], ccost)
    names = " -> ".join([*others, "this bundle"])
    return Method("cascade", "cascade", f"Bolukbasi selection over {names}, fitted on the calibration split",
                  points, lambda j, rt: staged_runner(cascade, policies[j], images, rt), choice)


def _images(subset: Subset, indices: Sequence[int]) -> torch.Tensor:
    """(n, 3, h, w) preprocessed test images at `indices` of `subset`."""
    if not indices:
        return torch.empty(0)
    return torch.stack([subset[i][0] for i in indices])


# -- timing ---------------------------------------------------------------------------------------
def time_batch1(runners: dict[str, Runner], n_images: int, *, warmup: int = 5, seed: int = 0,
                progress: ProgressFn | None = None, cancel: CancelFlag | None = None) -> dict[str, dict]:
    """Measured batch-1 CPU wall-clock of every runner on images 0..n_images−1, interleaved: each
    image goes through every runner once, in an order shuffled per image, so load from other
    processes and clock changes hit all runners alike. Returns name -> {mean_ms, median_ms, p50_ms,
    p95_ms, p99_ms (numpy.percentile of the per-image times), images}."""
    names = list(runners)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for i in range(min(warmup, n_images)):
            for name in names:
                runners[name](i)
        for i in range(n_images):
            rng.shuffle(names)
            for name in names:
                start = time.perf_counter()
                runners[name](i)
                times[name].append((time.perf_counter() - start) * 1e3)
            report(progress, cancel, "timing batch 1", i + 1, n_images)
    return {n: {"mean_ms": statistics.fmean(t), "median_ms": statistics.median(t), **percentiles_ms(t),
                "images": len(t)} for n, t in times.items() if t}


def oracle_at(records: Records, cost: CostTable, accuracy: float) -> dict:
    """The oracle at a given accuracy: the least mean FLOPs with which any per-image choice of exit
    (every exit evaluated on the way, as `engine.evaluate.oracle`) reaches `accuracy` on `records`.
    An image leaves at exit 0 unless it must be right, then at its first right exit; the images
    made right are those whose first right exit costs least beyond exit 0 (exact: all weigh the
    same). Returns {accuracy, flops, saved}; the accuracy is capped at what any exit gets right."""
    correct = records.logits.argmax(dim=-1) == records.labels[:, None]  # (N, E)
    cum = torch.tensor(cost.cumulative_flops(), dtype=torch.float64)  # (E,)
    n = records.num_samples
    extra = (cum[correct.double().argmax(dim=1)] - cum[0])[correct.any(dim=1)].sort().values
    k = min(math.ceil(accuracy * n - 1e-9), extra.numel())
    flops = float(cum[0] + extra[:k].sum() / n)
    return {"accuracy": k / n, "flops": flops, "saved": 1.0 - flops / cost.full_flops}


def at_loss(points: Sequence[dict], full_accuracy: float, max_loss: float) -> int | None:
    """Index of the cheapest point whose accuracy is within `max_loss` of `full_accuracy` (None: none is)."""
    ok = [i for i, p in enumerate(points) if p["accuracy"] >= full_accuracy - max_loss - 1e-12]
    return min(ok, key=lambda i: (points[i]["flops"], -points[i]["accuracy"])) if ok else None


def _timed_indices(method: Method, full_accuracy: float) -> set[int]:
    if method.time_all:
        return set(range(len(method.points)))
    wanted = {at_loss(method.points, full_accuracy, t) for t in TARGET_LOSSES} | {method.choice}
    return {i for i in wanted if i is not None}


def _runtime_name(model: MultiExitNet, runtime: str) -> str:
    return form_for(model, runtime).runtime if runtime in FORM_RUNTIMES else "torch eager (plain modules)"


def _time_methods(methods: list[Method], model: MultiExitNet, images: torch.Tensor, full_accuracy: float,
                  runtime: str, progress, cancel) -> dict:
    """Time the points the table reads (or all of a method's, when few and fixed) together with the
    full model, interleaved, all run by `runtime`; write ms, median_ms, speedup (full ms / ms) and
    flops_speedup (full FLOPs / FLOPs) into those points. With runtime "both", every one of them is
    timed under each of `SIDE_BY_SIDE` in the same interleaved run: the points' figures are the
    first's (torch), and "by_runtime" in each point and in the timing holds each runtime's."""
    runtimes = list(SIDE_BY_SIDE) if runtime == "both" else [runtime]
    runners: dict[str, Runner] = {}
    where: dict[str, tuple[str, dict]] = {}  # runner -> (its runtime, the point it times)
    e = model.num_exits
    for rt in runtimes:
        tag = "" if rt == runtimes[0] else f"@{rt}"
        for m in methods:
            for j in sorted(_timed_indices(m, full_accuracy)):
                key = f"{m.name}#{j}{tag}"
                runners[key], where[key] = m.runner(j, rt), (rt, m.points[j])
        # the full model through the staged runner: what Offramp's bookkeeping costs when nothing exits early
        runners[f"full#staged{tag}"] = staged_runner(model, ThresholdPolicy([None] * (e - 1) + [1.0]), images, rt)
    runners["full#eager"] = plain_runner(model, -1, images, "eager")  # the plain modules, for reference
    times = time_batch1(runners, int(images.shape[0]), progress=progress, cancel=cancel)
    full_ms = times["full#0"]["mean_ms"]
    by_runtime = {}
    for rt in runtimes:
        tag = "" if rt == runtimes[0] else f"@{rt}"
        own_full = times[f"full#0{tag}"]["mean_ms"]
        by_runtime[rt] = {"runtime": _runtime_name(model, rt), "full_ms": own_full,
                          "full_staged_ms": times[f"full#staged{tag}"]["mean_ms"]}
        for key, (own, point) in where.items():
            if own != rt:
                continue
            t = times[key]
            figures = {"ms": t["mean_ms"], "median_ms": t["median_ms"], "speedup": own_full / t["mean_ms"]}
            if len(runtimes) > 1:
                point.setdefault("by_runtime", {})[rt] = figures
            if not tag:
                point.update(ms=t["mean_ms"], median_ms=t["median_ms"], **{k: t[k] for k in LATENCY_KEYS},
                             speedup=full_ms / t["mean_ms"], flops_speedup=1.0 / max(1.0 - point["saved"], 1e-12))
    extra = {"by_runtime": by_runtime} if len(runtimes) > 1 else {}
    return {"images": int(images.shape[0]), "threads": torch.get_num_threads(), "device": "cpu", "batch_size": 1,
            "runtime": _runtime_name(model, runtimes[0]), **extra,
            "full_ms": full_ms, "full_median_ms": times["full#0"]["median_ms"],
            **{f"full_{k}": times["full#0"][k] for k in LATENCY_KEYS},
            "full_staged_ms": times["full#staged"]["mean_ms"], "full_eager_ms": times["full#eager"]["mean_ms"],
            "how": "every timed configuration runs each image once, in a per-image shuffled order, in one process; "
                   "ms is the mean over the images, p50/p95/p99 their percentiles; speed-up = full-model ms / ms, the full model run by the same "
                   "runtime; FLOPs speed-up = full-model FLOPs / mean FLOPs"}


def _overheads(bundle: Bundle, methods: list[Method], images: torch.Tensor, cost: CostTable, runtime: str,
               repeats: int) -> dict:
    """`engine.speed.exit_overhead` of a threshold policy and one policy of each of `fitted_kinds()`
    (the bundle's, else the fitted front's chosen point), each by its kind of decision."""
    model = bundle.model
    runtime = SIDE_BY_SIDE[0] if runtime == "both" else runtime
    form = form_for(model, runtime) if runtime in FORM_RUNTIMES else model
    found: dict[str, Policy] = {"threshold": ThresholdPolicy([1.0] * model.num_exits)}
    for kind in fitted_kinds():
        own = [p for p in bundle.policies.values() if p.kind == kind]
        fitted = next((m for m in methods if m.family == kind and m.choice is not None and m.policies), None)
        if own:
            found[kind] = own[0]
        elif fitted is not None:
            found[kind] = fitted.policies[fitted.choice]
    out = {}
    for kind, policy in found.items():
        try:
            out[kind] = exit_overhead(form, policy, images, cost, repeats=repeats)
        except ValueError as err:  # every image fires an early exit: say so rather than fail the report
            out[kind] = {"error": str(err)}
    return out


def fitted_kinds() -> list[str]:
    """The learned policy families `run_benchmark` fits on the calibration split (learned="fit"):
    every registered learned trainer (`engine.train.list_trainers(learned=True)`)."""
    return list_trainers(learned=True)


def run_benchmark(bundle: Bundle, splits: Splits, *, statics: dict[str, Bundle] | None = None,
                  cascade: dict[str, Bundle] | None = None, learned: str = "fit",
                  lambdas: Sequence[float] | None = None,
                  structure_lambdas: Sequence[float] | None = None, structure_epochs: int | None = None,
                  prototype_samples: int = 5000, timing_images: int = 300, seed: int = 0,
                  runtime: str = "prepared", overhead_repeats: int = 300,
                  progress: ProgressFn | None = None, cancel: CancelFlag | None = None,
                  recorded: tuple[Records, Records] | None = None) -> dict:
    """Every method on the test split of `splits`, fitted only on its calibration split; a JSON-able
    report (see `engine.bench_report` for its goals, table and plot).

    Methods: the full model; truncations (exit k always); `statics` (name -> separately trained
    smaller bundle, at its last exit); one shared threshold and the DyCE front; with learned="fit"
    the front of every family in `fitted_kinds()` (Bolukbasi: `lambdas`; structure:
    `structure_lambdas`, `structure_epochs`; any other: its own defaults; prototypes, for the
    families that read them, from at most `prototype_samples` training images); every policy
    stored in the bundle; with `cascade` (name -> cheaper bundle,
    cheapest first) a Bolukbasi network-selection cascade ending with this bundle; the oracle.
    Points the table reads are timed at batch 1 on `timing_images` test images (see `time_batch1`),
    run by `runtime` ("prepared": `engine.prepared`, as the app runs; "onnxruntime":
    `engine.ort_runtime`; "eager": the plain modules; "both": prepared and onnxruntime side by side),
    and the time an exit that does not fire adds is measured per exit (`engine.speed.exit_overhead`,
    `overhead_repeats` runs of each variant; 0: not measured).
    `recorded`: the bundle's (calibration, test) records when already recorded (data-parallel by
    `engine.recording.record_sharded` under torchrun); recorded here otherwise.
    Raises ValueError when the calibration or test split is empty or a bundle predicts other classes."""
    if learned not in ("fit", "bundle"):
        raise ValueError(f"learned must be 'fit' or 'bundle', not {learned!r}")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if len(splits.calibration) == 0 or len(splits.test) == 0:
        raise ValueError(f"the calibration ({len(splits.calibration)}) or test ({len(splits.test)} images) split is "
                         "empty; use more images or a larger --val-fraction")
    model = bundle.model.eval()
    for name, other in {**(statics or {}), **(cascade or {})}.items():
        if other.class_names != model.class_names:
            raise ValueError(f"{name} predicts {other.class_names}, the benchmarked bundle {model.class_names}; "
                             "compare networks trained on the same classes")
    cost = model_cost(bundle)
    cal, test = recorded or (record_outputs(model, splits.calibration, progress=progress, cancel=cancel),
                             record_outputs(model, splits.test, progress=progress, cancel=cancel))
    full_accuracy = accuracy_per_exit(test)[-1]
    timing_idx = sorted(random.Random(seed).sample(range(len(splits.test)), min(timing_images, len(splits.test))))
    images = _images(splits.test, timing_idx)
    e = model.num_exits
    full = Method("full", "full", "the last exit only: the original network",
                  score_on(test, cost, [ThresholdPolicy([None] * (e - 1) + [1.0])]),
                  lambda j, rt: plain_runner(model, -1, images, rt), time_all=True)
    methods = [full, _truncations(model, test, cost, images)]
    methods += [_static(n, b, splits.test, cost.full_flops, timing_idx, progress, cancel)
                for n, b in (statics or {}).items()]
    fitted = "fitted on the calibration split"
    methods.append(_fitted("threshold", cal, test, cost, model, images,
                           f"best fixed threshold (one for every exit; max-prob, entropy or margin), {fitted}"))
    methods.append(_fitted("dyce", cal, test, cost, model, images, f"DyCE configuration search, {fitted}"))
    kinds = fitted_kinds() if learned == "fit" else []
    options = {"bolukbasi": {"lambdas": lambdas}, "structure": {"lambdas": structure_lambdas, "epochs": structure_epochs}}
    proto = None
    for kind in kinds:
        kw, source = dict(options.get(kind, {})), f"λ sweep {fitted}"
        if get_trainer(kind).uses_prototypes:
            if proto is None:
                proto = record_outputs(model, stratified_subset(splits.train, prototype_samples), progress=progress,
                                       cancel=cancel)
            kw["prototype_records"] = proto
            source += f", prototypes from {proto.num_samples} training images"
        methods.append(_fitted(kind, cal, test, cost, model, images, source, progress=progress, cancel=cancel, **kw))
    methods += _bundle_policies(bundle, test, cost, images)
    if cascade:
        methods.append(_cascade(bundle, cascade, cal, test, splits, images, lambdas, progress, cancel))
    timing = _time_methods(methods, model, images, full_accuracy, runtime, progress, cancel)
    if overhead_repeats > 0:
        report(progress, cancel, "timing exits that do not fire", 0, 1)
        timing["exit_overhead"] = _overheads(bundle, methods, images, cost, runtime, overhead_repeats)
    ora = oracle(test, cost)
    return {
        "splits": splits.describe(), "classes": list(model.class_names), "exit_stages": model.exit_stages,
        "full_flops": cost.full_flops, "full_accuracy": full_accuracy, "accuracy_per_exit": accuracy_per_exit(test),
        "calibration_accuracy_per_exit": accuracy_per_exit(cal), "timing": timing,
        "learned_policies": (f"{' and '.join(kinds)} fronts fitted here on the calibration split" if kinds
                             else "only the policies stored in the bundle (train-policy); no fronts fitted here"),
        "oracle": {"accuracy": ora["accuracy"], "flops": ora["mean_flops"], "saved": ora["saved"],
                   "exit_fractions": ora["exit_fractions"]},
        "methods": {m.name: _method_entry(m, full_accuracy, lambda a: oracle_at(test, cost, a)["saved"])
                    for m in methods},
    }


def _method_entry(m: Method, full_accuracy: float, oracle_saved: Callable[[float], float]) -> dict:
    """A method in the report: its points, the ones the table reads (cheapest within each target
    loss; oracle_saved = what the oracle saves at that accuracy) and the one chosen on calibration."""
    def read(i):
        if i is None:
            return None
        p = m.points[i]
        return {"index": i, "loss": full_accuracy - p["accuracy"], "oracle_saved": oracle_saved(p["accuracy"]),
                **{k: v for k, v in p.items() if k != "policy"}}

    return {"family": m.family, "source": m.source, "points": m.points,
            "at_loss": {f"{100 * t:g}": read(at_loss(m.points, full_accuracy, t)) for t in TARGET_LOSSES},
            "calibration_choice": read(m.choice)}

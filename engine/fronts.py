"""Policy fronts fitted on a calibration split, and the bundles `offramp search` and
`offramp train-policy` write from them.

A front is a list of points (policy JSON, accuracy, mean flops, saved), cheapest first; every family fits one across the accuracy / cost trade-off: DyCE per-exit
configurations here, and each family registered in `engine.train` (a shared threshold swept,
Bolukbasi classifiers and structure networks over λ, ...) by its trainer. A user's target (the
cheapest point within some accuracy loss of the last exit, or the most accurate within a compute
budget: a fraction of the full model's FLOPs, `engine.budget`) picks the point a bundle keeps.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import replace
from typing import Sequence

import torch

from .budget import budget_check, check_budget, within_budget
from .bundle import Bundle
from .cost import CostTable, measure_costs
from .cost import _median_ms as median_ms
from .evaluate import accuracy_per_exit, evaluate_policy, pick_point
from .policies import Policy, ThresholdPolicy
from .progress import CancelFlag, ProgressFn
from .records import Records
from .search import search_front
from .speed import prepared_form
from .train import get_trainer, list_trainers
from .train.dyce import crossfit_dyce_front


def policy_kinds() -> list[str]:
    """The policy kinds `fit_front` and `train_policy_bundle` fit: every registered trainer."""
    return list_trainers()


def scored_on(kind: str, records: Records) -> Records:
    """The part of calibration `records` that `fit_front(kind, records, ...)` scores its points on."""
    return records if kind == "dyce" else get_trainer(kind).scored_on(records)


def model_cost(bundle: Bundle) -> CostTable:
    """FLOPs of the bundle's model with no policy decisions: the bundle's table when it describes
    this model, else measured now."""
    cost, model = bundle.cost, bundle.model
    if not (list(cost.exit_stages) == model.exit_stages and len(cost.stage_flops) == model.backbone.num_stages
            and sum(cost.stage_flops) > 0):
        cost = measure_costs(model)
    return replace(cost, policy_flops=[0.0] * cost.num_exits)


# -- fitting fronts on the calibration split ------------------------------------------------------
def fit_front(kind: str, records: Records, cost: CostTable, *, lambdas: Sequence[float] | None = None,
              prototype_records: Records | None = None, epochs: int | None = None,
              progress: ProgressFn | None = None, cancel: CancelFlag | None = None) -> tuple[list[dict], list[Policy]]:
    """Policies of family `kind` fitted on `records` (the calibration split) across the accuracy /
    cost trade-off, and their points (policy, accuracy, flops, saved; decision FLOPs counted) on
    `scored_on(kind, records)`: the Pareto front, cheapest first, with the policies aligned.

    kind: "dyce" per-exit threshold configurations from the DyCE circular search per λ, scored out
    of fold (`engine.train.dyce.crossfit_dyce_front`),
    or a registered trainer's kind (`policy_kinds()`: e.g. "threshold", one confidence threshold
    shared by every exit; "bolukbasi" and "structure", λ sweeps), fitted by `Trainer.front` with
    `lambdas` and `epochs` (None: the family's own) and `prototype_records` (a recording of the
    train split; default `records`). Raises ValueError for an unknown kind."""
    if kind == "dyce":
        points = crossfit_dyce_front(records, cost, progress=progress, cancel=cancel)
        return points, [ThresholdPolicy(p["policy"]["thresholds"], p["policy"]["measure"]) for p in points]
    if kind not in policy_kinds():
        raise ValueError(f"unknown policy kind {kind!r}; choose one of {', '.join((*policy_kinds(), 'dyce'))}")
    return get_trainer(kind).front(records, cost, lambdas=lambdas, epochs=epochs,
                                   prototype_records=prototype_records, progress=progress, cancel=cancel)


def target_index(points: Sequence[dict], full_accuracy: float, *, max_loss: float | None = None,
                  budget: float | None = None, full_flops: float | None = None) -> int:
    """Index of the point a user's target picks: the cheapest within `max_loss` of `full_accuracy`
    (none: the most accurate), or the most accurate within `budget`, a fraction of `full_flops`
    (none fits: the cheapest; `engine.budget.within_budget`)."""
    if budget is not None:
        return within_budget(points, budget, full_flops)[0]
    return points.index(pick_point(points, max_loss=max_loss, full_accuracy=full_accuracy))


def search_bundle(bundle: Bundle, records: Records, *, max_loss: float = 0.005, budget: float | None = None,
                  measure: str = "max_prob", split: dict | None = None,
                  test_records: Records | None = None, exit_cost_ms: float = 0.0,
                  exit_cost_flops: float | None = None, progress: ProgressFn | None = None, cancel: CancelFlag | None = None) -> tuple[Bundle, dict]:
    """DyCE search on calibration `records`: a copy of `bundle` whose meta["front"] is the circular
    search's front, each point's figures out of fold (`crossfit_dyce_front`: what the search does
    on images it did not see; what the app's budget slider walks and shows), meta["default_point"]
    the chosen point
    (the cheapest within `max_loss` of the last exit, or, with `budget`, the most accurate whose
    mean FLOPs are within that fraction of the full model's) and whose default policy "threshold"
    is that configuration. meta["search"] keeps the one-pass and shared-threshold fronts for
    comparison, and meta["search"]["budget"] the chosen configuration's figures against the budget
    (`budget_report`) on calibration and on `test_records` (a split the choice never saw).
    `exit_cost_ms` > 0: the search charges every active early exit that many milliseconds more (its
    graph call and decision, which cost most when frames come paced:
    tests/benchmarks/paced_time_saved.py), as FLOPs at the full model's rate (`full_model_ms`);
    the front's FLOPs are still those that run. `exit_cost_flops` gives that charge in FLOPs
    instead: the full model's milliseconds differ between machines, so a search to repeat
    elsewhere names the FLOPs a charge came to (meta["search"]["exit_cost_flops"]).
    Returns (bundle, summary). Raises ValueError for empty records or a budget outside (0, 1];
    Cancelled when `cancel` is set during the cross-fitting (`progress` hears of it)."""
    if budget is not None:
        budget = check_budget(budget)
    t0 = time.perf_counter()
    cost = model_cost(bundle)
    if exit_cost_flops is not None:
        if not (math.isfinite(exit_cost_flops) and exit_cost_flops >= 0):
            raise ValueError(f"exit_cost_flops must be a number of FLOPs of 0 or more, not {exit_cost_flops}")
        step_flops = float(exit_cost_flops)
    else:
        step_flops = exit_cost_ms * cost.full_flops / full_model_ms(bundle) if exit_cost_ms > 0 else 0.0
    fronts = {"circular": crossfit_dyce_front(records, cost, measure=measure, step_flops=step_flops,
                                              progress=progress, cancel=cancel),
              **{m: search_front(records, cost, m, measure=measure) for m in ("one_pass", "shared")}}
    full = accuracy_per_exit(records)[-1]
    target = {"max_loss": None if budget is not None else max_loss, "budget": budget, "full_flops": cost.full_flops}
    index = target_index(fronts["circular"], full, **target)
    point = fronts["circular"][index]
    at_target = {m: f[target_index(f, full, **target)] for m, f in fronts.items()}
    policy = ThresholdPolicy(point["policy"]["thresholds"], point["policy"]["measure"])
    checked = budget_report(point, policy, cost, budget, test_records)
    meta = copy.deepcopy(bundle.meta)
    meta.update(front=fronts["circular"], default_point=index)
    meta.setdefault("evaluation", {})["default_point"] = point
    meta["search"] = {"method": "DyCE circular search from one-pass for each λ, scored out of fold (4 folds, 3 deals)",
                      "measure": measure, "split": split or {}, "samples": records.num_samples,
                      "full_accuracy": full, "target": {"max_loss": target["max_loss"], "budget": budget},
                      "exit_cost_ms": exit_cost_ms, "exit_cost_flops": step_flops,
                      "budget": checked, "chosen": point, "one_pass_front": fronts["one_pass"],
                      "shared_front": fronts["shared"], "seconds": round(time.perf_counter() - t0, 2)}
    searched = replace(bundle, policies={**bundle.policies, "threshold": policy}, default_policy="threshold",
                       meta=meta)
    return searched, {"front": fronts["circular"], "index": index, "full_accuracy": full, "at_target": at_target,
                      "full_flops": cost.full_flops, "budget": checked}


def full_model_ms(bundle: Bundle, repeats: int = 50) -> float:
    """The full model's median ms for one image on the CPU with one thread, run as the app runs it
    (`engine.prepared`): the rate at which `search_bundle` turns an exit's milliseconds into FLOPs."""
    model = bundle.model.eval()
    crop = model.backbone.preset.crop
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():  # warm-up runs make and specialise the graph
            return median_ms(prepared_form(model).run_to, torch.zeros(1, 3, crop, crop), torch.device("cpu"),
                             repeats, warmup=5)[0]
    finally:
        torch.set_num_threads(threads)


def budget_report(point: dict, policy: ThresholdPolicy, cost: CostTable, budget: float | None,
                  test_records: Records | None = None) -> dict:
    """The chosen configuration against `budget` (None: no budget was given): {budget,
    calibration, test}, each split's `engine.budget.budget_check` (accuracy, flops, fraction of
    the full model's FLOPs, budget_met); test is None without `test_records` (or when empty)."""
    test = None
    if test_records is not None and test_records.num_samples:
        ev = evaluate_policy(test_records, policy, cost)
        test = {**budget_check(ev["accuracy"], ev["mean_flops"], cost.full_flops, budget),
                "samples": test_records.num_samples}
    return {"budget": budget, "calibration": budget_check(point["accuracy"], point["flops"], cost.full_flops, budget),
            "test": test}


def train_policy_bundle(bundle: Bundle, kind: str, records: Records, *, name: str | None = None,
                        lambdas: Sequence[float] | None = None, prototype_records: Records | None = None,
                        epochs: int | None = None, max_loss: float = 0.005, make_default: bool = False,
                        split: dict | None = None, progress: ProgressFn | None = None,
                        cancel: CancelFlag | None = None) -> tuple[Bundle, dict]:
    """Fit the `kind` front on calibration `records` (see `fit_front`) and return a copy of
    `bundle` holding the policy of its cheapest point within `max_loss` of the last exit as policy
    `name` (default: the trainer's name for it), the default policy too with `make_default`; meta
    ["policy_fronts"][name] keeps the front. Returns (bundle, summary). Raises ValueError for a kind
    that is not in `policy_kinds()`."""
    trainer = get_trainer(kind)
    t0 = time.perf_counter()
    cost = model_cost(bundle)
    points, policies = fit_front(kind, records, cost, lambdas=lambdas, prototype_records=prototype_records,
                                 epochs=epochs, progress=progress, cancel=cancel)
    scored = scored_on(kind, records)
    full = accuracy_per_exit(scored)[-1]  # the last exit on the same images as the points
    index = target_index(points, full, max_loss=max_loss)
    name = name or trainer.name
    meta = copy.deepcopy(bundle.meta)
    meta.setdefault("policy_fronts", {})[name] = {
        "kind": kind, "split": split or {}, "samples": scored.num_samples, "full_accuracy": full,
        "scored_on": (f"{trainer.select_fraction:g} of the calibration split, held out of training"
                      if trainer.select_fraction else "the calibration split"),
        "max_loss": max_loss, "chosen": index, "points": points, "seconds": round(time.perf_counter() - t0, 2),
        "lambdas": None if lambdas is None else [float(x) for x in lambdas]}
    policy = policies[index].eval()
    trained = replace(bundle, policies={**bundle.policies, name: policy}, meta=meta,
                      default_policy=name if make_default else bundle.default_policy)
    return trained, {"front": points, "index": index, "full_accuracy": full, "name": name,
                     "full_flops": cost.full_flops}

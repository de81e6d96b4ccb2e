"""The DyCE search's front with figures for new data.

The circular search picks every exit's threshold to fit the calibration records, and a point it
finds is scored on those same records: the front reads better than the configurations do on new
images. Measured on the built-in model (5,000 calibration images): the configuration the search
called lossless there lost 0.42 point on the test split, the one chosen "within 0.5 point" with a
95 % margin 0.56. Cross-fitting removes that optimism: for each λ, the search runs on the other
folds and its configuration decides the held-out fold, so every point's accuracy and cost are
those of the *search at that λ* on images it did not see (there: 0.44 point lost out of fold,
0.44 on test). The configuration a point holds is then searched on all the records.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from ..cost import CostTable
from ..evaluate import _correct, evaluate_policy, full_model_point, loss_standard_error, pareto
from ..files import json_text
from ..policies import ThresholdPolicy, simulate
from ..progress import CancelFlag, ProgressFn, report
from ..records import Records
from ..search import circular, default_lambdas, search_front
from .sweep import fold_of

CROSSFIT_FOLDS = 4
# each repeat deals the folds anew: the figures average over how the records were split
CROSSFIT_REPEATS = 3
CROSSFIT_LAMBDAS = tuple(default_lambdas(64))


def crossfit_dyce_front(records: Records, cost: CostTable, lambdas: Sequence[float] = CROSSFIT_LAMBDAS, *,
                        measure: str = "max_prob", folds: int = CROSSFIT_FOLDS, repeats: int = CROSSFIT_REPEATS,
                        seed: int = 0, step_flops: float = 0.0, progress: ProgressFn | None = None,
                        cancel: CancelFlag | None = None) -> list[dict]:
    """Pareto front (cheapest first) of the circular search's configuration for each of
    `lambdas`, searched on all `records`, each scored out of fold: accuracy, loss_se, flops,
    saved[, ms, speedup] are the means over `repeats` deals of `folds` folds of what the search at
    that λ, run on the other folds, does on each held-out image (its own active exits paid).
    λ values whose searches on all the records end in the same configuration make one point, with
    the mean of their figures. Each point also has policy, method "circular", lambdas (those λ),
    lambda (the first), in_sample {accuracy, flops} (the configuration on the records it was
    searched on), folds and repeats. The full model's point (method "full") is on the front. With
    fewer than 4 records there is nothing to hold out: the in-sample `search_front`.

    `step_flops` > 0: the search charges every active early exit that much more (`charged`), as the
    price of the graph call and decision it adds to every frame that passes it, in FLOPs at the
    full model's rate; so an exit that seldom fires is switched off. The points still carry the
    FLOPs that run (`cost`). Raises Cancelled when cancelled."""
    n, e = records.num_samples, records.num_exits
    folds = min(folds, n // 2)
    searched = charged(cost, step_flops)
    if folds < 2:
        points = search_front(records, searched, "circular", measure=measure)
        return pareto([{**p, **_true_cost(records, cost, p)} for p in points]) if step_flops > 0 else points
    correct = _correct(records).double()
    lambdas = [float(lam) for lam in lambdas]
    right = torch.zeros(len(lambdas), n, dtype=torch.float64)
    spent = torch.zeros(len(lambdas), n, dtype=torch.float64)
    took = torch.zeros(len(lambdas), n, dtype=torch.float64)
    steps, rows = repeats * folds, torch.arange(n)
    for r in range(repeats):
        fold = fold_of(records.labels, folds, seed + r)
        for k in range(folds):
            report(progress, cancel, "cross-fitting the DyCE search", r * folds + k, steps,
                   f"deal {r + 1} of {repeats}, fold {k + 1} of {folds}")
            held = (fold == k).nonzero().squeeze(1)
            fit = records.subset((fold != k).nonzero().squeeze(1))
            for i, lam in enumerate(lambdas):
                policy = circular(fit, searched, lam, measure=measure)
                exits = simulate(policy, records.logits[held])
                active = policy.active_exits(e)  # each fold's configuration pays for its own heads
                right[i, held] += correct[held, exits]
                spent[i, held] += torch.tensor(cost.cumulative_flops(active), dtype=torch.float64)[exits]
                if cost.has_latency:
                    took[i, held] += torch.tensor(cost.cumulative_ms(active), dtype=torch.float64)[exits]
    report(progress, cancel, "cross-fitting the DyCE search", steps, steps)
    full = {**full_model_point(records, cost, measure), "method": "full", "lambda": None}
    full.pop("threshold", None)
    # λ values whose searches on all the records end in the same configuration are one point: its
    # figures are the mean of theirs (each an estimate of what that configuration's search does)
    same: dict[str, tuple[ThresholdPolicy, list[int]]] = {}
    for i, lam in enumerate(lambdas):
        policy = circular(records, searched, lam, measure=measure)
        same.setdefault(json_text(policy.to_json()), (policy, []))[1].append(i)
    points = []
    for policy, idx in same.values():
        m = len(idx) * repeats
        picked = right[idx].sum(0) / m
        flops = spent[idx].sum(0).mean().item() / m
        point = {"policy": policy.to_json(), "accuracy": picked.mean().item(),
                 "loss_se": loss_standard_error(picked, correct[rows, -1]), "flops": flops,
                 "saved": 1.0 - flops / cost.full_flops}
        if cost.has_latency:
            ms = took[idx].sum(0).mean().item() / m
            point.update(ms=ms, speedup=cost.full_ms / ms if ms > 0 else float("inf"))
        own = simulate(policy, records.logits)
        mine = cost.cumulative_flops(policy.active_exits(e))
        point.update(method="circular", **{"lambda": lambdas[idx[0]]}, lambdas=[lambdas[i] for i in idx],
                     folds=folds, repeats=repeats,
                     in_sample={"accuracy": correct[rows, own].mean().item(),
                                "flops": torch.tensor(mine, dtype=torch.float64)[own].mean().item()})
        points.append(point)
    return pareto([full, *points])  # the full model first: it wins exact ties


def charged(cost: CostTable, step_flops: float) -> CostTable:
    """`cost` with `step_flops` more decision cost at every early exit (the last decides nothing)."""
    if step_flops <= 0:
        return cost
    return replace(cost, policy_flops=[p + step_flops for p in cost.policy_flops[:-1]] + cost.policy_flops[-1:])


def _true_cost(records: Records, cost: CostTable, point: dict) -> dict:
    """A searched point's flops, saved[, ms, speedup] under `cost` (what runs), not the charged table."""
    policy = ThresholdPolicy(point["policy"]["thresholds"], point["policy"].get("measure", "max_prob"))
    ev = evaluate_policy(records, policy, cost)
    out = {"flops": ev["mean_flops"], "saved": ev["saved"]}
    if "mean_ms" in ev:
        out.update(ms=ev["mean_ms"], speedup=ev["speedup"])
    return out

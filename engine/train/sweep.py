"""The λ sweep every trained policy family is fitted with: λ is the price of compute (accuracy
traded per full model's FLOPs); one policy is trained per λ, each variant of it that needs no
retraining (a score offset, a halting cut-off) is scored on held-out records with its own
decision FLOPs counted, and the Pareto front of accuracy against mean FLOPs is kept.

Also here: what the trainers share, the loss of answering at each exit; and cross-fitting
(`out_of_fold`), which scores a family's candidates on folds of the calibration records they were
not fitted on, and `guarded_front`, which lets a learned candidate displace a fixed threshold only
where it beats it by more than noise.
"""
from __future__ import annotations

import math
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..cost import CostTable, with_policy_flops
from ..evaluate import _correct, _summary, evaluate_policy, pareto
from ..policies import Policy, simulate
from ..progress import CancelFlag, ProgressFn, report
from ..records import Records

# (point fields that tell the variant apart, e.g. {"offset": -1.0}; the policy) for each variant
Variants = Callable[[Policy], Iterable[tuple[dict, Policy]]]


def exit_losses(records: Records, loss: str) -> torch.Tensor:
    """(N, E) loss of answering at each exit: "error" (0/1) or "ce" (cross-entropy) of the
    calibrated logits."""
    logits, y = records.logits.float(), records.labels.long()
    if loss == "error":
        return (logits.argmax(dim=-1) != y[:, None]).float()
    n, e, k = logits.shape
    return F.cross_entropy(logits.reshape(n * e, k), y.repeat_interleave(e), reduction="none").reshape(n, e)


def lambda_sweep(train: Callable[[float], Policy], records: Records, cost: CostTable, lambdas: Sequence[float], *,
                 variants: Variants | None = None, pareto_only: bool = True, stage: str = "training policies",
                 progress: ProgressFn | None = None,
                 cancel: CancelFlag | None = None) -> tuple[list[dict], list[Policy]]:
    """Train `train(λ)` for each of `lambdas` and score every variant of it (`variants(policy)`;
    default the policy itself) with `engine.evaluate.evaluate_policy` on `records`, its decision
    FLOPs in `cost` (`engine.cost.with_policy_flops`).

    Returns (points, policies), aligned. Each point: lambda, the variant's fields, policy (to_json),
    accuracy, flops (mean), saved, [ms, speedup when `cost` has latency] — like
    `engine.evaluate.threshold_curve`'s points. With `pareto_only` (default) the Pareto front,
    cheapest first (of exact ties the earliest); else every point in the order of lambdas, then
    variants. Progress: `stage`, one step per λ. Raises Cancelled when `cancel` is set.
    """
    pairs: list[tuple[dict, Policy]] = []
    for i, lam in enumerate(lambdas):
        report(progress, cancel, stage, i, len(lambdas), f"λ = {lam:g}")
        trained = train(float(lam))
        for fields, policy in (variants(trained) if variants is not None else [({}, trained)]):
            ev = evaluate_policy(records, policy, with_policy_flops(cost, policy))
            point = {"lambda": float(lam), **fields, "policy": policy.to_json(), "accuracy": ev["accuracy"],
                     "loss_se": ev["loss_se"], "flops": ev["mean_flops"], "saved": ev["saved"]}
            if "mean_ms" in ev:
                point.update(ms=ev["mean_ms"], speedup=ev["speedup"])
            pairs.append((point, policy))
    report(progress, cancel, stage, len(lambdas), len(lambdas))
    if pareto_only:
        front = pareto([pt for pt, _ in pairs])  # cheapest first
        policy_of = {id(pt): p for pt, p in pairs}
        pairs = [(pt, policy_of[id(pt)]) for pt in front]
    return [pt for pt, _ in pairs], [p for _, p in pairs]


# -- cross-fitting: choosing on data the choice was not fitted on ----------------------------------
# A family's candidates fitted on some records: (a key naming the candidate, the same in every
# fold, e.g. ("learned", λ, offset); its policy).
Candidates = Callable[[Records], Iterable[tuple[Hashable, Policy]]]


def fold_of(labels: torch.Tensor, folds: int, seed: int = 0) -> torch.Tensor:
    """(N,) fold 0..folds−1 of each sample: each class's samples shuffled (seeded) and dealt out in
    turn, so every fold holds every class in proportion. Raises ValueError for folds < 2."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, not {folds}")
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(labels.numel(), dtype=torch.long)
    dealt = 0
    for c in torch.unique(labels):
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        out[idx] = (torch.arange(idx.numel()) + dealt) % folds
        dealt += idx.numel()
    return out


def out_of_fold(candidates: Candidates, records: Records, folds: int = 5, *, seed: int = 0,
                stage: str = "cross-fitting", progress: ProgressFn | None = None,
                cancel: CancelFlag | None = None) -> dict[Hashable, torch.Tensor]:
    """The exit (N,) each sample of `records` takes under each candidate key, every sample decided
    by the candidate fitted on the other folds (`fold_of`): the candidates' out-of-fold behaviour.
    A key that some fold's fitting did not produce is left out. Progress: `stage`, one step per
    fold. Raises Cancelled when `cancel` is set."""
    fold = fold_of(records.labels, folds, seed)
    features = records.features_or_none
    out: dict[Hashable, torch.Tensor] = {}
    seen: dict[Hashable, int] = {}
    for k in range(folds):
        report(progress, cancel, stage, k, folds, f"fold {k + 1} of {folds}")
        held = (fold == k).nonzero().squeeze(1)
        fit = records.subset((fold != k).nonzero().squeeze(1))
        held_features = [f[held] for f in features] if features is not None else None
        for key, policy in candidates(fit):
            exits = out.setdefault(key, torch.full((records.num_samples,), -1, dtype=torch.long))
            exits[held] = simulate(policy, records.logits[held], held_features)
            seen[key] = seen.get(key, 0) + 1
    report(progress, cancel, stage, folds, folds)
    return {key: exits for key, exits in out.items() if seen[key] == folds}


def exits_point(records: Records, exits: torch.Tensor, policy: Policy, cost: CostTable) -> dict:
    """A front point (accuracy, loss_se, flops, saved[, ms, speedup]) of samples that took `exits`
    (N,), paying for `policy`'s active exits and decisions; as `evaluate_policy` scores a policy."""
    table = with_policy_flops(cost, policy)
    s = _summary(exits, _correct(records), table, policy.active_exits(records.num_exits))
    return {"accuracy": s["accuracy"], "loss_se": s["loss_se"], "flops": s["flops"], "saved": s["saved"],
            **({"ms": s["ms"], "speedup": s["speedup"]} if "ms" in s else {})}


def guarded_front(reference: Sequence[tuple[dict, torch.Tensor]], candidates: Sequence[tuple[dict, torch.Tensor]],
                  margin_z: float = 1.0) -> list[dict]:
    """The `reference` points (a fixed-threshold family's front) with those `candidates` (learned
    ones) that beat the reference by more than noise at their cost; each point comes with its
    per-sample correctness (N,) bool on the same records.

    A candidate is kept when its accuracy less `margin_z` standard errors of its paired difference
    with the reference point nearest in FLOPs reaches the reference front's accuracy at its mean
    FLOPs (read between the front's points by straight lines, as mixing two of them reaches; beyond
    the front's cheapest point nothing is compared), and no other kept candidate beats it. Every
    reference point stays, even one a kept candidate beats on these records: a candidate's cost
    moves on new data (a policy refitted on all the records exits elsewhere than its folds did;
    seen: 57.7 % FLOPs saved out of fold, 55.5 % on test), and the reference points it had pushed
    out left a stretch of the cost axis where only a straight line between the survivors stood
    for the thresholds (0.36 point below them on test). A target (`pick_point`, `within_budget`)
    prefers the cheaper, more accurate point to the one it beats. So where
    learning does not clearly help the result holds the reference's points, and on new data it
    is no worse than the reference anywhere by construction. Returns the points, cheapest first."""
    front = pareto([p for p, _ in reference])
    xs = np.array([p["flops"] for p in front])
    ys = np.array([p["accuracy"] for p in front])
    right_of = {id(p): r for p, r in reference}
    kept = []
    for point, right in candidates:
        f = point["flops"]
        if xs.size and f >= xs[0]:
            nearest = front[int(np.argmin(np.abs(xs - f)))]
            d = right_of[id(nearest)].double() - right.double()
            se = math.sqrt(max(d.var().item(), 0.0) / d.numel()) if d.numel() > 1 else 0.0
            if point["accuracy"] - margin_z * se < float(np.interp(f, xs, ys)) - 1e-12:
                continue
        kept.append(point)
    out = [p for p, _ in reference] + pareto(kept)
    return sorted(out, key=lambda p: (p["flops"], -p["accuracy"]))

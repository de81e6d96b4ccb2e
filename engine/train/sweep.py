"""The λ sweep every trained policy family is fitted with: λ is the price of compute (accuracy
traded per full model's FLOPs); one policy is trained per λ, each variant of it that needs no
retraining (a score offset, a halting cut-off) is scored on held-out records with its own
decision FLOPs counted, and the Pareto front of accuracy against mean FLOPs is kept.

Also here: what the trainers share, the loss of answering at each exit.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from ..cost import CostTable, with_policy_flops
from ..evaluate import evaluate_policy, pareto
from ..policies import Policy
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

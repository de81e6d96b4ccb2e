"""A compute budget: the fraction of the full model's FLOPs a configuration may use on average,
every stage, exit head and decision that ran counted (as `engine.cost` counts them).

`within_budget` picks a front's most accurate point that fits a budget, or says none does;
`offramp search --budget`, `engine.search.choose` and the app's budget slider all use it. Plain
Python (no torch): the app's pure state reads and sets budgets with it too.
"""
from __future__ import annotations

import math
from typing import Sequence

# Rounding in summed FLOPs must not turn a point at exactly the budget into one over it.
TOLERANCE = 1e-9


def check_budget(budget: float) -> float:
    """`budget` as a float. Raises ValueError (one sentence naming the value) unless 0 < budget ≤ 1."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"budget {budget!r} is not a fraction of the full model's FLOPs: "
                         "give a number above 0 and at most 1, e.g. 0.6")
    return value


def cost_fraction(point: dict, full_flops: float | None = None) -> float:
    """A front point's mean FLOPs as a fraction of the full model's: flops / full_flops, or, without
    `full_flops`, 1 − the point's "saved" (which every front point carries)."""
    if full_flops is not None:
        return float(point["flops"]) / float(full_flops)
    return 1.0 - float(point["saved"])


def fits(fraction: float, budget: float) -> bool:
    """Whether a cost `fraction` of the full model is within `budget` (up to FLOPs rounding)."""
    return fraction <= budget + TOLERANCE


def within_budget(front: Sequence[dict], budget: float, full_flops: float | None = None) -> tuple[int, bool]:
    """(index, met): the index in `front` of the most accurate point whose cost fraction
    (`cost_fraction`) is within `budget` (of equally accurate ones the cheapest), met True; when
    none fits, the cheapest point, met False. Raises ValueError for an empty front or a budget
    outside (0, 1]."""
    budget = check_budget(budget)
    if not front:
        raise ValueError("the front is empty: there is no configuration to fit in a budget")
    costs = [cost_fraction(p, full_flops) for p in front]
    inside = [i for i, c in enumerate(costs) if fits(c, budget)]
    if not inside:
        return min(range(len(front)), key=lambda i: (costs[i], -front[i]["accuracy"])), False
    return max(inside, key=lambda i: (front[i]["accuracy"], -costs[i])), True


def budget_check(accuracy: float, flops: float, full_flops: float, budget: float | None) -> dict:
    """What a configuration did against `budget` on one split: {accuracy, flops, fraction (of the
    full model's FLOPs), budget_met (None without a budget)}."""
    fraction = flops / full_flops
    return {"accuracy": accuracy, "flops": flops, "fraction": fraction,
            "budget_met": None if budget is None else fits(fraction, budget)}

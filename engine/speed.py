"""What an exit costs in time beyond its FLOPs: the measurement behind `offramp bench`'s per-exit
overhead and tests/benchmarks/prepared_speed.py.

An early exit that runs and does not fire costs its head's and decision's FLOPs plus whatever the
runtime adds (calls, reads, Python). `exit_overhead` measures that extra per exit: the staged run
of one image with exits 0..k active and none firing, for every k, against the run with no early
exit, all interleaved in one process; the head's and decision's FLOPs, at the full model's measured
ms per FLOP, are subtracted.
"""
from __future__ import annotations

import copy
import random
import statistics
import time

import torch

from .cost import CostTable
from .model import MultiExitNet
from .policies import BolukbasiPolicy, Policy, StructurePolicy, ThresholdPolicy, with_policy_flops
from .prepared import PreparedModel


def never_firing(policy: Policy, active: int, num_exits: int) -> Policy:
    """A copy of `policy` that evaluates early exits 0..active−1 only (−1 of them: none) and fires at
    none of them, with the same work per exit: thresholds of 1.0 (max-probability), a Bolukbasi
    offset of −1e9, a structure trunk whose last bias is −1e4. ValueError for other policies."""
    if isinstance(policy, ThresholdPolicy):
        return ThresholdPolicy([1.0] * active + [None] * (num_exits - 1 - active) + [1.0], policy.measure)
    if isinstance(policy, BolukbasiPolicy):
        out = copy.deepcopy(policy)
        out.offset = -1e9
    elif isinstance(policy, StructurePolicy):
        out = copy.deepcopy(policy)
        with torch.no_grad():
            out.trunk[-1].bias.fill_(-1e4)
    else:
        raise ValueError(f"cannot make a {policy.kind!r} policy that never fires")
    mask = [e < active for e in range(num_exits - 1)] + [True]
    out.active_exits = lambda n: list(mask)  # an attribute shadowing the method: only these exits run
    return out


def exit_overhead(form: PreparedModel | MultiExitNet, policy: Policy, images: torch.Tensor, cost: CostTable, *,
                  repeats: int = 300, seed: int = 0) -> dict:
    """Per early exit, the µs an active exit that does not fire adds to a batch-1 staged run of
    `form` beyond its head's and decision's FLOPs (at the full model's ms per FLOP here), for
    `policy`'s kind of decision. Measured on the first of `images` (n, 3, h, w) on which no variant
    fires early; every variant `repeats` times, interleaved in a shuffled order.

    Returns {"per_exit_us", "mean_us" (all early exits active, per exit: the least noisy figure),
    "full_ms" (no early exit), "image"}. Raises ValueError when every image makes a variant fire."""
    n = cost.num_exits
    cost = with_policy_flops(cost, policy)  # the decision's own FLOPs (0 for thresholds)
    variants = [never_firing(policy, k, n) for k in range(n)]  # k = number of active early exits
    last = n - 1
    with torch.inference_mode():
        pick = next((i for i in range(images.shape[0])
                     if all(int(form.run(images[i:i + 1], v).exit_index[0]) == last for v in variants)), None)
    if pick is None:
        raise ValueError("every image fires an early exit even at threshold 1.0; give other images")
    x = images[pick:pick + 1]
    order = list(range(n))
    times: list[list[float]] = [[] for _ in range(n)]
    rng = random.Random(seed)
    with torch.inference_mode():
        for v in variants:  # the graphs of every variant exist before timing starts
            for _ in range(3):
                form.run(x, v)
        for _ in range(repeats):
            rng.shuffle(order)
            for k in order:
                start = time.perf_counter()
                form.run(x, variants[k])
                times[k].append(time.perf_counter() - start)
    ms = [statistics.median(t) * 1e3 for t in times]
    per_flop = ms[0] / cost.full_flops  # ms per FLOP of the run with no early exit
    own = [(cost.exit_flops[e] + cost.policy_flops[e]) * per_flop for e in range(n - 1)]
    per_exit = [(ms[k + 1] - ms[k] - own[k]) * 1e3 for k in range(n - 1)]
    mean = ((ms[-1] - ms[0] - sum(own)) / max(n - 1, 1)) * 1e3
    return {"per_exit_us": per_exit, "mean_us": mean, "full_ms": ms[0], "image": pick}

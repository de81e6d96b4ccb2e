"""DyCE configuration search (Wang et al., arXiv 2403.01695) over recorded exit outputs.

A *configuration* is which early exits are active plus one confidence threshold per active exit;
it is a `ThresholdPolicy` whose None thresholds mark inactive exits (their heads never run). The
last exit is always active. Its expected accuracy and expected cost follow exactly from the
records: a sample takes the first active exit whose confidence reaches its threshold, and pays
for every stage, head and decision on the way (`CostTable.cumulative_flops(active)`).

Search maximises `accuracy − λ · flops / full_flops` over configurations:
- `one_pass`: exit by exit from the first, the best of {inactive} ∪ thresholds there, given the
  choices so far (later exits still inactive);
- `circular`: from a start (one_pass by default), apply the single best change at any exit until
  no change gains;
- the shared-threshold baseline is `engine.evaluate.threshold_curve`.
Sweeping λ gives the Pareto front (`search_front`); `choose` picks a point by target, and
`ConfigurationTable` turns a front into policies so switching configuration is a lookup.

Every candidate threshold of one exit is scored at once: sort that exit's samples by confidence
once, and moving the threshold down one step lets the next sample leave there instead of further
on, so the accuracy and cost of all thresholds are cumulative sums of per-sample differences.
"""
from __future__ import annotations

import bisect
import math
from typing import Iterable, Sequence

import numpy as np
import torch

from .budget import TOLERANCE, cost_fraction, within_budget
from .cost import CostTable
from .evaluate import (_check_cost, _correct, _exit_confidence, _summary, below_each, default_thresholds, full_model_point,
                       operating_front, pareto, pick_point, threshold_curve)
from .policies import MEASURES, ThresholdPolicy
from .records import Records

METHODS = ("circular", "one_pass", "shared")
Thresholds = Sequence["float | None"]
_GAIN = 1e-12  # a change must raise the objective by more than rounding noise, so the search ends


def default_lambdas(n: int = 48) -> list[float]:
    """λ values for a front: 0 (most accurate) and `n − 1` log-spaced from 1e-3 to 10 (cheapest);
    λ is accuracy traded per unit of cost as a fraction of the full model."""
    return [0.0, *np.logspace(-3.0, 1.0, max(n - 1, 1)).tolist()]


# -- precomputed tables ---------------------------------------------------------------------------
class _Tables:
    """What every search step needs, computed once per (records, cost, measure, candidates)."""

    def __init__(self, records: Records, cost: CostTable, measure: str = "max_prob",
                 candidates: int | Sequence[float] | None = None):
        _check_cost(records, cost)
        if measure not in MEASURES:
            raise ValueError(f"unknown confidence measure {measure!r}; choose one of {', '.join(MEASURES)}")
        if records.num_samples == 0:
            raise ValueError("the records hold no samples: there is nothing to search on")
        self.records, self.cost, self.measure = records, cost, measure
        self.n, self.e = records.num_samples, records.num_exits
        conf = _exit_confidence(records, measure)  # (N, E−1) torch float32, exactly as ThresholdPolicy sees it
        self.conf = conf.numpy()
        self.correct_t = _correct(records)  # (N, E) bool
        self.correct = self.correct_t.numpy().astype(np.float64)
        self.full = cost.full_flops
        self.order, self.cand, self.count = [], [], []
        for j in range(self.e - 1):
            col = self.conf[:, j]
            self.order.append(np.argsort(-col, kind="stable"))  # most confident first
            cand = _candidates(conf[:, j], candidates)[::-1]  # highest first: ties keep the cautious one
            ascending = np.sort(col)
            self.cand.append(cand)
            # samples with confidence >= t; float32 against float32, as `decide` compares them
            self.count.append(self.n - np.searchsorted(ascending, cand.astype(np.float32), side="left"))

    def active(self, th: Thresholds) -> list[bool]:
        return [t is not None for t in th] + [True]

    def fires(self, th: Thresholds) -> np.ndarray:
        """(N, E) bool: where each sample would leave if it got there; the last exit always."""
        out = np.ones((self.n, self.e), dtype=bool)
        for j, t in enumerate(th):
            out[:, j] = self.conf[:, j] >= np.float32(t) if t is not None else False
        return out

    def exits(self, th: Thresholds) -> np.ndarray:
        return self.fires(th).argmax(axis=1)  # the first exit that fires

    def score(self, th: Thresholds) -> tuple[float, float]:
        """(accuracy, mean flops) of the configuration `th` (early exits only)."""
        ex = self.exits(th)
        cum = np.asarray(self.cost.cumulative_flops(self.active(th)))
        return float(self.correct[np.arange(self.n), ex].mean()), float(cum[ex].mean())

    def objective(self, th: Thresholds, lam: float) -> float:
        acc, flops = self.score(th)
        return acc - lam * flops / self.full

    def options(self, th: Thresholds, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Accuracy and mean flops of every option at early exit j with the others fixed:
        index 0 is "inactive", index 1 + c is threshold `cand[j][c]`."""
        fires = self.fires(th)
        rows = np.arange(self.n)
        left = fires[:, :j].any(axis=1)  # left at an earlier exit: j does not matter to them
        on = [*self.active(th)]
        on[j] = False
        cum_off = np.asarray(self.cost.cumulative_flops(on))
        on[j] = True
        cum_on = np.asarray(self.cost.cumulative_flops(on))
        fires[:, j] = False
        base = fires.argmax(axis=1)  # where each sample leaves with j inactive
        acc0 = self.correct[rows, base].sum()
        o = self.order[j]
        reach = ~left[o]  # in confidence order: samples that get to exit j
        later = base[o]
        d_acc = np.where(reach, self.correct[o, j] - self.correct[o, later], 0.0)
        d_cost = np.where(reach, cum_on[j] - cum_on[later], 0.0)
        # taking the k most confident samples out at j changes the totals by these prefix sums
        s_acc = np.concatenate(([0.0], np.cumsum(d_acc)))
        s_cost = np.concatenate(([0.0], np.cumsum(d_cost)))
        k = self.count[j]
        acc = np.concatenate(([acc0], acc0 + s_acc[k])) / self.n
        flops = np.concatenate(([cum_off[base].sum()], cum_on[base].sum() + s_cost[k])) / self.n
        return acc, flops

    def best_at(self, th: Thresholds, j: int, lam: float) -> tuple[float | None, float]:
        """The best option at exit j (None = inactive) and its objective."""
        acc, flops = self.options(th, j)
        value = acc - lam * flops / self.full
        i = int(np.argmax(value))  # first of ties: inactive, then the highest threshold
        return (None if i == 0 else float(self.cand[j][i - 1])), float(value[i])

    def best_within(self, th: Thresholds, j: int, max_flops: float) -> tuple[float | None, float, float] | None:
        """The most accurate option at exit j whose mean flops stay within `max_flops` (of equal
        accuracy the cheapest) as (threshold, accuracy, flops); None when no option fits."""
        acc, flops = self.options(th, j)
        fits = flops <= max_flops
        if not fits.any():
            return None
        acc = np.where(fits, acc, -np.inf)
        i = int(np.lexsort((np.where(fits, flops, np.inf), -acc))[0])  # best accuracy, then least flops
        return (None if i == 0 else float(self.cand[j][i - 1])), float(acc[i]), float(flops[i])

    def policy(self, th: Thresholds) -> ThresholdPolicy:
        return ThresholdPolicy([*th, 1.0], self.measure)

    def point(self, th: Thresholds) -> dict:
        """A curve point, numbers from `engine.evaluate._summary` as every curve point."""
        exits = torch.from_numpy(self.exits(th))
        return {"policy": self.policy(th).to_json(),
                **_summary(exits, self.correct_t, self.cost, self.active(th))}


def _candidates(conf: torch.Tensor, candidates: int | Sequence[float] | None) -> np.ndarray:
    """Ascending thresholds for one exit, distinct as float32 (how `decide` compares them): one
    for every distinct confidence, halfway down to the next lower one (None; `below_each`: the same
    samples exit as at the confidence itself, and a staged run whose confidence is a rounding step
    off agrees), about n quantiles of them (int), or the given values."""
    if candidates is None:
        values = conf[torch.isfinite(conf)].numpy()
        values = np.unique(values[(values >= 0.0) & (values <= 1.0)].astype(np.float32))
        values = np.asarray(below_each(values, values), dtype=np.float64)
    elif isinstance(candidates, (int, np.integer)):
        if candidates < 1:
            raise ValueError(f"candidates must be a positive number of thresholds, not {candidates}")
        values = np.asarray(default_thresholds(conf[:, None], candidates))
    else:
        values = np.asarray([float(t) for t in candidates], dtype=np.float64)
        if values.size and not ((values >= 0.0) & (values <= 1.0)).all():
            raise ValueError(f"candidate thresholds must lie in 0..1, got {sorted(set(values.tolist()))}")
    values = values.astype(np.float64)
    _, first = np.unique(values.astype(np.float32), return_index=True)  # ascending
    return values[first]


def _early(thresholds: Thresholds | ThresholdPolicy, num_exits: int) -> list[float | None]:
    th = thresholds.thresholds if isinstance(thresholds, ThresholdPolicy) else list(thresholds)
    if len(th) != num_exits:
        raise ValueError(f"a configuration needs {num_exits} thresholds (None = exit inactive; the last exit "
                         f"always answers), got {len(th)}")
    return [None if t is None else float(t) for t in th[:-1]]


# -- evaluation and search ------------------------------------------------------------------------
def evaluate_configuration(records: Records, cost: CostTable, thresholds: Thresholds | ThresholdPolicy,
                           measure: str = "max_prob") -> dict:
    """Expected accuracy and cost of one configuration on the records, as a curve point:
    {policy, accuracy, flops, saved[, ms, speedup]}; equal to `evaluate_policy` of its policy.

    `thresholds` has one entry per exit (None = inactive; the last is ignored) or is a
    ThresholdPolicy (whose measure then wins). Raises ValueError for a wrong length or measure."""
    if isinstance(thresholds, ThresholdPolicy):
        measure = thresholds.measure
    tables = _Tables(records, cost, measure, candidates=[])
    return tables.point(_early(thresholds, records.num_exits))


def _one_pass(t: _Tables, lam: float) -> list[float | None]:
    th: list[float | None] = [None] * (t.e - 1)
    for j in range(t.e - 1):
        th[j] = t.best_at(th, j, lam)[0]
    return th


def _circular(t: _Tables, lam: float, start: Thresholds, visited: list | None = None) -> list[float | None]:
    th = list(start)
    value = t.objective(th, lam)
    while t.e > 1:
        moves = [t.best_at(th, j, lam) for j in range(t.e - 1)]
        j = max(range(len(moves)), key=lambda i: moves[i][1])
        if moves[j][1] <= value + _GAIN:
            return th
        th[j], value = moves[j]
        if visited is not None:
            visited.append(tuple(th))
    return th


def _circular_within(t: _Tables, max_flops: float, start: Thresholds, visited: list) -> None:
    """Circular search for the most accurate configuration with mean flops <= max_flops, from a
    `start` that fits: the single best change (accuracy, then fewer flops) until none gains."""
    th = list(start)
    acc, flops = t.score(th)
    while True:
        moves = [(j, m) for j in range(t.e - 1) if (m := t.best_within(th, j, max_flops)) is not None]
        if not moves:
            return
        j, (value, m_acc, m_flops) = max(moves, key=lambda jm: (jm[1][1], -jm[1][2]))
        if not (m_acc > acc + _GAIN or (m_acc >= acc - _GAIN and m_flops < flops * (1 - 1e-12))):
            return
        th[j], acc, flops = value, m_acc, m_flops
        visited.append(tuple(th))


def one_pass(records: Records, cost: CostTable, lam: float, *, measure: str = "max_prob",
             candidates: int | Sequence[float] | None = None) -> ThresholdPolicy:
    """The one-pass configuration for trade-off `lam` (objective accuracy − lam·flops/full):
    exit by exit from the first, the best of inactive or any candidate threshold there, given
    the exits already chosen and later exits inactive.

    `candidates`: None = every distinct confidence at that exit, an int = about that many
    quantiles, or a list of thresholds for every exit. Raises ValueError for bad arguments."""
    return (t := _Tables(records, cost, measure, candidates)).policy(_one_pass(t, lam))


def circular(records: Records, cost: CostTable, lam: float, *, start: Thresholds | ThresholdPolicy | None = None,
             measure: str = "max_prob", candidates: int | Sequence[float] | None = None) -> ThresholdPolicy:
    """The circular-search configuration for `lam`: from `start` (default: the one-pass result)
    apply the single best change of one exit (on/off or threshold) over all exits until no
    change raises accuracy − lam·flops/full. A local optimum: no single change improves it."""
    t = _Tables(records, cost, measure, candidates)
    first = _one_pass(t, lam) if start is None else _early(start, t.e)
    return t.policy(_circular(t, lam, first))


def search_front(records: Records, cost: CostTable, method: str = "circular", lambdas: Iterable[float] | None = None,
                 measure: str = "max_prob", *, candidates: int | Sequence[float] | None = None,
                 budgets: int = 32) -> list[dict]:
    """Pareto front (cheapest first) of the configurations `method` finds, with the full model.
    Each point: policy (ThresholdPolicy.to_json()), accuracy, flops, saved[, ms, speedup],
    method, lambda (the λ whose search reached it; None for the rest).

    circular: for every λ (default `default_lambdas()`), circular search from the better of the
    one-pass result (itself a candidate, method "one_pass") and the previous λ's configuration.
    A λ sweep only reaches the corners of the front, so then, for `budgets` mean-cost targets evenly spread up to the full model, a
    circular search for the most accurate configuration within that cost, from the best one
    known within it (shared-threshold configurations included: point "method" says "shared"
    where one was not improved on). Every configuration a step reached is a candidate point.
    one_pass: the one-pass configuration of every λ. shared: the shared-threshold curve
    (`engine.evaluate.operating_front`). The full model's point has method "full".
    Raises ValueError for an unknown method or bad arguments."""
    if method not in METHODS:
        raise ValueError(f"unknown search method {method!r}; choose one of {', '.join(METHODS)}")
    full = _tagged(full_model_point(records, cost, measure), "full", None)
    if method == "shared":
        return [full if p["threshold"] is None else _tagged(p, "shared", None)
                for p in operating_front(records, cost, measure)]
    t = _Tables(records, cost, measure, candidates)
    found: dict[tuple, tuple[str, float | None]] = {}  # configuration -> (method, λ) that first reached it
    previous = None
    for lam in sorted(default_lambdas() if lambdas is None else [float(x) for x in lambdas]):
        th = _one_pass(t, lam)
        if method == "circular":
            # kept even when the search starts elsewhere: else the front can lose to one-pass's
            found.setdefault(tuple(th), ("one_pass", lam))
            if previous is not None and t.objective(previous, lam) > t.objective(th, lam):
                th = previous
            visited = [tuple(th)]
            th = _circular(t, lam, th, visited)
            for v in visited:
                found.setdefault(v, (method, lam))
            previous = th
        found.setdefault(tuple(th), (method, lam))
    if method == "circular":
        for p in threshold_curve(records, cost, measure):
            found.setdefault(tuple([p["threshold"]] * (t.e - 1)), ("shared", None))
        _fill_budgets(t, found, budgets)
    points = [_tagged(t.point(th), how, lam) for th, (how, lam) in found.items()]
    return pareto([full, *points])  # the full model first: it wins exact ties


def _fill_budgets(t: _Tables, found: dict, budgets: int) -> None:
    """Budget-constrained circular searches between the cheapest known configuration and the full
    model; what they reach joins `found` (method "circular", λ None)."""
    known = {th: t.score(th) for th in found}
    lo = min(flops for _, flops in known.values())
    for limit in np.linspace(lo, t.full, max(budgets, 0) + 1)[1:]:
        fitting = [th for th, (_, flops) in known.items() if flops <= limit]
        if not fitting:
            continue
        start = max(fitting, key=lambda th: (known[th][0], -known[th][1]))  # most accurate, then cheapest
        visited: list[tuple] = []
        _circular_within(t, float(limit), start, visited)
        for v in visited:
            found.setdefault(v, ("circular", None))
            known.setdefault(v, t.score(v))


def _tagged(point: dict, method: str, lam: float | None) -> dict:
    return {**{k: v for k, v in point.items() if k != "threshold"}, "method": method, "lambda": lam}


# -- choosing -------------------------------------------------------------------------------------
def choose(front: Sequence[dict], *, max_flops: float | None = None, min_accuracy: float | None = None,
           budget: float | None = None, full_flops: float | None = None) -> dict:
    """One point of a front (cheapest first), by exactly one target:
    max_flops: the most accurate point with mean flops <= max_flops (none: the cheapest point);
    min_accuracy (0..1): the cheapest point at least that accurate (none: the most accurate);
    budget (0 < budget <= 1): the most accurate point whose mean flops are within that fraction of
    the full model's (`full_flops`; default: read from each point's "saved"), none: the cheapest
    (`engine.budget.within_budget`, which also says whether it fits).
    Raises ValueError for an empty front, a budget outside (0, 1] or not exactly one target."""
    if sum(x is not None for x in (max_flops, min_accuracy, budget)) != 1:
        raise ValueError("give exactly one target: max_flops (mean FLOPs), min_accuracy (0..1) or budget "
                         "(a fraction of the full model's FLOPs)")
    if not front:
        raise ValueError("the front is empty: there is no configuration to choose")
    if budget is not None:
        return front[within_budget(front, budget, full_flops)[0]]
    if min_accuracy is not None:
        return pick_point(front, max_loss=0.0, full_accuracy=min_accuracy)
    ok = [p for p in front if p["flops"] <= max_flops]
    if not ok:
        return min(front, key=lambda p: (p["flops"], -p["accuracy"]))
    return max(ok, key=lambda p: (p["accuracy"], -p["flops"]))


class ConfigurationTable:
    """A front turned into ready ThresholdPolicy objects, cheapest first, so the app's budget
    slider switches configuration with a binary search and no allocation."""

    def __init__(self, front: Sequence[dict]):
        points = pareto(front)
        if not points:
            raise ValueError("the front is empty: there is no configuration to put in a table")
        for p in points:
            if p["policy"].get("kind") != "threshold":
                raise ValueError(f"a configuration table holds threshold configurations, not {p['policy'].get('kind')!r}")
        self.points = points
        self.policies = [ThresholdPolicy(p["policy"]["thresholds"], p["policy"].get("measure", "max_prob"))
                         for p in points]
        self.flops = [float(p["flops"]) for p in points]  # ascending
        self.accuracy = [float(p["accuracy"]) for p in points]  # ascending too: it is a front
        self.fractions = [cost_fraction(p) for p in points]  # of the full model's FLOPs, ascending

    @classmethod
    def search(cls, records: Records, cost: CostTable, **kw) -> "ConfigurationTable":
        """The table of `search_front(records, cost, **kw)`."""
        return cls(search_front(records, cost, **kw))

    def __len__(self) -> int:
        return len(self.policies)

    def __getitem__(self, i: int) -> ThresholdPolicy:
        return self.policies[i]

    def index_at_budget(self, budget: float) -> int:
        """Index of the point `choose(front, budget=budget)` picks: the most accurate within
        `budget` (a fraction of the full model's FLOPs), else the cheapest. Never raises: a budget
        that is not a number gets the cheapest point."""
        if not math.isfinite(budget):
            return 0
        return max(bisect.bisect_right(self.fractions, budget + TOLERANCE) - 1, 0)

    def at_budget(self, budget: float) -> ThresholdPolicy:
        """The configuration `index_at_budget(budget)` names (a lookup: no new object)."""
        return self.policies[self.index_at_budget(budget)]

    def within_flops(self, max_flops: float) -> ThresholdPolicy:
        """The most accurate configuration with mean flops <= max_flops (none: the cheapest)."""
        return self.policies[max(bisect.bisect_right(self.flops, max_flops) - 1, 0)]

"""Timing what Offramp runs: batch-1 runners of a model, its prepared form (engine.prepared) or a
cascade for `offramp bench`, and what an exit costs in time beyond its FLOPs (`offramp bench`'s
per-exit overhead, tests/benchmarks/prepared_speed.py).

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
import weakref
from typing import Callable

import torch

from .cascade import Cascade
from .cost import CostTable, with_policy_flops
from .model import MultiExitNet
from .policies import BolukbasiPolicy, Evidence, Policy, StructurePolicy, ThresholdPolicy
from .prepared import PreparedModel, prepare

Runner = Callable[[int], object]  # runs image i at batch 1


# -- runners --------------------------------------------------------------------------------------
_FORMS: "weakref.WeakKeyDictionary[MultiExitNet, PreparedModel]" = weakref.WeakKeyDictionary()
_ORT_FORMS: "weakref.WeakKeyDictionary[MultiExitNet, object]" = weakref.WeakKeyDictionary()
FORM_RUNTIMES = ("prepared", "onnxruntime")  # runtimes that run a prepared form (`form_for`); "eager" runs the modules


def prepared_form(model: MultiExitNet) -> PreparedModel:
    """`model`'s prepared form (engine.prepared), made once per model and again after its weights changed."""
    form = _FORMS.get(model)
    if form is None or not form.is_current():
        form = _FORMS[model] = prepare(model.eval())
    return form


def form_for(model: MultiExitNet, runtime: str):
    """`model`'s form for `runtime`: "prepared" (`prepared_form`) or "onnxruntime"
    (`engine.ort_runtime.OrtPreparedModel`, made once per model and again after its weights
    changed). Raises ValueError when onnxruntime cannot run it here."""
    if runtime == "prepared":
        return prepared_form(model)
    if runtime != "onnxruntime":
        raise ValueError(f"runtime must be one of {', '.join(FORM_RUNTIMES)}, not {runtime!r}")
    from .ort_runtime import prepare_ort
    form = _ORT_FORMS.get(model)
    if form is None or not form.is_current():
        form = _ORT_FORMS[model] = prepare_ort(model.eval().cpu())
    return form


def plain_runner(model: MultiExitNet, exit_index: int, images: torch.Tensor, runtime: str = "prepared") -> Runner:
    """Batch-1 forward of `model` cut to a plain fixed-depth network: the stages up to exit
    `exit_index`'s tap and its head, nothing else (the full model for the last exit); run by its
    prepared form (runtime "prepared" or "onnxruntime") or (runtime "eager") by the plain modules."""
    e = model.exit_index(exit_index)
    if runtime in FORM_RUNTIMES:
        form = form_for(model, runtime)
        return lambda i: form.run_to(images[i:i + 1], e)
    net = torch.nn.Sequential(*list(model.backbone.stages)[: model.exit_stages[e] + 1], model.exits[e]).eval()
    return lambda i: net(images[i:i + 1])


def staged_runner(model: MultiExitNet | Cascade, policy: Policy, images: torch.Tensor,
                  runtime: str = "prepared") -> Runner:
    """Batch-1 staged run that really stops at the exit that fires: `PreparedModel.run` (runtime
    "prepared"), `OrtPreparedModel.run` ("onnxruntime") or `MultiExitNet.run` ("eager"); for a
    cascade its models' forms for that runtime, or `Cascade.run`."""
    if runtime not in FORM_RUNTIMES:
        return lambda i: model.run(images[i:i + 1], policy)
    if isinstance(model, Cascade):
        return _cascade_runner(model, policy, images, runtime)
    form = form_for(model, runtime)
    return lambda i: form.run(images[i:i + 1], policy)


def _cascade_runner(cascade: Cascade, policy: Policy, images: torch.Tensor, runtime: str = "prepared") -> Runner:
    """`Cascade.run`'s loop at batch 1 with every model's form for `runtime`."""
    forms = [form_for(m, runtime) for m in cascade.models]
    m = len(forms)
    active = policy.active_exits(m)

    def run(i: int) -> torch.Tensor:
        x, history, ran = images[i:i + 1], [], []
        for j, form in enumerate(forms):
            if not (active[j] or j == m - 1):
                continue
            logits, tap = form.run_to(x, with_tap=True)
            history.append(logits)
            ran.append(j)
            if j == m - 1 or bool(policy.decide(Evidence(j, m, history, ran, tap=tap))):
                return logits
    return run


# -- what an exit costs beyond its FLOPs -----------------------------------------------------------


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


def quantile_of(values: list[float], q: float) -> float:
    """The `q` quantile of `values` (0.5: the median), to a thousandth; one value: itself."""
    if len(values) < 2:
        return values[0]
    if q == 0.5:
        return statistics.median(values)
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


def exit_overhead(form: PreparedModel | MultiExitNet, policy: Policy, images: torch.Tensor, cost: CostTable, *,
                  repeats: int = 300, seed: int = 0, quantile: float = 0.5, block: int = 1) -> dict:
    """Per early exit, the µs an active exit that does not fire adds to a batch-1 staged run of
    `form` beyond its head's and decision's FLOPs (at the full model's ms per FLOP here), for
    `policy`'s kind of decision. Measured on the first of `images` (n, 3, h, w) on which no variant
    fires early; every variant `repeats` times, interleaved in a shuffled order, each read at the
    `quantile` of its times (0.5: the median; on a machine shared with busy processes a low one,
    e.g. 0.1, leaves out the runs during which this process waited for a core). With `block` > 1,
    each variant runs `block` times in a row per turn (one untimed run first), as a live stream
    runs one policy frame after frame: its graphs and weights are then in the caches, which
    alternating variants run by run (block 1) evicts; `repeats` still counts the timed runs.

    Returns {"per_exit_us", "mean_us" (all early exits active, per exit: the least noisy figure),
    "full_ms" (no early exit), "image", "quantile", "block"}. Raises ValueError when every image makes a
    variant fire, or for a quantile outside (0, 1)."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie between 0 and 1, not {quantile}")
    if block < 1:
        raise ValueError(f"block must be a whole number of runs ≥ 1, not {block}")
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
        for _ in range(max(1, repeats // block)):
            rng.shuffle(order)
            for k in order:
                if block > 1:
                    form.run(x, variants[k])
                for _ in range(block):
                    start = time.perf_counter()
                    form.run(x, variants[k])
                    times[k].append(time.perf_counter() - start)
    ms = [quantile_of(t, quantile) * 1e3 for t in times]
    per_flop = ms[0] / cost.full_flops  # ms per FLOP of the run with no early exit
    own = [(cost.exit_flops[e] + cost.policy_flops[e]) * per_flop for e in range(n - 1)]
    per_exit = [(ms[k + 1] - ms[k] - own[k]) * 1e3 for k in range(n - 1)]
    mean = ((ms[-1] - ms[0] - sum(own)) / max(n - 1, 1)) * 1e3
    return {"per_exit_us": per_exit, "mean_us": mean, "full_ms": ms[0], "image": pick, "quantile": quantile,
            "block": block}

"""Training the Bolukbasi policy (`engine.policies.bolukbasi`; Bolukbasi et al., ICML 2017). The
classifiers are trained bottom-up, from the deepest early exit to the first, as weighted binary
classification: for each sample, the loss of exiting now is compared with the loss it would get
by continuing under the later, already-trained classifiers plus λ × the extra compute (a fraction
of the full model's FLOPs). The better choice is the target, the size of the difference the
weight. λ sweeps the trade-off (`bolukbasi_front`).

The registered trainer "bolukbasi" (`crossfit_front`) makes the fixed threshold a special case: a
Bolukbasi policy can leave exits out and read one confidence column with a bias
(`BolukbasiPolicy.from_thresholds`), so the shared threshold and the DyCE configurations are
candidates beside the trained policies; every searched or trained candidate is scored out of fold
on the calibration records, and one displaces a threshold only where it beats it by more than noise.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..cost import CostTable, with_policy_flops
from ..evaluate import _correct, operating_front, pareto
from ..policies import MEASURES, Policy, simulate
from ..policies.bolukbasi import BolukbasiPolicy, evidence_features
from ..progress import CancelFlag, ProgressFn, report
from ..records import Records
from .registry import register_trainer
from ..search import circular, default_lambdas
from .sweep import exit_losses, exits_point, guarded_front, lambda_sweep, out_of_fold

# λ values that span "accuracy first" to "compute first" when cost is a fraction of the full model.
DEFAULT_LAMBDAS = (0.0, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0)
# Score offsets tried per λ: the negative ones reach the accurate end of the front (see bolukbasi_front).
DEFAULT_OFFSETS = (-3.0, -2.0, -1.5, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5)
# The cross-fitted front (`crossfit_front`, the registered trainer): λ values trained, the DyCE
# searches it starts from, folds, L-BFGS iterations (the logistic fits converge well before the
# 200 of a single policy), and how many standard errors a learned point must beat a fixed threshold by.
CROSSFIT_LAMBDAS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
DYCE_LAMBDAS = tuple(default_lambdas(24))
CROSSFIT_FOLDS = 4
CROSSFIT_EPOCHS = 60
MARGIN_Z = 2.0


def records_evidence(records: Records, exit_index: int, top_k: int,
                     active: Sequence[bool] | None = None) -> torch.Tensor:
    """`evidence_features` at `exit_index` for every recorded sample, the exits before it that are
    `active` (default: all) evaluated, as the policy evaluates them."""
    run = [j for j in range(exit_index + 1) if active is None or j == exit_index or active[j]]
    return evidence_features([records.logits[:, j] for j in run], top_k)


# -- training -------------------------------------------------------------------------------------
def _fit(net: nn.Module, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, *, steps: int,
         weight_decay: float, seed: int) -> None:
    """Weighted logistic regression of `net` on x (N, D) → target (N,), full-batch L-BFGS on
    standardised inputs; the standardisation is then folded into the first layer, so the trained
    net reads raw evidence. Deterministic for a given seed."""
    mu = x.mean(dim=0)
    sd = x.std(dim=0, unbiased=False)
    sd = torch.where(sd > 1e-6, sd, torch.ones_like(sd))  # constant columns (e.g. agreement at exit 0)
    z = (x - mu) / sd
    total = weight.sum()
    if total <= 0:  # nothing to learn: every sample is indifferent, and exiting is no worse
        weight, target, total = torch.ones_like(weight), torch.ones_like(target), torch.tensor(float(weight.numel()))
    w = weight / total
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
    if isinstance(net, nn.Linear):
        nn.init.zeros_(net.weight)
        nn.init.zeros_(net.bias)
    mats = [m.weight for m in net.modules() if isinstance(m, nn.Linear)]
    opt = torch.optim.LBFGS(net.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        score = net(z).squeeze(-1)
        # logistic loss written out: F.binary_cross_entropy_with_logits is ~1000x slower on small
        # batches when its threads compete with other work for a few cores
        loss = (w * (F.softplus(score) - target * score)).sum()
        loss = loss + weight_decay * sum((m ** 2).sum() for m in mats)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    first = net if isinstance(net, nn.Linear) else net[0]
    with torch.no_grad():  # W z + b = (W / sd) x + (b − W (mu / sd))
        w64, b64 = first.weight.double(), first.bias.double()
        first.bias.copy_((b64 - (w64 * (mu / sd).double()).sum(dim=1)).float())
        first.weight.copy_((w64 / sd.double()).float())


def _tune_bias(net: nn.Module, x: torch.Tensor, gain: torch.Tensor) -> None:
    """Shift the last layer's bias so that "exit where score > 0" maximises the summed `gain`
    (loss of going on − loss of exiting) of the samples that exit: the training objective itself,
    exactly, along the direction the logistic fit found. Logistic loss only approximates it."""
    with torch.no_grad():
        score = net(x).squeeze(-1).double()  # (N,)
        order = torch.argsort(score, descending=True, stable=True)
        s, total = score[order], torch.cumsum(gain[order].double(), dim=0)
        # a cut may only fall between different scores: after position i when s[i] > s[i + 1]
        can = torch.ones_like(s, dtype=torch.bool)
        can[:-1] = s[:-1] > s[1:]
        total = torch.where(can, total, torch.full_like(total, -math.inf))
        k = int(torch.argmax(total))
        if total[k] <= 0:  # no cut beats letting nobody exit
            cut = float(s[0]) + 1.0
        else:
            cut = float(s[k] + s[k + 1]) / 2 if k + 1 < s.numel() else float(s[k]) - 1.0
        last = net if isinstance(net, nn.Linear) else net[-1]
        last.bias -= cut


def train_bolukbasi(records: Records, cost: CostTable, lam: float, *, hidden: int = 0, top_k: int = 5,
                    loss: str = "error", epochs: int = 200, weight_decay: float = 1e-6, passes: int = 2,
                    tune_bias: bool = True, seed: int = 0, active: Sequence[bool] | None = None,
                    progress: ProgressFn | None = None, cancel: CancelFlag | None = None) -> BolukbasiPolicy:
    """Train a BolukbasiPolicy on `records` (calibrated logits of every exit on a held-out split).

    Bottom-up from exit E−2 to 0: with the classifiers after e trained, each sample's loss of
    exiting at e (0/1 error, or cross-entropy with loss="ce") is compared with the loss at the exit
    the later classifiers send it to plus lam × (the FLOPs continuing adds, including their
    decisions, / the full model's FLOPs). Target = exit where exiting is no worse, weight = the
    absolute difference; weighted logistic regression with `epochs` L-BFGS iterations, then (with
    `tune_bias`) the bias that minimises that objective exactly. Further `passes` repeat the sweep
    with each exit trained only on the samples the earlier exits now let through. Deterministic.
    Progress stage: "training policy". Raises ValueError for a negative lam, fewer than 2 exits or
    a cost table of another model, and Cancelled when cancelled. `active` (one bool per early exit;
    default all) leaves exits out: they are not evaluated, trained or paid for.
    """
    if not lam >= 0:
        raise ValueError(f"lam (the price of compute) must be 0 or more, not {lam}")
    if passes < 1:
        raise ValueError(f"passes must be at least 1, not {passes}")
    num_exits, n = records.num_exits, records.num_samples
    if cost.num_exits != num_exits:
        raise ValueError(f"the cost table describes {cost.num_exits} exits but the records have {num_exits}")
    policy = BolukbasiPolicy(num_exits, records.num_classes, top_k=top_k, hidden=hidden, lam=lam, loss=loss,
                             active=active)
    table = with_policy_flops(cost, policy)
    # (E,) cost of leaving at each exit, inactive exits not evaluated on the way
    cum = torch.tensor(table.cumulative_flops(policy.active_exits(num_exits)), dtype=torch.float64)
    losses = exit_losses(records, loss).double()  # (N, E)
    early = [e for e in range(num_exits - 1) if policy.active[e]]
    evidence = {e: records_evidence(records, e, policy.top_k, policy.active) for e in early}  # each (N, width)
    stops = torch.zeros(n, num_exits, dtype=torch.bool)  # current decisions; the last exit always answers
    stops[:, -1] = True
    rows = torch.arange(n)
    total, step = passes * len(early), 0
    for p in range(passes):
        for e in reversed(early):
            report(progress, cancel, "training policy", step, total, f"pass {p + 1}, exit {e}")
            step += 1
            dest = e + 1 + stops[:, e + 1:].int().argmax(dim=1)  # where going on leads: first later exit taken
            gain = losses[rows, dest] + lam * (cum[dest] - cum[e]) / table.full_flops - losses[:, e]
            # the first pass cannot know the earlier exits yet: every sample counts
            reach = ~stops[:, :e].any(dim=1) if p > 0 else torch.ones(n, dtype=torch.bool)
            gain = torch.where(reach, gain, torch.zeros_like(gain))
            net = policy.classifiers[e]
            _fit(net, evidence[e], (gain >= 0).float(), gain.abs().float(), steps=epochs,
                 weight_decay=weight_decay, seed=seed + e)
            if tune_bias:
                _tune_bias(net, evidence[e], gain)
            with torch.no_grad():
                stops[:, e] = policy.exit_now(e, evidence[e])
    report(progress, cancel, "training policy", total, total)
    return policy.eval()


# -- the λ sweep ----------------------------------------------------------------------------------
def bolukbasi_front(records_train: Records, records_eval: Records, cost: CostTable,
                    lambdas: Sequence[float] = DEFAULT_LAMBDAS, *, offsets: Sequence[float] = DEFAULT_OFFSETS,
                    pareto_only: bool = True, return_policies: bool = False, progress: ProgressFn | None = None,
                    cancel: CancelFlag | None = None, **train_kw):
    """`lambda_sweep` of `train_bolukbasi` on `records_train`, each policy scored on `records_eval`
    once per offset in `offsets` (a negative offset makes every exit more reluctant: it reaches the
    accurate end of the front that small λ alone may not, when the training split makes early exits
    look better than they are). Returns the points, cheapest first.

    Each point: lambda, offset, policy (to_json), accuracy, flops (mean), saved, [ms, speedup when
    `cost` has latency]. `pareto_only` keeps the Pareto front; `return_policies` returns (points,
    policies) with the policies aligned. `train_kw` goes to train_bolukbasi (hidden, top_k, loss,
    epochs, ...).
    """
    def variants(trained: BolukbasiPolicy):
        for offset in offsets:
            policy = copy.deepcopy(trained)
            policy.offset = float(offset)
            yield {"offset": float(offset)}, policy

    points, policies = lambda_sweep(lambda lam: train_bolukbasi(records_train, cost, lam, **train_kw), records_eval,
                                    cost, lambdas, variants=variants, pareto_only=pareto_only,
                                    stage="training policies", progress=progress, cancel=cancel)
    if not pareto_only:  # every point, still cheapest first
        order = sorted(range(len(points)), key=lambda i: (points[i]["flops"], -points[i]["accuracy"]))
        points, policies = [points[i] for i in order], [policies[i] for i in order]
    return (points, policies) if return_policies else points


# -- the cross-fitted front ------------------------------------------------------------------------
def _reference(records: Records, cost: CostTable, top_k: int) -> list[tuple[dict, BolukbasiPolicy, torch.Tensor]]:
    """The shared threshold's front over every confidence measure (`operating_front`, the full
    model included; the threshold method's front, `engine.train.threshold`), each point's configuration written as a Bolukbasi policy (`from_thresholds`) and
    scored as one: (point, policy, per-sample correctness)."""
    correct, rows = _correct(records), torch.arange(records.num_samples)
    out = []
    for p in pareto([p for m in MEASURES for p in operating_front(records, cost, m)]):  # the threshold method's
        measure = p["policy"]["measure"]
        policy = BolukbasiPolicy.from_thresholds(p["policy"]["thresholds"], measure, records.num_classes, top_k=top_k)
        exits = simulate(policy, records.logits)
        point = {"origin": "threshold", "measure": measure, "threshold": p["threshold"],
                 **exits_point(records, exits, policy, cost)}
        out.append((point, policy, correct[rows, exits]))
    return out


def crossfit_front(records: Records, cost: CostTable, lambdas: Sequence[float] = CROSSFIT_LAMBDAS, *,
                   offsets: Sequence[float] = DEFAULT_OFFSETS, dyce_lambdas: Sequence[float] = DYCE_LAMBDAS,
                   folds: int = CROSSFIT_FOLDS, margin_z: float = MARGIN_Z, epochs: int = CROSSFIT_EPOCHS,
                   hidden: Sequence[int] = (0,), top_k: int = 5, seed: int = 0, progress: ProgressFn | None = None,
                   cancel: CancelFlag | None = None, **train_kw) -> tuple[list[dict], list[BolukbasiPolicy]]:
    """The Bolukbasi front fitted on calibration `records`, never worse than a fixed threshold by
    construction and chosen on data its choices were not fitted on.

    Candidates, every one a `BolukbasiPolicy`: the shared threshold on every confidence measure
    (the reference; `from_thresholds`); the DyCE circular-search configuration of each of
    `dyce_lambdas` (per-exit thresholds, exits on or off: also `from_thresholds`); and the trained
    policy of each of `lambdas` at each score offset in `offsets` for each hidden width in `hidden`
    (0: linear; `train_bolukbasi` with `epochs` L-BFGS iterations and `train_kw`). The searched and trained candidates are cross-fitted
    (`out_of_fold`, `folds` folds): a candidate's point is what it does on each fold when fitted on
    the others, so its accuracy, cost and loss_se are estimates for new data, not its fit; its
    policy is then fitted on all `records`. `guarded_front` keeps those of them that beat the
    reference's front by more than `margin_z` standard errors at their cost, and the reference's
    points with the Pareto front of those are returned, cheapest first, with the policies aligned. Each point:
    origin ("threshold", "dyce" or "learned"), lambda / offset / measure / threshold where they
    apply, policy (to_json), accuracy, loss_se, flops, saved, in_sample {accuracy, flops} (the final
    policy on all `records`), folds. Raises Cancelled when cancelled."""
    num_classes = records.num_classes

    def candidates(fit: Records):
        for lam in dyce_lambdas:
            th = circular(fit, cost, float(lam))
            yield ("dyce", float(lam)), BolukbasiPolicy.from_thresholds(th.thresholds, th.measure, num_classes,
                                                                        top_k=top_k)
        for h in hidden:
            for lam in lambdas:
                trained = train_bolukbasi(fit, cost, float(lam), epochs=epochs, hidden=h, top_k=top_k, seed=seed,
                                          cancel=cancel, **train_kw)
                for offset in offsets:
                    policy = copy.deepcopy(trained)
                    policy.offset = float(offset)
                    yield ("learned", float(lam), float(offset), h), policy

    reference = _reference(records, cost, top_k)
    # every fold must leave samples to fit on and to score: with too few, the thresholds alone
    folds = min(folds, records.num_samples // 2)
    if folds < 2:
        return _threshold_only(reference)
    oof = out_of_fold(candidates, records, folds, seed=seed, stage="cross-fitting the Bolukbasi policy",
                      progress=progress, cancel=cancel)
    report(progress, cancel, "fitting the Bolukbasi policy on all calibration", 0, 1)
    final = dict(candidates(records))
    correct, rows = _correct(records), torch.arange(records.num_samples)
    found = []
    for key, exits in oof.items():
        policy = final[key]
        fields = {"origin": key[0], "lambda": key[1],
                  **({"offset": key[2], "hidden": key[3]} if key[0] == "learned" else {})}
        own = simulate(policy, records.logits)
        in_sample = exits_point(records, own, policy, cost)
        point = {**fields, **exits_point(records, exits, policy, cost),
                 "in_sample": {"accuracy": in_sample["accuracy"], "flops": in_sample["flops"]}, "folds": folds}
        found.append((point, policy, correct[rows, exits]))
    front = guarded_front([(p, r) for p, _, r in reference], [(p, r) for p, _, r in found], margin_z)
    policy_of = {id(p): q for p, q, _ in (*reference, *found)}
    for p in front:
        p["policy"] = policy_of[id(p)].to_json()
        if p["origin"] == "threshold":
            p["in_sample"] = {"accuracy": p["accuracy"], "flops": p["flops"]}
    report(progress, cancel, "fitting the Bolukbasi policy on all calibration", 1, 1)
    return front, [policy_of[id(p)].eval() for p in front]


def _threshold_only(reference) -> tuple[list[dict], list[BolukbasiPolicy]]:
    points = []
    for p, policy, _ in reference:
        points.append({**p, "policy": policy.to_json(), "in_sample": {"accuracy": p["accuracy"], "flops": p["flops"]}})
    return points, [policy.eval() for _, policy, _ in reference]


@register_trainer("bolukbasi", summary="a small classifier per exit (Bolukbasi et al. 2017), cross-fitted")
def fit_bolukbasi(records: Records, score_records: Records, cost: CostTable, *,
                  lambdas: Sequence[float] | None = None, epochs: int | None = None,
                  prototype_records: Records | None = None, progress: ProgressFn | None = None,
                  cancel: CancelFlag | None = None) -> tuple[list[dict], list[Policy]]:
    """The registered trainer: `crossfit_front` on `records` (the calibration split, which the
    points are also scored on, out of fold) over `lambdas` (default CROSSFIT_LAMBDAS) with `epochs`
    L-BFGS iterations (default CROSSFIT_EPOCHS). (`score_records` is `records` for this family,
    `prototype_records` is not used.)"""
    kw = {} if lambdas is None else {"lambdas": [float(x) for x in lambdas]}
    if epochs is not None:
        kw["epochs"] = int(epochs)
    return crossfit_front(records, cost, progress=progress, cancel=cancel, **kw)

"""Training the Bolukbasi policy (`engine.policies.bolukbasi`; Bolukbasi et al., ICML 2017). The
classifiers are trained bottom-up, from the deepest early exit to the first, as weighted binary
classification: for each sample, the loss of exiting now is compared with the loss it would get
by continuing under the later, already-trained classifiers plus λ × the extra compute (a fraction
of the full model's FLOPs). The better choice is the target, the size of the difference the
weight. λ sweeps the trade-off (`bolukbasi_front`, the registered trainer "bolukbasi").
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..cost import CostTable, with_policy_flops
from ..policies import Policy
from ..policies.bolukbasi import BolukbasiPolicy, evidence_features
from ..progress import CancelFlag, ProgressFn, report
from ..records import Records
from .registry import register_trainer
from .sweep import exit_losses, lambda_sweep

# λ values that span "accuracy first" to "compute first" when cost is a fraction of the full model.
DEFAULT_LAMBDAS = (0.0, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0)
# Score offsets tried per λ: the negative ones reach the accurate end of the front (see bolukbasi_front).
DEFAULT_OFFSETS = (-3.0, -2.0, -1.5, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5)


def records_evidence(records: Records, exit_index: int, top_k: int) -> torch.Tensor:
    """`evidence_features` at `exit_index` for every recorded sample, all exits before it evaluated
    (as the Bolukbasi policy evaluates every exit)."""
    return evidence_features([records.logits[:, j] for j in range(exit_index + 1)], top_k)


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
                    tune_bias: bool = True, seed: int = 0, progress: ProgressFn | None = None,
                    cancel: CancelFlag | None = None) -> BolukbasiPolicy:
    """Train a BolukbasiPolicy on `records` (calibrated logits of every exit on a held-out split).

    Bottom-up from exit E−2 to 0: with the classifiers after e trained, each sample's loss of
    exiting at e (0/1 error, or cross-entropy with loss="ce") is compared with the loss at the exit
    the later classifiers send it to plus lam × (the FLOPs continuing adds, including their
    decisions, / the full model's FLOPs). Target = exit where exiting is no worse, weight = the
    absolute difference; weighted logistic regression with `epochs` L-BFGS iterations, then (with
    `tune_bias`) the bias that minimises that objective exactly. Further `passes` repeat the sweep
    with each exit trained only on the samples the earlier exits now let through. Deterministic.
    Progress stage: "training policy". Raises ValueError for a negative lam, fewer than 2 exits or
    a cost table of another model, and Cancelled when cancelled.
    """
    if not lam >= 0:
        raise ValueError(f"lam (the price of compute) must be 0 or more, not {lam}")
    if passes < 1:
        raise ValueError(f"passes must be at least 1, not {passes}")
    num_exits, n = records.num_exits, records.num_samples
    if cost.num_exits != num_exits:
        raise ValueError(f"the cost table describes {cost.num_exits} exits but the records have {num_exits}")
    policy = BolukbasiPolicy(num_exits, records.num_classes, top_k=top_k, hidden=hidden, lam=lam, loss=loss)
    table = with_policy_flops(cost, policy)
    cum = torch.tensor(table.cumulative_flops(), dtype=torch.float64)  # (E,) cost of leaving at each exit
    losses = exit_losses(records, loss).double()  # (N, E)
    evidence = [records_evidence(records, e, policy.top_k) for e in range(num_exits - 1)]  # each (N, width)
    stops = torch.zeros(n, num_exits, dtype=torch.bool)  # current decisions; the last exit always answers
    stops[:, -1] = True
    rows = torch.arange(n)
    total, step = passes * (num_exits - 1), 0
    for p in range(passes):
        for e in range(num_exits - 2, -1, -1):
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


@register_trainer("bolukbasi", summary="a small classifier per exit (Bolukbasi et al. 2017)")
def fit_bolukbasi(records: Records, score_records: Records, cost: CostTable, *,
                  lambdas: Sequence[float] | None = None, epochs: int | None = None,
                  prototype_records: Records | None = None, progress: ProgressFn | None = None,
                  cancel: CancelFlag | None = None) -> tuple[list[dict], list[Policy]]:
    """The registered trainer: `bolukbasi_front` over `lambdas` (default DEFAULT_LAMBDAS) and
    DEFAULT_OFFSETS. (`epochs` and `prototype_records` are not used.)"""
    kw = {} if lambdas is None else {"lambdas": [float(x) for x in lambdas]}
    return bolukbasi_front(records, score_records, cost, return_policies=True, progress=progress, cancel=cancel, **kw)

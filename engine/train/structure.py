"""Training the category-structure policy (`engine.policies.structure`): end to end on recorded
exit outputs, with a differentiable cost-aware objective over the sequential halting
probabilities, λ trading expected loss against expected compute; the λ sweep over it
(`structure_front`, the registered trainer "structure"); and the novelty veto's cutoffs
(`fit_veto`), which the registered trainer gives every point of its front.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..cost import CostTable, with_policy_flops
from ..evaluate import _correct, full_model_point, operating_front, pareto, threshold_curve
from ..policies import MEASURES, Policy, simulate
from ..policies.structure import MEASURES as STRUCTURE_MEASURES, StructurePolicy
from ..progress import CancelFlag, ProgressFn, report
from ..records import Records
from .registry import register_trainer
from .sweep import exit_losses, exits_point, guarded_front, lambda_sweep

LOSSES = ("error", "ce")
GRADIENTS = ("surrogate", "plain")
STRUCTURE_LAMBDAS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
STRUCTURE_TAUS = (0.3, 0.5, 0.7)  # halting cut-offs the trainer tries per trained policy (no retraining)
# Part of the calibration records a structure policy is not trained on: its points are scored there,
# because its feature projection fits the rest closely enough to look ~3 points too good on CIFAR-10.
STRUCTURE_SELECT = 0.3
# How many standard errors a trained point must beat the fixed threshold by on the held-out part
# to stay on the front (`guarded_front`).
MARGIN_Z = 2.0
# The novelty veto (`fit_veto`): at the shallowest VETO_DEPTH of the early exits (at least one), an
# exit may fire only for inputs no more atypical than VETO_QUANTILE of the calibration images it
# fires on. Chosen with `engine.shift.choose_veto` on corrupted copies of the calibration images
# (never test): the shallow exits' confidence is what a pixel-level shift fools most, and there the
# deeper exits most often still answer right; deeper vetoes cost FLOPs the later exits do not repay.
VETO_QUANTILE = 0.5
VETO_DEPTH = 0.4
# How far (accuracy, 0..1) a vetoed front point may fall below the threshold front at its FLOPs
# on the held-out part of the calibration records before it keeps no veto (clean data must not pay).
VETO_CLEAN_LIMIT = 0.001


def log_halting_distribution(x: torch.Tensor) -> torch.Tensor:
    """log P(halt at e), (N, E), from the halting logits x (N, E−1), h = sigmoid(x), computed stably:
    P(halt at e) = h_e ∏_{j<e}(1 − h_j), the last exit taking the rest."""
    stay = torch.cumsum(F.logsigmoid(-x), dim=1)  # log ∏_{j<=e}(1 − h_j)
    before = torch.cat([torch.zeros_like(x[:, :1]), stay], dim=1)  # (N, E): log ∏_{j<e}(1 − h_j)
    return before + torch.cat([F.logsigmoid(x), torch.zeros_like(x[:, :1])], dim=1)


# -- training -------------------------------------------------------------------------------------
def train_structure_policy(records: Records, cost: CostTable, lam: float, *,
                           prototype_source: Records | None = None, epochs: int = 150, lr: float = 1e-2,
                           batch_size: int = 256, weight_decay: float = 1e-4, loss: str = "error",
                           gradient: str = "surrogate", holdout: float = 0.2, proj_dim: int = 16, hidden: int = 32,
                           tau: float = 0.5, proto_temperature: float = 0.1, init: StructurePolicy | None = None,
                           progress: ProgressFn | None = None, cancel: CancelFlag | None = None,
                           seed: int = 0) -> StructurePolicy:
    """Train a StructurePolicy on recorded exits (held-out `records` with features) for trade-off `lam`.

    Prototypes, feature centre and scale come from `prototype_source` (a TRAINING-split recording;
    default `records`). Objective, minimised with Adam over shuffled mini-batches:
        mean_n Σ_e P_n(halt at e) · (loss_n,e + lam · cost_e / full cost),
    P(halt at e) = h_e ∏_{j<e}(1 − h_j) (the last exit takes the rest), loss = 0/1 error or CE of the
    exit's calibrated logits, cost_e = cumulative FLOPs to exit e with this policy's own FLOPs counted.
    `gradient`: "surrogate" (default) follows the objective's gradient with the sigmoid's saturation
    divided out (see `_surrogate`), "plain" its own gradient (it tends to stick at "never exit").
    A `holdout` fraction of `records` is not trained on: the parameters of the epoch whose decisions
    score best on it are kept (early stopping: the feature projection memorises small records).
    `init` starts training from a copy of that policy (e.g. `StructurePolicy.from_thresholds`, the
    best fixed threshold for this λ: `threshold_start`) instead of random weights; its sizes win over
    proj_dim, hidden, tau and proto_temperature. The starting point is scored on the held-out part
    too (epoch 0), so training keeps it unless an epoch beats it there.
    Same seed, same policy. Returns the policy in eval mode. Raises ValueError for records without
    features or a cost table of another model, Cancelled when `cancel` is set.
    """
    if not records.features:
        raise ValueError("a structure policy needs the pooled features: record with with_features=True")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient {gradient!r}; choose one of {', '.join(GRADIENTS)}")
    if lam < 0 or epochs < 1:
        raise ValueError(f"lam must be >= 0 and epochs >= 1, got lam={lam}, epochs={epochs}")
    if cost.num_exits != records.num_exits:
        raise ValueError(f"the cost table describes {cost.num_exits} exits but the records have {records.num_exits}")
    source = prototype_source if prototype_source is not None else records
    if not source.features or source.num_exits != records.num_exits:
        raise ValueError("the prototype source must be a recording of the same exits, with features")
    widths = [int(f.shape[1]) for f in records.features]
    info = {"lambda": float(lam), "loss": loss, "epochs": int(epochs), "lr": float(lr), "gradient": gradient,
            "holdout": float(holdout), "seed": int(seed)}
    if init is not None:
        if init.feature_widths != widths or init.num_classes != records.num_classes:
            raise ValueError(f"the starting policy was built for widths {init.feature_widths} and {init.num_classes} "
                             f"classes, the records have {widths} and {records.num_classes}")
        policy = copy.deepcopy(init).train()
        policy.info = {**info, "init": init.info.get("origin", "given")}
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            policy = StructurePolicy(widths, records.num_classes, proj_dim=proj_dim, hidden=hidden, tau=tau,
                                     proto_temperature=proto_temperature, info=info)
    policy.set_prototypes(source.features, source.labels)
    table = with_policy_flops(cost, policy)
    step_cost = torch.tensor(table.cumulative_flops(), dtype=torch.float32) / table.full_flops  # (E,)
    target = exit_losses(records, loss) + lam * step_cost  # (N, E): what halting at e costs each sample
    with torch.no_grad():  # the measures and standardised features are fixed: compute them once
        fixed = [policy.fixed_inputs(e, [records.logits[:, j] for j in range(e + 1)], records.features[e])
                 for e in range(records.num_exits - 1)]
    if not fixed:  # a single exit: nothing to decide
        return policy.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers: more threads only add overhead on a shared CPU
    try:
        _fit(policy, fixed, target, lam=lam, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
             gradient=gradient, holdout=holdout, seed=seed, progress=progress, cancel=cancel)
    finally:
        torch.set_num_threads(threads)
    return policy.eval()


def _surrogate(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient is the expected objective's with the sigmoid's saturation divided out.

    d E[target] / d x_e = S_e · h_e(1 − h_e) · Δ_e, with S_e = P(reach e) and Δ_e = target_e − V_{e+1}
    (V_{e+1}: expected target of going on under the current policy). Once h saturates that gradient
    vanishes, and the policy sticks where the first steps pushed it (usually: never exit). The
    weighted logistic loss S_e·|Δ_e|·BCE(x_e, [Δ_e < 0]) (S, Δ held fixed) has the gradient
    S_e·|Δ_e|·(h_e − [Δ_e < 0]): the same sign everywhere, divided by h_e or 1 − h_e; so its
    decisions h_e >= 0.5 converge to the cost-optimal ones. x: (B, E−1) logits; target (B, E)."""
    h = torch.sigmoid(x.detach())
    value = target[:, -1]
    terms = []
    for e in range(x.shape[1] - 1, -1, -1):  # bottom-up: the value of going on needs the later exits
        delta = target[:, e] - value
        terms.append((e, delta))
        value = h[:, e] * target[:, e] + (1.0 - h[:, e]) * value
    reach = torch.cumprod(torch.cat([torch.ones_like(h[:, :1]), 1.0 - h[:, :-1]], dim=1), dim=1)  # (B, E−1)
    loss = 0.0
    for e, delta in terms:
        bce = F.binary_cross_entropy_with_logits(x[:, e], (delta < 0).float(), reduction="none")
        loss = loss + (reach[:, e] * delta.abs() * bce).mean()
    return loss


def _fit(policy: StructurePolicy, fixed: list, target: torch.Tensor, *, lam: float, epochs: int, lr: float,
         batch_size: int, weight_decay: float, gradient: str, holdout: float, seed: int,
         progress: ProgressFn | None, cancel: CancelFlag | None) -> None:
    """Minimise the expected objective over `target` (N, E) with Adam (`gradient` "surrogate": see
    `_surrogate`; "plain": its own gradient); keep the parameters of the epoch whose decisions
    (h >= tau) have the lowest mean target on a held-out `holdout` fraction of the samples."""
    n = target.shape[0]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    n_out = int(round(holdout * n)) if n >= 10 else 0
    fit_idx, out_idx = order[n_out:], order[:n_out]

    def logits(idx):  # (B, E−1) halting logits
        return torch.stack([policy.halting_logit(e, s[idx], m[idx]) for e, (s, m) in enumerate(fixed)], 1)

    def held_out() -> float:
        policy.eval()
        with torch.no_grad():
            exits = _first_exit(torch.sigmoid(logits(out_idx)), policy.tau)
            return target[out_idx].gather(1, exits[:, None]).mean().item()

    opt = torch.optim.Adam(policy.parameters(), lr=lr, weight_decay=weight_decay)
    best_score, best_state, best_epoch = math.inf, None, epochs
    if n_out:  # the starting point is a candidate too (epoch 0): training must beat it on held-out data
        best_score, best_state, best_epoch = held_out(), copy.deepcopy(policy.state_dict()), 0
    for epoch in range(epochs):
        policy.train()
        total = 0.0
        for idx in fit_idx[torch.randperm(fit_idx.numel(), generator=generator)].split(batch_size):
            x = logits(idx)
            objective = (log_halting_distribution(x).exp() * target[idx]).sum(1).mean()
            loss = _surrogate(x, target[idx]) if gradient == "surrogate" else objective
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += objective.item() * idx.numel()
        message = f"λ {lam:g}: expected objective {total / max(fit_idx.numel(), 1):.4f}"
        if n_out:
            score = held_out()
            message += f", held out {score:.4f}"
            if score < best_score:
                best_score, best_epoch = score, epoch + 1
                best_state = copy.deepcopy(policy.state_dict())
        report(progress, cancel, "training structure policy", epoch + 1, epochs, message)
    if best_state is not None:
        policy.load_state_dict(best_state)
    policy.info.update(objective=total / max(fit_idx.numel(), 1), best_epoch=best_epoch,
                       held_out_objective=best_score if n_out else None)


def structure_exits(policy: StructurePolicy, records: Records) -> torch.Tensor:
    """(N,) exit each sample takes, computed the training way (all samples at once): the first
    early exit that fires (h >= tau, not vetoed), else the last. Equals `simulate(policy, ...)`."""
    with torch.no_grad():
        return _first_exit(policy.exit_decisions(records.logits, records.features).float(), 0.5)


def _first_exit(h: torch.Tensor, tau: float) -> torch.Tensor:
    """(N,) the first early exit with h >= tau (h: (N, E−1)), else the last exit E−1."""
    stop = torch.cat([h >= tau, torch.ones(h.shape[0], 1, dtype=torch.bool, device=h.device)], dim=1)
    return stop.float().argmax(dim=1)  # argmax returns the first maximum


# -- the novelty veto -----------------------------------------------------------------------------
def veto_exits(num_exits: int, depth: float = VETO_DEPTH) -> list[int]:
    """The shallowest `depth` share of the early exits of a `num_exits`-exit model, at least one
    (none when there is no early exit)."""
    early = num_exits - 1
    return list(range(min(early, max(1, round(depth * early))))) if early > 0 else []


def fit_veto(policy: StructurePolicy, records: Records, quantile: float = VETO_QUANTILE,
             exits: Sequence[int] | None = None) -> StructurePolicy:
    """Set `policy`'s novelty veto from clean calibration `records` (with features; prototypes
    already set) and return it: at each of `exits` (default `veto_exits`) the cutoff is the
    `quantile` of the atypicality (1 − sim_top1) of the samples whose halting fires there (h >= tau,
    whatever earlier exits did), so the exit keeps firing for that share of the calibration images
    it fired for; no veto at the other exits, nor where nothing fires. Raises ValueError for
    records without features or a quantile outside (0, 1]."""
    if not records.features:
        raise ValueError("a novelty veto needs the pooled features: record with with_features=True")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"the veto quantile must be in (0, 1], not {quantile}")
    exits = veto_exits(policy.num_exits) if exits is None else list(exits)
    column = STRUCTURE_MEASURES.index("sim_top1")
    cutoffs: list[float | None] = [None] * (policy.num_exits - 1)
    with torch.no_grad():
        for e in exits:
            std, m = policy.fixed_inputs(e, [records.logits[:, j] for j in range(e + 1)], records.features[e])
            fires = torch.sigmoid(policy.halting_logit(e, std, m)) >= policy.tau
            if fires.any():
                cutoffs[e] = float(torch.quantile(1.0 - m[fires, column].double(), quantile))
    policy.veto = cutoffs
    policy.info["veto"] = {"quantile": float(quantile), "exits": [e for e in exits if cutoffs[e] is not None]}
    return policy


def with_veto(points: Sequence[dict], policies: Sequence[StructurePolicy], records: Records,
              score_records: Records, cost: CostTable, reference: Sequence[dict], *,
              quantile: float = VETO_QUANTILE, exits: Sequence[int] | None = None,
              limit: float = VETO_CLEAN_LIMIT) -> tuple[list[dict], list[StructurePolicy]]:
    """Each front point's policy with a novelty veto fitted on `records` (`fit_veto`), kept where on
    `score_records` (clean, held out of the fitting) it falls no more than `limit` below the
    `reference` front (the fixed thresholds' points there, read between them by straight lines) at
    its FLOPs; elsewhere the point stays as it was. Returns (points, policies), cheapest first,
    the points re-scored (a vetoed one says "veto": its cutoffs)."""
    front = pareto(reference)
    xs, ys = [p["flops"] for p in front], [p["accuracy"] for p in front]
    out = []
    for point, policy in zip(points, policies):
        vetoed = fit_veto(copy.deepcopy(policy), records, quantile, exits).eval()
        if any(v is not None for v in vetoed.veto):
            exits_taken = simulate(vetoed, score_records.logits, score_records.features)
            scored = exits_point(score_records, exits_taken, vetoed, cost)
            if scored["accuracy"] >= float(np.interp(scored["flops"], xs, ys)) - limit:
                point = {**point, **scored, "policy": vetoed.to_json(), "veto": vetoed.veto}
                policy = vetoed
        out.append((point, policy))
    out.sort(key=lambda pp: pp[0]["flops"])
    return [p for p, _ in out], [q for _, q in out]


# -- the λ sweep ----------------------------------------------------------------------------------
def structure_front(records_train: Records, records_eval: Records, cost: CostTable,
                    lambdas: Sequence[float] = STRUCTURE_LAMBDAS, *, taus: Sequence[float] = (0.5,),
                    prototype_source: Records | None = None, pareto_only: bool = False,
                    return_policies: bool = False, warm_start: bool = False, progress: ProgressFn | None = None,
                    cancel: CancelFlag | None = None, **train_kw):
    """`lambda_sweep` of `train_structure_policy` on `records_train` (prototypes from
    `prototype_source`), each policy scored at every tau on `records_eval`; with `warm_start`, each
    λ's training starts from the best fixed threshold for that λ (`threshold_start`).

    Points, in the order of lambdas then taus (with `pareto_only`: the Pareto front, cheapest
    first), like `threshold_curve`'s: lambda, tau, policy (to_json), accuracy, flops (mean), saved,
    [ms, speedup when `cost` has latency]. With `return_policies`, returns (points, policies) with
    one trained policy per point (tau set).
    Raises Cancelled when `cancel` is set.
    """
    def variants(trained: StructurePolicy):
        for t in taus:
            policy = copy.deepcopy(trained)
            policy.tau = t
            yield {"tau": float(t)}, policy.eval()

    def train(lam: float) -> StructurePolicy:
        init = threshold_start(records_train, cost, lam, **{k: train_kw[k] for k in ("proj_dim", "hidden")
                                                           if k in train_kw}) if warm_start else None
        return train_structure_policy(records_train, cost, lam, prototype_source=prototype_source, cancel=cancel,
                                      init=init, **train_kw)

    points, policies = lambda_sweep(train, records_eval, cost, lambdas, variants=variants, pareto_only=pareto_only,
                                    stage="structure front", progress=progress, cancel=cancel)
    return (points, policies) if return_policies else points


def threshold_start(records: Records, cost: CostTable, lam: float, measure: str = "max_prob",
                    **kw) -> StructurePolicy:
    """The shared threshold on `measure` that minimises error + `lam` × cost / full cost on
    `records` (the full model among the choices), as a structure policy
    (`StructurePolicy.from_thresholds`; `kw`: its sizes): where training for `lam` starts."""
    points = [*threshold_curve(records, cost, measure), full_model_point(records, cost, measure)]
    best = max(points, key=lambda p: p["accuracy"] - lam * p["flops"] / cost.full_flops)
    widths = [int(f.shape[1]) for f in records.features]
    return StructurePolicy.from_thresholds(best["policy"]["thresholds"], measure, widths, records.num_classes, **kw)


def threshold_reference(records: Records, score_records: Records, cost: CostTable, prototype_source: Records
                        ) -> list[tuple[dict, StructurePolicy, torch.Tensor]]:
    """The shared threshold's front over every confidence measure, swept on `records` and
    `score_records` together (the whole calibration split: the threshold method's front), each
    configuration written as a structure policy (`StructurePolicy.from_thresholds`, prototypes
    from `prototype_source`) and scored as one on `score_records`: (point, policy, per-sample
    correctness)."""
    whole = Records(torch.cat([records.logits, score_records.logits]), [], torch.cat([records.labels,
                    score_records.labels]), records.class_names, records.exit_stages)
    widths = [int(f.shape[1]) for f in records.features]
    correct, rows = _correct(score_records), torch.arange(score_records.num_samples)
    out = []
    for p in pareto([p for m in MEASURES for p in operating_front(whole, cost, m)]):  # the threshold method's front
        measure = p["policy"]["measure"]
        policy = StructurePolicy.from_thresholds(p["policy"]["thresholds"], measure, widths, records.num_classes)
        policy.set_prototypes(prototype_source.features, prototype_source.labels).eval()
        exits = simulate(policy, score_records.logits, score_records.features)
        point = {"origin": "threshold", "measure": measure, "threshold": p["threshold"],
                 **exits_point(score_records, exits, policy, cost)}
        out.append((point, policy, correct[rows, exits]))
    return out


@register_trainer("structure", summary="a network on features + class-prototype measures",
                  select_fraction=STRUCTURE_SELECT, uses_prototypes=True)
def fit_structure(records: Records, score_records: Records, cost: CostTable, *,
                  lambdas: Sequence[float] | None = None, epochs: int | None = None,
                  prototype_records: Records | None = None, progress: ProgressFn | None = None,
                  cancel: CancelFlag | None = None) -> tuple[list[dict], list[Policy]]:
    """The registered trainer: `structure_front` over `lambdas` (default STRUCTURE_LAMBDAS) and
    STRUCTURE_TAUS, `epochs` per λ, each λ started from its best fixed threshold, prototypes from
    `prototype_records` (default `records`); then `guarded_front` with the fixed thresholds written
    as structure policies (`threshold_reference`): a trained point stays only where it beats them
    on `score_records` by more than MARGIN_Z standard errors; then every point gets the novelty
    veto where it costs clean data no more than VETO_CLEAN_LIMIT on `score_records` (`with_veto`).
    The front, cheapest first; each point has origin "threshold" or "learned"."""
    kw = {} if epochs is None else {"epochs": int(epochs)}
    source = prototype_records if prototype_records is not None else records
    points, policies = structure_front(records, score_records, cost, list(lambdas or STRUCTURE_LAMBDAS),
                                       taus=STRUCTURE_TAUS, prototype_source=source, pareto_only=False,
                                       return_policies=True, warm_start=True, progress=progress, cancel=cancel,
                                       **kw)
    correct, rows = _correct(score_records), torch.arange(score_records.num_samples)
    learned = []
    for p, policy in zip(points, policies):
        exits = simulate(policy, score_records.logits, score_records.features)
        learned.append(({"origin": "learned", **p}, policy, correct[rows, exits]))
    reference = threshold_reference(records, score_records, cost, source)
    front = guarded_front([(p, r) for p, _, r in reference], [(p, r) for p, _, r in learned], MARGIN_Z)
    policy_of = {id(p): q for p, q, _ in (*reference, *learned)}
    for p in front:
        p.setdefault("policy", policy_of[id(p)].to_json())
    return with_veto(front, [policy_of[id(p)].eval() for p in front], records, score_records, cost,
                     [p for p, _, _ in reference])

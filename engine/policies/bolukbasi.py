"""Learned early-exit policy after Bolukbasi et al., "Adaptive Neural Networks for Efficient
Inference" (ICML 2017): at every early exit a small binary classifier (linear, or a tiny MLP)
reads class-agnostic evidence and says exit-vs-continue. The classifiers are trained bottom-up,
from the deepest early exit to the first, as weighted binary classification: for each sample, the
loss of exiting now is compared with the loss it would get by continuing under the later,
already-trained classifiers plus λ × the extra compute (a fraction of the full model's FLOPs).
The better choice is the target, the size of the difference the weight. λ sweeps the trade-off.

Read top to bottom: the evidence vector (one function for training and inference), the policy,
its cost, training, and the λ sweep.
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cost import CostTable, measure_policy_flops
from ..model import Evidence
from ..progress import CancelFlag, ProgressFn, report
from .base import Policy, linear_stack, one_frame, register_policy, softmax_row
from .threshold import ThresholdPolicy

if TYPE_CHECKING:
    from ..evaluate import Records
    from ..model import MultiExitNet

LOSSES = ("error", "ce")
# λ values that span "accuracy first" to "compute first" when cost is a fraction of the full model.
DEFAULT_LAMBDAS = (0.0, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0)
# Score offsets tried per λ: the negative ones reach the accurate end of the front (see bolukbasi_front).
DEFAULT_OFFSETS = (-3.0, -2.0, -1.5, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5)
_EXTRA = ("entropy", "margin", "max_logodds", "agree_prev", "prev_max_prob", "prev_prob_of_top", "agree_frac")


# -- evidence -------------------------------------------------------------------------------------
def evidence_width(num_classes: int, top_k: int) -> int:
    """Length of the evidence vector for `num_classes` classes and `top_k` sorted probabilities."""
    return min(top_k, num_classes) + len(_EXTRA)


def evidence_features(logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """(batch, evidence_width) class-agnostic evidence at the exit whose logits come last in `logits`
    (the calibrated logits of the exits evaluated so far, each (batch, classes)).

    Columns: the top_k sorted probabilities (the first is the max-prob), normalised entropy,
    margin (top-1 − top-2), log-odds of the max-prob, then agreement with earlier exits: does the
    previous exit's argmax agree, its max-prob, its probability of this exit's top class, and the
    fraction of all earlier exits that agree (all 0 at the first exit). Training (from Records)
    and inference (from Evidence) both call this, so the two cannot drift apart. No matrix
    products: the FLOP counter sees only the classifier.
    """
    cur = logits[-1].float().contiguous()
    p = torch.softmax(cur, dim=-1)  # (batch, classes)
    k = p.shape[-1]
    top = p.topk(min(top_k, k), dim=-1).values  # (batch, k) sorted, best first
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1) / (math.log(k) if k > 1 else 1.0)
    margin = top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0.0)
    p1 = top[:, 0].clamp(1e-7, 1.0 - 1e-7)
    logodds = torch.log(p1) - torch.log1p(-p1)  # resolves 0.99 from 0.9999, where max-prob cannot
    cls = p.argmax(dim=-1, keepdim=True)  # (batch, 1)
    zeros = torch.zeros_like(p1)
    agree_prev, prev_max, prev_top, agree_frac = zeros, zeros, zeros, zeros
    if len(logits) > 1:
        prev = torch.softmax(logits[-2].float().contiguous(), dim=-1)
        agree_prev = (prev.argmax(dim=-1, keepdim=True) == cls).squeeze(-1).float()
        prev_max = prev.max(dim=-1).values
        prev_top = prev.gather(-1, cls).squeeze(-1)
        agree = [(l.float().argmax(dim=-1, keepdim=True) == cls).squeeze(-1).float() for l in logits[:-1]]
        agree_frac = torch.stack(agree, dim=-1).mean(dim=-1)
    extra = torch.stack([entropy, margin, logodds, agree_prev, prev_max, prev_top, agree_frac], dim=-1)
    return torch.cat([top, extra], dim=-1)


def evidence_features_one(logits: Sequence[np.ndarray], top_k: int) -> np.ndarray:
    """`evidence_features` of one sample, from its logits rows (each (classes,) float32), in numpy.

    The live case decides for one frame at a time, where each of the ~25 tiny torch operations of
    the batched version costs more than its arithmetic; this computes the same columns in the same
    float32 (tests hold the two together).
    """
    cur = logits[-1]
    p = softmax_row(cur)
    k = p.shape[0]
    top = -np.sort(-p)[:min(top_k, k)]
    entropy = -(p * np.log(np.maximum(p, np.float32(1e-12)))).sum() / np.float32(math.log(k) if k > 1 else 1.0)
    margin = top[0] - (top[1] if top.shape[0] > 1 else np.float32(0.0))
    p1 = np.clip(top[0], np.float32(1e-7), np.float32(1.0 - 1e-7))
    logodds = np.log(p1) - np.log1p(-p1)
    cls = int(p.argmax())
    agree_prev = prev_max = prev_top = agree_frac = 0.0
    if len(logits) > 1:
        prev = softmax_row(logits[-2])
        agree_prev = float(int(prev.argmax()) == cls)
        prev_max, prev_top = prev.max(), prev[cls]
        agree_frac = sum(int(row.argmax()) == cls for row in logits[:-1]) / (len(logits) - 1)
    extra = np.array([entropy, margin, logodds, agree_prev, prev_max, prev_top, agree_frac], dtype=np.float32)
    return np.concatenate([top.astype(np.float32), extra])


_P_LOW, _P_HIGH = float(np.float32(1e-7)), float(np.float32(1.0 - 1e-7))  # the float32 clamp of the batched version


def evidence_row(row: Sequence[float], top_k: int, classes: Sequence[int],
                 previous: tuple[list[float], float] | None) -> tuple[list[float], tuple[list[float], float], int]:
    """`evidence_features` of one sample in plain Python floats, from its logits `row` at this exit,
    the argmax of every exit evaluated before it (`classes`) and what this returned at the one
    just before (`previous`, None at the first). Returns (features, this exit's softmax numerators
    and their sum, its argmax). The prepared batch-1 path (engine.prepared) uses it for a few
    classes, where it costs less than one numpy call per column; tests hold it to
    `evidence_features` (entropy as log-sum-exp − E[logit], equal but for p < 1e-12)."""
    m = max(row)
    cls = row.index(m)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    k = len(row)
    top = [v / s for v in sorted(e, reverse=True)[:min(top_k, k)]]
    entropy = (math.log(s) + m - sum(map(operator.mul, e, row)) / s) / (math.log(k) if k > 1 else 1.0)
    p1 = min(max(top[0], _P_LOW), _P_HIGH)
    f = top + [entropy, top[0] - (top[1] if len(top) > 1 else 0.0), math.log(p1) - math.log1p(-p1)]
    if previous is None:
        f += [0.0, 0.0, 0.0, 0.0]
    else:
        prev, total = previous
        f += [float(classes[-1] == cls), 1.0 / total, prev[cls] / total, classes.count(cls) / len(classes)]
    return f, (e, s), cls


def records_evidence(records: "Records", exit_index: int, top_k: int) -> torch.Tensor:
    """`evidence_features` at `exit_index` for every recorded sample, all exits before it evaluated
    (as the Bolukbasi policy evaluates every exit)."""
    return evidence_features([records.logits[:, j] for j in range(exit_index + 1)], top_k)


# -- the policy -----------------------------------------------------------------------------------
def _make_classifier(width: int, hidden: int) -> nn.Module:
    if hidden > 0:
        return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    return nn.Linear(width, 1)


@register_policy
class BolukbasiPolicy(Policy):
    """One small binary classifier per early exit on `evidence_features`; a sample exits where
    score + offset > 0 (sigmoid(score) > 0.5 for offset 0). Every exit is evaluated."""

    kind = "bolukbasi"

    def __init__(self, num_exits: int, num_classes: int, *, top_k: int = 5, hidden: int = 0, offset: float = 0.0,
                 lam: float | None = None, loss: str = "error"):
        super().__init__()
        if num_exits < 2:
            raise ValueError(f"a Bolukbasi policy needs at least 2 exits, not {num_exits}")
        if top_k < 1 or hidden < 0:
            raise ValueError(f"top_k must be at least 1 and hidden at least 0, got top_k={top_k}, hidden={hidden}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        if not math.isfinite(float(offset)):
            raise ValueError(f"offset must be a finite number, got {offset}")
        self.num_exits, self.num_classes = int(num_exits), int(num_classes)
        self.top_k, self.hidden, self.offset = int(top_k), int(hidden), float(offset)
        self.lam, self.loss = (None if lam is None else float(lam)), loss
        self.width = evidence_width(self.num_classes, self.top_k)
        self.classifiers = nn.ModuleList(_make_classifier(self.width, self.hidden) for _ in range(num_exits - 1))

    def active_exits(self, num_exits: int) -> list[bool]:
        if num_exits != self.num_exits:
            raise ValueError(f"this Bolukbasi policy was built for {self.num_exits} exits, the model has {num_exits}")
        return [True] * num_exits

    def exit_now(self, exit_index: int, x: torch.Tensor) -> torch.Tensor:
        """(batch,) bool from evidence vectors x (batch, width) at early exit `exit_index`."""
        net = self.classifiers[exit_index]
        weight = next(net.parameters())
        score = net(x.to(weight.device, weight.dtype)).squeeze(-1)  # (batch,)
        return score + self.offset > 0

    def decide(self, evidence: Evidence) -> torch.Tensor:
        e = evidence.exit_index
        if e >= self.num_exits - 1:  # run() never asks at the last exit; it always answers
            return torch.ones(evidence.current.shape[0], dtype=torch.bool, device=evidence.current.device)
        if one_frame(evidence):
            rows = [l[0].float().numpy() for l in evidence.logits]
            net = self.classifiers[e]
            layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
            score = linear_stack(layers, self, f"classifier{e}", evidence_features_one(rows, self.top_k))
            return torch.tensor([bool(score[0] + self.offset > 0)])
        return self.exit_now(e, evidence_features(evidence.logits, self.top_k)).to(evidence.current.device)

    def decision_flops(self) -> list[float]:
        """FLOPs of one decision at every exit, from the layer sizes (a multiply-add counts 2, as
        engine.cost counts them); 0 at the last exit."""
        if self.hidden > 0:
            per = 2.0 * self.width * self.hidden + 2.0 * self.hidden
        else:
            per = 2.0 * self.width
        return [per] * (self.num_exits - 1) + [0.0]

    def to_json(self) -> dict:
        return {"kind": self.kind, "num_exits": self.num_exits, "num_classes": self.num_classes,
                "top_k": self.top_k, "hidden": self.hidden, "width": self.width, "offset": self.offset,
                "lambda": self.lam, "loss": self.loss}

    @classmethod
    def from_json(cls, d: dict, *, num_exits: int, num_classes: int) -> "BolukbasiPolicy":
        """Rebuild with fresh classifiers (load the tensors afterwards). ValueError when the entry was
        made for another number of exits or classes."""
        if int(d.get("num_exits", num_exits)) != num_exits:
            raise ValueError(f"the Bolukbasi policy was trained for {d['num_exits']} exits, the model has {num_exits}")
        if int(d.get("num_classes", num_classes)) != num_classes:
            raise ValueError(f"the Bolukbasi policy was trained for {d['num_classes']} classes, "
                             f"the model has {num_classes}")
        p = cls(num_exits, num_classes, top_k=int(d.get("top_k", 5)), hidden=int(d.get("hidden", 0)),
                offset=float(d.get("offset", 0.0)), lam=d.get("lambda"), loss=d.get("loss", "error"))
        if "width" in d and int(d["width"]) != p.width:
            raise ValueError(f"the Bolukbasi policy's evidence width {d['width']} does not match {p.width} "
                             f"({num_classes} classes, top_k {p.top_k})")
        return p

    def describe(self) -> str:
        net = f"MLP({self.hidden})" if self.hidden else "linear"
        lam = "" if self.lam is None else f", λ={self.lam:g}"
        return f"Bolukbasi learned policy ({net}{lam})"


# -- cost -----------------------------------------------------------------------------------------
def with_policy_flops(cost: CostTable, policy: Policy, model: "MultiExitNet | None" = None) -> CostTable:
    """A copy of `cost` whose policy_flops are `policy`'s decision FLOPs at every exit: measured
    with engine.cost.measure_policy_flops when `model` is given, else from the policy's own
    `decision_flops()` (layer sizes); threshold and evaluation-only policies cost 0.

    Raises ValueError when neither a model nor an analytic count is available, or the sizes differ.
    """
    n = cost.num_exits
    if model is not None:
        flops = measure_policy_flops(policy, model)
    elif hasattr(policy, "decision_flops"):
        flops = list(policy.decision_flops())
    elif isinstance(policy, ThresholdPolicy) or policy.evaluation_only:
        flops = [0.0] * n
    else:
        raise ValueError(f"cannot count the FLOPs of a {policy.kind!r} policy without its model: pass model=")
    if len(flops) != n:
        raise ValueError(f"the policy decides at {len(flops)} exits but the cost table has {n}")
    return replace(cost, policy_flops=[float(f) for f in flops])


# -- training -------------------------------------------------------------------------------------
def _exit_losses(records: "Records", loss: str) -> torch.Tensor:
    """(N, E) loss of answering at each exit: 0/1 error or cross-entropy."""
    logits, y = records.logits.float(), records.labels.long()
    if loss == "error":
        return (logits.argmax(dim=-1) != y[:, None]).float()
    n, e, k = logits.shape
    return F.cross_entropy(logits.reshape(n * e, k), y.repeat_interleave(e), reduction="none").reshape(n, e)


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


def train_bolukbasi(records: "Records", cost: CostTable, lam: float, *, hidden: int = 0, top_k: int = 5,
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
    losses = _exit_losses(records, loss).double()  # (N, E)
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
def bolukbasi_front(records_train: "Records", records_eval: "Records", cost: CostTable,
                    lambdas: Sequence[float] = DEFAULT_LAMBDAS, *, offsets: Sequence[float] = DEFAULT_OFFSETS,
                    pareto_only: bool = True, return_policies: bool = False, progress: ProgressFn | None = None,
                    cancel: CancelFlag | None = None, **train_kw):
    """Train one policy per λ on `records_train`, score it with engine.evaluate.evaluate_policy on
    `records_eval` (its decision FLOPs in the cost) once per offset in `offsets` (a negative offset
    makes every exit more reluctant: it reaches the accurate end of the front that small λ alone
    may not, when the training split makes early exits look better than they are), and return
    the points, cheapest first.

    Each point: lambda, offset, policy (to_json), accuracy, flops (mean), saved, [ms, speedup when
    `cost` has latency] — like engine.evaluate.threshold_curve's points. `pareto_only` keeps the
    Pareto front; `return_policies` returns (points, policies) with the policies aligned.
    `train_kw` goes to train_bolukbasi (hidden, top_k, loss, epochs, ...).
    """
    from ..evaluate import evaluate_policy, pareto  # engine.evaluate imports the policies package

    pairs = []
    for i, lam in enumerate(lambdas):
        report(progress, cancel, "training policies", i, len(lambdas), f"λ = {lam:g}")
        trained = train_bolukbasi(records_train, cost, float(lam), **train_kw)
        table = with_policy_flops(cost, trained)
        for offset in offsets:
            policy = copy.deepcopy(trained)
            policy.offset = float(offset)
            ev = evaluate_policy(records_eval, policy, table)
            point = {"lambda": float(lam), "offset": float(offset), "policy": policy.to_json(),
                     "accuracy": ev["accuracy"], "flops": ev["mean_flops"], "saved": ev["saved"]}
            if "mean_ms" in ev:
                point.update(ms=ev["mean_ms"], speedup=ev["speedup"])
            pairs.append((point, policy))
    report(progress, cancel, "training policies", len(lambdas), len(lambdas))
    pairs.sort(key=lambda pp: (pp[0]["flops"], -pp[0]["accuracy"]))
    if pareto_only:
        keep = {id(p) for p in pareto([pt for pt, _ in pairs])}
        pairs = [pp for pp in pairs if id(pp[0]) in keep]
    points = [pt for pt, _ in pairs]
    return (points, [p for _, p in pairs]) if return_policies else points

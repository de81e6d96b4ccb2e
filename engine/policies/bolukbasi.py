"""Learned early-exit policy after Bolukbasi et al., "Adaptive Neural Networks for Efficient
Inference" (ICML 2017): at every early exit a small binary classifier (linear, or a tiny MLP)
reads class-agnostic evidence and says exit-vs-continue. (Its training, bottom-up as weighted
binary classification, and the λ sweep: `engine.train.bolukbasi`.)

Read top to bottom: the evidence vector (one function for training and inference, with its
one-frame numpy and Python-float forms), the policy, its fast rows for the prepared path.
"""
from __future__ import annotations

import math
import operator
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .base import ROW_CLASSES, Evidence, Policy, linear_stack, one_frame, register_policy, softmax_row

LOSSES = ("error", "ce")  # what the training compares (engine.train.bolukbasi); kept in the manifest
ORIGINS = ("learned", "threshold")  # how a policy's classifiers were set (see BolukbasiPolicy.from_thresholds)
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


# confidence measure -> (its column among the extra evidence columns, 0 for the top-1 probability; sign)
_MEASURE_COLUMN = {"max_prob": (0, 1.0), "entropy": (1, -1.0), "margin": (2, 1.0)}


# -- the policy -----------------------------------------------------------------------------------
def _make_classifier(width: int, hidden: int) -> nn.Module:
    if hidden > 0:
        return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    return nn.Linear(width, 1)


@register_policy
class BolukbasiPolicy(Policy):
    """One small binary classifier per early exit on `evidence_features`; a sample exits where
    score + offset >= 0 (sigmoid(score) >= 0.5 for offset 0). `active` says which early exits are
    evaluated at all (default: every one; an inactive exit's head never runs and it decides
    nothing), so every DyCE configuration, and with it every fixed threshold, is a special case:
    `from_thresholds` builds it exactly."""

    kind = "bolukbasi"

    def __init__(self, num_exits: int, num_classes: int, *, top_k: int = 5, hidden: int = 0, offset: float = 0.0,
                 lam: float | None = None, loss: str = "error", active: Sequence[bool] | None = None,
                 origin: str = "learned"):
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
        if active is not None and len(active) not in (num_exits - 1, num_exits):
            raise ValueError(f"active must say for each of the {num_exits - 1} early exits whether it runs, "
                             f"got {list(active)}")
        self.active = [True] * (num_exits - 1) if active is None else [bool(a) for a in list(active)[:num_exits - 1]]
        if origin not in ORIGINS:
            raise ValueError(f"unknown origin {origin!r}; choose one of {', '.join(ORIGINS)}")
        self.origin = origin  # "learned", or "threshold": a fixed threshold written as this policy (from_thresholds)
        self.width = evidence_width(self.num_classes, self.top_k)
        self.classifiers = nn.ModuleList(_make_classifier(self.width, self.hidden) for _ in range(num_exits - 1))

    @classmethod
    def from_thresholds(cls, thresholds: Sequence[float | None], measure: str, num_classes: int, *,
                        top_k: int = 5) -> "BolukbasiPolicy":
        """The threshold configuration `thresholds` (one per exit, None = inactive; a
        `ThresholdPolicy`'s) on confidence `measure` as a linear Bolukbasi policy: at each active
        exit the score is the evidence column of that measure minus the threshold (1 − the
        normalised entropy for "entropy"), so it exits where `ThresholdPolicy` does (for max_prob
        and margin the float32 arithmetic is the same; entropy may differ at a rounding tie).
        Raises ValueError for an unknown measure."""
        if measure not in _MEASURE_COLUMN:
            raise ValueError(f"unknown confidence measure {measure!r}; choose one of {', '.join(_MEASURE_COLUMN)}")
        num_exits = len(thresholds)
        policy = cls(num_exits, num_classes, top_k=top_k, active=[t is not None for t in thresholds[:-1]],
                     origin="threshold")
        k = min(policy.top_k, num_classes)
        column, sign = _MEASURE_COLUMN[measure]
        with torch.no_grad():
            for e, t in enumerate(thresholds[:-1]):
                net = policy.classifiers[e]
                net.weight.zero_()
                net.bias.zero_()
                if t is None:
                    continue
                net.weight[0, column if column == 0 else k + column - 1] = sign
                # entropy: 1 − H >= t  <=>  −H + (1 − t) >= 0
                net.bias.fill_(-float(np.float32(t)) if sign > 0 else 1.0 - float(t))
        return policy

    def active_exits(self, num_exits: int) -> list[bool]:
        if num_exits != self.num_exits:
            raise ValueError(f"this Bolukbasi policy was built for {self.num_exits} exits, the model has {num_exits}")
        return [*self.active, True]

    def exit_now(self, exit_index: int, x: torch.Tensor) -> torch.Tensor:
        """(batch,) bool from evidence vectors x (batch, width) at early exit `exit_index`."""
        net = self.classifiers[exit_index]
        weight = next(net.parameters())
        score = net(x.to(weight.device, weight.dtype)).squeeze(-1)  # (batch,)
        return score + self.offset >= 0

    def decide(self, evidence: Evidence) -> torch.Tensor:
        e = evidence.exit_index
        if e >= self.num_exits - 1:  # run() never asks at the last exit; it always answers
            return torch.ones(evidence.current.shape[0], dtype=torch.bool, device=evidence.current.device)
        if not self.active[e]:  # run() never evaluates it; asked anyway, it lets everything go on
            return torch.zeros(evidence.current.shape[0], dtype=torch.bool, device=evidence.current.device)
        if one_frame(evidence):
            rows = [l[0].float().numpy() for l in evidence.logits]
            net = self.classifiers[e]
            layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
            score = linear_stack(layers, self, f"classifier{e}", evidence_features_one(rows, self.top_k))
            return torch.tensor([bool(score[0] + self.offset >= 0)])
        return self.exit_now(e, evidence_features(evidence.logits, self.top_k)).to(evidence.current.device)

    def state_key(self) -> tuple:
        return (self.offset, tuple(self.active), *super().state_key())

    def row_decider(self, num_classes: int, spatial: Sequence[int]) -> "BolukbasiRows | None":
        return BolukbasiRows(self) if num_classes <= ROW_CLASSES else None

    def decision_flops(self) -> list[float]:
        """FLOPs of one decision at every exit, from the layer sizes (a multiply-add counts 2, as
        engine.cost counts them); 0 at the last exit and at inactive ones."""
        if self.hidden > 0:
            per = 2.0 * self.width * self.hidden + 2.0 * self.hidden
        else:
            per = 2.0 * self.width
        return [per if a else 0.0 for a in self.active] + [0.0]

    def to_json(self) -> dict:
        return {"kind": self.kind, "num_exits": self.num_exits, "num_classes": self.num_classes,
                "top_k": self.top_k, "hidden": self.hidden, "width": self.width, "offset": self.offset,
                "lambda": self.lam, "loss": self.loss, "active": self.active, "origin": self.origin}

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
                offset=float(d.get("offset", 0.0)), lam=d.get("lambda"), loss=d.get("loss", "error"),
                active=d.get("active"), origin=d.get("origin", "learned"))
        if "width" in d and int(d["width"]) != p.width:
            raise ValueError(f"the Bolukbasi policy's evidence width {d['width']} does not match {p.width} "
                             f"({num_classes} classes, top_k {p.top_k})")
        return p

    def describe(self) -> str:
        net = f"MLP({self.hidden})" if self.hidden else "linear"
        lam = "" if self.lam is None else f", λ={self.lam:g}"
        off = "" if all(self.active) else ", exits " + "".join("x" if a else "-" for a in self.active) + "+"
        if self.origin == "threshold":
            return f"Bolukbasi policy at a fixed-threshold configuration ({net}{off})"
        return f"Bolukbasi learned policy ({net}{lam}{off})"


class BolukbasiRows:
    """`BolukbasiPolicy.decide` for the prepared batch-1 path (a `RowDecider`): `evidence_row` of
    the logits row, then the exit's classifier in Python floats (in numpy when it has a hidden layer)."""

    def __init__(self, policy: BolukbasiPolicy):
        self.top_k, self.offset = policy.top_k, policy.offset
        self.layers = [[(m.weight.detach().double().cpu().numpy(), m.bias.detach().double().cpu().numpy())
                        for m in net.modules() if isinstance(m, nn.Linear)] for net in policy.classifiers]
        self.linear = [(layers[0][0][0].tolist(), float(layers[0][1][0])) if len(layers) == 1 else None
                       for layers in self.layers]

    def columns(self, e: int):
        return None, None, None

    def start(self):
        classes: list[int] = []
        previous = None

        def decide(e: int, row: list, more, distance: float, tap) -> bool:
            nonlocal previous
            f, previous, cls = evidence_row(row, self.top_k, classes, previous)
            classes.append(cls)
            linear = self.linear[e]
            if linear is not None:
                return sum(map(operator.mul, linear[0], f)) + linear[1] + self.offset >= 0
            h = np.asarray(f)
            for i, (weight, bias) in enumerate(self.layers[e]):
                h = weight @ h + bias
                h = np.maximum(h, 0.0) if i < len(self.layers[e]) - 1 else h
            return float(h[0]) + self.offset >= 0
        return decide

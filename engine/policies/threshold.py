"""Confidence thresholds per exit on max-probability, entropy or margin, and the oracle."""
from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch

from .base import Evidence, Policy, register_policy

MEASURES = ("max_prob", "entropy", "margin")


def confidence(logits: torch.Tensor, measure: str = "max_prob") -> torch.Tensor:
    """Confidence in [0, 1] (higher = surer) of each row of (batch, classes) logits.

    max_prob: the top probability; entropy: 1 − entropy / log(K); margin: top-1 − top-2 probability.
    """
    p = torch.softmax(logits.float(), dim=-1)
    if measure == "max_prob":
        return p.max(dim=-1).values
    if measure == "entropy":
        k = p.shape[-1]
        h = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
        return 1.0 - h / math.log(k) if k > 1 else torch.ones_like(h)
    if measure == "margin":
        top = p.topk(min(2, p.shape[-1]), dim=-1).values
        return top[..., 0] - (top[..., 1] if top.shape[-1] > 1 else 0.0)
    raise ValueError(f"unknown confidence measure {measure!r}; choose one of {', '.join(MEASURES)}")


@register_policy
class ThresholdPolicy(Policy):
    """Exit where the exit's confidence reaches its threshold. A threshold of None leaves that exit
    inactive (its head is not evaluated); the last exit always answers."""

    kind = "threshold"

    def __init__(self, thresholds: Sequence[float | None], measure: str = "max_prob"):
        super().__init__()
        if measure not in MEASURES:
            raise ValueError(f"unknown confidence measure {measure!r}; choose one of {', '.join(MEASURES)}")
        for t in thresholds:
            if t is not None and not 0.0 <= float(t) <= 1.0:  # NaN fails this too
                raise ValueError(f"threshold {t} is outside 0..1")
        self.thresholds = [None if t is None else float(t) for t in thresholds]
        self.measure = measure

    @classmethod
    def uniform(cls, num_exits: int, threshold: float, measure: str = "max_prob") -> "ThresholdPolicy":
        return cls([threshold] * num_exits, measure)

    def active_exits(self, num_exits: int) -> list[bool]:
        if len(self.thresholds) != num_exits:
            raise ValueError(f"policy has {len(self.thresholds)} thresholds but the model has {num_exits} exits")
        return [t is not None for t in self.thresholds[:-1]] + [True]

    def decide(self, evidence: Evidence) -> torch.Tensor:
        t = self.thresholds[evidence.exit_index]
        if t is None:
            return torch.zeros(evidence.current.shape[0], dtype=torch.bool, device=evidence.current.device)
        return confidence(evidence.current, self.measure) >= t

    def decision_flops(self) -> list[float]:
        """0 at every exit: a confidence has no matrix products, all the FLOP counter counts."""
        return [0.0] * len(self.thresholds)

    def with_thresholds(self, thresholds: Sequence[float | None]) -> "ThresholdPolicy":
        """A copy with these thresholds and the same measure; ValueError for a value outside 0..1."""
        checked = ThresholdPolicy(thresholds, self.measure).thresholds
        # a new object rather than an edit: a frame in flight keeps the policy it started with
        edited = copy.copy(self)
        edited.thresholds = checked
        return edited

    def state_key(self) -> tuple:
        return (self.measure, tuple(self.thresholds))

    def row_decider(self, num_classes: int, spatial: Sequence[int]) -> "ThresholdRows":
        return ThresholdRows(self)

    def to_json(self) -> dict:
        return {"kind": self.kind, "measure": self.measure, "thresholds": self.thresholds}

    @classmethod
    def from_json(cls, d: dict, *, num_exits: int, num_classes: int) -> "ThresholdPolicy":
        th = d.get("thresholds")
        if not isinstance(th, list) or len(th) != num_exits:
            raise ValueError(f"threshold policy needs {num_exits} thresholds, got {th!r}")
        return cls(th, d.get("measure", "max_prob"))

    def describe(self) -> str:
        ts = ", ".join("off" if t is None else f"{t:.2f}" for t in self.thresholds[:-1])
        return f"threshold on {self.measure}: [{ts}]"


class ThresholdRows:
    """`ThresholdPolicy.decide` for the prepared batch-1 path (a `RowDecider`): the confidence of
    the logits row in Python floats, against the threshold rounded to float32 (as torch compares a
    float32 tensor with a number)."""

    def __init__(self, policy: ThresholdPolicy):
        self.measure = policy.measure
        self.limits = [math.inf if t is None else float(np.float32(t)) for t in policy.thresholds]

    def columns(self, e: int):
        return None, None, None

    def start(self):
        return self.decide

    def decide(self, e: int, row: list, more: list, distance: float, tap) -> bool:
        m = max(row)
        z = [math.exp(v - m) for v in row]
        total = sum(z)
        if self.measure == "max_prob":
            return 1.0 / total >= self.limits[e]
        p = [v / total for v in z]
        if self.measure == "entropy":
            k = len(p)
            h = -sum(q * math.log(q if q > 1e-12 else 1e-12) for q in p)
            return (1.0 - h / math.log(k) if k > 1 else 1.0) >= self.limits[e]
        top = sorted(p)[-2:]
        return (top[-1] - (top[0] if len(top) > 1 else 0.0)) >= self.limits[e]


@register_policy
class OraclePolicy(Policy):
    """Exit at the earliest exit whose answer is right (the bound of any policy). Evaluation only:
    it needs the labels, given with `with_targets`."""

    kind = "oracle"
    evaluation_only = True

    def __init__(self):
        super().__init__()
        self.targets: torch.Tensor | None = None

    def with_targets(self, targets: torch.Tensor) -> "OraclePolicy":
        self.targets = targets.long()
        return self

    def decide(self, evidence: Evidence) -> torch.Tensor:
        if self.targets is None:
            raise RuntimeError("the oracle needs labels: call with_targets(labels) first")
        y = self.targets.to(evidence.current.device)[evidence.index]
        return evidence.current.argmax(-1) == y

    @classmethod
    def from_json(cls, d: dict, *, num_exits: int, num_classes: int) -> "OraclePolicy":
        return cls()

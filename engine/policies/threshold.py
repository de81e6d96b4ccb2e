"""Confidence thresholds per exit on max-probability, entropy or margin, and the oracle."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..model import Evidence
from .base import Policy, register_policy

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

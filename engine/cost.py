"""Cost of a multi-exit model: FLOPs of every stage, exit head and policy decision, measured with
`torch.utils.flop_counter`; latency per stage and head measured on a device; the cost of a
sample that takes exit e, counting every exit head that ran before it and did not fire.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch


@dataclass
class CostTable:
    """Per-part costs of one model on one input size. FLOPs count a multiply-add as 2."""

    exit_stages: list[int]  # stage index each exit reads
    stage_flops: list[float]  # per stage
    exit_flops: list[float]  # per exit head
    policy_flops: list[float] = field(default_factory=list)  # per exit: cost of the decision there
    stage_ms: list[float] = field(default_factory=list)  # measured batch-1 latency per stage ([] = not measured)
    exit_ms: list[float] = field(default_factory=list)
    device: str = ""  # where the latencies were measured

    def __post_init__(self):
        if not self.policy_flops:
            self.policy_flops = [0.0] * len(self.exit_flops)

    @property
    def num_exits(self) -> int:
        return len(self.exit_stages)

    @property
    def has_latency(self) -> bool:
        return bool(self.stage_ms) and bool(self.exit_ms)

    def _path(self, part_stage: Sequence[float], part_exit: Sequence[float], part_policy: Sequence[float],
              active: Sequence[bool] | None) -> list[float]:
        """Cumulative cost of a sample that takes exit e, for every e (decisions at the last exit cost 0)."""
        active = list(active) if active is not None else [True] * self.num_exits
        out, acc, prev_stage = [], 0.0, -1
        for e, s in enumerate(self.exit_stages):
            acc += sum(part_stage[prev_stage + 1: s + 1])
            prev_stage = s
            here = acc + part_exit[e]
            out.append(here)
            if active[e] or e == self.num_exits - 1:
                acc = here + (part_policy[e] if e < self.num_exits - 1 else 0.0)
        return out

    def cumulative_flops(self, active: Sequence[bool] | None = None) -> list[float]:
        """FLOPs used by a sample that exits at e, with inactive exits not evaluated."""
        return self._path(self.stage_flops, self.exit_flops, self.policy_flops, active)

    def cumulative_ms(self, active: Sequence[bool] | None = None) -> list[float]:
        if not self.has_latency:
            raise ValueError("this cost table has no latency profile; measure one with profile_latency()")
        return self._path(self.stage_ms, self.exit_ms, [0.0] * self.num_exits, active)

    @property
    def full_flops(self) -> float:
        """The full model: every stage plus the last exit, no other head, no decisions."""
        return sum(self.stage_flops[: self.exit_stages[-1] + 1]) + self.exit_flops[-1]

    @property
    def full_ms(self) -> float:
        if not self.has_latency:
            raise ValueError("this cost table has no latency profile")
        return sum(self.stage_ms[: self.exit_stages[-1] + 1]) + self.exit_ms[-1]

    def mean_flops(self, exit_index: torch.Tensor, active: Sequence[bool] | None = None) -> float:
        """Mean FLOPs per sample for samples that took `exit_index` (N,)."""
        table = torch.tensor(self.cumulative_flops(active), dtype=torch.float64)
        return float(table[exit_index.cpu().long()].mean()) if exit_index.numel() else 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "CostTable":
        return cls(**{k: d.get(k, []) if k != "device" else d.get(k, "") for k in cls.__dataclass_fields__})

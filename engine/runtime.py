"""Engine: load a bundle, pick a device, preprocess frames, run the staged model with the active
policy, and keep running totals. What it returns (`InferenceResult`) is all the app sees.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExitReading:
    """One exit that ran for this frame."""

    exit_index: int
    stage: int  # stage the exit reads
    confidence: float  # under the active policy's measure (max-probability for non-threshold policies)
    top_k: list[tuple[str, float]]  # (class name, probability), best first
    threshold: float | None  # the active threshold at this exit, if the policy has one
    fired: bool


@dataclass
class RunningTotals:
    frames: int = 0
    flops: float = 0.0
    full_flops: float = 0.0
    ms: float = 0.0
    full_ms: float = 0.0
    exit_counts: list[int] = field(default_factory=list)  # histogram: frames per exit

    @property
    def saved(self) -> float:
        """Fraction of FLOPs saved against running the full model on every frame."""
        return 1.0 - self.flops / self.full_flops if self.full_flops else 0.0

    @property
    def saved_ms(self) -> float:
        return 1.0 - self.ms / self.full_ms if self.full_ms else 0.0


@dataclass(frozen=True)
class InferenceResult:
    exit_index: int  # the exit that fired
    num_exits: int
    class_index: int
    label: str
    confidence: float  # top probability at the fired exit
    exits: list[ExitReading]  # the exits that ran, in order
    stages_run: int
    num_stages: int
    flops: float  # FLOPs used for this frame, exit heads that ran and did not fire included
    full_flops: float  # FLOPs of the full model (every stage + last exit)
    ms: float  # measured wall-clock of the staged run on the device
    full_ms: float  # measured latency of the full model on the same device (profile)
    totals: RunningTotals

    @property
    def saved(self) -> float:
        return 1.0 - self.flops / self.full_flops if self.full_flops else 0.0

"""The shared-threshold baseline as a registered trainer: one confidence threshold for every exit,
swept for each confidence measure; the best fixed threshold at every cost."""
from __future__ import annotations

from typing import Sequence

from ..cost import CostTable
from ..evaluate import operating_front, pareto
from ..policies import MEASURES, Policy, ThresholdPolicy
from ..progress import CancelFlag, ProgressFn
from ..records import Records
from .registry import register_trainer


@register_trainer("threshold", name="shared-threshold", learned=False,
                  summary="one confidence threshold for every exit (best of max_prob, entropy, margin)")
def fit_threshold(records: Records, score_records: Records, cost: CostTable, *,
                  lambdas: Sequence[float] | None = None, epochs: int | None = None,
                  prototype_records: Records | None = None, progress: ProgressFn | None = None,
                  cancel: CancelFlag | None = None) -> tuple[list[dict], list[Policy]]:
    """The Pareto front of `engine.evaluate.operating_front` on `score_records` over every
    confidence measure, and its policies. Nothing is trained: the other arguments are not used."""
    points = pareto([p for m in MEASURES for p in operating_front(score_records, cost, m)])
    return points, [ThresholdPolicy(p["policy"]["thresholds"], p["policy"]["measure"]) for p in points]

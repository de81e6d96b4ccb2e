"""How unlike its classes an input is ("novelty"), from the structure policy's class prototypes.

At every early exit the structure policy compares the input's pooled features with class
prototypes (`engine.policies.structure`); an input of none of the classes, or a corrupted one,
sits further from all of them: its nearest-prototype similarity `sim_top1` is lower. The score:
  1. atypicality at exit e = 1 − sim_top1 (the structure measure itself, `structure_measures`);
  2. its percentile among the calibration split's atypicalities at that exit;
  3. the mean of those percentiles over the deeper half of the early exits (the first stages'
     features say more about colour and texture than about classes: their prototypes barely
     separate the classes, and a shift moves them little);
  4. the fraction of calibration samples whose mean is lower, i.e. that are more typical.
So novelty is in 0..1 and uniform on calibration-like data: 0.95 means "less typical than 95 % of
the images the policy was calibrated on". `auroc` measures how well it tells two sets apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .policies.structure import MEASURES, StructurePolicy, structure_measures
from .records import Records

_SIM_TOP1 = MEASURES.index("sim_top1")


def novelty_exits(num_exits: int) -> list[int]:
    """The early exits the score reads: the deeper half of them (at least one)."""
    early = num_exits - 1
    return list(range(early // 2, early)) if early > 0 else []


def atypicality(policy: StructurePolicy, logits: torch.Tensor, features: Sequence[torch.Tensor],
                exits: Sequence[int]) -> np.ndarray:
    """(N, len(exits)) 1 − nearest-prototype cosine similarity of each sample at each of `exits`
    (early exits), from calibrated `logits` (N, E, K) and pooled `features` (one (N, C_e) per exit)."""
    cols = []
    with torch.no_grad():
        for e in exits:
            prototypes, centre, _ = policy.buffers_of(e)
            m = structure_measures([logits[:, j] for j in range(e + 1)], features[e], prototypes, centre=centre,
                                   proto_temperature=policy.proto_temperature)
            cols.append(1.0 - m[:, _SIM_TOP1].double().numpy())
    return np.stack(cols, axis=1) if cols else np.zeros((logits.shape[0], 0))


def _below(values: np.ndarray, sorted_reference: np.ndarray) -> np.ndarray:
    """Fraction of `sorted_reference` strictly below each of `values`."""
    return np.searchsorted(sorted_reference, values, side="left") / max(len(sorted_reference), 1)


@dataclass
class NoveltyScale:
    """The calibration split's atypicalities, to turn a sample's into a novelty score in 0..1."""

    exits: list[int]
    per_exit: np.ndarray  # (M, len(exits)) calibration atypicality at each exit, each column sorted
    combined: np.ndarray  # (M,) calibration samples' mean per-exit percentile, sorted

    @classmethod
    def fit(cls, policy: StructurePolicy, calibration: Records) -> "NoveltyScale":
        """The scale of `policy`'s prototypes on `calibration` records (with features). Raises
        ValueError for records without features or a model with no early exit."""
        if not calibration.features:
            raise ValueError("novelty needs the pooled features: record with with_features=True")
        exits = novelty_exits(calibration.num_exits)
        if not exits:
            raise ValueError("novelty needs at least one early exit, and these records have only the last one")
        raw = atypicality(policy, calibration.logits, calibration.features, exits)
        per_exit = np.sort(raw, axis=0)
        scale = cls(exits, per_exit, np.zeros(0))
        scale.combined = np.sort(scale._mean_percentile(raw))
        return scale

    def _mean_percentile(self, raw: np.ndarray) -> np.ndarray:
        return np.mean([_below(raw[:, j], self.per_exit[:, j]) for j in range(len(self.exits))], axis=0)

    def score(self, policy: StructurePolicy, records: Records) -> np.ndarray:
        """(N,) novelty in 0..1 of each sample of `records`: the fraction of calibration samples
        more typical than it (see the module's steps)."""
        raw = atypicality(policy, records.logits, records.features, self.exits)
        return _below(self._mean_percentile(raw), self.combined)


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of telling `positive` scores (e.g. corrupted images') from
    `negative` ones (clean): P(a positive scores higher than a negative), ties counted half.
    0.5 is chance, 1 perfect. Raises ValueError when either set is empty."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.sort(np.asarray(negative, dtype=np.float64))
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"AUROC needs scores of both sets, got {pos.size} and {neg.size}")
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (pos.size * neg.size))


__all__ = ["NoveltyScale", "atypicality", "auroc", "novelty_exits"]

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

Live (`LiveNovelty`, read by `engine.runtime.Engine` for `InferenceResult.novelty`): a frame that
leaves early never computes the deeper exits the score above reads, so the live score is per exit:
the atypicality at ONE exit the frame did run (the exit that fired; for a frame that reached the
last exit, which has no prototypes, the deepest early exit that ran) as a percentile of the
calibration split's atypicalities at that same exit. It is uniform on calibration-like data at
every exit, so "unlike my classes" (score >= 1 − false_alarm) raises a false alarm on about
`false_alarm` of such frames whichever exit it read. Its calibration (quantiles per exit, a few
KiB) is stored in the bundle's meta under "novelty" by `calibrate_live`; a bundle without it
shows no indicator: without calibration data there is no honest threshold.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .policies.base import pooled_features
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


# -- live: one exit's score per frame -------------------------------------------------------------
META_KEY = "novelty"  # the bundle meta entry `calibrate_live` writes
FALSE_ALARM = 0.05  # default share of calibration-like frames called "unlike my classes"
QUANTILES = 201  # calibration atypicality quantiles kept per exit (0, 0.5 %, ..., 100 %)


def calibrate_live(bundle: Any, calibration: Records, *, policy: str | None = None,
                   false_alarm: float = FALSE_ALARM, reliability: str = "") -> dict:
    """Store in `bundle.meta["novelty"]` (and return) the live novelty calibration: per early exit
    the QUANTILES quantiles of `calibration`'s atypicality (records with features, of images none
    of the prototypes were built from) under the bundle's structure policy `policy` (default: its
    first). `reliability`: a measured statement to show with the score (e.g. `offramp shift`'s
    AUROCs). Save the bundle to keep it. Raises ValueError without a structure policy, features,
    an early exit, or for a false_alarm outside (0, 0.5]."""
    name = policy or next((n for n, p in bundle.policies.items() if isinstance(p, StructurePolicy)), None)
    if name is None or not isinstance(bundle.policies.get(name), StructurePolicy):
        raise ValueError(f"live novelty needs a structure policy's prototypes; the bundle has {sorted(bundle.policies)}")
    if not calibration.features:
        raise ValueError("live novelty needs the pooled features: record with with_features=True")
    if not 0.0 < false_alarm <= 0.5:
        raise ValueError(f"false_alarm is a small share of frames in (0, 0.5], not {false_alarm}")
    exits = list(range(calibration.num_exits - 1))
    if not exits:
        raise ValueError("live novelty needs at least one early exit, and these records have only the last one")
    raw = atypicality(bundle.policies[name], calibration.logits, calibration.features, exits)  # (N, exits)
    q = np.quantile(raw, np.linspace(0.0, 1.0, QUANTILES), axis=0)  # (QUANTILES, exits)
    entry = {"policy": name, "false_alarm": float(false_alarm), "samples": int(calibration.num_samples),
             "quantiles": {str(e): [round(float(v), 6) for v in q[:, j]] for j, e in enumerate(exits)},
             "reliability": reliability}
    bundle.meta[META_KEY] = entry
    return entry


@dataclass(frozen=True)
class NoveltyReading:
    """How unlike the bundle's classes one frame is, from one exit it ran (`LiveNovelty`)."""

    score: float | None  # 0..1: share of calibration images more typical at `exit_index`; None: unknown
    exit_index: int | None  # the exit whose pooled features were read; None when no early exit ran
    threshold: float  # "unlike my classes" from this score on: 1 − false_alarm
    false_alarm: float  # share of calibration-like frames that pass the threshold
    reliability: str = ""  # measured statement stored with the calibration ("" = not measured)
    why_unknown: str = ""  # when score is None: why
    samples: int = 0  # calibration images the score is a percentile among

    @property
    def novel(self) -> bool:
        return self.score is not None and self.score >= self.threshold


class LiveNovelty:
    """Per-frame novelty from the pooled features of one early exit (see the module's doc).
    Host numpy on one vector: no model weight is touched, no answer changes."""

    def __init__(self, policy: StructurePolicy, entry: dict):
        """Raises ValueError when `entry` (a `calibrate_live` result) does not fit `policy`."""
        self.false_alarm = float(entry["false_alarm"])
        self.threshold = 1.0 - self.false_alarm
        self.reliability = str(entry.get("reliability", ""))
        self.samples = int(entry.get("samples", 0))
        self._exits: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for key, values in entry["quantiles"].items():
            e = int(key)
            if not 0 <= e < policy.num_exits - 1:
                raise ValueError(f"novelty calibration names exit {e}; the structure policy has "
                                 f"{policy.num_exits - 1} early exits")
            prototypes, centre, _ = policy.buffers_of(e)
            q = np.maximum.accumulate(np.asarray(values, dtype=np.float64))  # np.interp wants it sorted
            if len(q) < 2:
                raise ValueError(f"novelty calibration of exit {e} has {len(q)} quantiles; it needs 2 or more")
            self._exits[e] = (prototypes.detach().double().cpu().numpy(), centre.detach().double().cpu().numpy(),
                              q.tolist())

    @classmethod
    def from_bundle(cls, bundle: Any) -> tuple["LiveNovelty | None", str]:
        """(the bundle's live novelty, "") or (None, why there is none): no calibration stored, or
        one that names a missing policy or does not fit it. Never raises for a bundle's content."""
        entry = bundle.meta.get(META_KEY) if isinstance(bundle.meta, dict) else None
        if entry is None:
            return None, "the bundle has no novelty calibration (engine.novelty.calibrate_live)"
        policy = bundle.policies.get(entry.get("policy")) if isinstance(entry, dict) else None
        if not isinstance(policy, StructurePolicy):
            return None, f"the novelty calibration names no structure policy of the bundle ({sorted(bundle.policies)})"
        try:
            return cls(policy, entry), ""
        except (KeyError, TypeError, ValueError) as e:
            return None, f"the bundle's novelty calibration is damaged ({e})"

    @property
    def exits(self) -> list[int]:
        return sorted(self._exits)

    def atypicality(self, e: int, features: np.ndarray) -> float:
        """1 − the nearest-prototype cosine similarity of pooled `features` (C,) at early exit e
        (`structure_measures`' sim_top1)."""
        prototypes, centre, _ = self._exits[e]
        x = features.astype(np.float64) - centre
        return 1.0 - float((prototypes @ x).max()) / max(math.sqrt(float(x @ x)), 1e-12)

    def score(self, e: int, features: np.ndarray) -> float:
        """Novelty 0..1 at early exit e: the share of calibration images less atypical there."""
        q = self._exits[e][2]  # a Python list: bisect costs less than np.interp on one value
        a = self.atypicality(e, features)
        i = bisect.bisect_right(q, a)
        if i == 0 or i == len(q):
            return 0.0 if i == 0 else 1.0
        lo, hi = q[i - 1], q[i]
        return (i - 1 + ((a - lo) / (hi - lo) if hi > lo else 0.0)) / (len(q) - 1)

    def read(self, fired: int, taps: dict[int, torch.Tensor], ran: Sequence[bool]) -> NoveltyReading:
        """The reading of a frame that fired at exit `fired`, from `taps` (early exit -> its tap,
        batch 1) of the exits whose head `ran`: at `fired` when it is calibrated, else at the
        deepest calibrated exit below it that ran; unknown when none did."""
        usable = [e for e in taps if e in self._exits and e <= fired and ran[e]]
        if not usable:
            return self.unknown("no early exit with prototypes ran for this frame")
        e = max(usable)
        tap = taps[e].detach()
        if tap.dim() == 4 and tap.device.type == "cpu":  # numpy's sum costs less than torch's mean here
            a = tap.numpy()
            features = a.sum(axis=(2, 3))[0] / (a.shape[2] * a.shape[3])
        else:
            features = pooled_features(tap)[0].cpu().numpy()
        return NoveltyReading(self.score(e, features), e, self.threshold, self.false_alarm, self.reliability,
                              samples=self.samples)

    def unknown(self, why: str) -> NoveltyReading:
        """A reading that says the score could not be computed, and `why`."""
        return NoveltyReading(None, None, self.threshold, self.false_alarm, self.reliability, why, self.samples)


__all__ = ["FALSE_ALARM", "LiveNovelty", "META_KEY", "NoveltyReading", "NoveltyScale", "atypicality", "auroc",
           "calibrate_live", "novelty_exits"]

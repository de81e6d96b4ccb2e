"""The shift report: how the full model, the threshold policy and the structure policy hold up on
corrupted copies of the test split (`engine.corrupt`), compared at equal mean FLOPs.

For every set (the clean test split first, then each corrupted one), on that set's records:
  full_accuracy   the last exit's accuracy
  policies        the bundle's threshold policy (DyCE / shared threshold) and structure policy (its
                  decision FLOPs counted): accuracy, loss against the full model on the same
                  images, mean FLOPs, saved, exit fractions
  equal_flops     per learned policy: one threshold shared by every exit, swept on this set's
                  records (`threshold_curve`, plus the full model) and read at that policy's mean
                  FLOPs (linearly interpolated between the two sweep points around it, since a mix
                  of two thresholds reaches any cost between theirs; the nearest end outside the
                  sweep), its loss there, and whether the policy loses less (wins: hit/miss)
  novelty         mean novelty score (`engine.novelty`) and, for corrupted sets, the AUROC of
                  telling the set's images from the clean ones by it

Also here: `CorruptedImages`, corrupted copies of the calibration images made on the fly;
`fit_shifted_structure`, a structure policy fitted on calibration records mixed with them; and
`choose_veto`, how the structure policy's novelty veto (`engine.train.structure.fit_veto`) was
chosen: on such copies, never on test.
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from .corrupt import KINDS, SEVERITIES, check_kind, check_severity, corrupt, parse_set_name
from .cost import CostTable, with_policy_flops
from .evaluate import accuracy_per_exit, evaluate_policy, full_model_point, threshold_curve
from .novelty import NoveltyScale, auroc
from .policies import Policy
from .policies.structure import StructurePolicy
from .records import Records


# -- corrupted copies of the calibration images, for fitting ---------------------------------------
class CorruptedImages(Dataset):
    """Images of a labelled dataset (a Subset of an image dataset) corrupted on the fly, for fitting
    a policy on shifted calibration data (never on test): item i is image i under one kind and
    severity drawn from (seed, i), then `transform`. Same seed, same items."""

    def __init__(self, subset: Subset, transform: Callable, kinds: Sequence[str] = KINDS,
                 severities: Sequence[int] = SEVERITIES, seed: int = 0):
        base = copy.copy(subset.dataset)
        base.transform = None  # PIL images, corrupted before the model's transform
        self.subset = Subset(base, subset.indices)
        self.transform, self.seed = transform, int(seed)
        self.kinds = [check_kind(k) for k in kinds]
        self.severities = [check_severity(s) for s in severities]

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, i: int):
        img, label = self.subset[i]
        rng = np.random.default_rng([self.seed, i])
        kind, severity = self.kinds[rng.integers(len(self.kinds))], self.severities[rng.integers(len(self.severities))]
        out = corrupt(np.asarray(img), kind, severity, seed=self.seed, key=i)
        return self.transform(Image.fromarray(out, "RGB")), label


def concat_records(parts: Sequence[Records]) -> Records:
    """One Records of `parts` (recordings of the same exits), in order."""
    first = parts[0]
    features = [torch.cat([p.features[e] for p in parts]) for e in range(len(first.features))] \
        if all(p.features for p in parts) else []
    return Records(torch.cat([p.logits for p in parts]), features, torch.cat([p.labels for p in parts]),
                   first.class_names, first.exit_stages)


def fit_shifted_structure(bundle, calibration: Subset, records: Records, prototype_records: Records, *,
                          name: str = "structure-shift", lambdas: Sequence[float] | None = None,
                          epochs: int | None = None, max_loss: float = 0.005, seed: int = 0,
                          progress=None, cancel=None):
    """A structure policy fitted on calibration `records` mixed with as many corrupted copies of the
    same calibration images (`CorruptedImages`: every kind, severities 1..5), so that it sees what
    a shift does to its measures; chosen as `offramp train-policy` chooses (the cheapest within
    `max_loss` of the last exit, here on the mixed data). Returns (bundle with it as policy `name`,
    `train_policy_bundle`'s summary). Never touches the test split."""
    from .evaluate import record_outputs
    from .fronts import train_policy_bundle
    from .preprocess import eval_transform
    shifted = CorruptedImages(calibration, eval_transform(bundle.model.backbone.preset), seed=seed)
    copies = record_outputs(bundle.model, shifted, progress=progress, cancel=cancel)
    mixed = concat_records([records, copies])
    return train_policy_bundle(bundle, "structure", mixed, name=name, lambdas=lambdas, epochs=epochs,
                               prototype_records=prototype_records, max_loss=max_loss, progress=progress,
                               cancel=cancel)


def corrupted_sets(root: str | os.PathLike) -> list[tuple[str, Path]]:
    """(name, folder) of every corrupted set under `root`: its sub-folders that hold a test/ split,
    `offramp corrupt`'s sets first in kind and severity order, others by name. Raises ValueError
    naming `root` when it is no folder or holds no such set."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; give --corrupted the folder `offramp corrupt --out` wrote")
    found = sorted(p for p in root.iterdir() if p.is_dir() and (p / "test").is_dir())
    if not found:
        raise ValueError(f"{root} holds no corrupted sets (sub-folders with a test/ folder); make them with "
                         f"`offramp corrupt --data DATA --out {root}`")

    def order(p: Path):
        parsed = parse_set_name(p.name)
        return (0, KINDS.index(parsed[0]), parsed[1], "") if parsed else (1, 0, 0, p.name)
    return [(p.name, p) for p in sorted(found, key=order)]


def choose_veto(policy: StructurePolicy, clean: Records, shifted: Records, cost: CostTable, *,
                quantiles: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9), depths: Sequence[float] = (0.2, 0.4, 0.6, 1.0),
                clean_limit: float = 0.001, measure: str = "max_prob") -> list[dict]:
    """Every novelty veto (quantile × depth: `fit_veto` at `veto_exits(depth)`) of `policy`, its
    cutoffs fitted on `clean` calibration records, scored on `shifted` ones (corrupted copies of
    calibration images): its loss minus a shared threshold's at its FLOPs there ("gap", negative:
    it holds up better), and the same on `clean` ("clean_gap"). Returns them best first, among
    those with clean_gap <= the no-veto policy's + `clean_limit`; the no-veto policy is among them
    (quantile None)."""
    from .train.structure import fit_veto, veto_exits

    def gaps(p: StructurePolicy) -> tuple[float, float]:
        out = []
        for records in (clean, shifted):
            full = accuracy_per_exit(records)[-1]
            point = policy_point(records, p, cost, full)
            out.append(point["loss"] - (full - threshold_at_flops(records, cost, point["flops"], measure)["accuracy"]))
        return out[0], out[1]

    plain = copy.deepcopy(policy)
    plain.veto = None
    base_clean, base_gap = gaps(plain)
    rows = [{"quantile": None, "exits": [], "gap": base_gap, "clean_gap": base_clean}]
    for q in quantiles:
        for d in depths:
            exits = veto_exits(policy.num_exits, d)
            if any(r["quantile"] == q and r["exits"] == exits for r in rows):
                continue
            clean_gap, gap = gaps(fit_veto(copy.deepcopy(plain), clean, q, exits))
            rows.append({"quantile": q, "exits": exits, "gap": gap, "clean_gap": clean_gap})
    kept = [r for r in rows if r["clean_gap"] <= base_clean + clean_limit]
    return sorted(kept, key=lambda r: r["gap"])


# -- equal FLOPs ------------------------------------------------------------------------------------
def threshold_at_flops(records: Records, cost: CostTable, flops: float, measure: str = "max_prob") -> dict:
    """A shared threshold's accuracy on `records` at mean FLOPs `flops`: the sweep's points (and
    the full model's), cheapest first, interpolated linearly between the two around `flops`, or the
    nearest end when `flops` lies outside them. Returns {accuracy, flops, thresholds (the one or
    two swept thresholds used; None for the full model), how ("interpolated", "exact" or
    "nearest")}."""
    points = [*threshold_curve(records, cost, measure), full_model_point(records, cost, measure)]
    points = sorted(points, key=lambda p: (p["flops"], -p["accuracy"]))
    below = [p for p in points if p["flops"] <= flops]
    above = [p for p in points if p["flops"] >= flops]
    if not below or not above:
        p = points[0] if not below else points[-1]
        return {"accuracy": p["accuracy"], "flops": p["flops"], "thresholds": [p["threshold"]], "how": "nearest"}
    lo = max(below, key=lambda p: (p["flops"], p["accuracy"]))  # the best point at the cost just below
    hi = min(above, key=lambda p: (p["flops"], -p["accuracy"]))
    if hi["flops"] - lo["flops"] <= 1e-9 * max(flops, 1.0):
        return {"accuracy": lo["accuracy"], "flops": lo["flops"], "thresholds": [lo["threshold"]], "how": "exact"}
    w = (flops - lo["flops"]) / (hi["flops"] - lo["flops"])
    return {"accuracy": (1 - w) * lo["accuracy"] + w * hi["accuracy"], "flops": flops,
            "thresholds": [lo["threshold"], hi["threshold"]], "how": "interpolated"}


def policy_point(records: Records, policy: Policy, cost: CostTable, full_accuracy: float) -> dict:
    """`evaluate_policy` of `policy` (its decision FLOPs counted) in short: accuracy, loss against
    `full_accuracy`, loss_se, flops, saved, exit_fractions."""
    ev = evaluate_policy(records, policy, with_policy_flops(cost, policy))
    return {"accuracy": ev["accuracy"], "loss": full_accuracy - ev["accuracy"], "loss_se": ev["loss_se"],
            "flops": ev["mean_flops"], "saved": ev["saved"], "exit_fractions": ev["exit_fractions"]}


def set_entry(records: Records, cost: CostTable, policies: dict[str, Policy], learned: Sequence[str],
              measure: str = "max_prob") -> dict:
    """One set's row: full_accuracy; each of `policies` (name -> policy) as `policy_point`; and for
    each name in `learned`, equal_flops[name]: the shared threshold at that policy's mean FLOPs
    (`threshold_at_flops`, with its loss) and whether the policy loses less (wins)."""
    full = accuracy_per_exit(records)[-1]
    points = {name: policy_point(records, p, cost, full) for name, p in policies.items()}
    equal = {}
    for name in learned:
        at = threshold_at_flops(records, cost, points[name]["flops"], measure)
        at["loss"] = full - at["accuracy"]
        equal[name] = {"threshold": at, "wins": bool(points[name]["loss"] < at["loss"])}
    return {"num_samples": records.num_samples, "full_accuracy": full, "policies": points, "equal_flops": equal}


def shift_report(clean: Records, sets: dict[str, Records], cost: CostTable, threshold: Policy,
                 structure: StructurePolicy, calibration: Records, *, extra: dict[str, StructurePolicy] | None = None,
                 measure: str = "max_prob") -> dict:
    """The shift report (see the module): "clean" and every named set of `sets` (records with
    features), the novelty scale fitted on `calibration` records. `extra` learned policies (name ->
    policy) get their own rows and their own equal-FLOPs comparison. JSON-able: measure,
    full_flops, novelty_exits, policies (name -> to_json), sets (name -> `set_entry` + kind,
    severity, novelty {mean, auroc}), summary (per learned policy: wins, sets, mean_loss_gap over
    the corrupted sets). Raises ValueError for records without features or a cost table of
    another model."""
    for name, r in {"clean": clean, "calibration": calibration, **sets}.items():
        if not r.features:
            raise ValueError(f"the {name} records have no features; record them with with_features=True")
    named = {"threshold": threshold, "structure": structure, **(extra or {})}
    learned = [n for n in named if n != "threshold"]
    scale = NoveltyScale.fit(structure, calibration)
    clean_novelty = scale.score(structure, clean)
    rows = {}
    for name, records in {"clean": clean, **sets}.items():
        row = set_entry(records, cost, named, learned, measure)
        novelty = clean_novelty if name == "clean" else scale.score(structure, records)
        row["novelty"] = {"mean": float(novelty.mean()),
                          "auroc": None if name == "clean" else auroc(novelty, clean_novelty)}
        parsed = parse_set_name(name)
        row["kind"], row["severity"] = parsed if parsed else (name, None)
        rows[name] = row
    corrupted = [r for n, r in rows.items() if n != "clean"]
    return {"measure": measure, "full_flops": cost.full_flops, "novelty_exits": scale.exits,
            "policies": {n: p.to_json() for n, p in named.items()}, "sets": rows,
            "summary": {n: _wins(corrupted, n) for n in learned}}


def _wins(rows: Sequence[dict], name: str) -> dict:
    """How often policy `name` loses less than the threshold at equal FLOPs over the corrupted
    `rows`, and the mean of (its loss − the threshold's) in accuracy (negative: it holds up better)."""
    gaps = [r["policies"][name]["loss"] - r["equal_flops"][name]["threshold"]["loss"] for r in rows]
    return {"wins": sum(r["equal_flops"][name]["wins"] for r in rows), "sets": len(rows),
            "mean_loss_gap": float(np.mean(gaps)) if gaps else math.nan}


__all__ = ["choose_veto", "corrupted_sets", "policy_point", "set_entry", "shift_report", "threshold_at_flops"]

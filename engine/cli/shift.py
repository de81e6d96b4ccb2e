"""The `shift` command: the full model, the threshold policy and the structure policy on corrupted
copies of the test split (`offramp corrupt`), compared at equal mean FLOPs (`engine.shift`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import args as num
from .common import (TerminalProgress, bundle_and_data, check_out, load, pct, print_skipped, record, splits_for,
                     write_outputs)


def add_shift(sub) -> None:
    """The `shift` command."""
    raw = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("shift", formatter_class=raw, help="threshold vs structure policy on corrupted test sets, at "
                       "equal FLOPs; novelty AUROC (JSON + table)", description=SHIFT_HELP)
    bundle_and_data(s, "the .offramp bundle, with a threshold and a structure policy")
    s.add_argument("--corrupted", required=True, metavar="DIR", help="the folder `offramp corrupt --out` wrote "
                   "(one sub-folder with a test/ split per corrupted set)")
    s.add_argument("--limit", type=num.positive_int, metavar="N", help="at most N images of each set (clean and "
                   "corrupted), every class in proportion (default: all; the calibration split is always whole)")
    s.add_argument("--threshold", default="threshold", metavar="NAME", help="the bundle's threshold policy (default: "
                   "threshold)")
    s.add_argument("--structure", default="structure", metavar="NAME", help="the bundle's structure policy (default: "
                   "structure; `offramp train-policy --kind structure` makes it)")
    s.add_argument("--fit-shifted", action="store_true", help="also fit a structure policy on the calibration split "
                   "mixed with corrupted copies of its images (never test) and report it as structure-shift")
    s.add_argument("--lambdas", type=num.nonnegative, nargs="+", metavar="λ", help="--fit-shifted: λ sweep "
                   "(default: the structure trainer's)")
    s.add_argument("--epochs", type=num.positive_int, help="--fit-shifted: epochs per λ (default 150)")
    s.add_argument("--prototype-samples", type=num.positive_int, default=5000, metavar="N",
                   help="--fit-shifted: training images whose features give the prototypes (default: 5000)")
    s.add_argument("--seed", type=num.seed, default=0, help="--fit-shifted: seed of the corrupted copies (default 0)")
    s.add_argument("--out", help="--fit-shifted: write the bundle with policy structure-shift here (.offramp)")
    s.add_argument("--json", help="report file (default: <bundle>-shift.json)")
    s.set_defaults(fn=cmd_shift)


def cmd_shift(args) -> int:
    from ..files import write_json
    from ..shift import corrupted_sets
    out_json = args.json or f"{Path(args.bundle).stem}-shift.json"
    check_out(out_json, suffixes=(".json",), what="report", option="--json")
    if args.out and not args.fit_shifted:
        raise ValueError("--out writes the policy --fit-shifted fits; give --fit-shifted too, or leave --out out")
    if args.out:
        check_out(args.out)
    corrupted_sets(args.corrupted)  # a folder without sets fails before anything is recorded
    bundle = load(args.bundle)
    splits = splits_for(bundle, args)
    progress = TerminalProgress()
    calibration = splits.calibration
    cal = record(bundle.model, calibration, progress)
    extra, fitted = {}, None
    if args.fit_shifted:
        fitted, extra = _fit_shifted(args, bundle, splits, calibration, cal, progress)
    rep = measure_shift(bundle, args.bundle, splits, args.corrupted, cal, progress, limit=args.limit,
                        threshold=args.threshold, structure=args.structure, extra=extra)
    rep = {"bundle": str(args.bundle), "data": str(args.data), "corrupted": str(args.corrupted),
           "command": "offramp " + " ".join(sys.argv[1:]), "calibration_samples": cal.num_samples, **rep}
    print("\n".join(shift_lines(rep)))
    outputs = [(lambda p: write_json(p, rep), out_json, "report")]
    if fitted is not None and args.out:
        from ..bundle import save_bundle
        outputs.append((lambda p: save_bundle(fitted, p), args.out, "bundle"))
    write_outputs(outputs)
    print(f"wrote {out_json}" + (f" and {args.out} (policy 'structure-shift')" if fitted is not None and args.out else ""))
    return 0


def measure_shift(bundle, path: str, splits, corrupted: str, cal, progress, *, limit: int | None = None,
                  threshold: str = "threshold", structure: str = "structure", extra: dict | None = None) -> dict:
    """`engine.shift.shift_report` of `bundle` (file `path`) on the corrupted sets under `corrupted`
    (at most `limit` images of each, and of the clean test split) against its policies `threshold`
    and `structure`; `cal` is the calibration split's records. Raises ValueError, one sentence,
    for a folder without sets or a missing policy."""
    from ..fronts import model_cost
    from ..policies.structure import StructurePolicy
    from ..shift import corrupted_sets, shift_report
    sets = corrupted_sets(corrupted)
    thr = _policy(bundle, path, threshold, None)
    struct = _policy(bundle, path, structure, StructurePolicy)
    clean = record(bundle.model, _limited(splits.test, limit), progress)
    shifted = {name: record(bundle.model, _corrupted_part(bundle, p, limit), progress) for name, p in sets}
    return shift_report(clean, shifted, model_cost(bundle), thr, struct, cal, extra=extra or {})


def _policy(bundle, path: str, name: str, kind):
    """The bundle's policy `name` (of class `kind` when given); ValueError naming the bundle otherwise."""
    policy = bundle.policies.get(name)
    if policy is None:
        raise ValueError(f"{path} has no policy {name!r} (it has {', '.join(bundle.policies)}); "
                         + ("train one with `offramp train-policy BUNDLE --data DATA --kind structure`"
                            if kind is not None else "give --threshold one of them"))
    if kind is not None and not isinstance(policy, kind):
        raise ValueError(f"policy {name!r} of {path} is a {policy.kind} policy, not a structure policy; "
                         "give --structure the name of one")
    return policy


def _limited(subset, limit):
    from ..splits import stratified_subset
    return subset if limit is None else stratified_subset(subset, limit)


def _corrupted_part(bundle, path, limit):
    """The test split of one corrupted set through the model's preset, labelled by the model's classes."""
    from torch.utils.data import Subset
    from ..preprocess import eval_transform
    from ..splits import open_labelled_part
    ds, _ = open_labelled_part(path, "test", classes=bundle.model.class_names, on_skipped=print_skipped)
    ds.transform = eval_transform(bundle.model.backbone.preset)
    return _limited(Subset(ds, list(range(len(ds)))), limit)


def _fit_shifted(args, bundle, splits, calibration, cal, progress):
    from ..shift import fit_shifted_structure
    from ..splits import stratified_subset
    proto = record(bundle.model, stratified_subset(splits.train, args.prototype_samples), progress)
    fitted, rep = fit_shifted_structure(bundle, calibration, cal, proto, lambdas=args.lambdas, epochs=args.epochs,
                                        seed=args.seed, progress=progress)
    progress.close()
    p = rep["front"][rep["index"]]
    print(f"structure-shift: fitted on {cal.num_samples} calibration images and as many corrupted copies; chosen "
          f"λ {p['lambda']:g}, tau {p['tau']:g}: {pct(p['accuracy'])} accuracy, {pct(p['saved'])} saved there")
    return fitted, {rep["name"]: fitted.policies[rep["name"]]}


def shift_lines(rep: dict) -> list[str]:
    """The table `offramp shift` prints: per set, the full model's accuracy, each policy's loss
    (points against the full model on the same images) and FLOPs saved, the shared threshold's loss
    at each learned policy's FLOPs and hit/miss, the novelty AUROC."""
    learned = list(rep["summary"])
    head = f"{'set':<20}{'full':>7}{'threshold':>16}" + "".join(f"{n[:15]:>16}{'thr@same':>9}{'':>5}" for n in learned)
    lines = ["loss = accuracy points below the full model on the same images; saved = FLOPs saved; thr@same = one "
             "shared threshold swept to the same mean FLOPs; hit = the learned policy loses less",
             head + f"{'novelty AUROC':>15}"]
    for name, row in rep["sets"].items():
        pol = row["policies"]

        def cell(p):
            return f"{100 * p['loss']:+.1f} @{pct(p['saved'])}"
        line = f"{name:<20}{pct(row['full_accuracy']):>7}{cell(pol['threshold']):>16}"
        for n in learned:
            eq = row["equal_flops"][n]
            line += f"{cell(pol[n]):>16}{100 * eq['threshold']['loss']:>+9.1f}{'hit' if eq['wins'] else 'miss':>5}"
        auc = row["novelty"]["auroc"]
        lines.append(line + (f"{auc:>15.3f}" if auc is not None else f"{'-':>15}"))
    for n, s in rep["summary"].items():
        lines.append(f"{n}: loses less than the threshold at equal FLOPs on {s['wins']} of {s['sets']} corrupted sets; "
                     f"mean loss gap {100 * s['mean_loss_gap']:+.2f} points (negative: holds up better)")
    from ..bench_report import goal_lines, shift_goal
    lines.append("goal (issue 15):")
    lines += goal_lines([shift_goal(rep, n) for n in learned])
    return lines


SHIFT_HELP = """How early exits hold up under shift: on every corrupted set under --corrupted (made by
`offramp corrupt` from the test split) and on the clean test split, the full model's accuracy, and
for the bundle's threshold policy and its structure policy the accuracy, the loss against the full
model on the same images and the mean FLOPs; then one threshold shared by every exit is swept on
each set and read at the structure policy's mean FLOPs, and the structure policy "hits" where it
loses less there. The novelty score (how unlike its classes an image is, from the structure
policy's prototypes, calibrated on the calibration split) is reported as the AUROC of telling each
corrupted set from the clean images.

--fit-shifted fits one more structure policy, on the calibration split mixed with corrupted copies
of its images (the test split is never fitted on), and reports it beside the bundle's.

examples:
  offramp corrupt --data cifar10-jpg.zip --out /tmp/cifar10-c --severities 3 5 --limit 2000
  offramp shift model.offramp --data cifar10-jpg.zip --corrupted /tmp/cifar10-c --limit 2000
  offramp shift model.offramp --data cifar10-jpg.zip --corrupted /tmp/cifar10-c --fit-shifted --out m.offramp
"""

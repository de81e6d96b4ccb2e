"""Measuring commands: `evaluate` (accuracy per exit, cost of each policy), `search` (DyCE thresholds
stored in the bundle) and `bench` (every method on a held-out split, measured speed-up)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import args as num
from .train import add_scale_out, memory_limit
from .common import (TerminalProgress, bundle_and_data, calibration_records, check_out, checked_unlabelled, load, pct,
                     print_skipped, record, report_outputs, save_bundle_or_keep, splits_for, write_outputs)


def add_evaluate(sub) -> None:
    """The `evaluate` command."""
    s = sub.add_parser("evaluate", help="accuracy per exit, cost of each policy, oracle bound, curve")
    s.add_argument("bundle", nargs="?", help="bundle (default: the built-in model)")
    data = s.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="labelled image folder or the CIFAR-10 zip")
    data.add_argument("--unlabelled", metavar="FOLDER", help="images without labels: every exit and policy is "
                      "scored by agreement with the last exit (e.g. new photos for a distilled bundle)")
    s.add_argument("--split", default="test", help="split of the CIFAR-10 layout to use (default: test)")
    s.add_argument("--batch-size", type=num.positive_int, default=256)
    add_scale_out(s)
    s.add_argument("--json", help="report file (default: <bundle>-evaluation.json)")
    s.add_argument("--png", help="plot file (default: next to the JSON)")
    s.set_defaults(fn=cmd_evaluate)


def cmd_evaluate(args) -> int:
    return data_parallel(_evaluate, args)


def data_parallel(command, args) -> int:
    """Run `command(args)` as one rank of torchrun's process group (joined first, left after); in
    one process, simply run it."""
    from .. import distributed as dist
    dist.init(getattr(args, "device", "cpu"))
    try:
        return command(args)
    finally:
        dist.finish()


def _evaluate(args) -> int:
    from .. import distributed as dist
    from ..preprocess import eval_transform
    from ..evaluate import evaluation_report, plot_report
    from ..recording import record_sharded
    from ..cost import profile_latency
    from ..files import write_json
    out_json, out_png = report_outputs(args, f"{Path(args.bundle or 'default').stem}-evaluation.json")
    bundle = load(args.bundle)
    model = bundle.model
    if args.unlabelled:
        from ..data.folders import open_unlabelled
        split, check = checked_unlabelled(args.unlabelled, split=args.split)
        ds = open_unlabelled(args.unlabelled, split, report=check)
    else:
        from ..splits import open_labelled_part
        ds, check = open_labelled_part(args.data, args.split, classes=model.class_names, on_skipped=print_skipped)
    ds.transform = eval_transform(model.backbone.preset)
    progress = TerminalProgress() if dist.is_main() else None  # rank 0 alone reports
    records = record_sharded(model, ds, batch_size=args.batch_size, device=dist.device(args.device),
                             store=args.cache_dir, memory_limit=memory_limit(args), progress=progress)
    if records is None:  # another rank than 0: its part is recorded
        return 0
    progress.close()
    if args.unlabelled:  # no labels: score every exit and policy by agreement with the last exit
        records.labels = records.logits[:, -1].argmax(-1)
        print(f"{records.num_samples} unlabelled images: 'accuracy' below is agreement with the last exit")
    cost = profile_latency(model, bundle.cost)  # this machine's batch-1 latency, not the one stored
    rep = evaluation_report(records, cost, bundle.policies, default=bundle.default_policy)
    unread = sorted(set(ds.bad) - {src for src, _ in check.skipped})  # failed after the check passed them
    rep["data"] = str(args.data or args.unlabelled)
    rep["skipped"] = [[str(p), why] for p, why in check.skipped] + [[ds._name(src), ds.bad[src]] for src in unread]
    if args.unlabelled:
        rep.pop("classes_scored")
    else:
        print(f"scored {records.num_samples} images of {len(rep['classes_scored'])} of the model's "
              f"{len(model.class_names)} classes: {', '.join(rep['classes_scored'])}")
    if rep["skipped"]:
        print(f"skipped {len(rep['skipped'])} unreadable files (listed above and in the report)")
    _print_report(rep)
    write_outputs([(lambda p: write_json(p, rep), out_json, "report"), (lambda p: plot_report(rep, p), out_png, "plot")])
    print(f"wrote {out_json} and {out_png}")
    return 0


def _print_report(rep: dict) -> None:
    print("accuracy per exit: " + "  ".join(f"E{e}:{pct(a)}" for e, a in enumerate(rep["accuracy_per_exit"])))
    print("calibration error (ECE) per exit: " + "  ".join(f"E{e}:{pct(a)}" for e, a in enumerate(rep["ece_per_exit"])))
    rows = [("full model", rep["full"])] + [(k, v) for k, v in rep["policies"].items()] + [("oracle", rep["oracle"])]
    print(f"{'method':<24}{'accuracy':>10}{'MFLOPs':>10}{'saved':>8}{'ms':>8}{'speed-up':>10}")
    for name, r in rows:
        ms = f"{r['mean_ms']:.2f}" if r.get("mean_ms") is not None else "-"
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        print(f"{name:<24}{pct(r['accuracy']):>10}{r['mean_flops'] / 1e6:>10.2f}{pct(r['saved']):>8}{ms:>8}{speedup:>10}")
    print("ms and speed-up: expected batch-1 latency from this machine's per-stage profile (1 thread); "
          "`offramp bench` times whole runs, decisions included")


def add_search(sub) -> None:
    """The `search` command."""
    raw = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("search", formatter_class=raw, help="DyCE search: per-exit thresholds, a Pareto front and a "
                       "default configuration, stored in the bundle", description=SEARCH_HELP)
    bundle_and_data(s, "the .offramp bundle to search (written back unless --out)", unlabelled=True)
    target = s.add_mutually_exclusive_group()
    target.add_argument("--max-loss", type=num.points, default=0.5, metavar="POINTS",
                        help="default configuration: the cheapest within this many accuracy points of the last exit "
                             "on the calibration split (default: 0.5)")
    target.add_argument("--budget", type=num.fraction, metavar="F", help="default configuration: the most accurate "
                        "whose mean FLOPs (exit heads that ran included) are at most this fraction of the full "
                        "model's (0 < F <= 1, e.g. 0.6), checked on calibration and on the test split")
    s.add_argument("--measure", default="max_prob", choices=["max_prob", "entropy", "margin"],
                   help="the confidence every threshold is compared with (default: max_prob)")
    charge = s.add_mutually_exclusive_group()
    charge.add_argument("--exit-cost-ms", type=num.real(0.0, 1000.0), default=0.0, metavar="MS",
                   help="charge every active early exit this many ms more in the search, for the graph call and "
                        "decision it adds to each frame that passes it (about 0.1 ms when frames come paced, as "
                        "from a camera: tests/benchmarks/paced_time_saved.py), so exits that seldom fire are "
                        "switched off; converted into FLOPs at the full model's rate (default 0: FLOPs only)")
    charge.add_argument("--exit-cost-mflops", type=num.real(0.0, 1e9), metavar="M",
                        help="the same charge given in MFLOPs: the full model's ms differ between machines, so "
                             "this repeats a search elsewhere (the search prints the MFLOPs --exit-cost-ms came to)")
    s.add_argument("--out", help="write the searched bundle here instead of over BUNDLE (.offramp)")
    s.add_argument("--json", help="also write a report here: the target, the chosen configuration's accuracy, FLOPs "
                   "fraction and budget_met on calibration and on test, and the front")
    s.set_defaults(fn=cmd_search)


def cmd_search(args) -> int:
    return data_parallel(_search, args)


def _search(args) -> int:
    from ..bench_report import front_table
    from ..files import write_json
    from ..fronts import search_bundle
    if args.json:
        check_out(args.json, suffixes=(".json",), what="report", option="--json")
    bundle, splits, progress, records = calibration_records(args, with_features=False)
    test = _test_records(bundle, splits, progress)
    if records is None:  # another rank than 0 under torchrun: its parts are recorded
        return 0
    searched, rep = search_bundle(bundle, records, max_loss=args.max_loss / 100, budget=args.budget,
                                  measure=args.measure, split=splits.describe(), test_records=test,
                                  exit_cost_ms=args.exit_cost_ms, progress=progress,
                                  exit_cost_flops=None if args.exit_cost_mflops is None else args.exit_cost_mflops * 1e6)
    full, flops = rep["full_accuracy"], rep["full_flops"]
    print(f"DyCE front on {records.num_samples} calibration images ({len(rep['front'])} configurations; "
          f"last exit {pct(full)}), scored out of fold (each image decided by the search run without it); "
          "* = the default configuration:")
    charge = searched.meta["search"]["exit_cost_flops"]
    if args.exit_cost_ms:
        print(f"(the search charged every active early exit {args.exit_cost_ms:g} ms more, as {charge / 1e6:.2f} "
              f"MFLOPs here: --exit-cost-mflops {charge / 1e6:.2f} repeats it on any machine; the figures are the "
              "FLOPs that run)")
    elif charge:
        print(f"(the search charged every active early exit {charge / 1e6:g} MFLOPs more; the figures are the FLOPs "
              "that run)")
    print("\n".join(front_table(rep["front"], rep["index"], flops, full)))
    target = (f"≤ {pct(args.budget)} of the full model's FLOPs" if args.budget is not None
              else f"≤ {args.max_loss:g}-point loss")
    for method, label in (("circular", "DyCE circular, out of fold"), ("one_pass", "DyCE one-pass, in sample"),
                          ("shared", "shared threshold, in sample")):
        p = rep["at_target"][method]
        print(f"{label + ':':<29} {pct(p['accuracy'])} accuracy, {pct(1 - p['flops'] / flops)} of FLOPs saved "
              f"at {target}")
    print("\n".join(budget_lines(rep["budget"])))
    out = args.out or args.bundle
    save_bundle_or_keep(searched, out)
    print(f"saved {out} (default policy 'threshold' = point {rep['index']}; its front drives the app's budget slider)")
    if args.json:
        write_outputs([(lambda p: write_json(p, _search_report(args, rep, records.num_samples)), args.json, "report")])
        print(f"wrote {args.json}")
    return 0


def _test_records(bundle, splits, progress):
    """Every exit's outputs on the test split, or None where there is none (unlabelled data)."""
    test = getattr(splits, "test", None)
    if test is None or len(test) == 0:
        return None
    return record(bundle.model, test, progress, with_features=False)


def budget_lines(checked: dict) -> list[str]:
    """What `offramp search` says of the chosen configuration on calibration and test, against the budget."""
    budget = checked["budget"]
    cal = checked["calibration"]
    lines = []
    if budget is not None and not cal["budget_met"]:
        lines.append(f"no configuration fits a budget of {pct(budget)} of the full model's FLOPs on the calibration "
                     f"split: kept the cheapest, at {pct(cal['fraction'])} (budget_met false)")
    for split, c in (("calibration", cal), ("test", checked["test"])):
        if c is None:
            lines.append(f"{split + ':':<13} no labelled test split here: the choice cannot be checked on unseen images")
            continue
        met = "" if budget is None else f", budget {pct(budget)} {'met' if c['budget_met'] else 'NOT met'}"
        seen = f" ({c['samples']} images the choice never saw)" if split == "test" else " (the choice was made here)"
        lines.append(f"{split + ':':<13} {pct(c['accuracy'])} accuracy at {pct(c['fraction'])} of the full model's "
                     f"FLOPs{met}{seen}")
    return lines


def _search_report(args, rep: dict, samples: int) -> dict:
    """The --json report of `offramp search`."""
    checked, chosen = rep["budget"], rep["front"][rep["index"]]
    return {"bundle": str(args.bundle), "data": str(args.data or args.unlabelled), "out": str(args.out or args.bundle),
            "command": "offramp " + " ".join(sys.argv[1:]), "calibration_samples": samples,
            "target": {"max_loss": None if args.budget is not None else args.max_loss / 100, "budget": args.budget},
            "full_accuracy": rep["full_accuracy"], "full_flops": rep["full_flops"],
            "budget": checked["budget"], "calibration": checked["calibration"], "test": checked["test"],
            "chosen": {"index": rep["index"], **chosen}, "front": rep["front"]}


def add_bench(sub) -> None:
    """The `bench` command."""
    raw = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("bench", formatter_class=raw, help="compare every method on a held-out split: accuracy, FLOPs "
                       "saved, measured batch-1 CPU speed-up (JSON + PNG + table)", description=BENCH_HELP)
    bundle_and_data(s, "the multi-exit .offramp bundle to benchmark")
    s.add_argument("--static", nargs="+", action="extend", default=[], metavar="SMALL.offramp",
                   help="separately trained smaller networks on the same classes, compared at their last exit "
                        "(is a plain small model as good?)")
    s.add_argument("--cascade", nargs="+", action="extend", default=[], metavar="SMALL.offramp",
                   help="cheaper networks, cheapest first, to run before BUNDLE in a Bolukbasi selection cascade")
    s.add_argument("--timing-images", type=num.positive_int, default=300, metavar="N",
                   help="test images each timed configuration runs at batch 1 (default: 300)")
    s.add_argument("--threads", type=num.nonnegative_int, default=1,
                   help="CPU threads for the batch-1 timing (default 1, as the app runs a frame; 0 = PyTorch's)")
    s.add_argument("--learned", default="fit", choices=["fit", "bundle"], help="fit: fit the Bolukbasi and "
                   "structure fronts here on the calibration split (default); bundle: only the bundle's own policies")
    s.add_argument("--lambdas", type=num.nonnegative, nargs="+", metavar="λ", help="Bolukbasi (and cascade) λ sweep")
    s.add_argument("--structure-lambdas", type=num.nonnegative, nargs="+", metavar="λ",
                   help="structure policy λ sweep")
    s.add_argument("--structure-epochs", type=num.positive_int,
                   help="structure policy training epochs per λ (default 150)")
    s.add_argument("--prototype-samples", type=num.positive_int, default=5000, metavar="N",
                   help="training images whose features give the structure policy's prototypes (default: 5000)")
    s.add_argument("--runtime", default="torch", choices=["torch", "prepared", "onnxruntime", "both", "eager"],
                   help="what runs the timed configurations: torch (= prepared: BatchNorm folded, TorchScript graphs, "
                        "as the app runs; default), onnxruntime (ONNX graphs on the CPU, the app's other runtime), "
                        "both (torch and onnxruntime side by side in one interleaved timing, a row per runtime) or "
                        "eager (the plain modules training uses)")
    s.add_argument("--overhead-repeats", type=num.nonnegative_int, default=300, metavar="N",
                   help="runs of each variant when timing what an exit that does not fire costs (default 300; 0: skip)")
    s.add_argument("--corrupted", metavar="DIR", help="also score the shift goal on the corrupted sets `offramp corrupt "
                   "--out DIR` wrote: the bundle's structure policy against a shared threshold at equal FLOPs")
    s.add_argument("--corrupted-limit", type=num.positive_int, metavar="N", help="--corrupted: at most N images of "
                   "each set (every class in proportion; default: all)")
    s.add_argument("--json", help="report file (default: <bundle>-bench.json)")
    s.add_argument("--png", help="plot file (default: next to the JSON)")
    s.set_defaults(fn=cmd_bench)


def cmd_bench(args) -> int:
    return data_parallel(_bench, args)


def _bench(args) -> int:
    import torch
    from .. import distributed as dist
    from ..recording import record_sharded
    from .. import bench_report
    from ..bench import run_benchmark
    from ..files import write_json
    out_json, out_png = report_outputs(args, f"{Path(args.bundle).stem}-bench.json")
    if args.corrupted:
        from ..shift import corrupted_sets
        corrupted_sets(args.corrupted)  # a folder without sets fails before anything is recorded
    bundle = load(args.bundle)
    if args.threads:
        torch.set_num_threads(args.threads)
    statics = {Path(p).name: load(p) for p in args.static}
    cascade = {Path(p).name: load(p) for p in args.cascade}
    splits = splits_for(bundle, args)
    progress = TerminalProgress() if dist.is_main() else None
    # the bundle's outputs on both splits, recorded data-parallel under torchrun; the rest runs on rank 0
    recorded = [record_sharded(bundle.model, split, progress=progress) if len(split) else None
                for split in (splits.calibration, splits.test)]
    if not dist.is_main():
        return 0
    rep = run_benchmark(bundle, splits, recorded=None if None in recorded else tuple(recorded), statics=statics, cascade=cascade, learned=args.learned, lambdas=args.lambdas,
                        structure_lambdas=args.structure_lambdas, structure_epochs=args.structure_epochs,
                        prototype_samples=args.prototype_samples, timing_images=args.timing_images,
                        runtime="prepared" if args.runtime == "torch" else args.runtime, overhead_repeats=args.overhead_repeats, progress=progress)
    progress.close()
    rep = {"bundle": str(args.bundle), "data": str(args.data),
           "command": "offramp " + " ".join(sys.argv[1:]), **rep}
    rep["goals"] = bench_report.assess_goals(rep)
    if args.corrupted:
        from .shift import measure_shift, shift_lines
        rep["shift"] = measure_shift(bundle, args.bundle, splits, args.corrupted, recorded[0], progress,
                                     limit=args.corrupted_limit)
        rep["goals"].append(bench_report.shift_goal(rep["shift"]))
    rep["notes"] = bench_report.notes(rep)
    print("\n".join(bench_report.table(rep)))
    print("\n".join(bench_report.latency_lines(rep)))
    if rep["timing"].get("by_runtime"):
        print("\n".join(bench_report.runtime_lines(rep)))
    print("chosen on the calibration split (cheapest within 0.5 point there), as it does on the test split:")
    print("\n".join(bench_report.choice_lines(rep)))
    if rep["timing"].get("exit_overhead"):
        print("time an active exit that does not fire adds beyond its FLOPs (batch 1):")
        print("\n".join(bench_report.overhead_lines(rep)))
    if "shift" in rep:
        print("under shift (the bundle's policies; `offramp shift` for the options):")
        print("\n".join(shift_lines(rep["shift"])))
    print(f"learned policies: {rep['learned_policies']}")
    print("goals (test split, cheapest point within 0.5 point of the full model):")
    print("\n".join(bench_report.goal_lines(rep["goals"])))
    for note in rep["notes"]:
        print(f"note: {note}")
    write_outputs([(lambda p: write_json(p, rep), out_json, "report"),
                    (lambda p: bench_report.plot(rep, p), out_png, "plot")])
    print(f"wrote {out_json} and {out_png}")
    return 0


SEARCH_HELP = """Search per-exit confidence thresholds (DyCE, arXiv 2403.01695) on the calibration split.

A configuration says which exits are active and the threshold of each. The search records every
exit's answer once, then sweeps the accuracy/compute trade-off (one-pass search, then circular
search: the single best change until none helps) and keeps the Pareto front. The bundle gets the
front (the app's budget slider walks it) and, as its default policy "threshold", the cheapest
configuration within --max-loss points of the last exit, or, with --budget F, the most accurate
whose mean FLOPs (every exit head that ran included) are at most F times the full model's. The
chosen configuration's accuracy and FLOPs fraction (and whether it met the budget) are printed for
the calibration split, where it was chosen, and for the test split, which the choice never saw;
when no configuration fits the budget, the cheapest is kept and budget_met is false.

examples:
  offramp search model.offramp --data cifar10-jpg.zip --out model-searched.offramp
  offramp search model.offramp --data cifar10-jpg.zip --budget 0.6 --json budget.json
"""


BENCH_HELP = """Benchmark every way to save compute on a held-out test split that nothing was fitted on.

Methods: the full model; the network cut after exit k (a fixed-depth smaller network); --static
networks; one shared threshold; the DyCE front; Bolukbasi and structure policy fronts; a --cascade;
the bundle's own policies; the oracle (the bound). Thresholds, fronts and policies are fitted on
the calibration split only. Mean FLOPs count every exit head that ran and did not fire and every
policy decision. Batch-1 wall-clock is measured on this CPU for the full model and each method's
table points, interleaved in one process, so speed-up = full-model ms / method ms; each timed
point also reports the p50 / p95 / p99 of its per-image times.

Prints, per method, accuracy, FLOPs saved and measured speed-up at the cheapest point within 0.5
and within 1.0 accuracy points of the full model, then the goals (hit or miss). Writes a JSON
report and a PNG plot (accuracy vs FLOPs and vs measured ms).

example:
  offramp bench model.offramp --data cifar10-jpg.zip --static small.offramp --timing-images 300
"""

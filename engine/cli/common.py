"""What the `offramp` commands share: the terminal progress bar, loading and saving bundles, output
paths checked before any work, the data splits and recordings of search / train-policy / bench, and
the lines they print."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import args as num
from ..progress import Progress


class TerminalProgress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.last, self.stage, self.t0 = stream, 0.0, None, time.perf_counter()

    def __call__(self, p: Progress) -> None:
        now = time.perf_counter()
        if p.stage != self.stage:
            if self.stage is not None:
                self.stream.write("\n")
            self.stage, self.t0 = p.stage, now
        if now - self.last < 0.1 and p.done < p.total:
            return
        self.last = now
        frac = p.fraction
        eta = (now - self.t0) * (1 - frac) / frac if frac > 0 else 0
        bar = "#" * int(frac * 30)
        self.stream.write(f"\r{p.stage:<18} [{bar:<30}] {p.done}/{p.total} {p.message} "
                          f"{'' if frac >= 1 else f'~{eta:.0f}s left'}   ")
        self.stream.flush()

    def close(self) -> None:
        if self.stage is not None:
            self.stream.write("\n")
            self.stage = None


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def load(path: str | None):
    from ..bundle import default_bundle_path, load_bundle
    return load_bundle(path or default_bundle_path())


# -- where results go: checked before any work, kept somewhere if the write fails after it ----------
def check_out(path: str, *, suffixes: tuple[str, ...] = (".offramp",), what: str = "bundle",
               option: str = "--out") -> None:
    """Refuse (OutputPathError, one sentence) an output that could not be written, before any work."""
    from ..files import check_output_path
    check_output_path(path, suffixes=suffixes, what=what, option=option)


def check_plotting(png: str | None) -> None:
    """Refuse an explicit --png up front (PlotUnavailable, one sentence with the install hint) when no plot
    can be drawn here; without --png the report is written and the missing plot reported at the end."""
    if png is None:
        return
    from ..plot import PlotUnavailable, plotting_problem
    problem = plotting_problem()
    if problem:
        raise PlotUnavailable(f"--png {png} was asked for, but {problem}")


def report_outputs(args, default_json: str) -> tuple[str, str]:
    """(JSON, PNG) paths of a report command (`--json`, `--png`: the PNG next to the JSON by default),
    both checked before any work, and matplotlib checked when `--png` was asked for."""
    out_json = args.json or default_json
    out_png = args.png or str(Path(out_json).with_suffix(".png"))
    check_out(out_json, suffixes=(".json",), what="report", option="--json")
    check_out(out_png, suffixes=(".png",), what="plot", option="--png")
    check_plotting(args.png)
    return out_json, out_png


def calibration_records(args, with_features: bool = True):
    """(bundle, splits, progress, records) of the commands that fit on a bundle's calibration split
    and write the bundle back (search, train-policy): `--out` (or BUNDLE itself) checked first."""
    from ..splits import UnlabelledSplits
    if args.out:
        check_out(args.out)
    bundle = load(args.bundle)
    check_out(args.out or args.bundle, suffixes=())  # written back over BUNDLE without --out
    splits = splits_for(bundle, args)
    progress = TerminalProgress()
    unlabelled = isinstance(splits, UnlabelledSplits)
    records = record(bundle.model, splits.calibration, progress, with_features=with_features,
                     teacher_labels=unlabelled)
    return bundle, splits, progress, records


def save_bundle_or_keep(bundle, out: str) -> None:
    """save_bundle; when that fails (disk full, permissions changed), the bundle is kept in a spare
    folder and SaveFailed says where, so finished training is never thrown away."""
    from ..bundle import save_bundle
    from ..files import save_or_keep
    save_or_keep(lambda p: save_bundle(bundle, p), out, what="bundle")


def write_outputs(outputs) -> None:
    """Write each (write, path, what) with `save_or_keep`: one that fails is kept in a spare folder
    and the others are still written; then SaveFailed names every failure."""
    from ..files import SaveFailed, save_or_keep
    failed = []
    for write, path, what in outputs:
        try:
            save_or_keep(write, path, what=what)
        except SaveFailed as e:
            failed.append(str(e))
    if failed:
        raise SaveFailed("; ".join(failed))


def listing(items: list[str], most: int = 5) -> str:
    shown = ", ".join(map(str, items[:most]))
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def tell(text: str) -> None:
    """`text` on stderr, from rank 0 alone under torchrun (every rank reads the same data, so the
    others would only repeat it)."""
    from .. import distributed as dist
    if dist.is_main():
        print(text, file=sys.stderr)


def print_skipped(path: str, reason: str) -> None:
    tell(f"skipped {path}: {reason}")


def print_warning(message: str) -> None:
    tell(f"warning: {message}")



def checked_unlabelled(path: str, progress=None, split: str = "train"):
    """(split, UnlabelledReport) of the images under `path` (`split_or_whole`): bad files printed,
    ValueError naming the path when too few are readable."""
    from ..data.checks import check_unlabelled
    from ..splits import split_or_whole
    split = split_or_whole(path, split)
    check = check_unlabelled(path, split, progress=progress)
    if progress is not None:
        progress.close()
    for bad, reason in check.skipped:
        print_skipped(bad, reason)
    check.raise_if_unusable()
    return split, check


def splits_for(bundle, args):
    """The data splits for search / train-policy / bench: the validation fraction given, else the
    one the bundle was trained with (meta["split"]), else 0.1 (train-exits' default)."""
    from ..splits import open_splits, recorded_val_fraction
    fraction = recorded_val_fraction(bundle.meta, args.val_fraction)
    if getattr(args, "unlabelled", None):
        return unlabelled_splits(bundle, args.unlabelled, fraction)
    splits = open_splits(args.data, bundle.model.backbone.preset, val_fraction=fraction, on_skipped=print_skipped,
                         on_warning=print_warning, classes=bundle.model.class_names)  # labels by class name
    d = splits.describe()
    tell(f"data: {d['train']} training, {d['calibration']} calibration ({d['calibration_source']}), "
         f"{d['test']} test images ({d['test_source']})")
    return splits


def unlabelled_splits(bundle, path: str, fraction: float):
    """train-exits --unlabelled's parts of `path` (`UnlabelledSplits`), bad files printed."""
    from ..splits import UnlabelledSplits
    split, check = checked_unlabelled(path)
    splits = UnlabelledSplits.open(path, split, bundle.model.backbone.preset, val_fraction=fraction, report=check)
    tell(f"data: {len(splits.calibration)} held-out unlabelled images, scored against the last exit's answers")
    return splits


def record(model, subset, progress, with_features=True, teacher_labels=False):
    """Every exit's outputs on `subset`; with `teacher_labels` the labels are the last exit's answers."""
    from .. import distributed as dist
    from ..recording import record_sharded
    if len(subset) == 0:
        raise ValueError("the calibration split is empty; use more images or a larger --val-fraction")
    # data-parallel under torchrun: rank 0 gets the records, the other ranks None
    records = record_sharded(model, subset, with_features=with_features, progress=progress if dist.is_main() else None)
    if records is None:
        return None
    progress.close()
    if teacher_labels:
        records.labels = records.logits[:, -1].argmax(-1)
    return records


def print_calibration(cal: dict) -> None:
    """Temperature and expected calibration error (ECE) per exit, before and after scaling."""
    print("calibration (held-out split): " + "  ".join(
        f"{e}: T={t:.2f} " + ("kept (the teacher)" if b is None else f"ECE {b * 100:.1f}->{a * 100:.1f}%")
        for e, (t, b, a) in enumerate(zip(cal["temperatures"], cal["ece_before"], cal["ece_after"]))))


def pick_device(name: str) -> str:
    import torch
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def bundle_and_data(s: argparse.ArgumentParser, bundle_help: str, unlabelled: bool = False) -> None:
    """The arguments search, train-policy and bench share: the bundle and the data it was trained on."""
    s.add_argument("bundle", metavar="BUNDLE", help=bundle_help)
    data = s.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="the labelled data the bundle was trained on: the CIFAR-10 zip or "
                      "folder (train/ and test/), or a folder with one sub-folder per class")
    if unlabelled:
        data.add_argument("--unlabelled", metavar="FOLDER", help="the unlabelled images the exits were distilled on "
                          "(train-exits --unlabelled): accuracy means agreement with the last exit")
    s.add_argument("--val-fraction", type=num.held_out, metavar="F", help="fraction of the training data held out of "
                   "training, as given to train-exits / train-backbone (default: what the bundle records, else 0.1)")


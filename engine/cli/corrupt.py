"""The `corrupt` command: CIFAR-10-C style corrupted copies of a test split (`engine.corrupt`), for
`offramp shift` and every command that reads data."""
from __future__ import annotations

import argparse
import sys

from . import args as num
from .common import TerminalProgress, print_skipped


def _kind(text: str) -> str:
    from ..corrupt import KINDS
    if text not in KINDS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a corruption; choose from {', '.join(KINDS)}")
    return text


def add_corrupt(sub) -> None:
    """The `corrupt` command."""
    raw = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("corrupt", formatter_class=raw, help="write corrupted copies of a test split (CIFAR-10-C "
                       "style: noise, blur, contrast, JPEG), one folder per kind and severity", description=CORRUPT_HELP)
    s.add_argument("--data", required=True, help="the CIFAR-10 zip or folder (its test split is copied), or a folder "
                   "with one sub-folder per class (all of it)")
    s.add_argument("--out", required=True, metavar="DIR", help="folder to write OUT/<kind>-<severity>/test/<class>/ into")
    s.add_argument("--kinds", nargs="+", type=_kind, metavar="KIND",
                   help="corruptions to write (default: all: gaussian_noise gaussian_blur contrast jpeg_compression)")
    s.add_argument("--severities", nargs="+", type=num.integer(1, 5), metavar="S", help="severities 1..5 (default: all)")
    s.add_argument("--limit", type=num.positive_int, metavar="N",
                   help="at most N images, every class in proportion (default: all)")
    s.add_argument("--seed", type=num.seed, default=0, help="noise seed (default 0; same seed, same files)")
    s.set_defaults(fn=cmd_corrupt)


def cmd_corrupt(args) -> int:
    from ..corrupt import KINDS, SEVERITIES, write_corrupted
    from ..files import check_output_path
    check_output_path(args.out, what="corrupted sets", folder=True)
    progress = TerminalProgress()
    rep = write_corrupted(args.data, args.out, args.kinds or KINDS, sorted(set(args.severities or SEVERITIES)),
                          limit=args.limit, seed=args.seed, on_skipped=print_skipped, progress=progress)
    progress.close()
    if rep.skipped:
        print(f"skipped {len(rep.skipped)} unreadable images (listed above)", file=sys.stderr)
    print(f"wrote {len(rep.sets)} corrupted sets of {rep.images} images each under {rep.out}: {', '.join(rep.sets)}")
    print(f"evaluate one with: offramp evaluate BUNDLE --data {rep.out.rstrip('/')}/{rep.sets[0]}")
    return 0


CORRUPT_HELP = """Write corrupted copies of a dataset's test split, CIFAR-10-C style (Hendrycks & Dietterich 2019,
with the paper's CIFAR-10 parameters): Gaussian noise, Gaussian blur, contrast reduction and JPEG
re-compression, severities 1..5. Each kind and severity is one folder, OUT/<kind>-<severity>, laid
out like a test split (test/<class>/<name>.png; .jpg for jpeg_compression, whose JPEG bytes are
the corruption), so every command that reads data reads it. Deterministic: the same data, seed and
options give the same files. Unreadable source images are reported and skipped.

examples:
  offramp corrupt --data cifar10-jpg.zip --out /tmp/cifar10-c --severities 3 5 --limit 2000
  offramp evaluate model.offramp --data /tmp/cifar10-c/gaussian_noise-3
  offramp shift model.offramp --data cifar10-jpg.zip --corrupted /tmp/cifar10-c --limit 2000
"""

"""The `offramp` command: everything the app does, scriptable.

    offramp info [BUNDLE]                      what a bundle holds
    offramp run [--bundle B] PATH...           classify images, folders, videos with early exits
    offramp train-exits --data DIR ...         exits on a frozen backbone -> bundle
    offramp train-backbone --arch A --data D   a whole multi-exit network from scratch -> bundle
    offramp evaluate [BUNDLE] --data DIR       per-exit accuracy, policy cost, curve (JSON + PNG)
    offramp search BUNDLE --data DIR           DyCE per-exit thresholds: front + default configuration
    offramp train-policy BUNDLE --data DIR --kind K   a learned exit policy (threshold, bolukbasi, structure)
    offramp bench BUNDLE --data DIR            every method on a held-out split: FLOPs, measured speed-up
    offramp export [BUNDLE] --out DIR          ONNX graphs per stage, exit and decision + a manifest
    offramp corrupt --data DIR --out DIR       corrupted copies of the test split (noise, blur, contrast, JPEG)
    offramp shift BUNDLE --data D --corrupted DIR   threshold vs structure policy on them, at equal FLOPs
    offramp list-backbones                     the registered backbones
    offramp layers SPEC                        where any torchvision, timm: or module: model can be cut

Data splits (search, train-policy, bench): "calibration" is the part of the data the exits were
not trained on (for the CIFAR-10 zip: the validation part of its train split, as train-exits and
train-backbone hold it out); bench reports on a "test" part used by nothing else (the CIFAR-10
test split; for a plain class folder, half of that validation part, the other half calibrating).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..logs import LEVELS, setup_logging
from ..progress import Cancelled
from . import args as num
from .corrupt import add_corrupt
from .evaluate import add_bench, add_evaluate, add_search
from .export import add_export
from .info import add_info
from .layers import add_layers
from .run import add_list_backbones, add_run
from .shift import add_shift
from .train import add_train_backbone, add_train_exits, add_train_policy

log = logging.getLogger("offramp")

# the commands in the order `offramp --help` lists them; each module adds its own options
COMMANDS = (add_list_backbones, add_layers, add_info, add_run, add_train_exits, add_train_backbone, add_evaluate,
            add_search, add_train_policy, add_export, add_bench, add_corrupt, add_shift)


def build_parser() -> argparse.ArgumentParser:
    """The `offramp` parser. Building it imports nothing heavy (no torch): every command imports
    what it needs when it runs."""
    p = num.Parser(prog="offramp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", type=str.upper, choices=LEVELS, default="WARNING",
                   help="log records of this level and above go to stderr (default WARNING; OFFRAMP_DEBUG=1: DEBUG)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status. Every error ends in one line on stderr (the
    traceback is logged at debug level: set OFFRAMP_DEBUG=1, or give --log-level DEBUG, to see it)."""
    args = build_parser().parse_args(argv)
    setup_logging("DEBUG" if os.environ.get("OFFRAMP_DEBUG") else args.log_level)
    code = _run(args)
    from ..distributed import leave
    leave(code)  # a torchrun rank ends here, before the interpreter's teardown (see `leave`)
    return code


def _run(args) -> int:
    try:
        code = args.fn(args)
        sys.stdout.flush()  # a reader gone (`| head`) shows here, not at exit where Python would print it
        return code
    except BrokenPipeError:
        return _reader_gone()
    except Cancelled:
        print("\ncancelled; nothing was written", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        log.debug("offramp %s failed", args.command, exc_info=True)
        print(f"offramp {args.command}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug or an input no check foresaw: one line, not a traceback
        log.debug("offramp %s failed", args.command, exc_info=True)
        print(f"offramp {args.command}: unexpected {type(exc).__name__}: {exc} (set OFFRAMP_DEBUG=1 for the "
              "details)", file=sys.stderr)
        return 1


def _reader_gone() -> int:
    """Stop quietly when whatever read our output has gone (`offramp info B | head -3`), with the
    status of a program ended by SIGPIPE (128 + 13), as the Python docs' "Note on SIGPIPE" does:
    stdout now points at devnull, so the flush at exit cannot fail a second time and say so."""
    log.debug("offramp: stdout was closed by its reader", exc_info=True)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (captured, replaced): nothing will flush it at exit
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())

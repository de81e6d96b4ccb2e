"""`offramp run` (classify images, folders and videos with early exits) and `offramp list-backbones`."""
from __future__ import annotations

import os
import sys

from . import args as num
from ..files import json_text
from .common import listing, pct


def add_list_backbones(sub) -> None:
    """The `list-backbones` command."""
    s = sub.add_parser("list-backbones", help="list the registered backbones")
    s.set_defaults(fn=cmd_list_backbones)


def cmd_list_backbones(args) -> int:
    from ..backbones import backbone_family, list_backbones
    for name in list_backbones():
        print(f"{name:<22} {backbone_family(name)}")
    return 0


def add_run(sub) -> None:
    """The `run` command."""
    s = sub.add_parser("run", help="classify images, folders and videos with early exits",
                       description="Classify images, folders and videos with early exits. Exit status: 0 when "
                       "every input was classified, 1 when some were skipped (missing or unreadable, each "
                       "named on stderr), 2 when nothing was classified.")
    s.add_argument("paths", nargs="+", metavar="PATH", help="images, folders or video files (a leading .offramp file is the bundle)")
    s.add_argument("--bundle", help="bundle to use (default: the built-in model)")
    s.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    s.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"],
                   help="what runs the model: torch (default; TorchScript graphs) or onnxruntime (CPU only; ONNX "
                        "graphs made from the bundle at start, needs offramp[export])")
    pick = s.add_mutually_exclusive_group()
    pick.add_argument("--policy", metavar="NAME", help="a policy stored in the bundle by name, e.g. bolukbasi or "
                      "structure after train-policy (see `offramp info`; default: the bundle's default policy)")
    pick.add_argument("--threshold", type=num.unit,
                      help="one max-probability threshold (0..1) for every exit, instead of the bundle's policy")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.set_defaults(fn=cmd_run)


def cmd_run(args) -> int:
    from ..media import iter_frames
    from ..runtime import Engine
    paths = list(args.paths)
    bundle = args.bundle
    if bundle is None and paths and paths[0].endswith(".offramp"):
        bundle = paths.pop(0)
    if not paths:
        raise SystemExit("offramp run: name at least one image, folder or video")
    missing = [p for p in paths if not os.path.lexists(p)]
    if len(missing) == len(paths):  # nothing to do: say so before loading any model
        for p in missing:
            print(f"skipped: {p} does not exist", file=sys.stderr)
        print(f"offramp run: nothing was classified: {listing(missing)} "
              f"{'does' if len(missing) == 1 else 'do'} not exist", file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(1)  # one image at a time: more threads only spin (and the latency profile uses 1)
    engine = Engine(bundle, device=args.device, runtime=args.runtime)
    if args.policy is not None:
        engine.set_policy(args.policy)
    if args.threshold is not None:
        engine.set_thresholds([args.threshold] * engine.model.num_exits)
    failed: list[str] = []

    def skip(msg: str) -> None:
        failed.append(msg)
        print(f"skipped: {msg}", file=sys.stderr)

    classified = 0
    for source, frame in iter_frames(paths, on_error=skip):  # RGB frames, decoded as training decodes
        r = engine.infer(frame, rgb=True)
        classified += 1
        if args.json:
            print(json_text({"source": source, "exit": r.exit_index, "label": r.label, "confidence": r.confidence,
                              "flops": r.flops, "full_flops": r.full_flops, "saved": r.saved, "ms": r.ms, "clock": r.clock,
                              "exits": [{"exit": x.exit_index, "confidence": x.confidence, "top": x.top_k[0][0]}
                                        for x in r.exits]}))
        else:
            print(f"{source}: {r.label} ({pct(r.confidence)}) at exit E{r.exit_index} of {r.num_exits}, "
                  f"{r.flops / 1e6:.2f} of {r.full_flops / 1e6:.2f} MFLOPs ({pct(r.saved)} saved), {r.ms:.2f} ms")
    t = engine.totals
    if t.frames and not args.json:
        print(f"{t.frames} frame{'s' if t.frames != 1 else ''}: {pct(t.saved)} of FLOPs saved, exits taken {t.exit_counts}", file=sys.stderr)
    if not classified:
        print(f"offramp run: nothing was classified: every input was missing or unreadable ({listing(paths)})",
              file=sys.stderr)
        return 2
    if failed:
        print(f"offramp run: {len(failed)} input{'s' if len(failed) > 1 else ''} skipped (see above)", file=sys.stderr)
        return 1
    return 0

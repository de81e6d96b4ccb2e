"""`offramp layers SPEC`: the layers a model can be cut after, with output shapes and the FLOPs up to each."""
from __future__ import annotations

from . import args as num
from .common import pct


def add_layers(sub) -> None:
    """The `layers` command."""
    s = sub.add_parser("layers", help="list the layers a model can be cut after (for train-exits --model --taps)",
                       description="List the layers a model can be cut after: its output shape and the FLOPs "
                       "of everything up to it (one image). Layers inside a skip connection are left out: "
                       "no cut is possible there.")
    s.add_argument("spec", metavar="SPEC", help="a torchvision model name, timm:NAME or module:pkg.mod:factory")
    s.add_argument("--depth", type=num.integer(1, 8), default=2,
                   help="how deep in the module tree to look (layer1 is 1 deep, layer1.0 is 2; default 2)")
    s.add_argument("--input-size", type=num.integer(8, 4096), metavar="PIXELS",
                   help="side of the square input image (default: what the model expects)")
    s.set_defaults(fn=cmd_layers)


def cmd_layers(args) -> int:
    from ..backbones.generic import layers
    found, total, size = layers(args.spec, max_depth=args.depth, input_size=args.input_size)
    unit, scale = ("GFLOPs", 1e9) if total >= 1e9 else ("MFLOPs", 1e6)
    print(f"{args.spec}: {total / scale:.3f} {unit} for one {size}x{size} image; it can be cut after")
    width = max([len(name) for name, _, _ in found] + [5])
    print(f"  {'layer':<{width}}  {'output':<16} {unit + ' to here':>14} {'of all':>7}")
    for name, shape, flops in found:
        dims = "x".join(map(str, shape))
        print(f"  {name:<{width}}  {dims:<16} {flops / scale:>14.3f} {pct(flops / total if total else 0.0):>7}")
    if not found:
        print("  (no layer: the network is one block at this depth; try --depth 3)")
    print(f"for example: offramp train-exits --model {args.spec} --taps {','.join(_quarters(found, total)) or 'NAME'} "
          "--data DIR --out model.offramp")
    return 0


def _quarters(found: list, total: float) -> list[str]:
    """The layers nearest a quarter, half and three quarters of the FLOPs: a first choice of taps."""
    picked: list[str] = []
    for share in (0.25, 0.5, 0.75):
        name = min(found, key=lambda f: abs(f[2] - share * total))[0] if found else None
        if name is not None and name not in picked:
            picked.append(name)
    return picked

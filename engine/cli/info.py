"""`offramp info`: what a bundle holds, read from its manifest alone (no tensors are loaded).

A manifest written by hand or by another tool may hold anything: every section is read inside a
guard, so a malformed one ends in one line naming the bundle and the section (the traceback goes to
the debug log), never in a traceback.
"""
from __future__ import annotations

import logging

from ..files import json_text
from .common import pct

log = logging.getLogger("offramp")


def add_info(sub) -> None:
    """The `info` command."""
    s = sub.add_parser("info", help="show what a bundle holds (default: the built-in model)")
    s.add_argument("bundle", nargs="?", help="a .offramp bundle file")
    s.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    s.set_defaults(fn=cmd_info)


def cmd_info(args) -> int:
    from ..bundle import default_bundle_path, read_manifest
    path = args.bundle or default_bundle_path()
    m = read_manifest(path)
    if args.json:
        print(json_text(m, indent=2))
        return 0
    if not isinstance(m, dict):
        raise ValueError(f"{path} has a malformed manifest (not a JSON object); the bundle is damaged or not Offramp's")
    lines: list[str] = []
    for section, describe in (("model (backbone, classes, cost, exits, policies)", _info_model), ("meta", _info_meta)):
        try:
            lines += describe(path, m)
        except Exception as err:  # noqa: BLE001 - a hand-edited or hostile manifest can hold anything
            log.debug("offramp info %s: section %s", path, section, exc_info=True)
            raise ValueError(f"{path} has a malformed manifest: its {section} section cannot be read "
                             f"({type(err).__name__}: {err}); the bundle is damaged or not Offramp's") from None
    # the manifest alone can look fine over damaged weights: build the model and verify its tensors
    # (checksum, finite values, shapes) so `info` never vouches for a bundle that will not load
    from ..bundle import load_bundle
    load_bundle(path)
    print("\n".join(lines))
    return 0


def _info_model(path, m: dict) -> list[str]:
    """The bundle, its backbone, input, classes, cost and exits (one line each)."""
    from ..cost import CostTable
    table = CostTable.from_json(m["cost"])
    cum = table.cumulative_flops()
    if not table.full_flops > 0:
        raise ValueError(f"the full model's FLOPs are {table.full_flops}")
    evaluation = _section(m.get("meta", {}), "meta").get("evaluation", {})
    acc = evaluation.get("accuracy_per_exit")
    distilled = evaluation.get("labels") == "last exit's predictions"  # exits without labels: agreement
    column = "  agrees w/ last" if distilled else "  val. accuracy"
    names = m["class_names"]
    lines = [f"bundle      {path}",
             f"backbone    {m['backbone']['name']} {m['backbone'].get('kwargs', {})}",
             f"input       {m['preset']['crop']}x{m['preset']['crop']} (resize {m['preset']['resize']})",
             f"classes     {len(names)}: {', '.join(map(str, names[:12]))}{' …' if len(names) > 12 else ''}",
             f"full model  {table.full_flops / 1e6:.2f} MFLOPs"
             + (f", {table.full_ms:.2f} ms on {table.device}" if table.has_latency else ""),
             "exits       exit  after stage  head      MFLOPs to reach  of full" + (column if acc else "")]
    for e, spec in enumerate(m["exits"]):  # exits E0… (0-based), stages 1… (counted), as the app shows them
        line = (f"            E{e:<3}  {int(spec['stage']) + 1:>11}  {spec['kind']:<8} {cum[e] / 1e6:>15.2f}  "
                f"{pct(cum[e] / table.full_flops):>7}")
        lines.append(line + (f"  {pct(acc[e]):>{len(column) - 2}}" if acc else ""))
    kinds = ", ".join(f"{k} ({v['kind']})" for k, v in m["policies"].items())
    lines.append(f"policies    {kinds}; default: {m['default_policy']}")
    return lines


def _info_meta(path, m: dict) -> list[str]:
    """What the bundle's meta says about its default point, distillation and search."""
    meta = _section(m.get("meta", {}), "meta")
    evaluation = _section(meta.get("evaluation", {}), "meta.evaluation")
    distilled = evaluation.get("labels") == "last exit's predictions"
    lines = []
    point = evaluation.get("default_point")
    if point:
        what = "agrees with the last exit on" if distilled else "accuracy"
        lines.append(f"default     {what} {pct(point['accuracy'])}, saved {pct(point['saved'])} of FLOPs "
                     "(validation split)")
    if distilled:
        lines.append("exits       distilled from the last exit on unlabelled images (train-exits --unlabelled)")
    search = meta.get("search")
    if search:
        lines.append(f"front       {len(meta.get('front') or [])} configurations from a DyCE search on "
                     f"{search['samples']} calibration images")
    return lines


def _section(value, name: str) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"{name} is a {type(value).__name__}, not an object")
    return value

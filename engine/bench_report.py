"""What `offramp bench` says about its report (`engine.bench.run_benchmark`): the goals the
product is held to, hit or miss; the terminal table; the plot. And the front table `offramp
search` and `offramp train-policy` print.

Goals (issue 3), all read on the held-out test split at the cheapest point of each method whose
accuracy is within 0.5 points of the full model's:
  1. ≥ 60 % of FLOPs saved and ≥ 2× measured batch-1 CPU speed-up (best adaptive method);
  2. each learned policy no worse than the best fixed threshold anywhere on the curve, and the best
     of them using ≥ 10 % less compute than the fixed threshold at the 0.5-point point;
  3. ≥ 80 % of the saving of the oracle at the same accuracy (`engine.bench.oracle_at`).
And (issue 13) at every timed point of every adaptive method, not only the 0.5-point one: a measured
speed-up ≥ 0.9 × the speed-up its FLOPs promise. Issue 15 reads the learned policies closer: each
no more than 0.1 point below the best fixed threshold at any cost along the test curve
(`SHORTFALL_LIMIT`), the better of them ≥ 80 % of the oracle's saving at its 0.5-point point, every
point chosen on calibration within its 0.5-point promise on test, and (`shift_goal`, from
`engine.shift.shift_report`) the structure policy losing less than the threshold at equal FLOPs on
the corrupted sets.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .evaluate import pareto
from .files import write_json
from .plot import plot_curves, write_png
from .train import list_trainers

FIXED = ("truncation", "static")  # plain networks of fixed depth
KEY = "0.5"  # the at_loss entry the goals read
SHORTFALL_LIMIT = 0.001  # how far (accuracy, 0..1) a learned curve may fall below the fixed threshold's (issue 15)
PROMISE = 0.005  # the loss the calibration choice is made for, which it must keep on test


# -- goals ----------------------------------------------------------------------------------------
def shortfall(curve: Sequence[dict], reference: Sequence[dict]) -> float | None:
    """The most accuracy (0..1) `curve` loses to `reference` at equal mean FLOPs along `curve`:
    for every reference point within the curve's FLOPs range, its accuracy minus the curve's, the
    curve read between its Pareto points by straight lines (mixing two policies at random per image
    reaches them). A single point is compared with the best reference point at no more FLOPs.
    <= 0: never worse; None: no reference point to compare with."""
    if len(curve) == 1:
        within = [r["accuracy"] for r in reference if r["flops"] <= curve[0]["flops"]]
        return max(within) - curve[0]["accuracy"] if within else None
    front = pareto(curve)
    xs, ys = [p["flops"] for p in front], [p["accuracy"] for p in front]
    lo, hi = min(c["flops"] for c in curve), max(c["flops"] for c in curve)
    gaps = [r["accuracy"] - float(np.interp(r["flops"], xs, ys)) for r in reference if lo <= r["flops"] <= hi]
    return max(gaps) if gaps else None


def _pt(point: dict | None) -> str:
    if point is None:
        return "not reached"
    speed = f", {point['speedup']:.2f}× measured" if point.get("speedup") else ""
    return f"{100 * point['saved']:.1f} % FLOPs saved{speed}"


def adaptive_families() -> set[str]:
    """Method families that exit per image: every fitted policy kind (`engine.train`), the DyCE
    search, the cascade and the bundle's own policies."""
    return {*list_trainers(), "dyce", "cascade", "bundle"}


def learned_families() -> set[str]:
    """The learned policy kinds (`engine.train.list_trainers(learned=True)`)."""
    return set(list_trainers(learned=True))


def assess_goals(rep: dict) -> list[dict]:
    """The goals as [{goal, method, achieved, hit}] (hit None: cannot be judged from this report)."""
    methods = rep["methods"]
    at = {n: m["at_loss"][KEY] for n, m in methods.items()}
    adaptive_kinds, learned_kinds = adaptive_families(), learned_families()
    adaptive = {n: p for n, p in at.items() if methods[n]["family"] in adaptive_kinds and p is not None}
    goals = []

    def both(p):
        return p["saved"] >= 0.6 and (p.get("speedup") or 0.0) >= 2.0

    best = max(adaptive, key=lambda n: (both(adaptive[n]), adaptive[n]["saved"]), default=None)
    fastest = max(adaptive, key=lambda n: adaptive[n].get("speedup") or 0.0, default=None)
    achieved = _pt(adaptive.get(best))
    if fastest not in (None, best):
        achieved += f"; fastest: {fastest}, {_pt(adaptive[fastest])}"
    goals.append({"goal": "≥ 60 % FLOPs saved and ≥ 2× measured batch-1 CPU speed-up at ≤ 0.5-point loss",
                  "method": best, "achieved": achieved, "hit": best is not None and both(adaptive[best])})
    learned = [n for n in methods if methods[n]["family"] in learned_kinds
               or (methods[n]["family"] == "bundle" and methods[n]["points"][0]["policy"]["kind"] in learned_kinds)]
    threshold = methods.get("threshold")
    for name in learned:
        gap = shortfall(methods[name]["points"], threshold["points"]) if threshold else None
        goals.append({"goal": f"{name} no more than {100 * SHORTFALL_LIMIT:g} point below the best fixed threshold "
                              "anywhere on the curve", "method": name,
                      "achieved": "no overlap" if gap is None else f"worst shortfall {100 * gap:+.2f} points",
                      "hit": None if gap is None else gap <= SHORTFALL_LIMIT + 1e-12})
    thr = at.get("threshold")
    found = [n for n in learned if at[n] is not None]
    cheapest = min(found, key=lambda n: at[n]["flops"], default=None)
    less = None if cheapest is None or thr is None else 1.0 - at[cheapest]["flops"] / thr["flops"]
    goals.append({"goal": "best learned policy uses ≥ 10 % less compute than the best fixed threshold at "
                          "≤ 0.5-point loss", "method": cheapest,
                  "achieved": "not reached" if less is None else f"{100 * less:.1f} % less compute",
                  "hit": None if not learned else (less is not None and less >= 0.10)})
    ora = at[cheapest]["oracle_saved"] if cheapest is not None else 0.0
    share = at[cheapest]["saved"] / ora if cheapest is not None and ora > 0 else None
    goals.append({"goal": "best learned policy reaches ≥ 80 % of the oracle's FLOPs saving at ≤ 0.5-point loss",
                  "method": cheapest, "achieved": "not reached" if share is None else
                  f"{100 * share:.0f} % of the oracle's {100 * ora:.1f} %",
                  "hit": None if not learned else (share is not None and share >= 0.8)})
    goals.append(promise_goal(rep))
    timed = [(n, p) for n, m in methods.items() if m["family"] in adaptive_kinds for p in m["points"]
             if p.get("speedup") and p.get("flops_speedup")]
    worst = min(timed, key=lambda np_: np_[1]["speedup"] / np_[1]["flops_speedup"], default=None)
    ratio = worst[1]["speedup"] / worst[1]["flops_speedup"] if worst else None
    goals.append({"goal": "measured speed-up ≥ 0.9 × the FLOPs speed-up at every timed point of every adaptive "
                          "method", "method": worst[0] if worst else None,
                  "achieved": "nothing timed" if ratio is None else
                  f"worst {ratio:.2f} ({worst[1]['speedup']:.2f}× measured, {worst[1]['flops_speedup']:.2f}× by FLOPs)",
                  "hit": None if ratio is None else ratio >= 0.9})
    saved = adaptive[best]["oracle_saved"] if best is not None else 0.0
    frac = adaptive[best]["saved"] / saved if best is not None and saved > 0 else None
    goals.append({"goal": "≥ 80 % of the oracle's FLOPs saving at equal accuracy, at ≤ 0.5-point loss",
                  "method": best,
                  "achieved": "not reached" if frac is None else
                  f"{100 * frac:.0f} % of the oracle's {100 * saved:.1f} %", "hit": frac is not None and frac >= 0.8})
    return goals


def promise_goal(rep: dict) -> dict:
    """Every point chosen on calibration (`calibration_choice`: the cheapest within 0.5 point there)
    loses at most 0.5 point on test: the method whose choice loses most on test, and whether it kept it."""
    chosen = {n: m["calibration_choice"] for n, m in rep["methods"].items() if m.get("calibration_choice")}
    worst = max(chosen, key=lambda n: chosen[n]["loss"], default=None)
    return {"goal": f"every point chosen on calibration within {100 * PROMISE:g} point there stays within it on test",
            "method": worst, "achieved": "nothing chosen" if worst is None else
            f"worst test loss {100 * chosen[worst]['loss']:+.2f} points", "hit": None if worst is None else
            chosen[worst]["loss"] <= PROMISE + 1e-12}


def shift_goal(shift: dict, learned: str = "structure") -> dict:
    """The shift goal from an `engine.shift.shift_report`: on the corrupted sets, policy `learned`
    loses less accuracy against the full model than one shared threshold at its mean FLOPs — on
    every set (hit), the count and the mean gap said either way."""
    s = shift["summary"].get(learned)
    if s is None or not s["sets"]:
        return {"goal": f"under shift, {learned} loses less than the fixed threshold at equal FLOPs", "method": learned,
                "achieved": "no corrupted sets", "hit": None}
    return {"goal": f"under shift, {learned} loses less than the fixed threshold at equal FLOPs on every corrupted "
                    "set", "method": learned,
            "achieved": f"{s['wins']} of {s['sets']} sets, mean loss gap {100 * s['mean_loss_gap']:+.2f} points",
            "hit": s["wins"] == s["sets"]}


def notes(rep: dict) -> list[str]:
    """Warnings a reader must not miss: a plain smaller network as good as early exit; leakage."""
    out = []
    methods = rep["methods"]
    at = {n: m["at_loss"][KEY] for n, m in methods.items() if m["at_loss"][KEY] is not None}
    fixed = {n: p for n, p in at.items() if methods[n]["family"] in FIXED}
    adaptive_kinds = adaptive_families()
    adaptive = {n: p for n, p in at.items() if methods[n]["family"] in adaptive_kinds}
    if fixed:
        f = max(fixed, key=lambda n: fixed[n]["saved"])
        a = max(adaptive, key=lambda n: adaptive[n]["saved"], default=None)
        if a is None or fixed[f]["saved"] >= adaptive[a]["saved"]:
            out.append(f"a plain smaller network ({f}{_exit_name(fixed[f])}) is as good as any early-exit policy "
                       f"here at ≤ 0.5-point loss: {_pt(fixed[f])}; early exit does not pay on this model and data")
    if rep["splits"]["layout"] == "folder":
        out.append("no test split: calibration and test are halves of the validation part the bundle's exits were "
                   "calibrated on, so test accuracy may flatter the temperatures a little")
    return out


def _exit_name(point: dict) -> str:
    return f", exit {point['exit']}" if "exit" in point else ""


# -- table ----------------------------------------------------------------------------------------
def _cell(p: dict | None) -> str:
    if p is None:
        return f"{'not reached':<38}"
    speed = f"{p['speedup']:.2f}×" if p.get("speedup") else "-"
    by_flops = f"{p['flops_speedup']:.2f}×" if p.get("flops_speedup") else "-"
    ms = f"{p['ms']:.2f}" if p.get("ms") is not None else "-"
    return f"{100 * p['accuracy']:>6.2f}% {100 * p['saved']:>6.1f}% {by_flops:>7} {speed:>7} {ms:>6}"


def table(rep: dict) -> list[str]:
    """The terminal table: per method, accuracy, FLOPs saved, speed-up by FLOPs and measured, and
    ms at the cheapest point within 0.5 and within 1.0 points of the full model (or "not reached")."""
    t = rep["timing"]
    eager = f", plain modules {t['full_eager_ms']:.2f} ms" if t.get("full_eager_ms") else ""
    lines = [f"held-out test split: {rep['splits']['test']} images; full model {100 * rep['full_accuracy']:.2f}% "
             f"accuracy, {rep['full_flops'] / 1e6:.2f} MFLOPs, {t['full_ms']:.2f} ms at batch 1 "
             f"({t['images']} images, {t['threads']} threads; "
             f"staged run with no early exit {t['full_staged_ms']:.2f} ms{eager})",
             f"timed with: {t.get('runtime', 'torch eager')}",
             f"{'':<26}{'≤ 0.5 point below full model':<40}{'≤ 1.0 point below full model':<40}",
             f"{'method':<26}" + f"{'accuracy':>7} {'saved':>7} {'FLOPs×':>7} {'speed':>7} {'ms':>6}  " * 2]
    for name, m in rep["methods"].items():
        label = name + (_exit_name(m["at_loss"]["0.5"]) if m["family"] == "truncation" and m["at_loss"]["0.5"] else "")
        lines.append(f"{label[:25]:<26}{_cell(m['at_loss']['0.5'])}  {_cell(m['at_loss']['1'])}")
    o = rep["oracle"]
    lines.append(f"{'oracle (bound)':<26}{100 * o['accuracy']:>6.2f}% {100 * o['saved']:>6.1f}%")
    return lines


def latency_lines(rep: dict) -> list[str]:
    """Per method, the batch-1 time per image at the point the table reads within 0.5 point of the
    full model: the mean and the p50 / p95 / p99 of the recorded per-image times, in ms."""
    head = f"{'method':<26}{'mean':>8}{'p50':>8}{'p95':>8}{'p99':>8}"
    lines = ["batch-1 latency per image (ms) at ≤ 0.5 point below the full model:", head]
    for name, m in rep["methods"].items():
        p = m["at_loss"][KEY]
        label = (name + (_exit_name(p) if p is not None and m["family"] == "truncation" else ""))[:25]
        if p is None or p.get("ms") is None:
            lines.append(f"{label:<26}{'not reached' if p is None else 'not timed'}")
            continue
        lines.append(f"{label:<26}{p['ms']:>8.2f}" + "".join(_ms(p.get(k)) for k in ("p50_ms", "p95_ms", "p99_ms")))
    return lines


def runtime_lines(rep: dict) -> list[str]:
    """With `bench --runtime both`: one row per runtime, the full model's batch-1 ms and, for every
    method with a staged run (not the full model, truncations or static networks), its ms and
    speed-up against the full model under the same runtime, at the point the table reads within 0.5
    point; all timed interleaved in one run. Empty without side-by-side timing."""
    t = rep["timing"]
    by = t.get("by_runtime")
    if not by:
        return []
    staged = [(name, m["at_loss"][KEY]) for name, m in rep["methods"].items()
              if m["family"] not in ("full", "truncation", "static") and m["at_loss"][KEY] is not None]
    head = f"{'runtime':<34}{'full':>7}{'no exit':>9}" + "".join(f"{name[:15]:>17}" for name, _ in staged)
    lines = ["batch-1 ms per image by runtime, interleaved in one run (speed-up against the full model under the "
             "same runtime; methods at ≤ 0.5 point below the full model):", head]
    for rt, r in by.items():
        cells = []
        for _, p in staged:
            f = (p.get("by_runtime") or {}).get(rt)
            cells.append(f"{f['ms']:>9.2f} {f['speedup']:>5.2f}×" if f else f"{'-':>17}")
        lines.append(f"{r['runtime'].split(',')[0][:33]:<34}{r['full_ms']:>7.2f}{r['full_staged_ms']:>9.2f}" + "".join(cells))
    names = list(by)
    if len(names) == 2:
        a, b = (by[n]["full_ms"] for n in names)
        lines.append(f"full model: {by[names[1]]['runtime']} takes {b / a:.2f}× the time of {by[names[0]]['runtime']}")
    return lines


def _ms(value: float | None) -> str:
    return f"{'-':>8}" if value is None else f"{value:>8.2f}"


def overhead_lines(rep: dict) -> list[str]:
    """Per policy kind, the µs an active exit that does not fire adds beyond its FLOPs, per exit."""
    lines = []
    for kind, o in rep["timing"].get("exit_overhead", {}).items():
        if "error" in o:
            lines.append(f"  {kind:<10} not measured: {o['error']}")
            continue
        per = " ".join(f"E{e}:{v:.0f}" for e, v in enumerate(o["per_exit_us"]))
        lines.append(f"  {kind:<10} {o['mean_us']:>5.1f} µs per exit with all on (each alone: {per} µs)")
    return lines


def choice_lines(rep: dict) -> list[str]:
    """What a user would deploy: each fitted front's point chosen on calibration (cheapest within
    0.5 point there), and how it does on the test split, where no choice was made."""
    lines = []
    for name, m in rep["methods"].items():
        p = m.get("calibration_choice")
        if p is not None:
            speed = f", {p['speedup']:.2f}× measured" if p.get("speedup") else ""
            change = 100 * (p["accuracy"] - rep["full_accuracy"])
            lines.append(f"  {name:<12} test accuracy {100 * p['accuracy']:.2f}% ({change:+.2f} points), "
                         f"{100 * p['saved']:.1f}% FLOPs saved{speed}")
    return lines


def goal_lines(goals: Sequence[dict]) -> list[str]:
    mark = {True: "HIT ", False: "MISS", None: "n/a "}
    return [f"[{mark[g['hit']]}] {g['goal']}: {g['achieved']}" + (f" ({g['method']})" if g.get("method") else "")
            for g in goals]


def front_table(points: Sequence[dict], chosen: int, full_flops: float, full_accuracy: float,
                rows: int = 16) -> list[str]:
    """A front (cheapest first) as at most `rows` evenly spread lines plus the chosen one, marked *."""
    keep = sorted({int(round(i)) for i in np.linspace(0, len(points) - 1, min(rows, len(points)))} | {chosen})
    lines = [f"  {'#':>4}  {'accuracy':>8}  {'vs last':>7}  {'MFLOPs':>8}  {'saved':>6}  policy"]
    for i in keep:
        p = points[i]
        lines.append(f"{'*' if i == chosen else ' '} {i:>4}  {100 * p['accuracy']:>7.2f}%  "
                     f"{100 * (p['accuracy'] - full_accuracy):>+7.2f}  {p['flops'] / 1e6:>8.3f}  "
                     f"{100 * (1 - p['flops'] / full_flops):>5.1f}%  {_describe(p['policy'])}")
    return lines


def _describe(policy: dict) -> str:
    if policy.get("kind") == "threshold":
        return "[" + ", ".join("off" if t is None else f"{t:.3f}" for t in policy["thresholds"][:-1]) + "]"
    info = {**policy.get("info", {}), **policy}  # a structure policy keeps its λ in info
    return " ".join([str(policy.get("kind")), *(f"{k}={info[k]:g}" for k in ("lambda", "offset", "tau")
                                                if isinstance(info.get(k), (int, float)))])


# -- files ----------------------------------------------------------------------------------------
def save(rep: dict, json_path: str | Path, png_path: str | Path | None = None) -> None:
    """Write the report as JSON (non-finite numbers become null) and its plot as PNG, both atomically."""
    write_json(Path(json_path), rep, indent=1)
    if png_path is not None:
        plot(rep, png_path)


def plot(rep: dict, path: str | Path | None = None) -> np.ndarray:
    """Accuracy vs mean FLOPs (% of the full model) for every method, next to accuracy vs the
    measured batch-1 ms of the points that were timed. Returns the BGR image; writes a PNG if `path`."""
    full = rep["full_flops"]
    by_flops, by_ms = [], []
    for name, m in rep["methods"].items():
        pts = sorted(m["points"], key=lambda p: p["flops"])
        style = {"style": "line", "marker": "o"} if len(pts) > 1 and m["family"] not in FIXED else {"style": "points"}
        by_flops.append({"name": name, "points": [(100 * p["flops"] / full, 100 * p["accuracy"]) for p in pts],
                         **style})
        timed = [(p["ms"], 100 * p["accuracy"]) for p in sorted(pts, key=lambda p: p.get("ms", 0)) if "ms" in p]
        by_ms.append({"name": name, "points": timed, **style})
    o = rep["oracle"]
    by_flops.append({"name": "oracle", "points": [(100 * o["flops"] / full, 100 * o["accuracy"])],
                     "style": "points", "marker": "^"})
    n = rep["splits"]["test"]
    left = plot_curves(by_flops, x_label="mean compute (% of the full model's FLOPs)", y_label="accuracy (%)",
                       title=f"Held-out accuracy vs FLOPs ({n} images)")
    right = plot_curves(by_ms, x_label=f"measured batch-1 ms on this CPU ({rep['timing']['images']} images)",
                        y_label="accuracy (%)", title="Held-out accuracy vs measured time")
    image = np.hstack([left, right])
    if path is not None:
        write_png(image, path)
    return image

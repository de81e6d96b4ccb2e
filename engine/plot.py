"""Line/point plots for the evaluation and benchmark reports (accuracy vs cost curves), drawn with
matplotlib's Agg renderer, whose fonts draw ×, ≤, µ and λ. matplotlib is an optional extra
(`pip install 'offramp[plot]'`): it is imported inside the functions, and without it drawing
raises `PlotUnavailable`, one sentence that says how to install it; nothing else needs it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .files import write_atomic

INSTALL = "pip install 'offramp[plot]'"
# Colours (BGR, as the images returned) of the usual qualitative palette: blue, orange, green, red, purple,
# brown, pink, grey
PALETTE = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148), (75, 86, 140),
           (194, 119, 227), (127, 127, 127)]
MARKERS = ("o", "s", "^", "D", "v", "x")
DPI = 100  # pixels per inch of the figure: sizes are given in pixels
_PT = 72 / DPI  # points per pixel
_INK, _AXIS, _GRID = "#282828", "#5a5a5a", "#e4e4e4"


class PlotUnavailable(RuntimeError):
    """matplotlib, which draws the plots, is not installed; the message says how to install it."""


def plotting_problem() -> str | None:
    """Why no plot can be drawn here, in one sentence, or None when it can (a command can check
    this before its work, rather than fail at the end)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"drawing the plot needs matplotlib, an optional extra: {INSTALL}"
    return None


def nice_ticks(lo: float, hi: float, target: int = 6) -> tuple[list[float], int]:
    """Round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 × 10^k), and the decimals to print."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi - lo < 1e-12 * max(1.0, abs(lo), abs(hi)):
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(target, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    # the round step whose tick count comes closest to `target` (ties: the coarser step)
    mult = min((1.0, 2.0, 2.5, 5.0, 10.0), key=lambda m: (abs((hi - lo) / (m * mag) - target), -m))
    step = mult * mag
    start, stop = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    ticks = [round(i * step, 12) for i in range(start, stop + 1)]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9) + (1 if mult == 2.5 else 0))
    return ticks, decimals


def plot_curves(series: Sequence[dict], *, x_label: str, y_label: str, title: str,
                path: str | Path | None = None, size: tuple[int, int] = (900, 600),
                x_range: tuple[float, float] | None = None, y_range: tuple[float, float] | None = None) -> np.ndarray:
    """Draw `series` and return the (height, width, 3) BGR image; write it as PNG to `path` if given.

    Each series is a dict: name, points [(x, y), ...], style "line" | "points", and optionally
    colour (BGR tuple or "#rrggbb"), marker (one of o s ^ D v x) and width (line thickness in
    pixels). A line with a marker also marks its points. Non-finite points are skipped. The axes
    cover all points (padded by 4 %) unless x_range / y_range are given; ticks are round numbers;
    the legend goes where it hides the least data.
    Raises ValueError for an unknown style, marker or colour, PlotUnavailable without matplotlib,
    OSError when the PNG cannot be written.
    """
    items = [_prepare(s, i) for i, s in enumerate(series)]
    xs = [p[0] for it in items for p in it["points"]]
    ys = [p[1] for it in items for p in it["points"]]
    x_lo, x_hi, xt, xd = _axis(xs, x_range)
    y_lo, y_hi, yt, yd = _axis(ys, y_range)
    figure_class, canvas_class = _matplotlib()
    w, h = size
    fig = figure_class(figsize=(w / DPI, h / DPI), dpi=DPI, facecolor="white")
    canvas = canvas_class(fig)
    ax = fig.add_subplot()
    for it in items:
        _draw_series(ax, it)
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set_xticks(xt, [f"{t:.{xd}f}" for t in xt])
    ax.set_yticks(yt, [f"{t:.{yd}f}" for t in yt])
    ax.grid(True, color=_GRID, linewidth=1.0)
    ax.set_axisbelow(True)
    ax.tick_params(colors=_AXIS, labelcolor=_INK)
    for spine in ax.spines.values():
        spine.set_color(_AXIS)
    ax.set_xlabel(_text(x_label), color=_INK)
    ax.set_ylabel(_text(y_label), color=_INK)
    ax.set_title(_text(title), color=_INK, fontweight="bold")
    if any(it["name"] and it["points"] for it in items):
        ax.legend(loc="best", framealpha=0.88, fontsize="small")
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())  # (h, w, 4)
    out = np.ascontiguousarray(rgba[:, :, 2::-1])  # RGB(A) -> BGR, as OpenCV and the callers expect
    if out.shape[:2] != (h, w):  # a size the figure's inches could not hold exactly
        out = cv2.resize(out, (w, h), interpolation=cv2.INTER_AREA)
    if path is not None:
        write_png(out, path)
    return out


def write_png(img: np.ndarray, path: str | Path) -> None:
    """Encode the BGR image `img` as PNG and write it atomically (temporary file next to it, then rename)."""
    path = Path(path)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"OpenCV could not encode the plot for {path}")
    write_atomic(path, buf.tobytes())


# -- pieces -------------------------------------------------------------------------------------
def _matplotlib():
    """(Figure, FigureCanvasAgg): an Agg canvas of its own, so no pyplot state and no GUI backend
    is touched (the app's Qt, or a user's notebook, keep theirs). PlotUnavailable without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise PlotUnavailable(plotting_problem() or f"matplotlib cannot be imported ({err}): {INSTALL}") from err
    return Figure, FigureCanvasAgg


def _text(s: str) -> str:
    """`s` printed as given: a "$" would start matplotlib's math notation."""
    return s.replace("$", r"\$")


def _prepare(s: dict, i: int) -> dict:
    style = s.get("style", "line")
    if style not in ("line", "points"):
        raise ValueError(f"series {s.get('name')!r}: style must be 'line' or 'points', not {style!r}")
    marker = s.get("marker", None if style == "line" else MARKERS[i % len(MARKERS)])
    if marker is not None and marker not in MARKERS:
        raise ValueError(f"series {s.get('name')!r}: marker must be one of {' '.join(MARKERS)}, not {marker!r}")
    pts = [(float(x), float(y)) for x, y in s.get("points", []) if math.isfinite(x) and math.isfinite(y)]
    return {"name": str(s.get("name", f"series {i + 1}")), "points": pts, "style": style, "marker": marker,
            "colour": _colour(s.get("colour"), i), "width": float(s.get("width", 2))}


def _axis(values: list[float], given: tuple[float, float] | None) -> tuple[float, float, list[float], int]:
    """Limits (the data padded by 4 %, or `given`) and the round ticks that fall inside them."""
    if given is not None:
        lo, hi = float(given[0]), float(given[1])
    elif values:
        lo, hi = min(values), max(values)
        pad = 0.04 * (hi - lo)
        lo, hi = lo - pad, hi + pad
    else:
        lo, hi = 0.0, 1.0
    if not hi - lo > 1e-12 * max(1.0, abs(lo), abs(hi)):
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    ticks, decimals = nice_ticks(lo, hi)
    eps = 1e-9 * (hi - lo)
    return lo, hi, [t for t in ticks if lo - eps <= t <= hi + eps], decimals


def _colour(c, i: int) -> tuple[int, int, int]:
    """A series' colour as a (b, g, r) tuple of 0..255."""
    if c is None:
        return PALETTE[i % len(PALETTE)]
    if isinstance(c, str):
        c = c.lstrip("#")
        if len(c) != 6:
            raise ValueError(f"colour {c!r} must be '#rrggbb' or a (b, g, r) tuple")
        r, g, b = (int(c[k:k + 2], 16) for k in (0, 2, 4))
        return b, g, r
    return tuple(int(v) for v in c)


def _rgb(bgr: tuple[int, int, int], scale: float = 1.0) -> tuple[float, float, float]:
    b, g, r = bgr
    return r * scale / 255, g * scale / 255, b * scale / 255


def _draw_series(ax, it: dict) -> None:
    if not it["points"]:
        return
    x, y = zip(*it["points"])
    line = it["style"] == "line" and len(x) > 1
    marker = it["marker"] or ("o" if it["style"] == "points" or len(x) == 1 else None)
    radius = 5 if it["style"] == "points" else 4  # pixels
    colour = _rgb(it["colour"])
    ax.plot(x, y, linestyle="-" if line else "none", linewidth=it["width"] * _PT, color=colour,
            marker=marker, markersize=2 * radius * _PT,
            markeredgecolor=colour if marker == "x" else _rgb(it["colour"], 0.6),
            markeredgewidth=2 * _PT if marker == "x" else 1.0 * _PT,
            label=_legend_name(it["name"]), zorder=3)


def _legend_name(name: str) -> str | None:
    """The legend's label; None (no entry) for an empty name. matplotlib leaves out labels that start
    with "_", so such a name gets a leading space."""
    if not name:
        return None
    return _text(" " + name if name.startswith("_") else name)

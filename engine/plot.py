"""Small line/point plots drawn with OpenCV (no matplotlib, no Qt): accuracy vs cost curves for
evaluation reports. Drawn at twice the size and shrunk, so lines, markers and text are smooth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .files import write_atomic

# Colours (BGR) of the usual qualitative palette: blue, orange, green, red, purple, brown, pink, grey
PALETTE = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148), (75, 86, 140),
           (194, 119, 227), (127, 127, 127)]
MARKERS = ("o", "s", "^", "D", "v", "x")
_SS = 2  # supersampling factor
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_TICK = 0.45 * _SS  # font scale of tick labels, legend and axis labels (at the supersampled size)
_INK, _AXIS, _GRID, _MUTED = (40, 40, 40), (90, 90, 90), (228, 228, 228), (110, 110, 110)
_ASCII = {"×": "x", "−": "-", "–": "-", "—": "-", "≥": ">=", "≤": "<=", "·": ".", "%": "%", "µ": "u"}


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
    colour (BGR tuple or "#rrggbb"), marker (one of o s ^ D v x) and width (line thickness).
    A line with a marker also marks its points. Non-finite points are skipped. The axes cover all
    points (padded by 4 %) unless x_range / y_range are given; ticks are round numbers.
    Raises ValueError for an unknown style or marker, OSError when the PNG cannot be written.
    """
    w, h = size
    items = [_prepare(s, i) for i, s in enumerate(series)]
    xs = [p[0] for it in items for p in it["points"]]
    ys = [p[1] for it in items for p in it["points"]]
    x_lo, x_hi, xt, xd = _axis(xs, x_range)
    y_lo, y_hi, yt, yd = _axis(ys, y_range)

    S = _SS
    img = np.full((h * S, w * S, 3), 255, np.uint8)
    ylabels = [f"{t:.{yd}f}" for t in yt]
    text_h = _text_size("0", _TICK, S)[1]
    left = 24 * S + text_h * 2 + max(_text_size(s, _TICK, S)[0] for s in ylabels)
    frame = _Frame((left, 44 * S, w * S - 22 * S, h * S - 30 * S - text_h * 3), (x_lo, x_hi), (y_lo, y_hi))
    _draw_grid(img, frame, list(zip(xt, [f"{t:.{xd}f}" for t in xt])), list(zip(yt, ylabels)))

    # data, clipped to the plot area by drawing on its own canvas
    x0, y0, x1, y1 = frame.box
    area = img[y0:y1 + 1, x0:x1 + 1].copy()
    for it in items:
        _draw_series(area, it, [frame.to_area(x, y) for x, y in it["points"]])
    lines = [[frame.to_area(x, y) for x, y in it["points"]] if it["style"] == "line" else [] for it in items]
    _draw_legend(area, items, _covered(lines, [frame.to_area(x, y) for x, y in zip(xs, ys)]))
    img[y0:y1 + 1, x0:x1 + 1] = area
    cv2.rectangle(img, (x0, y0), (x1, y1), _AXIS, S, cv2.LINE_AA)

    # axis labels and title
    lw, _ = _text_size(x_label, _TICK * 1.1, S)
    _put(img, x_label, ((x0 + x1 - lw) // 2, h * S - 12 * S), _TICK * 1.1, _INK, S)
    _put_vertical(img, y_label, 12 * S, (y0 + y1) // 2, _TICK * 1.1, S)
    tw, _ = _text_size(title, 0.62 * S, S + S // 2)
    _put(img, title, ((w * S - tw) // 2, 28 * S), 0.62 * S, _INK, S + S // 2)

    out = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    if path is not None:
        write_png(out, path)
    return out


def write_png(img: np.ndarray, path: str | Path) -> None:
    """Encode `img` as PNG and write it atomically (temporary file next to it, then rename)."""
    path = Path(path)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"OpenCV could not encode the plot for {path}")
    write_atomic(path, buf.tobytes())


# -- pieces -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Frame:
    """Where the plot area sits on the (supersampled) image and which data ranges it shows."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        (x0, y0, x1, y1), (xa, xb), (ya, yb) = self.box, self.x_range, self.y_range
        return x0 + (x - xa) / (xb - xa) * (x1 - x0), y1 - (y - ya) / (yb - ya) * (y1 - y0)

    def to_area(self, x: float, y: float) -> tuple[float, float]:
        """Pixel position relative to the plot area's top-left corner."""
        px, py = self.to_px(x, y)
        return px - self.box[0], py - self.box[1]


def _draw_grid(img: np.ndarray, frame: _Frame, xticks: list[tuple[float, str]], yticks: list[tuple[float, str]]):
    """Grid lines, tick marks and tick labels of both axes."""
    S, (x0, y0, x1, y1) = _SS, frame.box
    text_h = _text_size("0", _TICK, S)[1]
    for t, s in xticks:
        px = int(round(frame.to_px(t, frame.y_range[0])[0]))
        cv2.line(img, (px, y0), (px, y1), _GRID, S, cv2.LINE_AA)
        cv2.line(img, (px, y1), (px, y1 + 5 * S), _AXIS, S, cv2.LINE_AA)
        _put(img, s, (px - _text_size(s, _TICK, S)[0] // 2, y1 + 9 * S + text_h), _TICK, _INK, S)
    for t, s in yticks:
        py = int(round(frame.to_px(frame.x_range[0], t)[1]))
        cv2.line(img, (x0, py), (x1, py), _GRID, S, cv2.LINE_AA)
        cv2.line(img, (x0 - 5 * S, py), (x0, py), _AXIS, S, cv2.LINE_AA)
        _put(img, s, (x0 - 9 * S - _text_size(s, _TICK, S)[0], py + text_h // 2), _TICK, _INK, S)


def _prepare(s: dict, i: int) -> dict:
    style = s.get("style", "line")
    if style not in ("line", "points"):
        raise ValueError(f"series {s.get('name')!r}: style must be 'line' or 'points', not {style!r}")
    marker = s.get("marker", None if style == "line" else MARKERS[i % len(MARKERS)])
    if marker is not None and marker not in MARKERS:
        raise ValueError(f"series {s.get('name')!r}: marker must be one of {' '.join(MARKERS)}, not {marker!r}")
    pts = [(float(x), float(y)) for x, y in s.get("points", []) if math.isfinite(x) and math.isfinite(y)]
    return {"name": _ascii(str(s.get("name", f"series {i + 1}"))), "points": pts, "style": style, "marker": marker,
            "colour": _colour(s.get("colour"), i), "width": int(s.get("width", 2))}


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
    if c is None:
        return PALETTE[i % len(PALETTE)]
    if isinstance(c, str):
        c = c.lstrip("#")
        if len(c) != 6:
            raise ValueError(f"colour {c!r} must be '#rrggbb' or a (b, g, r) tuple")
        r, g, b = (int(c[k:k + 2], 16) for k in (0, 2, 4))
        return b, g, r
    return tuple(int(v) for v in c)


def _draw_series(img: np.ndarray, it: dict, pts: list[tuple[float, float]]) -> None:
    S = _SS
    if it["style"] == "line" and len(pts) > 1:
        shift = 4  # sub-pixel coordinates: 4 fractional bits
        poly = np.array([[round(x * 16), round(y * 16)] for x, y in pts], np.int32)
        cv2.polylines(img, [poly], False, it["colour"], it["width"] * S, cv2.LINE_AA, shift)
    if it["marker"] or it["style"] == "points" or len(pts) == 1:
        for p in pts:
            _marker(img, p, it["marker"] or "o", it["colour"], 5 * S if it["style"] == "points" else 4 * S)


def _marker(img: np.ndarray, p: tuple[float, float], kind: str, colour, r: int) -> None:
    x, y = int(round(p[0])), int(round(p[1]))
    edge = tuple(int(v * 0.6) for v in colour)
    if kind == "o":
        cv2.circle(img, (x, y), r, colour, -1, cv2.LINE_AA)
        cv2.circle(img, (x, y), r, edge, _SS, cv2.LINE_AA)
        return
    if kind == "x":
        for dx, dy in ((r, r), (r, -r)):
            cv2.line(img, (x - dx, y - dy), (x + dx, y + dy), colour, 2 * _SS, cv2.LINE_AA)
        return
    shapes = {"s": [(-1, -1), (1, -1), (1, 1), (-1, 1)], "^": [(0, -1.25), (1.15, 0.85), (-1.15, 0.85)],
              "v": [(0, 1.25), (1.15, -0.85), (-1.15, -0.85)], "D": [(0, -1.3), (1.3, 0), (0, 1.3), (-1.3, 0)]}
    poly = np.array([[x + dx * r * 0.9, y + dy * r * 0.9] for dx, dy in shapes[kind]], np.float64).round().astype(np.int32)
    cv2.fillPoly(img, [poly], colour, cv2.LINE_AA)
    cv2.polylines(img, [poly], True, edge, _SS, cv2.LINE_AA)


def _covered(lines: list[list[tuple[float, float]]], points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pixels the data covers: every point, and samples every few pixels along each line."""
    out = list(points)
    for pts in lines:
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            n = int(math.hypot(x1 - x0, y1 - y0) // (4 * _SS)) + 1
            out.extend((x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n) for i in range(1, n))
    return out


def _draw_legend(area: np.ndarray, items: list[dict], data_px: list[tuple[float, float]]) -> None:
    """Legend box in the corner of the plot area that hides the least data."""
    named = [it for it in items if it["name"] and it["points"]]
    if not named:
        return
    S, fs, th = _SS, _TICK, _SS
    th_txt = _text_size("Ag", fs, th)[1]
    row, sample_w, pad = th_txt + 10 * S, 26 * S, 8 * S
    bw = pad * 3 + sample_w + max(_text_size(it["name"], fs, th)[0] for it in named)
    bh = pad * 2 + row * len(named) - (row - th_txt) + 4 * S
    ah, aw = area.shape[:2]
    inset = 10 * S
    # lower right and upper left first: where rising accuracy-vs-cost curves usually are not
    corners = [(aw - bw - inset, ah - bh - inset), (inset, inset), (inset, ah - bh - inset), (aw - bw - inset, inset)]
    m = 12 * S

    def hidden(c):
        return sum(c[0] - m <= x <= c[0] + bw + m and c[1] - m <= y <= c[1] + bh + m for x, y in data_px)

    x0, y0 = min(corners, key=hidden)  # ties keep the first
    overlay = area.copy()
    cv2.rectangle(overlay, (x0, y0), (x0 + bw, y0 + bh), (255, 255, 255), -1)
    cv2.addWeighted(overlay, 0.88, area, 0.12, 0, dst=area)
    cv2.rectangle(area, (x0, y0), (x0 + bw, y0 + bh), (200, 200, 200), S, cv2.LINE_AA)
    for k, it in enumerate(named):
        cy = y0 + pad + 2 * S + k * row + th_txt // 2
        sx = x0 + pad
        if it["style"] == "line":
            cv2.line(area, (sx, cy), (sx + sample_w, cy), it["colour"], it["width"] * S, cv2.LINE_AA)
        if it["marker"] or it["style"] == "points":
            _marker(area, (sx + sample_w / 2, cy), it["marker"] or "o", it["colour"], 4 * S)
        _put(area, it["name"], (sx + sample_w + pad, cy + th_txt // 2), fs, _INK, th)


def _ascii(s: str) -> str:
    """Hershey fonts draw ASCII only."""
    return "".join(_ASCII.get(ch, ch) if ord(ch) > 127 else ch for ch in s).encode("ascii", "replace").decode()


def _text_size(s: str, scale: float, thickness: int) -> tuple[int, int]:
    (tw, th), _ = cv2.getTextSize(_ascii(s), _FONT, scale, thickness)
    return tw, th


def _put(img: np.ndarray, s: str, org: tuple[int, int], scale: float, colour, thickness: int) -> None:
    cv2.putText(img, _ascii(s), (int(org[0]), int(org[1])), _FONT, scale, colour, thickness, cv2.LINE_AA)


def _put_vertical(img: np.ndarray, s: str, x: int, cy: int, scale: float, thickness: int) -> None:
    """Text rotated 90° counter-clockwise, its left edge at `x`, centred on `cy`."""
    (tw, th), base = cv2.getTextSize(_ascii(s), _FONT, scale, thickness)
    tile = np.full((th + base + 4, tw + 4, 3), 255, np.uint8)
    _put(tile, s, (2, th + 2), scale, _INK, thickness)
    tile = cv2.rotate(tile, cv2.ROTATE_90_COUNTERCLOCKWISE)
    y0 = max(0, cy - tile.shape[0] // 2)
    region = img[y0:y0 + tile.shape[0], x:x + tile.shape[1]]
    np.minimum(region, tile[:region.shape[0], :region.shape[1]], out=region)

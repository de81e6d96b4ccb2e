"""Plain-Python state of the app, no Qt: what model is loaded (`ModelInfo`), which policy and
thresholds are active (`PolicyState`), what has been shown so far (`LiveStats`), and how late the
GUI thread's timer ran (`LatenessMeter`). The Qt layer reads and drives these; tests use them bare.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


# -- the loaded model ---------------------------------------------------------------------------
@dataclass
class ModelInfo:
    """What the window needs to know about the loaded bundle, read once when it loads."""

    bundle: Any  # engine.bundle.Bundle: kept for saving, retraining and switching policies
    path: str  # file it came from, "" for a bundle made in this session (retraining)
    name: str
    backbone: str
    class_names: list[str]
    num_stages: int
    stage_names: list[str]
    exit_stages: list[int]
    exit_kinds: list[str]
    exit_flops: list[float]  # cumulative FLOPs of a frame that takes exit e (every exit active)
    full_flops: float
    full_ms: float | None  # measured full-model latency on `device`, None when not profiled
    device: str
    policies: dict[str, dict]  # name -> policy.to_json()
    descriptions: dict[str, str]  # name -> policy.describe()
    default_policy: str
    front: list[dict] = field(default_factory=list)  # meta["front"], cheapest first
    default_point: int | None = None
    parameters: int = 0
    devices: list[str] = field(default_factory=list)  # what Engine.available_devices() offers here

    @property
    def num_exits(self) -> int:
        return len(self.exit_stages)

    @classmethod
    def from_engine(cls, engine: Any, path: str = "") -> "ModelInfo":
        """Read the facts off an `engine.runtime.Engine` (duck-typed: this module never imports torch)."""
        bundle = engine.bundle
        model = bundle.model
        cost = engine.cost
        meta = bundle.meta or {}
        front = [p for p in meta.get("front") or [] if isinstance(p, dict) and "policy" in p]
        point = meta.get("default_point")
        point = point if isinstance(point, int) and 0 <= point < len(front) else None
        try:
            full_ms = float(cost.full_ms)
        except (ValueError, AttributeError):
            full_ms = None
        name = meta.get("name") or (Path(path).stem if path else "retrained model")
        return cls(bundle=bundle, path=str(path), name=str(name), backbone=model.backbone.spec["name"],
                   class_names=list(model.class_names), num_stages=model.backbone.num_stages,
                   stage_names=[t.name for t in model.backbone.taps], exit_stages=list(model.exit_stages),
                   exit_kinds=[s.kind for s in model.exit_specs], exit_flops=list(cost.cumulative_flops()),
                   full_flops=float(cost.full_flops), full_ms=full_ms, device=str(engine.device),
                   policies={n: p.to_json() for n, p in bundle.policies.items()},
                   descriptions={n: p.describe() for n, p in bundle.policies.items()},
                   default_policy=bundle.default_policy, front=front, default_point=point,
                   parameters=sum(p.numel() for p in model.parameters()),
                   devices=[str(d) for d in engine.available_devices()])

    def summary(self) -> list[tuple[str, str]]:
        """(field, value) rows for the model-info dialog."""
        rows = [("Bundle", self.path or "(made in this session, not saved)"), ("Name", self.name),
                ("Backbone", f"{self.backbone} · {self.num_stages} stages · {self.parameters / 1e6:.2f} M parameters"),
                ("Classes", f"{len(self.class_names)}: {', '.join(self.class_names[:12])}"
                            + (" …" if len(self.class_names) > 12 else "")),
                ("Exits", ", ".join(f"E{e} after stage {s + 1} ({k})" for e, (s, k)
                                    in enumerate(zip(self.exit_stages, self.exit_kinds))))]
        rows.append(("Cost per exit", ", ".join(f"E{e}: {format_flops(f)} ({f / self.full_flops:.0%})"
                                                for e, f in enumerate(self.exit_flops))))
        rows.append(("Full model", format_flops(self.full_flops)
                     + (f" · {self.full_ms:.2f} ms on {self.device}" if self.full_ms is not None else "")))
        rows.append(("Policies", "; ".join(f"{n}: {d}" for n, d in self.descriptions.items())))
        rows.append(("Default policy", self.default_policy))
        rows.append(("Pareto front", f"{len(self.front)} operating points" if self.front else "none in this bundle"))
        return rows


def format_flops(flops: float) -> str:
    for unit, scale in (("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if abs(flops) >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} FLOPs"


def percent(fraction: float, digits: int = 0) -> str:
    """0.4567 -> "46 %"; never "-0 %" for a tiny negative saving (decision costs)."""
    value = round(100 * fraction, digits)
    return f"{0.0 if value == 0 else value:.{digits}f} %"


# -- the active policy --------------------------------------------------------------------------
class PolicyState:
    """Which policy is active and, for threshold policies, its thresholds as edited in the panel.

    `current` is the active policy as JSON (what the engine runs); `name` the bundle policy it
    started from; `edited` whether the sliders or the budget moved it away from that policy.
    """

    def __init__(self, info: ModelInfo):
        self.info = info
        self.name = info.default_policy
        self.current: dict = dict(info.policies[self.name])
        self.point: int | None = info.default_point
        self.edited = False

    @property
    def is_threshold(self) -> bool:
        return self.current.get("kind") == "threshold"

    @property
    def thresholds(self) -> list[float | None] | None:
        return list(self.current["thresholds"]) if self.is_threshold else None

    def choose(self, name: str) -> dict:
        """Switch to the bundle's policy `name`; returns its JSON."""
        if name not in self.info.policies:
            raise ValueError(f"the bundle has no policy {name!r}; it has {', '.join(self.info.policies)}")
        self.name, self.current, self.edited = name, dict(self.info.policies[name]), False
        return self.current

    def set_threshold(self, exit_index: int, value: float | None) -> list[float | None]:
        """Edit one exit's threshold (None = exit off); returns the full new list."""
        if not self.is_threshold:
            raise ValueError(f"policy {self.name!r} ({self.current.get('kind')}) has no thresholds to edit")
        ts = list(self.current["thresholds"])
        ts[exit_index] = None if value is None else min(1.0, max(0.0, float(value)))
        self.current = {**self.current, "thresholds": ts}
        self.edited = True
        return ts

    def choose_point(self, index: int) -> dict:
        """Take operating point `index` of the bundle's front; returns its policy JSON."""
        point = self.info.front[index]
        self.current, self.point, self.edited = dict(point["policy"]), index, True
        return self.current

    def reset(self) -> dict:
        """Back to the bundle's default policy and operating point."""
        self.choose(self.info.default_policy)
        self.point = self.info.default_point
        return self.current


def front_label(point: dict) -> str:
    """'expected accuracy 91.2 % · cost 43 % of the full model (saves 57 %)' for a front point."""
    saved = float(point.get("saved", 0.0))
    text = (f"expected accuracy {percent(float(point.get('accuracy', math.nan)), 1)} · "
            f"cost {percent(1 - saved)} of the full model (saves {percent(saved)})")
    if "ms" in point:
        text += f" · {float(point['ms']):.2f} ms"
    return text


def curve_xy(curve: Sequence[dict] | None) -> tuple[list[float], list[float]]:
    """A curve (points with "saved" or "flops" and "accuracy") as x = cost in % of the full model,
    y = accuracy in %, sorted by cost; empty lists for no curve."""
    pts = []
    for p in curve or []:
        if "accuracy" in p and "saved" in p:
            pts.append((100 * (1 - float(p["saved"])), 100 * float(p["accuracy"])))
    pts.sort()
    return [x for x, _ in pts], [y for _, y in pts]


# -- what has been shown ------------------------------------------------------------------------
class LiveStats:
    """Running figures over the frames shown since the model loaded (or the last reset)."""

    def __init__(self, num_exits: int = 0, history: int = 300):
        self.num_exits = num_exits
        self.history = history
        self.reset()

    def reset(self, num_exits: int | None = None) -> None:
        if num_exits is not None:
            self.num_exits = num_exits
        self.frames = 0
        self.flops = self.full_flops = self.ms = self.full_ms = 0.0
        self.exit_counts = [0] * self.num_exits
        self.saved_history: deque[float] = deque(maxlen=self.history)  # per frame, FLOPs saved in %
        self.cumulative_history: deque[float] = deque(maxlen=self.history)
        self._times: deque[float] = deque(maxlen=64)
        self.first_time: float | None = None
        self.last_time: float | None = None
        self.last = None  # the latest InferenceResult

    def add(self, result: Any, now: float | None = None) -> None:
        """Count one InferenceResult."""
        now = time.perf_counter() if now is None else now
        if len(self.exit_counts) < result.num_exits:
            self.exit_counts += [0] * (result.num_exits - len(self.exit_counts))
            self.num_exits = result.num_exits
        self.frames += 1
        self.flops += result.flops
        self.full_flops += result.full_flops
        self.ms += result.ms
        self.full_ms += result.full_ms or 0.0
        self.exit_counts[result.exit_index] += 1
        self.saved_history.append(100 * result.saved)
        self.cumulative_history.append(100 * self.saved)
        self._times.append(now)
        self.first_time = now if self.first_time is None else self.first_time
        self.last_time = now
        self.last = result

    @property
    def saved(self) -> float:
        """Fraction of FLOPs saved against the full model on every frame shown."""
        return 1.0 - self.flops / self.full_flops if self.full_flops else 0.0

    @property
    def saved_ms(self) -> float:
        return 1.0 - self.ms / self.full_ms if self.full_ms else 0.0

    @property
    def fps(self) -> float:
        """Frames per second over the last (up to) 64 frames."""
        if len(self._times) < 2 or self._times[-1] <= self._times[0]:
            return 0.0
        return (len(self._times) - 1) / (self._times[-1] - self._times[0])

    @property
    def overall_fps(self) -> float:
        """Frames per second from the first frame shown to the last."""
        if self.frames < 2 or self.last_time is None or self.last_time <= self.first_time:
            return 0.0
        return (self.frames - 1) / (self.last_time - self.first_time)

    def to_json(self) -> dict:
        return {"frames": self.frames, "exit_histogram": list(self.exit_counts),
                "saved_flops": self.saved, "saved_ms": self.saved_ms,
                "mean_ms": self.ms / self.frames if self.frames else 0.0,
                "full_ms": self.full_ms / self.frames if self.frames else 0.0,
                "fps": self.overall_fps}


class LatenessMeter:
    """How late a periodic timer fires: a measure of how long the GUI thread was blocked."""

    def __init__(self, interval_s: float):
        self.interval = interval_s
        self.max_ms = 0.0
        self.total_ms = 0.0
        self.ticks = 0
        self._last: float | None = None

    def tick(self, now: float | None = None) -> float:
        """Record one timer tick; returns its lateness in ms."""
        now = time.perf_counter() if now is None else now
        late = 0.0 if self._last is None else max(0.0, (now - self._last - self.interval) * 1000.0)
        self._last = now
        self.max_ms = max(self.max_ms, late)
        self.total_ms += late
        self.ticks += 1
        return late

    def restart(self) -> None:
        self._last = None
        self.max_ms = self.total_ms = 0.0
        self.ticks = 0

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.ticks if self.ticks else 0.0

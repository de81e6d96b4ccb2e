"""Plain-Python state of the app, no Qt: what model is loaded (`ModelInfo`), which policy and
thresholds are active (`PolicyState`); what has been shown so far (`RunningTotals`, the engine's
Qt-free accumulator) and how late the GUI thread's timer ran (`LatenessMeter`) come from `app.stats`. The Qt layer reads and drives these;
tests use them bare.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from engine.budget import check_budget, cost_fraction, fits, within_budget

from .stats import LatenessMeter, RunningTotals

__all__ = ["LatenessMeter", "ModelInfo", "PolicyState", "RunningTotals", "budget_text", "counted", "curve_xy",
           "format_flops", "front_label", "own_front", "percent", "signed_percent"]

# A learned policy's settings that change its trade-off without new weights: a point of its front
# that differs from the bundle's policy in these alone can run on the weights the bundle holds.
KNOBS = ("offset", "tau")


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
    # policy name -> (the points of its own front that can run here, cheapest first; index of the bundle's)
    policy_fronts: dict[str, tuple[list[dict], int | None]] = field(default_factory=dict)
    parameters: int = 0
    devices: list[str] = field(default_factory=list)  # what Engine.available_devices() offers here
    runtime: str = "torch"  # what runs the model: Engine.runtime_name
    # every runtime -> "" when it can run the model here, else why not (Engine.runtime_choices)
    runtimes: dict[str, str] = field(default_factory=lambda: {"torch": ""})

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
        policies = {n: p.to_json() for n, p in bundle.policies.items()}
        fronts = meta.get("policy_fronts") if isinstance(meta.get("policy_fronts"), dict) else {}
        policy_fronts = {n: own_front(entry, policies[n]) for n, entry in fronts.items()
                         if n in policies and isinstance(entry, dict)}
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
                   policies=policies, descriptions={n: p.describe() for n, p in bundle.policies.items()},
                   default_policy=bundle.default_policy, front=front, default_point=point,
                   policy_fronts={n: f for n, f in policy_fronts.items() if len(f[0]) > 1},
                   parameters=sum(p.numel() for p in model.parameters()),
                   devices=[str(d) for d in engine.available_devices()],
                   runtime=str(getattr(engine, "runtime_name", "torch")),
                   runtimes=dict(engine.runtime_choices()) if hasattr(engine, "runtime_choices") else {"torch": ""})

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


def counted(n: int, noun: str) -> str:
    """3, "class" -> "3 classes"; 1, "new early exit" -> "1 new early exit": a count as words say it
    (the last word takes "es" after s, x, ch, sh, else "s")."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}{'es' if noun.endswith(('s', 'x', 'ch', 'sh')) else 's'}"


def percent(fraction: float, digits: int = 0) -> str:
    """0.4567 -> "46 %"; never "-0 %" for a tiny negative saving (decision costs)."""
    value = round(100 * fraction, digits)
    return f"{0.0 if value == 0 else value:.{digits}f} %"


def signed_percent(fraction: float, digits: int = 0) -> str:
    """percent() with a typographic minus for a negative value: -0.05 -> "−5 %" (what a saving
    that costs more than it saves reads as)."""
    return percent(fraction, digits).replace("-", "\u2212")


def own_front(entry: dict, policy: dict) -> tuple[list[dict], int | None]:
    """The points of a bundle's meta["policy_fronts"] entry that can run with the tensors the bundle
    holds for `policy` (its JSON), and the index of the one that is `policy` (None if none is).

    A threshold policy's JSON is the whole policy: every point runs. A learned policy's points at
    another λ need weights the bundle does not keep; those differing only in KNOBS run."""
    def same_weights(p: dict) -> bool:
        if p.get("kind") != policy.get("kind"):
            return False
        return policy.get("kind") == "threshold" or all(p.get(k) == policy.get(k) for k in set(p) | set(policy)
                                                         if k not in KNOBS)
    points = [p for p in entry.get("points") or [] if isinstance(p, dict) and isinstance(p.get("policy"), dict)
              and same_weights(p["policy"])]
    index = next((i for i, p in enumerate(points) if p["policy"] == policy), None)
    return points, index


# -- the active policy --------------------------------------------------------------------------
class PolicyState:
    """Which policy is active and, for threshold policies, its thresholds as edited in the panel.

    `current` is the active policy as JSON (what the engine runs); `name` the bundle policy it
    started from (the one the policy combo shows); `edited` whether the sliders or the budget moved
    it away from that policy; `point` its index on `front`, the front the budget slider walks;
    `budget` the compute budget as a fraction of the full model's FLOPs (`choose_budget` sets it).

    Each policy walks its own front: a learned policy the points of its λ sweep the bundle can run
    (`ModelInfo.policy_fronts`), a threshold policy the bundle's front. A policy with no front of
    its own walks the bundle's front, and moving the budget switches to that front's policy.
    """

    def __init__(self, info: ModelInfo):
        self.info = info
        self.choose(info.default_policy)
        self.edited = False

    @property
    def is_threshold(self) -> bool:
        return self.current.get("kind") == "threshold"

    @property
    def thresholds(self) -> list[float | None] | None:
        return list(self.current["thresholds"]) if self.is_threshold else None

    @property
    def weights_of(self) -> str | None:
        """The bundle policy whose tensors `current` runs with (None: its JSON is all it needs)."""
        return None if self.is_threshold else self.name

    def front_of(self, name: str) -> tuple[str | None, list[dict], int | None]:
        """(the policy that owns it, the points, the bundle's own index) of the front the budget
        slider walks under policy `name`; (None, [], None) when there is none."""
        own = getattr(self.info, "policy_fronts", {}).get(name)
        if own:
            return name, own[0], own[1]
        owner = self._bundle_front_owner()
        if owner is None:
            return None, [], None
        return owner, list(self.info.front), self.info.default_point

    def _bundle_front_owner(self) -> str | None:
        """The threshold policy meta["front"] belongs to: "threshold", else the default, else the first
        threshold policy; None when the bundle has no front or no threshold policy."""
        if not self.info.front:
            return None
        kinds = {n: p.get("kind") for n, p in self.info.policies.items()}
        for name in ("threshold", self.info.default_policy, *kinds):
            if kinds.get(name) == "threshold":
                return name
        return None

    @property
    def front(self) -> list[dict]:
        return self.front_of(self.name)[1]

    @property
    def front_owner(self) -> str | None:
        return self.front_of(self.name)[0]

    def choose(self, name: str) -> dict:
        """Switch to the bundle's policy `name`; returns its JSON. Raises ValueError for another name."""
        if name not in self.info.policies:
            raise ValueError(f"the bundle has no policy {name!r}; it has {', '.join(self.info.policies)}")
        self.name, self.current, self.edited = name, dict(self.info.policies[name]), False
        owner, _, index = self.front_of(name)
        self.point = index if owner == name else None
        self.asked_budget: float | None = None
        return self.current

    def set_threshold(self, exit_index: int, value: float | None) -> list[float | None]:
        """Edit one exit's threshold (None = exit off); returns the full new list."""
        if not self.is_threshold:
            raise ValueError(f"policy {self.name!r} ({self.current.get('kind')}) has no thresholds to edit")
        ts = list(self.current["thresholds"])
        ts[exit_index] = None if value is None else min(1.0, max(0.0, float(value)))
        self.current = {**self.current, "thresholds": ts}
        self.edited = True
        self.asked_budget = None
        return ts

    def choose_point(self, index: int) -> dict:
        """Take operating point `index` of the front the budget walks (switching to the policy that
        owns it); returns its policy JSON. Raises IndexError for a point it does not have."""
        owner, points, own = self.front_of(self.name)
        if owner is None or not 0 <= index < len(points):
            raise IndexError(f"the budget has no point {index}")
        if owner != self.name:
            self.choose(owner)
        self.current, self.point = dict(points[index]["policy"]), index
        self.edited = index != own or self.current != self.info.policies[self.name]
        self.asked_budget = None
        return self.current

    # -- the compute budget: a fraction of the full model's FLOPs -----------------------------------
    def choose_budget(self, fraction: float) -> dict:
        """Take the most accurate point of the front the budget walks whose cost is within `fraction`
        of the full model's FLOPs (none fits: the cheapest; `budget_met` says which); returns its
        policy JSON. Raises ValueError for a fraction outside (0, 1], IndexError without a front."""
        fraction = check_budget(fraction)
        points = self.front
        if not points:
            raise IndexError(f"the {self.name} policy has no front to fit a budget of {fraction:g} in")
        index, _ = within_budget(points, fraction)
        self.choose_point(index)
        self.asked_budget = fraction
        return self.current

    @property
    def point_cost(self) -> float | None:
        """The cost of the front point in use as a fraction of the full model's FLOPs (None: none)."""
        return None if self.point is None else cost_fraction(self.front[self.point])

    @property
    def budget(self) -> float | None:
        """The compute budget (a fraction of the full model's FLOPs): the one `choose_budget` was
        given, else the cost of the front point in use; None off the front."""
        return self.asked_budget if self.asked_budget is not None else self.point_cost

    @property
    def budget_met(self) -> bool | None:
        """Whether the front point in use costs no more than `budget` (None off the front)."""
        cost = self.point_cost
        return None if cost is None else fits(cost, self.budget)

    def reset(self) -> dict:
        """Back to the bundle's default policy and operating point."""
        return self.choose(self.info.default_policy)

    # -- remembered between runs --------------------------------------------------------------------
    def memory(self) -> dict:
        """What to remember of the choice: the policy, the front point and the edited thresholds."""
        return {"name": self.name, "point": self.point, "edited": self.edited,
                "thresholds": self.thresholds if self.edited else None}

    def restore(self, memory: dict) -> dict:
        """Take back a `memory()`; returns the policy JSON. Raises ValueError (or IndexError) for
        one that does not fit this bundle, leaving the default policy active."""
        try:
            self.choose(str(memory["name"]))
            if memory.get("edited") and memory.get("point") is not None:
                self.choose_point(int(memory["point"]))
            ts = memory.get("thresholds")
            if ts is not None and memory.get("edited"):
                if not self.is_threshold or len(ts) != len(self.current["thresholds"]) or \
                        not all(t is None or 0.0 <= float(t) <= 1.0 for t in ts):
                    raise ValueError(f"remembered thresholds {ts!r} do not fit policy {self.name!r}")
                self.current = {**self.current, "thresholds": [None if t is None else float(t) for t in ts]}
                self.edited = True
        except (KeyError, TypeError, ValueError, IndexError):
            self.reset()
            raise ValueError(f"the remembered policy {memory!r} does not fit this bundle") from None
        return self.current


def budget_text(fraction: float) -> str:
    """0.6 -> '≤ 60 % of full compute' (rounded up, so the '≤' holds: 0.573 -> '≤ 58 %')."""
    return f"≤ {math.ceil(100 * fraction - 1e-9):d} % of full compute"


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

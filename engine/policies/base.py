"""The one policy interface and what a policy sees. A policy reads the `Evidence` at an exit and
says, per sample, whether to take this exit. Learned policies keep their parameters as module
state, which a bundle stores as tensors; everything else goes into `to_json()`.

`engine.policies` decides and nothing else: it imports no other part of the engine (training is
`engine.train`, scoring `engine.evaluate`), so the model, the cost meter and the prepared form
can all build on it.
"""
from __future__ import annotations

import operator
from typing import Callable, ClassVar, Protocol, Sequence

import numpy as np
import torch
from torch import nn

_POLICIES: dict[str, type["Policy"]] = {}
# Up to this many classes the learned policies' fast rows (`Policy.row_decider`) decide in Python
# floats; beyond it their own numpy/torch path is cheaper.
ROW_CLASSES = 64


def pooled_features(tap: torch.Tensor) -> torch.Tensor:
    """A tap's globally pooled features, (batch, channels): the mean over the positions of a map
    (batch, channels, h, w) or over the tokens (batch, tokens, channels); a vector as it is."""
    if tap.dim() == 4:
        return tap.mean(dim=(2, 3))
    if tap.dim() == 3:
        return tap.mean(dim=1)
    return tap.flatten(1)


class Evidence:
    """What a policy sees at one exit, for the samples still running.

    `features` (globally pooled tap features, (batch, channels)) is computed from `tap` only when a
    policy reads it, so policies that look at logits alone pay nothing for it.
    """

    __slots__ = ("exit_index", "num_exits", "logits", "exits_run", "index", "_features", "_tap")

    def __init__(self, exit_index: int, num_exits: int, logits: list[torch.Tensor], exits_run: list[int],
                 features: torch.Tensor | None = None, index: torch.Tensor | None = None, *,
                 tap: torch.Tensor | None = None):
        if features is None and tap is None:
            raise ValueError("Evidence needs the pooled features or the tap they come from")
        self.exit_index = exit_index  # which exit is deciding (0-based; last = the model's final classifier)
        self.num_exits = num_exits
        self.logits = logits  # calibrated logits of the exits evaluated so far, each (batch, classes)
        self.exits_run = exits_run  # the exit index of each entry in `logits`
        self.index = (torch.arange(logits[-1].shape[0], device=logits[-1].device)
                      if index is None else index)  # each sample's position in the original batch
        self._features, self._tap = features, tap

    @property
    def features(self) -> torch.Tensor:
        if self._features is None:
            self._features = pooled_features(self._tap)
        return self._features

    @property
    def current(self) -> torch.Tensor:
        return self.logits[-1]


class RowDecider(Protocol):
    """A policy's decisions for the prepared batch-1 path (`engine.prepared`), in Python floats.

    `columns(e)` says what else exit e's graph computes from the tap's pooled SUM for it: (rows
    (n, C), bias (n,)) of more products, and a centre (C,) whose distance from the sum it wants;
    (None, None, None) for nothing. `start()` is called once per image and returns
    `decide(e, row, more, distance, tap) -> bool`: `row` the exit's calibrated logits (a list of
    floats), `more` those extra products, `distance` that distance (0.0 without a centre), `tap`
    the stage output. Its answers must be `Policy.decide`'s (tests/test_prepared.py holds them)."""

    def columns(self, e: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]: ...

    def start(self) -> Callable[[int, list, list | None, float, torch.Tensor], bool]: ...


# -- one frame at a time in numpy -----------------------------------------------------------------
# The live case decides for one frame, where each tiny torch operation costs more than its
# arithmetic; learned policies compute that case in numpy, on float32 copies of their weights.
def one_frame(evidence: Evidence) -> bool:
    """True when `evidence` is a single sample on the CPU outside autograd (the numpy case)."""
    cur = evidence.current
    return cur.shape[0] == 1 and cur.device.type == "cpu" and not torch.is_grad_enabled()


def numpy_copies(owner: nn.Module, name: str, tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """float32 numpy copies of `tensors`, cached on `owner` under `name` and made again whenever
    one of them was changed in place (training, load_state_dict) or replaced."""
    key = tuple((t.data_ptr(), t._version) for t in tensors)
    cache = owner.__dict__.setdefault("_numpy_cache", {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = cache[name] = (key, [t.detach().float().cpu().numpy().copy() for t in tensors])
    return hit[1]


def softmax_row(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def linear_stack(layers: Sequence[nn.Linear], owner: nn.Module, name: str, x: np.ndarray) -> np.ndarray:
    """`x` through Linear layers with ReLU between them (not after the last), in numpy."""
    arrays = numpy_copies(owner, name, [t for m in layers for t in (m.weight, m.bias)])
    for i in range(0, len(arrays), 2):
        x = arrays[i] @ x + arrays[i + 1]
        if i < len(arrays) - 2:
            x = np.maximum(x, 0)
    return x


def register_policy(cls: type["Policy"]) -> type["Policy"]:
    """Class decorator: make a policy kind loadable from a bundle; duplicate kinds are an error."""
    if cls.kind in _POLICIES:
        raise ValueError(f"policy kind {cls.kind!r} is already registered")
    _POLICIES[cls.kind] = cls
    return cls


def list_policies() -> list[str]:
    return sorted(_POLICIES)


# A count that moves on whenever any module anywhere registers a parameter, buffer or submodule
# (an assignment or a `register_*` call): a policy makes its list of tensors again only then, not
# on every frame (walking its modules cost 17-32 µs a frame for the built-in learned policies).
_REGISTRATIONS = [0]
_VERSION = operator.attrgetter("_version")  # a tensor's in-place edit count, read in one C call per tensor


def _registered(*_args) -> None:
    _REGISTRATIONS[0] += 1


for _hook in ("register_module_parameter_registration_hook", "register_module_buffer_registration_hook",
              "register_module_module_registration_hook"):
    if hasattr(nn.modules.module, _hook):
        getattr(nn.modules.module, _hook)(_registered)
    else:  # a torch without these hooks: walk the modules every time
        _REGISTRATIONS = None  # type: ignore[assignment]
        break


def policy_from_json(d: dict, *, num_exits: int, num_classes: int) -> "Policy":
    """Rebuild a policy from its manifest entry (tensors are loaded afterwards with load_state_dict)."""
    kind = d.get("kind")
    if kind not in _POLICIES:
        raise ValueError(f"unknown policy kind {kind!r}; known kinds: {', '.join(list_policies())}")
    return _POLICIES[kind].from_json(d, num_exits=num_exits, num_classes=num_classes)


class Policy(nn.Module):
    kind: ClassVar[str] = ""
    evaluation_only: ClassVar[bool] = False  # True for policies that need the labels (the oracle)
    # One threshold per exit (None = exit off) that a user may edit live (`with_thresholds`), or
    # None for a policy that has none.
    thresholds: list[float | None] | None = None

    def active_exits(self, num_exits: int) -> list[bool]:
        """Which exits are evaluated at all; the last is always evaluated."""
        return [True] * num_exits

    def decide(self, evidence: Evidence) -> torch.Tensor:
        """(batch,) bool: True where the sample takes the exit `evidence.exit_index`."""
        raise NotImplementedError

    def decision_flops(self) -> list[float] | None:
        """FLOPs of one decision at every exit from the policy's own sizes (a multiply-add counts 2,
        matrix products only, as `engine.cost` counts them), or None when only measuring the
        decision on a model can tell (`engine.cost.measure_policy_flops`)."""
        return None

    def with_thresholds(self, thresholds: Sequence[float | None]) -> "Policy":
        """A copy deciding with these `thresholds` (see `thresholds`). Raises ValueError when the
        policy has none, or for a value it refuses."""
        raise ValueError(f"the {self.kind!r} policy ({self.describe()}) has no thresholds")

    def state_key(self) -> tuple:
        """What the decisions depend on besides the object itself; a plan made for this policy
        (`engine.prepared`) is made again when it changes. By default every parameter's and
        buffer's storage and version (an in-place edit changes the version); a policy with other
        settings adds them."""
        tensors = self._state_tensors()
        return tuple(map(_VERSION, tensors)), tuple(map(torch.Tensor.data_ptr, tensors))

    def _state_tensors(self) -> list[torch.Tensor]:
        """Every parameter and buffer, listed again only after a module registered one (see
        `_REGISTRATIONS`): an in-place edit or `.to()` keeps the tensor objects, and their
        storage and version are read on every call."""
        if _REGISTRATIONS is None:
            return [*self.parameters(), *self.buffers()]
        cached = self.__dict__.get("_tensors_listed")
        if cached is None or cached[0] != _REGISTRATIONS[0]:
            cached = self.__dict__["_tensors_listed"] = (_REGISTRATIONS[0], [*self.parameters(), *self.buffers()])
        return cached[1]

    def row_decider(self, num_classes: int, spatial: Sequence[int]) -> RowDecider | None:
        """Faster decisions for the prepared batch-1 path (see `RowDecider`), or None there to call
        `decide` on an `Evidence`. `spatial[e]` is the number of positions of exit e's tap."""
        return None

    def to_json(self) -> dict:
        return {"kind": self.kind}

    @classmethod
    def from_json(cls, d: dict, *, num_exits: int, num_classes: int) -> "Policy":
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind


@torch.no_grad()
def simulate(policy: Policy, logits: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Exit each sample would take under `policy`, from recorded outputs of every exit.

    `logits` (N, E, K) are calibrated logits of all exits; `features` the pooled tap features per
    exit. Runs the same decision sequence as `MultiExitNet.run`, so the answers agree exactly.
    Returns (N,) long.
    """
    n, num_exits, _ = logits.shape
    active = policy.active_exits(num_exits)
    fired = torch.full((n,), num_exits - 1, dtype=torch.long)
    index = torch.arange(n)
    run: list[int] = []
    for e in range(num_exits - 1):
        if not active[e]:
            continue
        run.append(e)
        feats = features[e][index] if features is not None else torch.empty(index.numel(), 0)
        ev = Evidence(e, num_exits, [logits[index, j] for j in run], list(run), feats, index)
        stop = policy.decide(ev).to(torch.bool).cpu()
        fired[index[stop]] = e
        index = index[~stop]
        if index.numel() == 0:
            break
    return fired

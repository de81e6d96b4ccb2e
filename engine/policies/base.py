"""The one policy interface. A policy sees the evidence at an exit and says, per sample,
whether to take this exit. Learned policies keep their parameters as module state, which a
bundle stores as tensors; everything else goes into `to_json()`.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from ..model import Evidence

_POLICIES: dict[str, type["Policy"]] = {}


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


def policy_from_json(d: dict, *, num_exits: int, num_classes: int) -> "Policy":
    """Rebuild a policy from its manifest entry (tensors are loaded afterwards with load_state_dict)."""
    kind = d.get("kind")
    if kind not in _POLICIES:
        raise ValueError(f"unknown policy kind {kind!r}; known kinds: {', '.join(list_policies())}")
    return _POLICIES[kind].from_json(d, num_exits=num_exits, num_classes=num_classes)


class Policy(nn.Module):
    kind: ClassVar[str] = ""
    evaluation_only: ClassVar[bool] = False  # True for policies that need the labels (the oracle)

    def active_exits(self, num_exits: int) -> list[bool]:
        """Which exits are evaluated at all; the last is always evaluated."""
        return [True] * num_exits

    def decide(self, evidence: Evidence) -> torch.Tensor:
        """(batch,) bool: True where the sample takes the exit `evidence.exit_index`."""
        raise NotImplementedError

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

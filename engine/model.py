"""MultiExitNet: a staged backbone with an exit head after some of its stages.

`forward_all` computes every exit (training, evaluation, recording); `run` executes stage by
stage and stops computing as soon as the policy lets every sample in the batch exit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from .backbones import StagedBackbone
from .exits import ExitHead, ExitSpec, make_exit, original_exit
from .policies import Evidence, pooled_features

if TYPE_CHECKING:
    from .policies import Policy


def resolve_index(i: int, n: int, what: str = "exit") -> int:
    """Turn a possibly negative index into an absolute one in [0, n); ValueError when out of range."""
    j = i + n if i < 0 else i
    if not 0 <= j < n:
        raise ValueError(f"{what} index {i} is out of range for {n} {what}s (use 0..{n - 1} or -{n}..-1)")
    return j


@dataclass
class StagedOutput:
    """Result of a staged run on a batch of B samples with E exits and K classes."""

    exit_index: torch.Tensor  # (B,) exit that fired
    logits: torch.Tensor  # (B, K) calibrated logits at the exit that fired
    exit_logits: torch.Tensor  # (B, E, K) calibrated logits of every exit that ran; NaN where it did not
    ran: torch.Tensor  # (B, E) bool: exit head evaluated for this sample
    stages_run: torch.Tensor  # (B,) number of stages executed for this sample
    stage_calls: list[int] = field(default_factory=list)  # samples each stage processed (proof of skipping)


class MultiExitNet(nn.Module):
    def __init__(self, backbone: StagedBackbone, exits: Sequence[ExitHead], class_names: Sequence[str]):
        super().__init__()
        stages = [e.spec.stage for e in exits]
        if not exits or stages != sorted(set(stages)):
            raise ValueError(f"exits must sit on distinct stages in increasing order, got stages {stages}")
        if stages[-1] != backbone.num_stages - 1:
            raise ValueError(f"the last exit must read the last stage ({backbone.num_stages - 1}), not {stages[-1]}")
        if any(e.spec.num_classes != len(class_names) for e in exits):
            raise ValueError(f"every exit must predict the {len(class_names)} classes {list(class_names)}")
        self.backbone = backbone
        self.exits = nn.ModuleList(exits)
        self.class_names = list(class_names)
        self.register_buffer("temperature", torch.ones(len(exits)))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def attach(cls, backbone: StagedBackbone, *, class_names: Sequence[str], exit_stages: Sequence[int] | None = None,
               head: str = "linear", hidden: int | None = None, keep_classifier: bool = True) -> "MultiExitNet":
        """Put new exit heads of kind `head` after `exit_stages` (default: every stage); linear ones
        where a stage gives tokens or a vector, not a feature map.

        The last exit is the backbone's own classifier when it exists, predicts the same number of
        classes and `keep_classifier` is true; otherwise a new head of `head` kind.
        """
        n = backbone.num_stages
        chosen = sorted({resolve_index(s, n, "stage") for s in (exit_stages if exit_stages is not None else range(n))})
        if chosen[-1] != n - 1:
            chosen.append(n - 1)
        k = len(class_names)
        if head == "deep" and hidden is None:  # deep heads widen up to the last stage's width
            hidden = max(t.channels for t in backbone.taps if t.layout == "map")
        heads = []
        for s in chosen:
            tap = backbone.taps[s]
            if s == n - 1 and keep_classifier and backbone.classifier is not None and _out_features(backbone.classifier) == k:
                heads.append(original_exit(backbone.classifier, tap, s, k))
            else:  # conv heads read maps: tokens and vectors get linear ones
                heads.append(make_exit(tap, s, head if tap.layout == "map" else "linear", k, hidden))
        backbone.classifier = None  # now owned by the last exit
        return cls(backbone, heads, class_names)

    @classmethod
    def from_specs(cls, backbone: StagedBackbone, specs: Sequence[ExitSpec], class_names: Sequence[str]) -> "MultiExitNet":
        """Rebuild exits from their specs (bundle loading); weights are loaded afterwards."""
        heads = []
        for spec in specs:
            tap = backbone.taps[resolve_index(spec.stage, backbone.num_stages, "stage")]
            if spec.kind == "original":
                if backbone.classifier is None:
                    raise ValueError(f"exit at stage {spec.stage} is 'original' but backbone has no classifier")
                heads.append(original_exit(backbone.classifier, tap, spec.stage, spec.num_classes))
            else:
                heads.append(make_exit(tap, spec.stage, spec.kind, spec.num_classes, spec.hidden or None))
        backbone.classifier = None
        return cls(backbone, heads, class_names)

    # -- facts --------------------------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        return len(self.exits)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def exit_specs(self) -> list[ExitSpec]:
        return [e.spec for e in self.exits]

    @property
    def exit_stages(self) -> list[int]:
        return [e.spec.stage for e in self.exits]

    def exit_index(self, i: int) -> int:
        return resolve_index(i, self.num_exits)

    # -- computing ----------------------------------------------------------------------------
    def forward(self, x):
        return self.forward_all(x)[-1]

    def forward_all(self, x: torch.Tensor, *, with_features: bool = False, calibrated: bool = False):
        """Logits of every exit, a list of (batch, classes); with pooled tap features if asked."""
        logits, feats = [], []
        e = 0
        for s, stage in enumerate(self.backbone.stages):
            x = stage(x)
            if e < self.num_exits and self.exits[e].spec.stage == s:
                out = self.exits[e](x)
                logits.append(out / self.temperature[e] if calibrated else out)
                if with_features:
                    feats.append(pooled_features(x))
                e += 1
                if e == self.num_exits:
                    break
        return (logits, feats) if with_features else logits

    @torch.no_grad()
    def run(self, x: torch.Tensor, policy: "Policy", taps: dict[int, torch.Tensor] | None = None) -> StagedOutput:
        """Staged inference that really stops: a sample leaves the batch when its exit fires, and
        stages after the last exit anyone needs are never executed. Exits the policy leaves
        inactive are not evaluated at all. `taps`, when given, receives the tap (stage output) of
        every early exit that ran, by exit (references to what the run computed anyway).

        The loop does only what deciding needs (a batch of 1 is the live case, where every
        tensor operation is overhead next to a small stage); the bookkeeping of the output is
        assembled once at the end.
        """
        b, n_exits = x.shape[0], self.num_exits
        active = policy.active_exits(n_exits)
        device = x.device
        exit_stage = self.exit_stages
        temperature = self.temperature.tolist()
        index = None  # positions in the batch of the samples still running; None = all of them
        left: list[tuple[int, torch.Tensor | None]] = []  # (exit, positions that fired there)
        computed: list[tuple[int, torch.Tensor | None, torch.Tensor]] = []  # (exit, positions, logits)
        history: list[torch.Tensor] = []
        history_exits: list[int] = []
        calls: list[int] = []
        e = 0
        for s, stage in enumerate(self.backbone.stages):
            x = stage(x)
            calls.append(int(x.shape[0]))
            if exit_stage[e] != s:
                continue
            if active[e] or e == n_exits - 1:
                logits = self.exits[e](x)
                if temperature[e] != 1.0:
                    logits = logits / temperature[e]
                computed.append((e, index, logits))
                history.append(logits)
                history_exits.append(e)
                if e == n_exits - 1:
                    break
                if taps is not None:
                    taps[e] = x
                stop = policy.decide(Evidence(e, n_exits, history, history_exits, None, index, tap=x))
                if x.shape[0] == 1:  # the live case: one sync, no indexing
                    if bool(stop):
                        left.append((e, index))
                        break
                elif bool(stop.any()):
                    stop = stop.to(torch.bool)
                    pos = torch.arange(x.shape[0], device=device) if index is None else index
                    left.append((e, pos[stop]))
                    keep = ~stop
                    index, x = pos[keep], x[keep]
                    history = [h[keep] for h in history]
                    if index.numel() == 0:
                        break
            e += 1
        return self._staged_output(b, device, left, computed, calls)

    def _staged_output(self, b, device, left, computed, calls) -> StagedOutput:
        n_exits = self.num_exits
        fired = torch.full((b,), n_exits - 1, dtype=torch.long, device=device)
        for e, pos in reversed(left):  # a sample leaves once: later entries never name it
            if pos is None:
                fired.fill_(e)
            else:
                fired[pos] = e
        out_logits = torch.full((b, n_exits, self.num_classes), float("nan"), device=device)
        ran = torch.zeros(b, n_exits, dtype=torch.bool, device=device)
        for e, pos, logits in computed:
            if pos is None:
                out_logits[:, e], ran[:, e] = logits, True
            else:
                out_logits[pos, e], ran[pos, e] = logits, True
        stages_run = torch.tensor(self.exit_stages, device=device)[fired] + 1
        final = out_logits[torch.arange(b, device=device), fired]
        return StagedOutput(fired, final, out_logits, ran, stages_run, calls)


def _out_features(classifier: nn.Module) -> int | None:
    last = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else None

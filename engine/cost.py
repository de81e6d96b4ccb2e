"""Cost of a multi-exit model: FLOPs of every stage, exit head and policy decision, measured with
`torch.utils.flop_counter`; latency per stage and head measured on a device; the cost of a
sample that takes exit e, counting every exit head that ran before it and did not fire.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from .policies import Evidence, pooled_features

if TYPE_CHECKING:
    from .model import MultiExitNet
    from .policies import Policy


@dataclass
class CostTable:
    """Per-part costs of one model on one input size. FLOPs count a multiply-add as 2."""

    exit_stages: list[int]  # stage index each exit reads
    stage_flops: list[float]  # per stage
    exit_flops: list[float]  # per exit head
    policy_flops: list[float] = field(default_factory=list)  # per exit: cost of the decision there
    stage_ms: list[float] = field(default_factory=list)  # measured batch-1 latency per stage ([] = not measured)
    exit_ms: list[float] = field(default_factory=list)
    device: str = ""  # where the latencies were measured

    def __post_init__(self):
        if not self.policy_flops:
            self.policy_flops = [0.0] * len(self.exit_flops)

    @property
    def num_exits(self) -> int:
        return len(self.exit_stages)

    @property
    def has_latency(self) -> bool:
        return bool(self.stage_ms) and bool(self.exit_ms)

    def _path(self, part_stage: Sequence[float], part_exit: Sequence[float], part_policy: Sequence[float],
              active: Sequence[bool] | None) -> list[float]:
        """Cumulative cost of a sample that takes exit e, for every e: stages up to e, the head and decision
        at every active exit up to e (the last exit decides nothing). Inactive exits cost nothing on the way."""
        active = list(active) if active is not None else [True] * self.num_exits
        out, acc, prev_stage = [], 0.0, -1
        for e, s in enumerate(self.exit_stages):
            acc += sum(part_stage[prev_stage + 1: s + 1])
            prev_stage = s
            # A sample leaving at e paid for the head and the decision there; the last exit decides nothing.
            here = acc + part_exit[e] + (part_policy[e] if e < self.num_exits - 1 else 0.0)
            out.append(here)
            if active[e]:
                acc = here
        return out

    def cumulative_flops(self, active: Sequence[bool] | None = None) -> list[float]:
        """FLOPs used by a sample that exits at e, with inactive exits not evaluated."""
        return self._path(self.stage_flops, self.exit_flops, self.policy_flops, active)

    def cumulative_ms(self, active: Sequence[bool] | None = None) -> list[float]:
        if not self.has_latency:
            raise ValueError("this cost table has no latency profile; measure one with profile_latency()")
        return self._path(self.stage_ms, self.exit_ms, [0.0] * self.num_exits, active)

    @property
    def full_flops(self) -> float:
        """The full model: every stage plus the last exit, no other head, no decisions."""
        return sum(self.stage_flops[: self.exit_stages[-1] + 1]) + self.exit_flops[-1]

    @property
    def full_ms(self) -> float:
        if not self.has_latency:
            raise ValueError("this cost table has no latency profile")
        return sum(self.stage_ms[: self.exit_stages[-1] + 1]) + self.exit_ms[-1]

    def mean_flops(self, exit_index: torch.Tensor, active: Sequence[bool] | None = None) -> float:
        """Mean FLOPs per sample for samples that took `exit_index` (N,)."""
        table = torch.tensor(self.cumulative_flops(active), dtype=torch.float64)
        return float(table[exit_index.cpu().long()].mean()) if exit_index.numel() else 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "CostTable":
        return cls(**{k: d.get(k, []) if k != "device" else d.get(k, "") for k in cls.__dataclass_fields__})


# -- measuring ------------------------------------------------------------------------------------
def _flops_and_output(fn: Callable, *inputs):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        out = fn(*inputs)
    return float(counter.get_total_flops()), out


def count_flops(module: Callable, *inputs) -> float:
    """FLOPs (a multiply-add counts 2) of one call `module(*inputs)`; any callable will do.

    Counted by torch.utils.flop_counter: convolutions and matrix products, not element-wise work.
    """
    return _flops_and_output(module, *inputs)[0]


def _example_input(model: "MultiExitNet", input_size: int | tuple[int, int] | None, device) -> torch.Tensor:
    """A batch-1 image (1, 3, h, w) at the preset's crop size unless `input_size` says otherwise."""
    size = input_size or model.backbone.preset.crop
    h, w = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(0)  # the same evidence every time
    return torch.randn(1, 3, h, w, generator=generator).to(device)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def measure_costs(model: "MultiExitNet", policy: "Policy | None" = None,
                  input_size: int | tuple[int, int] | None = None, device=None) -> CostTable:
    """FLOPs of every stage, exit head and (with `policy`) decision for one image of the preset's crop
    size (or `input_size`), each part fed the real output of the parts before it.

    `device` is where the example image is made: None = where the model is. A model on the "meta"
    device is counted without computing anything. Returns a CostTable without latencies.
    """
    device = device or _model_device(model)
    was_training = model.training
    model.eval()
    try:
        x = _example_input(model, input_size, device)
        stage_flops, taps = [], []
        for stage in model.backbone.stages:
            flops, x = _flops_and_output(stage, x)  # x: (1, channels, h, w) of this tap
            stage_flops.append(flops)
            taps.append(x)
        exit_flops = [count_flops(head, taps[head.spec.stage]) for head in model.exits]
        policy_flops = measure_policy_flops(policy, model, taps) if policy is not None else []
    finally:
        model.train(was_training)
    return CostTable(model.exit_stages, stage_flops, exit_flops, policy_flops)


@torch.no_grad()
def measure_policy_flops(policy: "Policy", model: "MultiExitNet", taps: Sequence[torch.Tensor] | None = None,
                         input_size: int | tuple[int, int] | None = None) -> list[float]:
    """FLOPs of `policy.decide` at every exit (0 at the last exit and at exits the policy leaves
    inactive), on the evidence of one real forward pass (`taps` = stage outputs, made when not given).

    Threshold policies cost ~0 (no matrix products); learned policies cost their layers. Policies
    that need labels (the oracle) are for evaluation only and cost 0.
    """
    n = model.num_exits
    active = policy.active_exits(n)
    if policy.evaluation_only:
        return [0.0] * n
    if taps is None:
        x = _example_input(model, input_size, _model_device(model))
        taps = []
        for stage in model.backbone.stages:
            x = stage(x)
            taps.append(x)
    flops, logits, run = [], [], []
    for e, head in enumerate(model.exits):
        if e == n - 1 or not active[e]:
            flops.append(0.0)
            continue
        tap = taps[head.spec.stage]
        logits.append(head(tap) / model.temperature[e])  # calibrated, as run() gives the policy
        run.append(e)
        features = pooled_features(tap)  # (1, channels)
        flops.append(count_decision_flops(policy, e, n, logits, run, features))
    return flops


def with_policy_flops(cost: CostTable, policy: "Policy", model: "MultiExitNet | None" = None) -> CostTable:
    """A copy of `cost` whose policy_flops are `policy`'s decision FLOPs at every exit: measured
    with `measure_policy_flops` when `model` is given, else the policy's own `decision_flops()`
    (its layer sizes; 0 for thresholds); evaluation-only policies cost 0.

    Raises ValueError when neither a model nor an analytic count is available, or the sizes differ.
    """
    n = cost.num_exits
    flops = measure_policy_flops(policy, model) if model is not None else policy.decision_flops()
    if flops is None:
        if not policy.evaluation_only:
            raise ValueError(f"cannot count the FLOPs of a {policy.kind!r} policy without its model: pass model=")
        flops = [0.0] * n
    if len(flops) != n:
        raise ValueError(f"the policy decides at {len(flops)} exits but the cost table has {n}")
    return replace(cost, policy_flops=[float(f) for f in flops])


def count_decision_flops(policy: "Policy", exit_index: int, num_exits: int, logits: Sequence[torch.Tensor],
                         exits_run: Sequence[int], features: torch.Tensor) -> float:
    """FLOPs of one `policy.decide` for one sample whose evidence is `logits` (each (1, classes))
    and pooled `features` (1, channels). Asked as a batch of two and halved: a policy may take a
    numpy shortcut for a single frame, which the FLOP counter (it sees torch operations) misses."""
    def two(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:1], t[:1]])
    evidence = Evidence(exit_index, num_exits, [two(l) for l in logits], list(exits_run), two(features),
                        torch.arange(2, device=features.device))
    return count_flops(policy.decide, evidence) / 2


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _median_ms(fn: Callable, x: torch.Tensor, device: torch.device, repeats: int, warmup: int):
    """Median wall time of `fn(x)` in milliseconds, and its output."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        out = fn(x)
        _synchronize(device)  # CUDA calls return before the work is done
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def profile_latency(model: "MultiExitNet", table: CostTable, device="cpu", repeats: int = 30, warmup: int = 5,
                    input_size: int | tuple[int, int] | None = None, threads: int | None = 1) -> CostTable:
    """A copy of `table` with the median batch-1 latency of every stage and exit head on `device`.

    On the CPU it is measured with `threads` intra-op threads (default 1, as the live app runs a
    frame: one image gains little from more, and on a busy 2-core laptop their spin-waiting costs
    more than the work; None = the current setting). The model is moved to `device` (and stays
    there) and put in eval mode for the measurement.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, not {repeats}")
    device = torch.device(device)
    was_training = model.training
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    model.to(device).eval()
    try:
        with torch.no_grad(), torch.inference_mode():
            x = _example_input(model, input_size, device)
            stage_ms, taps = [], []
            for stage in model.backbone.stages:
                ms, x = _median_ms(stage, x, device, repeats, warmup)
                stage_ms.append(ms)
                taps.append(x)
            exit_ms = [_median_ms(head, taps[head.spec.stage], device, repeats, warmup)[0] for head in model.exits]
    finally:
        model.train(was_training)
        torch.set_num_threads(threads_before)
    return replace(table, stage_ms=stage_ms, exit_ms=exit_ms, device=str(device))

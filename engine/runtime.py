"""Engine: load a bundle, pick a device, preprocess frames, run the staged model with the active
policy, and keep running totals. What it returns (`InferenceResult`) is all the app sees.
"""
from __future__ import annotations

import logging
import math
import os
import time
import weakref
from collections import deque
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .backbones import InputPreset
from .bundle import Bundle, BundleError, default_bundle_path, load_bundle
from .cost import CostTable, measure_costs, measure_policy_flops, profile_latency
from .model import MultiExitNet, StagedOutput
from .novelty import LiveNovelty, NoveltyReading
from .policies import MEASURES, Policy, ThresholdPolicy, confidence
from .prepared import PreparedModel, prepare
from .preprocess import Frame, preprocess
from .totals import THREAD_CLOCK, WALL_CLOCK, RunningTotals

log = logging.getLogger(__name__)
# what can run the model: "torch" (engine.prepared) or "onnxruntime" (engine.ort_runtime, CPU only)
RUNTIMES = ("torch", "onnxruntime")
# what times a frame: "auto" (the inference thread's CPU time where that is the model's whole
# compute, else the wall clock; see `Engine`) or "wall" (always the wall clock)
CLOCKS = ("auto", "wall")


def _thread_clock_is_fine() -> bool:
    """Whether `time.thread_time` resolves a microsecond (Linux and macOS: nanoseconds; Windows
    counts in 15.6 ms ticks, longer than a frame)."""
    try:
        return time.get_clock_info("thread_time").resolution <= 1e-6
    except (AttributeError, OSError, ValueError):
        return False


_THREAD_CLOCK_FINE = _thread_clock_is_fine()


@dataclass(frozen=True)
class ExitReading:
    """One exit that ran for this frame."""

    exit_index: int
    stage: int  # stage the exit reads
    confidence: float  # under the active policy's measure (max-probability for non-threshold policies)
    top_k: list[tuple[str, float]]  # (class name, probability), best first
    threshold: float | None  # the active threshold at this exit, if the policy has one
    fired: bool


@dataclass(frozen=True)
class InferenceResult:
    exit_index: int  # the exit that fired
    num_exits: int
    class_index: int
    label: str
    confidence: float  # top probability at the fired exit
    exits: list[ExitReading]  # the exits that ran, in order
    stages_run: int
    num_stages: int
    flops: float  # FLOPs used for this frame, exit heads that ran and did not fire included
    full_flops: float  # FLOPs of the full model (every stage + last exit)
    ms: float  # measured time of the staged run on the device, by `clock`
    full_ms: float  # latency of the full model on the same device: measured live (see `Engine`), else profiled
    totals: RunningTotals
    full_ms_live: bool = False  # True when full_ms comes from full-model runs timed alongside the live ones
    runtime: str = ""  # what ran the model and was timed: `Engine.runtime`
    clock: str = WALL_CLOCK  # what timed ms and full_ms: THREAD_CLOCK or WALL_CLOCK (`Engine`)
    # ran right after the full model's reference run on the same frame, on the caches it warmed: its
    # ms is not a typical frame's (`RunningTotals.typical_ms` leaves it out)
    warm: bool = False
    # how unlike the bundle's classes the frame is (engine.novelty.LiveNovelty), from an exit it ran;
    # None when the bundle has no novelty calibration (`Engine.novelty_reason` says why)
    novelty: NoveltyReading | None = None

    @property
    def saved(self) -> float:
        return 1.0 - self.flops / self.full_flops if self.full_flops else 0.0


# -- the engine -----------------------------------------------------------------------------------
class Engine:
    """A loaded bundle ready to classify frames on one device under one active policy.

    Not thread-safe, on purpose: one thread owns an Engine and makes every call on it, one after the
    other (in the app, `app.workers.InferenceWorker`: the GUI thread queues threshold, policy and
    device changes to it). One owner serialises; locks here would only repeat it.
    """

    def __init__(self, bundle: Bundle | str | os.PathLike | None = None, device: str = "auto", *,
                 latency_repeats: int = 20, reference_every: int = 0, runtime: str = "torch",
                 clock: str = "auto"):
        """`bundle`: a Bundle, a bundle file, or None for the default bundle (`default_bundle_path()`).

        `reference_every` = N > 0: on every N-th single frame, the full model (every stage, the
        last exit, no other head, no decision) also runs once on it, before the staged run, and is
        timed the same way, so results compare the staged run's milliseconds with the full
        model's measured under the same conditions (a busy laptop, other threads, caches gone cold
        while waiting for the frame) instead of with an idle-time profile. These reference runs
        count in no FLOPs or exit figure; the staged run after one is marked `warm`.

        `runtime`: what runs the model, one of `RUNTIMES` (see `set_runtime`).

        `clock`: what times the staged runs and the full model's reference runs, one of `CLOCKS`.
        "auto" times them by the calling thread's CPU time (`time.thread_time`) where that is all
        the model's compute: on the CPU with one intra-op thread (the app's inference thread) and
        a clock finer than a microsecond. Then another thread of the process holding the
        interpreter lock, or the OS giving the core to something else, does not count as the
        model's time. In the window, the GUI and capture threads take the lock whenever the staged
        run releases it (at every graph call and small op, more often than the full model's one
        call), and the wall clock charged the staged run its waits: "time saved" read 2.9 to
        29.9 % across runs of the same 40,000 frames. The switches still cost CPU time, which
        this clock counts (README, "Compute saved"). Elsewhere (a GPU, more threads, Windows) and
        with "wall": the wall clock. Results say which (`InferenceResult.clock`).

        Raises BundleError when the bundle is missing or damaged, ValueError for a device this
        machine does not have, a runtime that cannot run the model here or an unknown clock.
        """
        if clock not in CLOCKS:
            raise ValueError(f"unknown clock {clock!r}; choose one of {', '.join(CLOCKS)}")
        target = _resolve_device(device)
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
        if runtime == "onnxruntime":  # said before the bundle loads
            from .ort_runtime import unavailable_reason
            why = unavailable_reason(target)
            if why:
                raise ValueError(why)
        if bundle is None:
            path = default_bundle_path()
            if not path.is_file():
                raise BundleError(f"there is no default bundle at {path}; pass a bundle file or set "
                                  "OFFRAMP_DEFAULT_BUNDLE to one")
            bundle = path
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle, device="cpu")
        self.bundle = bundle
        self.model = bundle.model.eval()
        self._repeats = latency_repeats
        if reference_every < 0:
            raise ValueError(f"reference_every must be 0 (off) or a number of frames, not {reference_every}")
        self._reference_every = reference_every
        self._frames_run = 0
        self._reference_ms: deque[float] = deque(maxlen=32)  # the latest live full-model timings
        self._clock, self._clock_used = clock, WALL_CLOCK
        self._device = str(next(self.model.parameters()).device)
        name = bundle.default_policy
        if bundle.policies[name].evaluation_only:  # e.g. an oracle saved for reference: never live
            name = next((n for n, p in bundle.policies.items() if not p.evaluation_only), None)
            if name is None:
                raise ValueError("the bundle has only evaluation-only policies; add a threshold policy to use it live")
        self._policy: Policy = bundle.policies[name]
        self._policy_name: str | None = name
        has_flops = _has_flops(bundle.cost, self.model)
        self._cost = bundle.cost if has_flops else measure_costs(self.model, self._policy)
        self._flops_of: weakref.WeakKeyDictionary[Policy, list[float]] = weakref.WeakKeyDictionary()
        self._flops_at: tuple | None = None  # (cost table, active exits, FLOPs to reach each exit): `_results`
        self._totals = RunningTotals(self.model.num_exits, history=0)
        self._prepared: PreparedModel | None = None  # the form that runs (engine.prepared); made per device
        self._runtime = "torch"  # the runtime chosen (RUNTIMES)
        self._novelty, self.novelty_reason = LiveNovelty.from_bundle(bundle)
        self.set_device(target)
        if runtime != "torch":
            self.set_runtime(runtime)

    # -- facts ------------------------------------------------------------------------------------
    @staticmethod
    def available_devices() -> list[str]:
        """Devices this machine can run on: always "cpu", then "cuda" and "mps" when present."""
        out = ["cpu"]
        if torch.cuda.is_available():
            out.append("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            out.append("mps")
        return out

    @property
    def device(self) -> str:
        return self._device

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    @property
    def num_exits(self) -> int:
        return self.model.num_exits

    @property
    def preset(self) -> InputPreset:
        return self.model.backbone.preset

    @property
    def runtime(self) -> str:
        """What runs the model and is timed, for the user to read next to "time saved": e.g. "torch
        TorchScript + oneDNN Graph, BatchNorm folded" (`engine.prepared`)."""
        prepared = self._prepared
        return prepared.runtime if prepared is not None else "torch eager"

    @property
    def runtime_name(self) -> str:
        """The runtime chosen: one of `RUNTIMES`."""
        return self._runtime

    def runtime_choices(self) -> dict[str, str]:
        """Every runtime in `RUNTIMES` -> "" when it can run the model here on its device, else why
        not (one sentence, for a tooltip)."""
        from .ort_runtime import unavailable_reason
        return {"torch": "", "onnxruntime": unavailable_reason(self._device) or ""}

    def available_runtimes(self) -> list[str]:
        """The runtimes that can run the model here: "torch" always, "onnxruntime" when it is
        installed and the device is the CPU."""
        return [name for name, why in self.runtime_choices().items() if not why]

    @property
    def cost(self) -> CostTable:
        """FLOPs of the model and active policy, with the latency profile measured on this device."""
        return self._cost

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def policy_name(self) -> str | None:
        """The bundle's name for the active policy; None for a policy given as an instance."""
        return self._policy_name

    @property
    def thresholds(self) -> list[float | None] | None:
        """The active thresholds (one per exit), or None when the policy has none."""
        thresholds = self.policy.thresholds
        return list(thresholds) if thresholds is not None else None

    @property
    def totals(self) -> RunningTotals:
        """A snapshot of the running totals since the engine started or `reset_totals`."""
        return self._totals.snapshot()

    # -- changing what runs -----------------------------------------------------------------------
    def set_device(self, name: str) -> None:
        """Move the model to `name` ("auto", "cpu", "cuda", "mps", "cuda:1") and re-profile latency.

        Raises ValueError for a device this machine does not have.
        """
        device = _resolve_device(name)
        policy, cost, previous = self._policy, self._cost, self._device
        # onnxruntime runs on the CPU only: another device runs torch (`runtime_name` says so)
        runtime = self._runtime if device == "cpu" else "torch"
        try:
            self.model.to(device)
            policy.to(device)
            prepared = self._prepare(policy, runtime)
            cost = self._profiled(prepared, cost, device)
        except BaseException:  # e.g. out of GPU memory: stay where we were
            self.model.to(previous)
            policy.to(previous)
            raise
        if runtime != self._runtime:
            log.info("the %s runtime runs on the CPU only: %s runs torch", self._runtime, device)
        self._device, self._cost, self._prepared, self._runtime = device, cost, prepared, runtime
        self._reference_ms.clear()  # timings of the previous device

    def set_runtime(self, name: str) -> None:
        """Run the model with `name` (one of `RUNTIMES`) from the next frame on, and re-profile latency:
        "torch" (engine.prepared: TorchScript graphs) or "onnxruntime" (engine.ort_runtime: ONNX
        graphs made from the bundle now, a few seconds; the policy still decides on the host, so
        thresholds and policies change as with torch).

        Raises ValueError (one sentence) for an unknown name, a runtime that cannot run here
        (`runtime_choices`) or one that could not prepare this model; the engine then keeps its
        runtime."""
        if name not in RUNTIMES:
            raise ValueError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
        if name == self._runtime:
            return
        why = self.runtime_choices()[name]
        if why:
            raise ValueError(why)
        try:
            prepared = self._prepare(self._policy, name)
            cost = self._profiled(prepared, self._cost, self._device)
        except Exception as err:  # noqa: BLE001 - e.g. a stage the ONNX exporter cannot trace
            log.exception("could not prepare the model for the %s runtime", name)
            detail = " ".join(str(err).split())[:160] or err.__class__.__name__
            raise ValueError(f"the {name} runtime could not run this model ({detail}); it stays on "
                             f"{self._runtime}") from err
        self._prepared, self._cost, self._runtime = prepared, cost, name
        self._reference_ms.clear()  # timings of the previous runtime

    def _profiled(self, prepared, cost: CostTable, device: str) -> CostTable:
        """`cost` with the latency profile of `prepared` as it runs frames on `device`."""
        if prepared.input_shape is not None:  # profiled as it runs: its batch-1 graphs
            return prepared.profile_latency(cost, repeats=self._repeats, warmup=3)
        return profile_latency(self.model, cost, device=device, repeats=self._repeats, warmup=3,
                               threads=None)  # as this process runs frames

    def model_changed(self) -> None:
        """Prepare the model again after its weights were changed in place (the prepared form runs
        copies of them). A retrained model loaded as a new bundle needs no call: a new Engine
        prepares it; changing the policy or the thresholds also notices changed weights."""
        prepared = self._prepare(self.policy)
        self._prepared = prepared
        self._reference_ms.clear()

    def _prepare(self, policy: Policy, runtime: str | None = None) -> PreparedModel:
        """The model's prepared form for `runtime` (default the chosen one), its graphs for `policy`
        and for every exit's head made now (a threshold edit that turns an exit on then makes
        nothing on the next frame)."""
        if (runtime or self._runtime) == "onnxruntime":
            from .ort_runtime import prepare_ort
            prepared = prepare_ort(self.model)
        else:
            prepared = prepare(self.model)
        prepared.warm(ThresholdPolicy([1.0] * self.num_exits))
        prepared.warm(policy)
        return prepared

    def _current_prepared(self, policy: Policy) -> None:
        """Make `policy`'s graphs now, and prepare the model again if its weights changed."""
        prepared = self._prepared
        if prepared is None:
            return
        if not prepared.is_current():
            prepared = self._prepare(policy)
            self._prepared = prepared
            self._reference_ms.clear()
        prepared.warm(policy)

    def set_policy(self, policy: str | Policy) -> None:
        """Make `policy` (a name from the bundle, or a Policy) the active one, from the next frame on.

        Raises ValueError for an unknown name, an evaluation-only policy (the oracle) or a policy
        that does not fit this model's exits.
        """
        if isinstance(policy, str):
            if policy not in self.bundle.policies:
                raise ValueError(f"unknown policy {policy!r}; the bundle has: {', '.join(self.bundle.policies)}")
            name, policy = policy, self.bundle.policies[policy]
        elif isinstance(policy, Policy):
            name = next((n for n, p in self.bundle.policies.items() if p is policy), None)
        else:
            raise TypeError(f"set_policy takes a policy name or a Policy, not {type(policy).__name__}")
        if policy.evaluation_only:
            raise ValueError(f"the {policy.kind!r} policy needs the labels and is for evaluation only; "
                             "choose another policy")
        policy.active_exits(self.num_exits)  # raises ValueError when it does not fit the exits
        policy.to(self._device).eval()
        flops = self._policy_flops(policy)
        self._current_prepared(policy)
        self._policy, self._policy_name = policy, name
        self._cost = replace(self._cost, policy_flops=flops)

    def _policy_flops(self, policy: Policy) -> list[float]:
        """FLOPs of `policy`'s decision at every exit: what the policy declares (`decision_flops`),
        else measured once per policy object."""
        declared = policy.decision_flops()
        if declared is not None:
            return list(declared)
        if policy not in self._flops_of:
            self._flops_of[policy] = list(measure_policy_flops(policy, self.model))  # one forward pass
        return self._flops_of[policy]

    def set_thresholds(self, thresholds: Sequence[float | None]) -> None:
        """Replace the active threshold policy's thresholds (None = exit off), from the next frame on.

        Raises ValueError when the active policy has no thresholds, for a wrong count or a value
        outside 0..1.
        """
        if len(thresholds) != self.num_exits:
            raise ValueError(f"give {self.num_exits} thresholds (one per exit), not {len(thresholds)}")
        policy = self._policy
        if policy.thresholds is None:
            raise ValueError(f"the active policy ({policy.describe()}) has no thresholds; "
                             "choose a threshold policy first")
        # a new object rather than an edit: a frame in flight keeps the policy it started with
        edited = policy.with_thresholds(thresholds)
        self._policy = edited
        prepared = self._prepared
        # the graphs stay (a threshold is read on the host); weights changed in place are noticed here
        if prepared is not None and not prepared.is_current():
            self._current_prepared(edited)

    def reset_totals(self) -> None:
        self._totals = RunningTotals(self.num_exits, history=0)

    # -- running ----------------------------------------------------------------------------------
    def preprocess(self, frame: Frame, rgb: bool = False) -> torch.Tensor:
        """(1, 3, crop, crop) CPU tensor for `frame`: `engine.preprocess.preprocess` with the bundle's
        preset, the function datasets are evaluated with too. Raises as that does."""
        return preprocess(frame, self.preset, rgb)

    def infer(self, frame: Frame, rgb: bool = False) -> InferenceResult:
        """Classify one frame (BGR numpy by default; `rgb=True` for RGB; PIL image; path) with the
        active policy, stopping at the exit that fires. Raises ValueError for unreadable frames."""
        return self._run(self.preprocess(frame, rgb))[0]

    def infer_batch(self, frames: Sequence[Frame], rgb: bool = False) -> list[InferenceResult]:
        """Classify frames as one staged batch (samples leave as their exit fires); one result per
        frame, each with ms = batch time / number of frames."""
        if len(frames) == 0:
            return []
        return self._run(torch.cat([self.preprocess(f, rgb) for f in frames]))

    def _run(self, x: torch.Tensor) -> list[InferenceResult]:
        policy, cost, device, prepared = self._policy, self._cost, self._device, self._prepared
        x = x.to(device)
        timer = self._timer()
        warm = bool(self._reference_every and x.shape[0] == 1 and self._frames_run % self._reference_every == 0)
        if warm:
            # before the staged run, so the full model meets the frame as the staged runs meet theirs:
            # after the wait for a frame, the caches cold. Timed after it, on warm caches, it read
            # 1.54 ms against 1.99 ms for the staged run at 30 frames/s ("time saved −29 %", 37 % of
            # the FLOPs saved). The staged run that follows meets warm caches in turn: `warm` keeps
            # its time out of the typical frame's.
            self._time_full_model(x, device, prepared, timer)
        if prepared is not None:  # graphs a new set of active exits needs are made before the clock starts
            prepared.warm(policy)
        taps = {} if self._novelty is not None and x.shape[0] == 1 else None  # the run fills it: exit -> tap
        _sync(device)
        start = timer()
        with torch.inference_mode():
            out = (prepared or self.model).run(x, policy, taps)
        _sync(device)
        ms = (timer() - start) * 1000.0 / x.shape[0]
        novelty = self._novelty_of(out, taps)  # outside the clock: it is not the model's compute
        self._frames_run += 1
        return self._results(out, policy, cost, ms, novelty, warm)

    def _timer(self):
        """The clock this run is timed with (see `clock` in `Engine`); a change of clock (threads or
        device changed) starts the full model's reference timings afresh, so both stay comparable."""
        prepared = self._prepared
        thread = (self._clock == "auto" and _THREAD_CLOCK_FINE and self._device == "cpu"
                  and torch.get_num_threads() == 1 and getattr(prepared, "threads", 1) == 1)
        clock = THREAD_CLOCK if thread else WALL_CLOCK
        if clock != self._clock_used:
            self._reference_ms.clear()
            self._clock_used = clock
        return time.thread_time if thread else time.perf_counter

    def _novelty_of(self, out: StagedOutput, taps: dict[int, torch.Tensor] | None) -> list[NoveltyReading | None]:
        """Each frame's novelty reading from the taps its run recorded."""
        n = int(out.exit_index.shape[0])
        if self._novelty is None:
            return [None] * n
        if taps is None:
            return [self._novelty.unknown("computed for one frame at a time, not for a batch")] * n
        return [self._novelty.read(int(out.exit_index[0]), taps, out.ran[0].tolist())]

    def _time_full_model(self, x: torch.Tensor, device: str, prepared: PreparedModel | None, timer) -> None:
        """Run and time the full model on `x` as the staged run runs. Before the first reference
        run after a (re)start it runs twice untimed: those make and specialise the full model's graph
        (measured 6.6 and 2.0 ms, then 1.2–1.3 ms), which would make one still image claim most of its
        time saved (seen: "time saved 71 %" next to "FLOPs saved 12 %" for a single frame)."""
        def full(x: torch.Tensor) -> None:
            with torch.inference_mode():
                if prepared is not None:
                    prepared.run_to(x)
                else:
                    for stage in self.model.backbone.stages:
                        x = stage(x)
                    self.model.exits[-1](x)

        if not self._reference_ms:
            full(x)
            full(x)
        _sync(device)
        start = timer()
        full(x)
        _sync(device)
        self._reference_ms.append((timer() - start) * 1000.0)

    def _full_ms(self, cost: CostTable) -> tuple[float, bool]:
        """The full model's ms to compare with: the median of the live reference runs, else the profile.

        The median, not the mean: there is one reference run for every `reference_every` live frames,
        so one stall of the machine (another process, a page fault) in a reference run would weigh
        ten times what it weighs among the live frames and claim time saved that was not (seen: "time
        saved 60 %" next to "FLOPs saved 45 %" while another process loaded the CPU)."""
        live = sorted(self._reference_ms)
        if live:
            mid = len(live) // 2
            return (live[mid] if len(live) % 2 else (live[mid - 1] + live[mid]) / 2), True
        return (cost.full_ms if cost.has_latency else 0.0), False

    def _results(self, out: StagedOutput, policy: Policy, cost: CostTable, ms: float,
                 novelty: list[NoveltyReading | None], warm: bool = False) -> list[InferenceResult]:
        model, n_exits = self.model, self.model.num_exits
        active = tuple(policy.active_exits(n_exits))
        cached = self._flops_at
        if cached is None or cached[0] is not cost or cached[1] != active:  # per frame it is the same
            cached = self._flops_at = (cost, active, cost.cumulative_flops(list(active)))
        flops_at = cached[2]
        full_flops = cost.full_flops
        full_ms, full_ms_live = self._full_ms(cost)
        measure = getattr(policy, "measure", "max_prob")
        limits = policy.thresholds if policy.thresholds is not None else [None] * n_exits
        logits = out.exit_logits.float().cpu()  # (batch, exits, classes), NaN where an exit did not run
        probs = torch.softmax(logits, dim=-1)
        conf = confidence(logits, measure if measure in MEASURES else "max_prob").tolist()
        top_p, top_i = probs.topk(min(3, model.num_classes), dim=-1)
        top_p, top_i = top_p.tolist(), top_i.tolist()
        ran, fired_at, stages = out.ran.cpu().tolist(), out.exit_index.cpu().tolist(), out.stages_run.cpu().tolist()
        names, exit_stages = model.class_names, model.exit_stages  # a property that makes a list: once a frame
        results = []
        broken = next((f for i, f in enumerate(fired_at) if not math.isfinite(top_p[i][f][0])), None)
        if broken is not None:  # e.g. weights that overflow: "ship (nan %)" would mislead; nothing is counted
            raise ValueError(f"the model {self.bundle.meta.get('name', '')!r} gave no finite answer at exit "
                             f"E{broken} (NaN or infinite logits); its weights are broken: retrain it or load "
                             "another bundle.")
        for i, fired in enumerate(fired_at):
            readings = [ExitReading(e, exit_stages[e], conf[i][e],
                                    [(names[c], p) for c, p in zip(top_i[i][e], top_p[i][e])],
                                    limits[e] if e < n_exits - 1 else None, e == fired)
                        for e in range(n_exits) if ran[i][e]]
            self._totals.count(fired, n_exits, flops_at[fired], full_flops, ms, full_ms, typical=not warm)
            totals = self._totals.snapshot()
            results.append(InferenceResult(
                exit_index=fired, num_exits=n_exits, class_index=top_i[i][fired][0],
                label=names[top_i[i][fired][0]], confidence=top_p[i][fired][0], exits=readings,
                stages_run=stages[i], num_stages=model.backbone.num_stages, flops=flops_at[fired],
                full_flops=full_flops, ms=ms, full_ms=full_ms, totals=totals, full_ms_live=full_ms_live,
                runtime=self.runtime, clock=self._clock_used, warm=warm, novelty=novelty[i]))
        return results


def _resolve_device(name: str) -> str:
    """'auto' → cuda, then mps, then cpu; any other name is checked against this machine."""
    available = Engine.available_devices()
    if name == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if d in available)
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; available: {', '.join(available)}") from None
    if device.type not in available or (device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {name!r} is not available on this machine; available: {', '.join(available)}")
    return str(device)


def _sync(device: str) -> None:
    """Wait for queued GPU work, so perf_counter measures the computation and not its launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device.startswith("mps"):
        torch.mps.synchronize()


def _has_flops(table: CostTable, model: MultiExitNet) -> bool:
    return (list(table.exit_stages) == model.exit_stages and len(table.exit_flops) == model.num_exits
            and len(table.stage_flops) == model.backbone.num_stages and sum(table.stage_flops) > 0)

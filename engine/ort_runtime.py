"""The onnxruntime form of a MultiExitNet: what `Engine` runs with runtime="onnxruntime".

`OrtPreparedModel` has `engine.prepared.PreparedModel`'s contract where the Engine and `offramp
bench` use it (`run`, `run_to`, `warm`, `is_current`, `runtime`, `profile_latency`,
`input_shape`), and runs one image at a time on the CPU with onnxruntime, as `offramp export`'s
loop does, from graphs made in memory by its exporter (`engine.export.onnx_graph`):

  - one ONNX graph (one InferenceSession) per span of stages between two exits that run, made on
    first use for each set of active exits (`warm` makes them ahead), input "x" -> output "tap";
    a conv or deep exit head (calibrated: `engine.export.CalibratedExit`) goes into its span's
    graph as a second output "logits";
  - a linear head (1/(h·w) and the temperature folded into its rows, as engine.prepared does) and
    whatever else the policy's decision reads that is linear in the pooled features (columns,
    bias, a centre's distance: `RowDecider.columns`) are a numpy product on the host;
  - the decisions stay on the host: the policy's `row_decider`, else its `decide` on an
    `Evidence` (engine.prepared's `_EvidenceDecider`), so a threshold edit or another policy
    applies on the next frame and nothing is exported again. (`offramp export` also writes
    decision graphs: those fix the thresholds a runtime without Python needs.)

Other batch sizes and input sizes run through the torch prepared form without graphs (the folded
stages, `MultiExitNet.run`). The answers are the torch path's: the same exit, logits within 1e-4
(tests/test_ort_runtime.py).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import time
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from .cost import CostTable
from .export import OPSET, CalibratedExit, onnx_graph
from .model import MultiExitNet, StagedOutput
from .policies import Policy
from .prepared import (OneImageOutput, PlanCache, PreparedModel, _EvidenceDecider, fold_batchnorm,
                       folded_linear_heads)

log = logging.getLogger(__name__)
INSTALL = "pip install 'offramp[export]'"


def unavailable_reason(device: str = "cpu") -> str | None:
    """Why the onnxruntime form cannot run on `device` here (one sentence), or None when it can."""
    if not str(device).startswith("cpu"):
        return f"the onnxruntime runtime runs on the CPU only, and the model is on {device}; choose the CPU device first"
    if any(importlib.util.find_spec(name) is None for name in ("onnxruntime", "onnx")):
        return f"the onnxruntime runtime needs the onnx and onnxruntime packages: {INSTALL}"
    return None


class _Span(nn.Module):
    """Stages `first`..`last` and, when given, the calibrated exit head that reads the last one:
    x -> tap (and logits)."""

    def __init__(self, stages: list[nn.Module], head: nn.Module | None):
        super().__init__()
        self.stages, self.head = nn.Sequential(*stages), head

    def forward(self, x: torch.Tensor):
        tap = self.stages(x)
        return tap if self.head is None else (tap, self.head(tap))


class OrtPreparedModel:
    """`model` made ready to run with onnxruntime (see the module's doc)."""

    def __init__(self, model: MultiExitNet, *, threads: int | None = None):
        """`threads`: onnxruntime's intra-op threads (default torch's, as the torch path runs).
        Raises ValueError (one sentence) when onnxruntime is missing or the model is not on the CPU;
        what the exporter raises when a stage cannot become a graph."""
        device = next(model.parameters()).device
        why = unavailable_reason(device.type)
        if why is not None:
            raise ValueError(why)
        import onnxruntime as ort
        self._ort = ort
        model.eval()
        self.model = model
        self.torch_form = PreparedModel(model, graphs=False)  # the folded stages; other batch sizes run here
        self.num_exits, self.num_classes, self.exit_stages = model.num_exits, model.num_classes, model.exit_stages
        self.threads = max(1, threads if threads is not None else torch.get_num_threads())
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = self.threads
        self._options.inter_op_num_threads = 1
        self._options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._options.log_severity_level = 3  # errors only: its warnings name graph internals
        version = ".".join(ort.__version__.split(".")[:2])
        self.runtime = f"onnxruntime {version} CPU" + (f", {self.threads} threads" if self.threads > 1 else "")
        crop = model.backbone.preset.crop
        self.input_shape: tuple[int, ...] = (1, 3, crop, crop)
        self._stages = self.torch_form._stages
        self._inputs: list[torch.Tensor] = []  # example input of every stage, for exporting and timing
        x = torch.randn(*self.input_shape, generator=torch.Generator().manual_seed(0))
        spatial = []
        with torch.no_grad():
            for stage in self._stages:
                self._inputs.append(x)
                x = stage(x)
                spatial.append(math.prod(x.shape[2:]) if x.dim() == 4 else x.shape[1] if x.dim() == 3 else 1)
        self._spatial = spatial
        self._heads: list[tuple[np.ndarray, np.ndarray] | None] = [  # per exit: a linear head's (rows, bias)
            None if h is None else (h[0].numpy().copy(), h[1].numpy().copy())
            for h in folded_linear_heads(model, spatial)]
        self._sessions: dict[tuple[int, int, bool], object] = {}
        self._plans = PlanCache(lambda policy: _OrtPlan(self, policy))
        self._warmed: set[tuple[int, int, bool]] = set()
        self._span(0, self.exit_stages[-1], self._heads[-1] is None)  # the full model: fails here, not on a frame

    # -- graphs -----------------------------------------------------------------------------------
    def _span(self, first: int, last: int, head: bool):
        """The session of stages first..last (with the head of the exit reading `last` when `head`),
        made on first use: a callable x (numpy) -> [tap] or [tap, logits]."""
        key = (first, last, head)
        run = self._sessions.get(key)
        if run is None:
            e = self.exit_stages.index(last) if head else None
            module = _Span(self._stages[first:last + 1],
                           CalibratedExit(fold_batchnorm(self.model.exits[e], (self._tap(last),)),
                                          float(self.model.temperature[e])) if head else None)
            outputs = ["tap", "logits"] if head else ["tap"]
            start = time.perf_counter()
            data = _graph_bytes(module, (self._inputs[first],), outputs)
            session = self._ort.InferenceSession(data, self._options, providers=["CPUExecutionProvider"])
            log.debug("onnxruntime graph of stages %d-%d%s made in %.2f s", first, last, " + head" if head else "",
                      time.perf_counter() - start)
            run = self._sessions[key] = _bind(session)
        return run

    def _tap(self, s: int) -> torch.Tensor:
        """An example output of stage s (what its exit's head reads)."""
        with torch.no_grad():
            return self._stages[s](self._inputs[s])

    def is_current(self) -> bool:
        """False when the model's weights changed in place since it was prepared (prepare it again)."""
        return self.torch_form.is_current()

    def plan(self, policy: Policy) -> "_OrtPlan":
        """What runs for `policy` (made once per policy and its settings: `Policy.state_key`)."""
        return self._plans.get(policy)

    def warm(self, policy: Policy) -> None:
        """Make the sessions `policy` needs now rather than on its first frame and run each new one
        twice on a blank image (onnxruntime allocates its buffers on the first runs)."""
        steps = self.plan(policy).steps
        keys = [step.key for step in steps]
        if all(k in self._warmed for k in keys):
            return
        x = np.zeros(self.input_shape, dtype=np.float32)
        for _ in range(2):
            tap = x
            for step in steps:
                tap = step.run(tap)[0]
        self._warmed.update(keys)

    # -- running ----------------------------------------------------------------------------------
    def _fast(self, x: torch.Tensor) -> bool:
        return tuple(x.shape) == self.input_shape and x.device.type == "cpu" and x.dtype == torch.float32

    def run(self, x: torch.Tensor, policy: Policy, taps: dict[int, torch.Tensor] | None = None) -> StagedOutput:
        """Staged inference that really stops, as `MultiExitNet.run` (`taps` too): the onnxruntime
        graphs for one image of the preset's size, the torch folded modules otherwise."""
        if not self._fast(x):
            return self.torch_form.run(x, policy, taps)
        plan = self.plan(policy)
        decide, k, last = plan.decider.start(), self.num_classes, self.num_exits - 1
        rows: list[list[float] | None] = [None] * self.num_exits
        value = np.ascontiguousarray(x.detach().numpy())
        fired = s = 0
        for step in plan.steps:
            e, s = step.exit_index, step.stage
            out = step.run(value)
            tap = out[0]
            more, distance = None, 0.0
            if step.rows is not None:  # (n, C) times the pooled sum: a linear head's logits, the decision's products
                total = _pooled_sum(tap)
                values = (step.rows @ total + step.bias).tolist()
                if step.centre is not None:
                    distance = float(np.linalg.norm(total - step.centre))
                if step.host_head:
                    row, more = (values, None) if len(values) == k else (values[:k], values[k:])
                else:
                    row, more = out[1][0].tolist(), values
            else:
                row = out[1][0].tolist()
            rows[e] = row
            fired = e
            tensor = torch.from_numpy(tap)
            if taps is not None and e != last:
                taps[e] = tensor
            if e == last or decide(e, row, more, distance, tensor):
                break
            value = tap
        return OneImageOutput(plan.nan_rows, rows, fired, self.exit_stages[fired], s)

    def run_to(self, x: torch.Tensor, exit_index: int = -1, *, with_tap: bool = False):
        """Calibrated logits of exit `exit_index` (default the last: the full model) and nothing
        else, as `PreparedModel.run_to`; with `with_tap`: (logits, the stage output the exit read)."""
        if not self._fast(x):
            return self.torch_form.run_to(x, exit_index, with_tap=with_tap)
        e = self.model.exit_index(exit_index)
        head = self._heads[e]
        out = self._span(0, self.exit_stages[e], head is None)(np.ascontiguousarray(x.detach().numpy()))
        if head is not None:
            logits = torch.from_numpy((head[0] @ _pooled_sum(out[0]) + head[1])[None])
        else:
            logits = torch.from_numpy(out[1])
        return (logits, torch.from_numpy(out[0])) if with_tap else logits

    def profile_latency(self, table: CostTable, repeats: int = 30, warmup: int = 5) -> CostTable:
        """A copy of `table` with the median batch-1 ms of every stage and exit head as this form
        runs them (a head: its stage's graph with the head, less the stage's alone)."""
        def median_ms(fn, x) -> float:
            for _ in range(warmup):
                fn(x)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn(x)
                times.append((time.perf_counter() - start) * 1e3)
            return sorted(times)[len(times) // 2]
        inputs = [t.numpy() for t in self._inputs]
        stage_ms = [median_ms(self._span(s, s, False), inputs[s]) for s in range(len(self._stages))]
        exit_ms = []
        for e, s in enumerate(self.exit_stages):
            head = self._heads[e]
            if head is None:
                ms = median_ms(self._span(s, s, True), inputs[s])
            else:
                stage = self._span(s, s, False)
                ms = median_ms(lambda x, stage=stage, head=head: head[0] @ _pooled_sum(stage(x)[0]) + head[1],
                               inputs[s])
            exit_ms.append(max(ms - stage_ms[s], 0.0))
        return replace(table, stage_ms=stage_ms, exit_ms=exit_ms, device="cpu")


def prepare_ort(model: MultiExitNet, **kw) -> OrtPreparedModel:
    """`OrtPreparedModel(model, **kw)`; raises as that does."""
    return OrtPreparedModel(model, **kw)


# -- helpers --------------------------------------------------------------------------------------
def _graph_bytes(module: nn.Module, example: tuple[torch.Tensor, ...], outputs: list[str]) -> bytes:
    """The span as ONNX bytes for a fixed batch-1 input: the TorchScript-based exporter (seconds),
    else the torch.export-based one (a minute on the built-in model)."""
    try:
        return onnx_graph(module, example, ["x"], outputs, opset=OPSET, dynamic_batch=False, dynamo=False)
    except Exception:  # noqa: BLE001 - e.g. a torch without the TorchScript exporter: the other one
        log.info("the TorchScript-based ONNX exporter failed; trying torch.export's", exc_info=True)
        return onnx_graph(module, example, ["x"], outputs, opset=OPSET, dynamic_batch=False, dynamo=True)


def _bind(session):
    """session.run for input "x", every output, as a plain callable: x (numpy) -> list of arrays."""
    run, names = session.run, [o.name for o in session.get_outputs()]

    def call(x: np.ndarray) -> list[np.ndarray]:
        return run(names, {"x": x})
    return call


def _pooled_sum(tap: np.ndarray) -> np.ndarray:
    """One image's tap summed over its positions, (channels,): a map (1, C, h, w), tokens (1, n, C),
    or a vector as it is (engine.prepared's `_pooled_sum`, in numpy)."""
    if tap.ndim == 4:
        return tap.sum(axis=(0, 2, 3))
    if tap.ndim == 3:
        return tap.sum(axis=(0, 1))
    return tap.reshape(-1)


class _Step:
    """One span that runs for a policy: its session, the exit it ends at, and the host's products."""

    __slots__ = ("key", "run", "exit_index", "stage", "rows", "bias", "centre", "host_head")

    def __init__(self, form: OrtPreparedModel, first: int, e: int, columns, bias, centre):
        s = form.exit_stages[e]
        head = form._heads[e]
        self.host_head = head is not None
        self.key = (first, s, not self.host_head)
        self.run, self.exit_index, self.stage = form._span(*self.key), e, s
        rows = [] if head is None else [head]
        if columns is not None:
            rows.append((columns.detach().float().cpu().numpy(), bias.detach().float().cpu().numpy()))
        self.rows = np.ascontiguousarray(np.concatenate([r for r, _ in rows])) if rows else None
        self.bias = np.concatenate([b for _, b in rows]) if rows else None
        self.centre = None if centre is None else centre.detach().float().cpu().numpy()
        if self.centre is not None and self.rows is None:  # a distance with no products: an empty product
            self.rows = np.zeros((0, self.centre.shape[0]), np.float32)
            self.bias = np.zeros(0, np.float32)


class _OrtPlan:
    """For one policy: the spans that run (stages between two exits that run are one session) and
    the decider (the policy's `row_decider`, else its `decide` on an Evidence)."""

    def __init__(self, form: OrtPreparedModel, policy: Policy):
        n, k = form.num_exits, form.num_classes
        active = policy.active_exits(n)
        decider = policy.row_decider(k, [form._spatial[s] for s in form.exit_stages])
        self.decider = decider if decider is not None else _EvidenceDecider(policy, n)
        self.nan_rows = np.full((1, n, k), np.nan, dtype=np.float32)
        self.steps: list[_Step] = []
        first = 0
        for e in range(n):
            if not (active[e] or e == n - 1):
                continue
            columns, bias, centre = self.decider.columns(e) if e < n - 1 else (None, None, None)
            self.steps.append(_Step(form, first, e, columns, bias, centre))
            first = form.exit_stages[e] + 1

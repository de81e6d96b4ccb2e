"""The inference form of a MultiExitNet: what `Engine` and `offramp bench` run.

`MultiExitNet.run` stays the reference (plain modules, what training uses), but at batch 1 on a
CPU its per-layer Python calls, BatchNorms and per-exit tensor work cost as much as a small
stage's arithmetic. `prepare(model)` makes, once:

  - a copy of every stage with each BatchNorm folded into the convolution before it (`fold_batchnorm`);
  - for one image at a time on the CPU, TorchScript graphs (traced and frozen, channels-last,
    with oneDNN Graph fusion where this torch has it), one per exit that runs: the stages since
    the previous exit that ran, and a conv or deep head (BatchNorm folded) inside the graph. A
    linear head (1/(h·w) and the temperature folded into its Linear layer) and whatever else the
    policy reads that is linear in the pooled features are two eager operations on the tap after
    the graph (`_pooled_products`): measured, no slower than inside it. One TorchScript graph for
    the whole loop with the decisions in `if` blocks was measured and not kept: oneDNN Graph does
    not fuse inside the blocks (the full model +45 %). Stages between two exits that run are one
    graph, made on first use for each set of active exits (`PreparedModel.warm` makes them
    ahead). An exit that does not fire costs its graph's few extra operations, one host read and
    a decision in a few Python float operations (the policy's `row_decider`, see
    `engine.policies.RowDecider`), which at batch 1 cost less than the torch calls they replace;
  - for other batch sizes and input sizes, the folded stages in eager mode through
    `MultiExitNet.run` (samples leave the batch as their exits fire).

The answers are the reference's: the same exit, logits within 1e-5 (tests/test_prepared.py).
The prepared form copies the weights: after changing the model's weights in place, prepare it
again (`is_current` says whether that is needed). torch.compile was measured and not used: 19 s
to compile the built-in model here, twice the time per image of these graphs, and a C++ compiler
that a laptop may not have.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import threading
import time
import warnings
import weakref
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from torch import nn

from .backbones import StagedBackbone
from .cost import CostTable
from .exits import ExitHead
from .model import MultiExitNet, StagedOutput
from .policies import Evidence, Policy

log = logging.getLogger(__name__)
# TorchScript's deprecation notices and tracer warnings say nothing a user can act on here. They
# are filtered once, by category and message, rather than in `warnings.catch_warnings()` blocks
# around each trace: those swap the process's filters, so blocks left in two threads at once can
# restore each other's filters (and leave everything ignored for good).
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
_TRACE_LOCK = threading.Lock()  # oneDNN fusion is a process-wide switch, on only while graphs are made


_CONV = {"aten::_convolution", "aten::conv1d", "aten::conv2d", "aten::conv3d"}
_FOLDABLE = {(nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d),
             (nn.Linear, nn.BatchNorm1d)}  # (layer, BatchNorm) module types folded, exactly these


def fold_batchnorm(module: nn.Module, example: tuple[torch.Tensor, ...] | None = None) -> nn.Module:
    """A copy of `module` in eval mode with every BatchNorm that directly follows a convolution (or
    Linear) whose output nothing else reads folded into it; the plain copy without `example`, or
    when the folded copy does not give the module's output on it.

    The pairs are found in a TorchScript trace of the module on `example` (each operation carries
    the module it ran in), not with torch.fx: fx's tracer swaps `nn.Module.__call__` for the whole
    process while it runs, so a module another thread runs meanwhile fails or aborts (seen: an app
    window's worker preparing a model while another worker did; `engine.backbones.cut`, which
    needs fx, now passes other threads' modules through). A TorchScript trace is per thread."""
    original = module
    module = copy.deepcopy(module).eval()
    if example is None:
        return module
    try:
        with torch.no_grad():
            want = module(*example)
            graph = torch.jit.trace(module, example, check_trace=False).inlined_graph
        pairs = _foldable_pairs(module, graph)
        if not pairs:
            return module
        folded = module  # folded in place; a fresh copy of `original` only when the check fails
        for producer, norm in pairs:
            layer, bn = folded.get_submodule(producer), folded.get_submodule(norm)
            fused = (torch.nn.utils.fusion.fuse_linear_bn_eval(layer, bn) if isinstance(layer, nn.Linear)
                     else torch.nn.utils.fusion.fuse_conv_bn_eval(layer, bn))
            _replace(folded, producer, fused)
            _replace(folded, norm, nn.Identity())
        with torch.no_grad():
            got = folded(*example)
        if _close(got, want):
            return folded
        log.info("BatchNorm left unfolded: the folded copy computes other values")
    except Exception as err:  # noqa: BLE001 - a module TorchScript cannot trace keeps its BatchNorms
        log.info("BatchNorm left unfolded: %s", " ".join(str(err).split())[:200])
    return copy.deepcopy(original).eval()


def _module_path(scope: str) -> str:
    """The submodule a traced operation ran in, from its scope ("__module.0/__module.0.bn1" -> "0.bn1")."""
    last = scope.rsplit("/", 1)[-1]
    return last[len("__module."):] if last.startswith("__module.") else ""


def _foldable_pairs(module: nn.Module, graph) -> list[tuple[str, str]]:
    """(convolution or Linear, BatchNorm) submodule paths where the BatchNorm reads the layer's
    output and nothing else does, each module called once in the whole trace."""
    calls: dict[str, int] = {}
    for node in graph.nodes():
        if node.kind() in _CONV or node.kind() in ("aten::linear", "aten::batch_norm"):
            path = _module_path(node.scopeName())
            calls[path] = calls.get(path, 0) + 1
    pairs = []
    for node in graph.nodes():
        if node.kind() != "aten::batch_norm":
            continue
        source = node.inputsAt(0).node()
        if source.kind() not in _CONV and source.kind() != "aten::linear":
            continue
        layer, norm = _module_path(source.scopeName()), _module_path(node.scopeName())
        if not layer or not norm or calls[layer] != 1 or calls[norm] != 1 or len(source.output().uses()) != 1:
            continue
        a, b = module.get_submodule(layer), module.get_submodule(norm)
        if (type(a), type(b)) in _FOLDABLE and b.track_running_stats \
                and b.running_mean is not None:
            pairs.append((layer, norm))
    return pairs


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


# -- the graphs -----------------------------------------------------------------------------------
def _linear_head(head: ExitHead) -> nn.Linear | None:
    """The head's Linear layer when the head is global average pooling + one Linear, else None."""
    pre, post = head.pre, head.post
    if isinstance(post, nn.Sequential) and len(post) == 1:
        post = post[0]
    pooled = (isinstance(pre, nn.Sequential) and len(pre) == 2 and isinstance(pre[0], nn.AdaptiveAvgPool2d)
              and pre[0].output_size in (1, (1, 1)) and isinstance(pre[1], nn.Flatten))
    return post if pooled and isinstance(post, nn.Linear) else None


class _Calibrated(nn.Module):
    """Any other exit head, temperature applied, inside the graph."""

    def __init__(self, head: ExitHead, temperature: float, example: tuple[torch.Tensor, ...] | None = None):
        super().__init__()
        self.head, self.temperature = fold_batchnorm(head, example), float(temperature)

    def forward(self, tap: torch.Tensor) -> torch.Tensor:
        logits = self.head(tap)
        return logits / self.temperature if self.temperature != 1.0 else logits


class _Segment(nn.Module):
    """What one graph call computes: a stage; for an exit whose head is not linear in the pooled
    features, then `head`, the pooled sum of the tap times the columns given as inputs (`linear`),
    and the distance of that sum from a centre given as input (`norm`, for the structure policy).
    (A linear head's products are made outside the graph: `_pooled_products`.)"""

    def __init__(self, stage: nn.Module, head: nn.Module | None = None, linear: bool = False, norm: bool = False,
                 channels_last: bool = False):
        super().__init__()
        self.stage, self.head, self.linear, self.norm = stage, head, linear, norm
        self.channels_last = channels_last  # the first stage: take the image as it comes, run it channels-last

    def forward(self, x: torch.Tensor, *inputs: torch.Tensor):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        tap = self.stage(x)
        if self.head is None and not self.linear:
            return tap
        out = [tap]
        if self.head is not None:
            out.append(self.head(tap))
        total = _pooled_sum(tap)
        if self.linear:  # (n,): addmv, which oneDNN Graph leaves alone (a Linear would be a partition)
            out.append(torch.addmv(inputs[1], inputs[0], total))
        if self.norm:
            out.append(torch.linalg.vector_norm(total - inputs[2]))
        return tuple(out)


def _pooled_sum(tap: torch.Tensor) -> torch.Tensor:
    """One image's tap summed over its positions, (channels,): a map (1, C, h, w) in any memory
    format, tokens (1, n, C), or a vector as it is."""
    if tap.dim() == 4:
        return tap.sum(dim=(0, 2, 3))
    if tap.dim() == 3:
        return tap.sum(dim=(0, 1))
    return tap.flatten()


def _pooled_products(tap: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor,
                     centre: torch.Tensor | None) -> tuple[list[float], float]:
    """A linear head's calibrated logits (and the decision's other products) from one image's tap:
    `rows` (n, C) times its pooled sum plus `bias` (n,), as floats; and the sum's distance from
    `centre` (0.0 without one). Eager on purpose: at batch 1 these two or three operations cost
    less run here than inside the stage's graph, which then returns more outputs and checks more
    inputs on every call (measured, see the module's doc)."""
    total = _pooled_sum(tap)
    values = torch.addmv(bias, rows, total).tolist()
    return values, (torch.linalg.vector_norm(total - centre).item() if centre is not None else 0.0)


@contextlib.contextmanager
def _onednn_fusion(enabled: bool):
    with _TRACE_LOCK:
        before = torch.jit.onednn_fusion_enabled()
        torch.jit.enable_onednn_fusion(enabled)
        try:
            yield
        finally:
            torch.jit.enable_onednn_fusion(before)


def _close(got, want) -> bool:
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    return len(got) == len(want) and all(g.shape == w.shape and bool(torch.allclose(g, w, rtol=1e-4, atol=1e-4))
                                         for g, w in zip(got, want))


def _graph(module: nn.Module, example: tuple[torch.Tensor, ...], fuse: bool) -> tuple[Callable, str]:
    """`module` as a frozen TorchScript graph, run on `example` until optimised and checked against
    the module: (the graph's forward, how it runs). Falls back to no fusion, then to the module."""
    module.eval()
    with torch.no_grad():
        want = module(*example)
    failure = None
    for fused in ((True, False) if fuse else (False,)):
        try:
            with _onednn_fusion(fused):
                with torch.no_grad():
                    graph = torch.jit.freeze(torch.jit.trace(module, example, check_trace=False))
                with torch.inference_mode():  # the profiling executor optimises on the first runs
                    for _ in range(3):
                        got = graph.forward(*example)
            if _close(got, want):
                return graph.forward, "TorchScript + oneDNN Graph" if fused else "TorchScript"
            failure = "its TorchScript graph computes other values"
        except Exception as err:  # noqa: BLE001 - e.g. a fusion this torch cannot do: try the next way
            failure = " ".join(str(err).split())[:200]
    # a generic graph (a model cut by torch.fx, engine.backbones.cut) may not trace: eager is slower, never wrong
    log.info("a part of the model runs eagerly: TorchScript could not make it a graph (%s)", failure)
    return module.forward, "eager"


class PlanCache:
    """Per policy object and its settings (`Policy.state_key`), the plan `make(policy)` made for it:
    made once, then found again; the live case (the same policy as the frame before) first."""

    def __init__(self, make: Callable[[Policy], object]):
        self._make = make
        self._plans: dict[int, tuple[weakref.ref, tuple, object]] = {}
        self._last: tuple | None = None  # (policy, key, plan) of the latest call

    def get(self, policy: Policy):
        key = policy.state_key()
        last = self._last
        if last is not None and last[0] is policy and last[1] == key:
            return last[2]
        hit = self._plans.get(id(policy))
        if hit is None or hit[0]() is not policy or hit[1] != key:
            hit = (weakref.ref(policy), key, self._make(policy))
            self._plans[id(policy)] = hit
        self._last = (policy, key, hit[2])
        return hit[2]


def folded_linear_heads(model: MultiExitNet, spatial: list[int]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per exit, a linear head's (rows (K, C), bias (K,)) with 1/(h·w) of the positions its stage's
    output averages (`spatial[stage]`) and the exit's temperature folded in, so the calibrated logits
    are rows @ (the tap summed over its positions) + bias; None for a head that is not linear."""
    heads = []
    for e, head in enumerate(model.exits):
        linear, t = _linear_head(head), float(model.temperature[e])
        if linear is None:
            heads.append(None)
            continue
        scale = 1.0 / (spatial[model.exit_stages[e]] * t)
        bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
        heads.append(((linear.weight.detach().double() * scale).float().contiguous(),
                      (bias.detach().double() / t).float()))
    return heads


# -- the prepared model ---------------------------------------------------------------------------
class PreparedModel:
    """`model` made ready to run (see the module's doc). `run` has `MultiExitNet.run`'s contract."""

    def __init__(self, model: MultiExitNet, *, graphs: bool | None = None, fuse: bool = True,
                 channels_last: bool = True):
        """`graphs`: make the batch-1 TorchScript graphs (default: when the model is on the CPU);
        `fuse`: with oneDNN Graph fusion where it works (each graph is checked against its module);
        `channels_last`: the graphs keep images channels-last (faster convolutions here)."""
        model.eval()
        self.model = model
        self._stamp = [(t, t._version) for t in (*model.parameters(), *model.buffers())]
        self.device = next(model.parameters()).device
        backbone = model.backbone
        crop = backbone.preset.crop
        x = torch.randn(1, 3, crop, crop, generator=torch.Generator().manual_seed(0)).to(self.device)
        examples = []
        with torch.no_grad():
            for stage in backbone.stages:
                examples.append(x)
                x = stage(x)
        self._stages = [fold_batchnorm(s, (ex,)) for s, ex in zip(backbone.stages, examples)]
        folded = StagedBackbone(self._stages, list(backbone.taps), None, backbone.preset, backbone.spec)
        self.batched = MultiExitNet(folded, list(model.exits), model.class_names).to(self.device).eval()
        self.batched.temperature.copy_(model.temperature)
        self.num_exits, self.num_classes, self.exit_stages = model.num_exits, model.num_classes, model.exit_stages
        self._graphs = self.device.type == "cpu" if graphs is None else graphs
        self._fuse, self._channels_last = fuse, channels_last
        self._plans = PlanCache(lambda policy: _Plan(self, policy))
        self._warmed: set[int] = set()  # ids of the graphs `warm` has run
        self._made: dict[tuple, Callable] = {}
        self._kinds: set[str] = set()
        self.input_shape: tuple[int, ...] | None = None
        if self._graphs:
            self._make_stage_graphs()

    @property
    def runtime(self) -> str:
        """How this form runs one image: e.g. "torch TorchScript + oneDNN Graph, BatchNorm folded"."""
        kinds = " / ".join(sorted(self._kinds)) if self._graphs else "eager"
        return f"torch {kinds}, BatchNorm folded"

    def _make_stage_graphs(self) -> None:
        crop = self.model.backbone.preset.crop
        self.input_shape = (1, 3, crop, crop)
        x = torch.randn(*self.input_shape, generator=torch.Generator().manual_seed(0)).to(self.device)
        self._inputs, self._taps, self._spatial = [], [], []  # per stage: an example input and output
        cl = self._channels_last
        self._graph_stages = [copy.deepcopy(s).to(memory_format=torch.channels_last) if cl else s
                              for s in self._stages]
        with torch.no_grad():
            for s, stage in enumerate(self._graph_stages):
                self._inputs.append(x)
                x = stage(x.contiguous(memory_format=torch.channels_last) if cl and x.dim() == 4 else x)
                self._taps.append(x)
                # how many positions the pooled features average: h·w of a map, the tokens of a sequence
                self._spatial.append(math.prod(x.shape[2:]) if x.dim() == 4 else x.shape[1] if x.dim() == 3 else 1)
        self._heads = folded_linear_heads(self.model, self._spatial)
        self.exit_step(self.num_exits - 1, first=0)  # the full model, one graph: what runs with no early exit

    def _trace(self, module: nn.Module, example: tuple) -> Callable:
        fn, kind = _graph(module, example, self._fuse)
        self._kinds.add(kind)
        return fn

    def exit_step(self, e: int, columns: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  centre: torch.Tensor | None = None, first: int | None = None) -> tuple[Callable, tuple, tuple | None]:
        """The batch-1 graph (made on first use) of the stages from `first` (default: exit e's own
        stage) to exit e's, its extra inputs, and what `_pooled_products` makes of the tap it
        returns: (rows, bias, centre) for a linear head, whose products are made outside the graph;
        None when the graph also runs the head (and gives (tap, logits[, products][, distance])).
        `columns` (n, C) and `bias` (n,): more products of the pooled sum a decision reads;
        `centre` (C,): also give the distance of the pooled sum from it."""
        s = self.exit_stages[e]
        first = s if first is None else first
        head = self._heads[e]
        channels_last = self._channels_last and first == 0
        if head is not None:  # the stages alone; the head on the host
            key = ("stages", first, s)
            if key not in self._made:
                self._made[key] = self._trace(_Segment(self._span(first, s), channels_last=channels_last),
                                              (self._inputs[first],))
            rows, b = head
            if columns is not None:
                rows, b = torch.cat([rows, columns]).contiguous(), torch.cat([b, bias])
            return self._made[key], (), (rows, b, centre)
        inputs: list[torch.Tensor] = [] if columns is None else [columns, bias]
        linear = bool(inputs)
        if centre is not None:
            inputs = inputs + [centre] if linear else [torch.empty(0), torch.empty(0), centre]
        key = (first, e, linear, centre is not None)
        if key not in self._made:
            graph_head = _Calibrated(self.model.exits[e], float(self.model.temperature[e]), (self._taps[s],))
            module = _Segment(self._span(first, s), graph_head, linear, centre is not None, channels_last)
            self._made[key] = self._trace(module, (self._inputs[first], *inputs))
        return self._made[key], tuple(inputs), None

    def _span(self, first: int, last: int) -> nn.Module:
        """Stages first..last (their graph copies) as one module."""
        stages = self._graph_stages[first:last + 1]
        return stages[0] if len(stages) == 1 else nn.Sequential(*stages)

    def is_current(self) -> bool:
        """False when the model's weights changed in place since it was prepared (prepare it again)."""
        return all(t._version == v for t, v in self._stamp)

    def plan(self, policy: Policy) -> "_Plan":
        """What runs at each stage for `policy` (made once per policy and its settings:
        `Policy.state_key`)."""
        return self._plans.get(policy)

    def warm(self, policy: Policy) -> None:
        """Make the graphs `policy` needs now rather than on its first frame, and run each new one
        twice on a blank image: TorchScript specialises a graph on its first runs (measured on the
        built-in model: 6.6 and 2.0 ms, then 1.2–1.3 ms), which would otherwise land on the first
        frames a user sees and times."""
        if not self._graphs:
            return
        steps = self.plan(policy).steps
        if all(id(step[0]) in self._warmed for step in steps):
            return
        blank = torch.zeros(self.input_shape, device=self.device)
        for _ in range(2):
            x = blank
            for fn, _e, inputs, products, _s in steps:  # every step, as if no exit fired
                x = products(fn(x, *inputs))[0]
        self._warmed.update(id(step[0]) for step in steps)

    # -- running -----------------------------------------------------------------------------------
    def _fast(self, x: torch.Tensor) -> bool:
        return self._graphs and tuple(x.shape) == self.input_shape and x.device == self.device

    def run(self, x: torch.Tensor, policy: Policy, taps: dict[int, torch.Tensor] | None = None) -> StagedOutput:
        """Staged inference that really stops, as `MultiExitNet.run` (`taps` too): the batch-1 graphs
        for one image of the preset's size, the folded modules otherwise. (The graphs record no
        autograd: no inference-mode switch here, which alone costs as much as an exit's decision.)"""
        if not (self._graphs and x.shape == self.input_shape and x.device == self.device):
            return self.batched.run(x, policy, taps)
        plan = self.plan(policy)
        decide, last = plan.decider.start(), self.num_exits - 1
        rows: list[list[float] | None] = [None] * self.num_exits
        x = x.contiguous()
        for fn, e, inputs, products, s in plan.steps:  # s: the stage exit e reads
            tap, row, more, distance = products(fn(x, *inputs) if inputs else fn(x))
            rows[e] = row
            if taps is not None and e != last:
                taps[e] = tap
            if e == last or decide(e, row, more, distance, tap):
                return OneImageOutput(plan.nan_rows, rows, e, s, s)
            x = tap
        raise AssertionError("a plan ends with the last exit")  # pragma: no cover

    def run_to(self, x: torch.Tensor, exit_index: int = -1, *, with_tap: bool = False):
        """Calibrated logits of exit `exit_index` (default the last) and nothing else: no other head,
        no decision; the model cut after that exit (the full model for the last). With `with_tap`:
        (logits, the stage output the exit read)."""
        e = self.model.exit_index(exit_index)
        last = self.exit_stages[e]
        if not self._fast(x):
            with torch.no_grad():
                for stage in self.batched.backbone.stages[:last + 1]:
                    x = stage(x)
                logits = self.model.exits[e](x)
                t = float(self.model.temperature[e])
                logits = logits / t if t != 1.0 else logits
            return (logits, x) if with_tap else logits
        fn, inputs, host = self.exit_step(e, first=0)  # one graph: every stage (and a head that is not linear)
        out = fn(x.contiguous(), *inputs)
        if host is not None:
            tap = out
            logits = torch.addmv(host[1], host[0], _pooled_sum(tap)).unsqueeze(0)
        else:
            tap, logits = out[0], out[1]
        return (logits, tap) if with_tap else logits

    def profile_latency(self, table: CostTable, repeats: int = 30, warmup: int = 5) -> CostTable:
        """A copy of `table` with the median batch-1 ms of every stage and exit head as this form
        runs them (a head: its exit's graph less its stage's); `table` itself without graphs."""
        if not self._graphs:
            return table

        def median_ms(fn, *args) -> float:
            with torch.inference_mode():
                for _ in range(warmup):
                    fn(*args)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    fn(*args)
                    times.append((time.perf_counter() - start) * 1e3)
            return sorted(times)[len(times) // 2]
        stage_fns = [self._trace(_Segment(stage, channels_last=self._channels_last and s == 0), (self._inputs[s],))
                     for s, stage in enumerate(self._graph_stages)]
        stage_ms = [median_ms(fn, x) for fn, x in zip(stage_fns, self._inputs)]
        exit_ms = []
        for e, s in enumerate(self.exit_stages):
            fn, inputs, host = self.exit_step(e)
            if host is not None:
                def step(x, fn=fn, host=host):
                    return _pooled_products(fn(x), *host)
                exit_ms.append(max(median_ms(step, self._inputs[s]) - stage_ms[s], 0.0))
            else:
                exit_ms.append(max(median_ms(fn, self._inputs[s], *inputs) - stage_ms[s], 0.0))
        return replace(table, stage_ms=stage_ms, exit_ms=exit_ms, device=str(self.device))


class OneImageOutput(StagedOutput):
    """A batch-1 staged run's `StagedOutput` from its exits' logit rows (None where an exit did not
    run), `nan_rows` (1, exits, classes) all NaN, the exit that fired, the stage it read and the last
    stage that ran; its tensors are made when first read, through numpy (a few array writes cost
    less than one torch.tensor call). The run ends when the answer is known, as the full model's
    `run_to` does, which returns its logits as they come: the five small tensors of a StagedOutput (measured 9 µs alone, 32–38 µs
    after a run's graphs: `tests/benchmarks/loop_parts.py`) are bookkeeping for whoever reads them,
    not the model's compute, so they are made outside the time of the run."""

    def __init__(self, nan_rows: np.ndarray, rows: list, fired: int, fired_stage: int, last_stage: int):
        # not the dataclass's __init__: every field below is made on first read
        self._parts = (nan_rows, rows, fired, fired_stage, last_stage)

    @functools.cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        nan_rows, rows, _fired, _s, _last = self._parts
        exit_logits = nan_rows.copy()
        for e, row in enumerate(rows):
            if row is not None:
                exit_logits[0, e] = row
        return exit_logits, np.array([[r is not None for r in rows]])

    @functools.cached_property
    def exit_index(self) -> torch.Tensor:
        return torch.from_numpy(np.array([self._parts[2]], dtype=np.int64))

    @functools.cached_property
    def logits(self) -> torch.Tensor:
        return torch.from_numpy(self._arrays[0][:, self._parts[2]])

    @functools.cached_property
    def exit_logits(self) -> torch.Tensor:
        return torch.from_numpy(self._arrays[0])

    @functools.cached_property
    def ran(self) -> torch.Tensor:
        return torch.from_numpy(self._arrays[1])

    @functools.cached_property
    def stages_run(self) -> torch.Tensor:
        return torch.from_numpy(np.array([self._parts[3] + 1], dtype=np.int64))

    @functools.cached_property
    def stage_calls(self) -> list[int]:
        return [1] * (self._parts[4] + 1)


def prepare(model: MultiExitNet, **kw) -> PreparedModel:
    """`PreparedModel(model, **kw)`: the form `Engine` and `offramp bench` run."""
    return PreparedModel(model, **kw)


# -- plans: which graph each stage runs and how an exit decides, per policy -----------------------
class _Plan:
    """For one policy: per exit that runs, (the graph of the stages since the previous one (and of
    the exit's head when it is not linear), exit index, its inputs, what makes (tap, row, other
    products, distance) of the graph's output (`_host_products`, `_graph_products`), the stage the
    exit reads); and the decider: the policy's own fast rows (`Policy.row_decider`), else its
    `decide` on an Evidence. Stages between two exits that run are one graph: each call of a graph
    costs some microseconds whatever it computes."""

    def __init__(self, prepared: PreparedModel, policy: Policy):
        n, k = prepared.num_exits, prepared.num_classes
        active = policy.active_exits(n)
        spatial = [prepared._spatial[s] for s in prepared.exit_stages]
        decider = policy.row_decider(k, spatial)
        self.decider = decider if decider is not None else _EvidenceDecider(policy, n)
        self.nan_rows = np.full((1, n, k), np.nan, dtype=np.float32)
        self.steps = []
        first = 0
        for e in range(n):
            if not (active[e] or e == n - 1):
                continue
            columns, bias, centre = self.decider.columns(e) if e < n - 1 else (None, None, None)
            graph, inputs, host = prepared.exit_step(e, columns, bias, centre, first)
            products = (_host_products(*host, k, prepared._taps[prepared.exit_stages[e]].dim()) if host is not None
                        else _graph_products(columns is not None, centre is not None))
            self.steps.append((graph, e, inputs, products, prepared.exit_stages[e]))
            first = prepared.exit_stages[e] + 1


def _host_products(rows: torch.Tensor, bias: torch.Tensor, centre: torch.Tensor | None, k: int,
                   tap_dim: int) -> Callable:
    """tap -> (tap, the exit's row, the decision's other products or None, distance): a linear
    head's products made on the host (`_pooled_products`), split into the head's k logits and the
    rest. One closure per step, specialised for the tap's shape, so the batch-1 loop makes one call
    where it made several (see the README's speed table, measured before and after)."""
    dims = {4: (0, 2, 3), 3: (0, 1)}.get(tap_dim)
    if centre is None and rows.shape[0] == k and dims is not None:
        def products(tap: torch.Tensor):
            return tap, torch.addmv(bias, rows, tap.sum(dim=dims)).tolist(), None, 0.0
        return products

    def products_split(tap: torch.Tensor):
        values, distance = _pooled_products(tap, rows, bias, centre)
        return tap, values[:k], (values[k:] if len(values) > k else None), distance
    return products_split


def _graph_products(more: bool, distance: bool) -> Callable:
    """(tap, logits[, other products][, distance]) from a graph that runs its head -> (tap, row,
    other products or None, distance)."""
    def products(out: tuple):
        return (out[0], out[1].tolist()[0], out[2].tolist() if more else None,
                out[-1].item() if distance else 0.0)
    return products


class _EvidenceDecider:
    """Any other policy: its own `decide` on an `Evidence` of the logits so far and the tap."""

    def __init__(self, policy: Policy, num_exits: int):
        self.policy, self.num_exits = policy, num_exits

    def columns(self, e: int):
        return None, None, None

    def start(self):
        history: list[torch.Tensor] = []
        exits: list[int] = []

        def decide(e: int, row: list, more: list, distance: float, tap) -> bool:
            history.append(torch.tensor([row]))
            exits.append(e)
            return bool(self.policy.decide(Evidence(e, self.num_exits, history, exits, tap=tap)))
        return decide

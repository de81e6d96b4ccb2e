"""Export a bundle for runtimes outside Offramp: every stage, every exit head and every policy
decision as its own ONNX graph, and a JSON manifest that says how to chain them, so an edge
runtime computes exactly the stages an image needs and stops where the policy says.

A single graph would compute every exit (ONNX has no early return that runtimes honour); separate
graphs let the runtime stop. The manifest ("offramp-onnx/1"):

    input        how an image becomes the tensor `x` (resize, centre crop, scale, mean, std; NCHW RGB)
    stages[s]    file, input "x" -> output "tap" (the stage's output), FLOPs
    exits[e]     file, the stage it reads, input "tap" -> output "logits" (calibrated: the exit's
                 temperature is applied inside the graph), FLOPs
    policy       name, kind, its JSON (thresholds and measure for threshold policies), which exits
                 are active, and per active early exit a decision graph: inputs "logits0".."logitsK"
                 (the logits of the exits evaluated so far, in order), plus "tap" when the policy
                 reads the pooled features, -> output "exit" (bool per sample)
    algorithm    the loop, in words (see `OnnxRunner.run`, which implements it with onnxruntime)

`export_bundle` writes the folder atomically (a temp folder renamed into place) and, unless told
not to, checks every graph against torch with onnxruntime (`check_export`). Overwriting replaces
only an earlier export (a folder whose manifest says FORMAT) or an empty folder, never a folder of
anything else: `--out ~ --overwrite` must not delete a home folder.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .bundle import Bundle
from .files import OutputPathError, check_output_path, json_text, replacing
from .policies import Evidence, Policy
from .progress import CancelFlag, ProgressFn, report

FORMAT = "offramp-onnx/1"
MANIFEST = "manifest.json"
OPSET = 18
ALGORITHM = [
    "x = preprocess(image) as the 'input' entry says; history = []",
    "for each stage s in order: x = stages[s](x)",
    "  for the exit e reading stage s (if any), when policy.active[e] or e is the last exit:",
    "    logits_e = exits[e](x); history.append(logits_e)",
    "    if e is the last exit: answer argmax(logits_e) and stop",
    "    if decisions[e](*history, [tap=x]) is true: answer argmax(logits_e) and stop",
    "stages after the exit that answered are never computed",
]


class ExportError(RuntimeError):
    """The bundle could not be exported (no ONNX exporter, or a graph failed its check)."""


# -- the graphs -----------------------------------------------------------------------------------
class CalibratedExit(nn.Module):
    """An exit head with its temperature applied, as the staged run and the policies see it."""

    def __init__(self, head: nn.Module, temperature: float):
        super().__init__()
        self.head, self.temperature = head, float(temperature)

    def forward(self, tap: torch.Tensor) -> torch.Tensor:
        logits = self.head(tap)
        return logits / self.temperature if self.temperature != 1.0 else logits


class _Decision(nn.Module):
    """A policy's decision at one exit as a function of tensors: the history of logits and the tap."""

    def __init__(self, policy: Policy, exit_index: int, num_exits: int, exits_run: list[int], uses_tap: bool):
        super().__init__()
        self.policy, self.exit_index, self.num_exits = policy, exit_index, num_exits
        self.exits_run, self.uses_tap = list(exits_run), uses_tap

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        logits = list(inputs[:len(self.exits_run)])
        tap = inputs[-1] if self.uses_tap else logits[-1]
        evidence = Evidence(self.exit_index, self.num_exits, logits, self.exits_run, tap=tap)
        return self.policy.decide(evidence).to(torch.bool)


def _reads_features(policy: Policy, exit_index: int, num_exits: int, exits_run: list[int],
                    logits: list[torch.Tensor], tap: torch.Tensor) -> bool:
    """Whether the policy looks at the pooled features at this exit (Evidence computes them lazily)."""
    evidence = Evidence(exit_index, num_exits, logits, exits_run, tap=tap)
    policy.decide(evidence)
    return evidence._features is not None


def _have_dynamo_exporter() -> bool:
    """torch's torch.export-based ONNX exporter needs onnxscript."""
    return importlib.util.find_spec("onnxscript") is not None


def onnx_graph(module: nn.Module, example: tuple[torch.Tensor, ...], names: list[str], outputs: list[str], *,
               opset: int = OPSET, dynamic_batch: bool = True, dynamo: bool | None = None) -> bytes:
    """`module` as one serialised ONNX graph (inputs `names`, outputs `outputs`), quietly (the
    exporters are chatty). `dynamic_batch`: every input's first dimension is free, else the
    example's shapes are fixed. `dynamo`: torch's torch.export-based exporter (default: when
    onnxscript is installed); False: the TorchScript-based one, which makes a small graph in a
    fraction of the time (measured on the built-in model: 2 s against 60 s), what
    `engine.ort_runtime` uses, falling back to the other when it fails. Raises what the exporter raises."""
    module.eval()
    use_dynamo = _have_dynamo_exporter() if dynamo is None else dynamo
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if use_dynamo:
            kw = {}
            if dynamic_batch:
                batch = torch.export.Dim("batch", min=1, max=4096)
                shapes = tuple({0: batch} for _ in example)
                if isinstance(module, _Decision):  # forward(*inputs): the shapes of the one varargs tuple
                    shapes = (shapes,)
                kw["dynamic_shapes"] = shapes
            program = torch.onnx.export(module, example, dynamo=True, input_names=names, output_names=list(outputs),
                                        opset_version=opset, external_data=False, verbose=False, **kw)
            return program.model_proto.SerializeToString()
        buffer = io.BytesIO()  # the TorchScript-based exporter (older torch, onnxscript missing, or asked for)
        axes = {n: {0: "batch"} for n in [*names, *outputs]} if dynamic_batch else None
        torch.onnx.export(module, example, buffer, input_names=names, output_names=list(outputs),
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
        return buffer.getvalue()


def _export(module: nn.Module, example: tuple[torch.Tensor, ...], names: list[str], output: str,
            path: Path, opset: int) -> None:
    """One graph with a dynamic batch dimension on every input, written to `path`."""
    path.write_bytes(onnx_graph(module, example, names, [output], opset=opset))


# -- exporting ------------------------------------------------------------------------------------
def export_bundle(bundle: Bundle, folder: str | os.PathLike, *, policy: str | None = None, opset: int = OPSET,
                  check: bool = True, check_inputs: torch.Tensor | None = None, overwrite: bool = False,
                  progress: ProgressFn | None = None, cancel: CancelFlag | None = None) -> dict:
    """Write `bundle` as ONNX graphs + manifest.json into `folder` and return the manifest.

    `policy`: the bundle's policy to export (default: its default policy). `check`: run every graph
    with onnxruntime against torch on `check_inputs` (default: 8 random images) and put the result
    into the manifest under "check"; ExportError when outputs differ beyond tolerance or an exit
    decision differs. The folder appears complete or not at all; an existing folder is replaced
    only with `overwrite`, and only when it is an earlier export or empty (`check_export_folder`).
    Raises ValueError for an unknown policy or a folder that cannot be written, ExportError
    when no exporter is available, Cancelled when cancelled (nothing is left behind).
    """
    name = policy or bundle.default_policy
    if name not in bundle.policies:
        raise ValueError(f"the bundle has no policy {name!r}; it has {', '.join(sorted(bundle.policies))}")
    chosen = bundle.policies[name]
    if getattr(chosen, "evaluation_only", False):
        raise ValueError(f"the policy {name!r} needs the labels, so it cannot run outside evaluation")
    folder = check_export_folder(folder, overwrite=overwrite)
    if importlib.util.find_spec("onnx") is None:
        raise ExportError("ONNX export needs the onnx package: pip install 'offramp[export]'")
    model = bundle.model
    was_training, home = model.training, next(model.parameters()).device
    model.eval().cpu()
    try:
        # the folder appears complete or not at all; what is there is checked again when it is replaced
        with replacing(folder, folder=True, check_old=_check_replaceable) as tmp:
            manifest = _write_graphs(bundle, name, chosen, tmp, opset, progress, cancel)
            (tmp / MANIFEST).write_text(json_text(manifest, indent=1))
            if check:
                report(progress, cancel, "checking export", 0, 1)
                inputs = check_inputs if check_inputs is not None else _random_inputs(bundle)
                manifest["check"] = check_export(bundle, tmp, inputs, policy=name)
                (tmp / MANIFEST).write_text(json_text(manifest, indent=1))
                report(progress, cancel, "checking export", 1, 1)
    finally:
        model.to(home).train(was_training)
    return manifest


def check_export_folder(folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Check before any work that an export can be written to `folder`: it does not exist or, with
    `overwrite`, it is an earlier export or empty; its parent folder takes new files
    (`check_output_path`). Returns the folder; raises OutputPathError (a ValueError), one sentence
    naming the folder."""
    folder = check_output_path(folder, what="export folder", folder=True)
    if os.path.lexists(folder):
        if not overwrite:
            raise OutputPathError(f"{folder} already exists; choose a new folder or allow overwriting it")
        _check_replaceable(folder)
    return folder


def _check_replaceable(folder: Path) -> None:
    """Raise OutputPathError unless `folder` is empty or an earlier export: overwriting replaces
    (removes) the whole folder, so it must hold nothing but what an export wrote there."""
    if not any(folder.iterdir()) or _is_export(folder):
        return
    raise OutputPathError(f"{folder} is not an Offramp export folder (no {MANIFEST} of format {FORMAT}); "
                          "choose a new folder or remove it yourself")


def _is_export(folder: Path) -> bool:
    """Whether `folder` holds our manifest: by its format, since manifest.json is a common name."""
    manifest = folder / MANIFEST
    if not manifest.is_file():  # never open a FIFO: it would wait for a writer
        return False
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def _random_inputs(bundle: Bundle, n: int = 8) -> torch.Tensor:
    crop = bundle.model.backbone.preset.crop
    return torch.randn(n, 3, crop, crop, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _write_graphs(bundle: Bundle, name: str, policy: Policy, folder: Path, opset: int,
                  progress: ProgressFn | None, cancel: CancelFlag | None) -> dict:
    model, cost = bundle.model, bundle.cost
    n_exits = model.num_exits
    active = policy.active_exits(n_exits)
    preset = model.backbone.preset
    x = torch.randn(2, 3, preset.crop, preset.crop, generator=torch.Generator().manual_seed(0))
    total = model.backbone.num_stages + n_exits + sum(active[:-1])
    done = 0
    report(progress, cancel, "exporting", 0, total)
    stages, exits, decisions = [], [], [None] * n_exits
    history: list[torch.Tensor] = []
    exits_run: list[int] = []
    e = 0
    for s, stage in enumerate(model.backbone.stages):
        file = f"stage{s}.onnx"
        _export(stage, (x,), ["x"], "tap", folder / file, opset)
        stages.append({"file": file, "input": "x", "output": "tap", "shape": list(x.shape[1:]),
                       "flops": cost.stage_flops[s]})
        x = stage(x)
        stages[-1]["output_shape"] = list(x.shape[1:])
        done += 1
        report(progress, cancel, "exporting", done, total, file)
        if e >= n_exits or model.exit_stages[e] != s:
            continue
        head = CalibratedExit(model.exits[e], float(model.temperature[e]))
        file = f"exit{e}.onnx"
        _export(head, (x,), ["tap"], "logits", folder / file, opset)
        exits.append({"file": file, "stage": s, "input": "tap", "output": "logits", "flops": cost.exit_flops[e],
                      "kind": model.exits[e].spec.kind, "temperature_applied": float(model.temperature[e])})
        done += 1
        report(progress, cancel, "exporting", done, total, file)
        if active[e] or e == n_exits - 1:
            history.append(head(x))
            exits_run.append(e)
            if e < n_exits - 1:
                uses_tap = _reads_features(policy, e, n_exits, exits_run, history, x)
                names = [f"logits{i}" for i in range(len(history))] + (["tap"] if uses_tap else [])
                file = f"decide{e}.onnx"
                example = (*history, x) if uses_tap else tuple(history)
                _export(_Decision(policy, e, n_exits, exits_run, uses_tap), example, names, "exit",
                        folder / file, opset)
                decisions[e] = {"file": file, "inputs": names, "output": "exit",
                                "exits_before": list(exits_run), "flops": cost.policy_flops[e]}
                done += 1
                report(progress, cancel, "exporting", done, total, file)
        e += 1
    return {
        "format": FORMAT,
        "name": bundle.meta.get("name", "model"),
        "exported_by": f"offramp {__version__}, torch {torch.__version__}",
        "opset": opset,
        "backbone": model.backbone.spec,
        "class_names": list(model.class_names),
        "input": {"name": "x", "shape": [None, 3, preset.crop, preset.crop], "dtype": "float32", "layout": "NCHW",
                  "color": "RGB", "resize_shorter_side": preset.resize, "center_crop": preset.crop,
                  "scale": "pixel / 255", "mean": list(preset.mean), "std": list(preset.std)},
        "stages": stages,
        "exits": exits,
        "policy": {"name": name, "kind": policy.kind, "json": policy.to_json(), "active": active,
                   "decisions": decisions},
        "cost": cost.to_json(),
        "full_flops": cost.full_flops,
        "algorithm": ALGORITHM,
    }


# -- running the export ---------------------------------------------------------------------------
@dataclass
class OnnxResult:
    exit_index: int
    logits: np.ndarray  # (classes,) calibrated logits of the exit that answered
    stages_run: int
    exit_logits: dict[int, np.ndarray]  # every exit evaluated, by index


class OnnxRunner:
    """Runs an exported folder with onnxruntime, one image at a time, stopping where the policy says:
    the reference an edge runtime can compare itself with."""

    def __init__(self, folder: str | os.PathLike, threads: int = 1):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ExportError("running an export needs onnxruntime: pip install 'offramp[export]'") from err
        self.folder = Path(folder)
        try:
            self.manifest = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.folder} is not an Offramp ONNX export ({MANIFEST} unreadable: {err})") from err
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{self.folder / MANIFEST} is format {self.manifest.get('format')!r}, not {FORMAT}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1

        def session(file: str):
            return ort.InferenceSession(str(self.folder / file), options, providers=["CPUExecutionProvider"])

        self.stages = [session(s["file"]) for s in self.manifest["stages"]]
        self.exits = [session(x["file"]) for x in self.manifest["exits"]]
        pol = self.manifest["policy"]
        self.active = pol["active"]
        self.decisions = [None if d is None else (session(d["file"]), d["inputs"]) for d in pol["decisions"]]
        self.exit_stage = [x["stage"] for x in self.manifest["exits"]]

    def stage(self, s: int, x: np.ndarray) -> np.ndarray:
        return self.stages[s].run(None, {"x": x})[0]

    def exit(self, e: int, tap: np.ndarray) -> np.ndarray:
        return self.exits[e].run(None, {"tap": tap})[0]

    def run_full(self, x: np.ndarray) -> np.ndarray:
        """Every stage and the last exit only (no early exit): the full model, for comparison."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        for s in range(self.exit_stage[-1] + 1):
            x = self.stage(s, x)
        return self.exit(len(self.exits) - 1, x)

    def run(self, x: np.ndarray) -> OnnxResult:
        """The manifest's algorithm on one preprocessed image `x` (1, 3, H, W) float32."""
        if x.ndim != 4 or x.shape[0] != 1:
            raise ValueError(f"OnnxRunner.run takes one image of shape (1, 3, H, W), got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        n_exits = len(self.exits)
        history: list[np.ndarray] = []
        logits_by_exit: dict[int, np.ndarray] = {}
        e = 0
        for s in range(len(self.stages)):
            x = self.stage(s, x)
            if e >= n_exits or self.exit_stage[e] != s:
                continue
            if self.active[e] or e == n_exits - 1:
                logits = self.exit(e, x)
                history.append(logits)
                logits_by_exit[e] = logits[0]
                if e == n_exits - 1:
                    return OnnxResult(e, logits[0], s + 1, logits_by_exit)
                session, names = self.decisions[e]
                feeds = {n: history[i] for i, n in enumerate(names) if n != "tap"}
                if "tap" in names:
                    feeds["tap"] = x
                if bool(session.run(None, feeds)[0][0]):
                    return OnnxResult(e, logits[0], s + 1, logits_by_exit)
            e += 1
        raise ValueError(f"{self.folder}: the manifest's last exit never ran; the export is damaged")


# -- checking -------------------------------------------------------------------------------------
ATOL = 1e-3  # float32 graphs from two runtimes differ in summation order, never by this much
RTOL = 1e-3


@torch.no_grad()
def check_export(bundle: Bundle, folder: str | os.PathLike, inputs: torch.Tensor, *,
                 policy: str | None = None) -> dict:
    """Every stage and exit graph against torch on `inputs` (N, 3, H, W), then the whole early-exit
    loop image by image against the bundle's staged run. Returns {"samples", "max_abs_diff"
    (per stage / exit), "exits_agree", "stages_run_agree", "exit_counts" (where the images left),
    "max_logit_diff"}; raises ExportError when a
    graph's output differs beyond tolerance or an image exits elsewhere."""
    runner = OnnxRunner(folder)
    model = bundle.model
    pol = bundle.policies[policy or runner.manifest["policy"]["name"]]
    was_training = model.training
    model.eval()
    diffs: dict[str, float] = {}
    try:
        x = inputs.float().cpu()
        e = 0
        for s, stage in enumerate(model.backbone.stages):
            want = stage(x)
            got = runner.stage(s, x.numpy())
            diffs[f"stage{s}"] = _check_close(f"stage {s}", got, want)
            x = want
            if e < model.num_exits and model.exit_stages[e] == s:
                logits = model.exits[e](x) / model.temperature[e]
                diffs[f"exit{e}"] = _check_close(f"exit {e}", runner.exit(e, x.numpy()), logits)
                e += 1
        agree, stages_agree, logit_diff = 0, 0, 0.0
        counts = [0] * model.num_exits
        for i in range(inputs.shape[0]):
            one = inputs[i:i + 1].float().cpu()
            want = model.run(one, pol)
            got = runner.run(one.numpy())
            if got.exit_index != int(want.exit_index[0]):
                raise ExportError(f"image {i} exits at E{got.exit_index} in ONNX but at E{int(want.exit_index[0])} "
                                  "in torch; the exported decision graphs do not reproduce the policy")
            agree += 1
            counts[got.exit_index] += 1
            stages_agree += int(got.stages_run == int(want.stages_run[0]))
            logit_diff = max(logit_diff, float(np.abs(got.logits - want.logits[0].numpy()).max()))
    finally:
        model.train(was_training)
    return {"samples": int(inputs.shape[0]), "max_abs_diff": diffs, "exits_agree": agree,
            "stages_run_agree": stages_agree, "exit_counts": counts, "max_logit_diff": logit_diff,
            "atol": ATOL, "rtol": RTOL}


def _check_close(what: str, got: np.ndarray, want: torch.Tensor) -> float:
    want = want.numpy()
    if got.shape != want.shape:
        raise ExportError(f"{what}: ONNX output has shape {got.shape}, torch {want.shape}")
    diff = float(np.abs(got - want).max()) if got.size else 0.0
    scale = float(np.abs(want).max()) if want.size else 0.0
    if not math.isfinite(diff) or diff > ATOL + RTOL * scale:
        raise ExportError(f"{what}: ONNX and torch outputs differ by {diff:.3g} (largest value {scale:.3g})")
    return diff

"""A cache of what every exit head reads, so retraining exits and policies never re-runs the
frozen backbone: one pass over the data stores each head's `pre` output, the pooled tap
features (the policies' evidence), the labels and the final exit's logits (for distillation).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as save_tensors
from torch.utils.data import Dataset, Subset

from .data.folders import SKIPPED, make_loader
from .exits import MAP_HEADS
from .files import json_text, write_atomic
from .model import MultiExitNet
from .policies import pooled_features
from .preprocess import eval_transform
from .progress import CancelFlag, ProgressFn, report

_FORMAT = "offramp-feature-cache/1"


@dataclass
class FeatureCache:
    """Per-exit head inputs for N samples.

    `inputs[e]`: exit e's `pre` output, (N, C) float32 for pooled heads, (N, C, H, W) float16 for
    conv heads. `features[e]`: pooled tap features (N, C) float32 (the same tensor as `inputs[e]`
    where the head pools). `teacher_logits`: (N, K) logits of the last exit at caching time.
    """

    inputs: list[torch.Tensor]
    features: list[torch.Tensor]
    labels: torch.Tensor  # (N,) long
    teacher_logits: torch.Tensor  # (N, K) float32
    class_names: list[str]
    specs: list[dict]  # ExitSpec.to_json() of the exits it was made for
    meta: dict = field(default_factory=dict)  # e.g. the backbone spec, the dataset root

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_exits(self) -> int:
        return len(self.inputs)

    def subset(self, idx: Sequence[int] | torch.Tensor) -> "FeatureCache":
        """A cache of the samples at `idx` (in that order)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        inputs = [x[idx] for x in self.inputs]
        features = [inputs[e] if f is x else f[idx] for e, (f, x) in enumerate(zip(self.features, self.inputs))]
        return FeatureCache(inputs, features, self.labels[idx], self.teacher_logits[idx], list(self.class_names),
                            list(self.specs), dict(self.meta))

    def check_matches(self, model: MultiExitNet) -> None:
        """Raise ValueError when this cache was made for other exits or other classes than `model`'s."""
        mine = [(s["stage"], s["kind"], s["channels"]) for s in self.specs]
        theirs = [(s.stage, s.kind, s.channels) for s in model.exit_specs]
        if mine != theirs or self.class_names != model.class_names:
            raise ValueError(f"this feature cache was made for exits {mine} and classes {self.class_names}, "
                             f"but the model has exits {theirs} and classes {model.class_names}; cache again.")

    @torch.no_grad()
    def exit_logits(self, model: MultiExitNet, *, batch_size: int = 1024, calibrated: bool = False) -> torch.Tensor:
        """(N, E, K) logits of every exit of `model` computed from the cache (heads in eval mode)."""
        self.check_matches(model)
        device = next(model.parameters()).device
        out = torch.empty(len(self), self.num_exits, len(self.class_names))
        was = [h.training for h in model.exits]
        try:
            for e, head in enumerate(model.exits):
                head.eval()
                for s in range(0, len(self), batch_size):
                    logits = head.post(self.inputs[e][s:s + batch_size].to(device, torch.float32))
                    out[s:s + batch_size, e] = (logits / model.temperature[e] if calibrated else logits).cpu()
        finally:
            for h, w in zip(model.exits, was):
                h.train(w)
        return out

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the cache as one safetensors file (no pickle), atomically (temp file + rename)."""
        tensors = {"labels": self.labels.contiguous(), "teacher_logits": self.teacher_logits.contiguous()}
        shared = []
        for e, (x, f) in enumerate(zip(self.inputs, self.features)):
            tensors[f"inputs.{e}"] = x.contiguous()
            if f is x:
                shared.append(e)
            else:
                tensors[f"features.{e}"] = f.contiguous()
        header = {"format": _FORMAT, "class_names": self.class_names, "specs": self.specs,
                  "shared_features": shared, "meta": self.meta}
        data = save_tensors(tensors, metadata={"offramp": json_text(header)})
        write_atomic(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureCache":
        """Read a cache written by `save`. Raises ValueError when the file is not such a cache."""
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("offramp", "{}"))
                ours = header.get("format") == _FORMAT
                t = {k: f.get_tensor(k) for k in f.keys()} if ours else {}
        except Exception as err:  # safetensors raises its own error type for damaged files
            raise ValueError(f"{path} could not be read as a feature cache: {err}") from err
        if not ours:
            raise ValueError(f"{path} is not an Offramp feature cache (made by FeatureCache.save)")
        n = len(header["specs"])
        inputs = [t[f"inputs.{e}"] for e in range(n)]
        features = [inputs[e] if e in header["shared_features"] else t[f"features.{e}"] for e in range(n)]
        return cls(inputs, features, t["labels"], t["teacher_logits"], header["class_names"], header["specs"],
                   header.get("meta", {}))


def _with_eval_transform(dataset: Dataset, model: MultiExitNet) -> Dataset:
    """A dataset without a transform yields PIL images; give a shallow copy the model's preset."""
    if isinstance(dataset, Subset):
        inner = _with_eval_transform(dataset.dataset, model)
        return dataset if inner is dataset.dataset else Subset(inner, dataset.indices)
    if getattr(dataset, "transform", "absent") is None:
        dataset = copy.copy(dataset)
        dataset.transform = eval_transform(model.backbone.preset)
    return dataset


def _check_memory(inputs: list[torch.Tensor], features: list[torch.Tensor]) -> None:
    """Refuse up front a cache that cannot fit in memory, instead of failing hours later."""
    need = sum(t.numel() * t.element_size() for t in inputs)
    need += sum(f.numel() * f.element_size() for f, x in zip(features, inputs) if f is not x)
    free = _available_memory()
    if free is None:
        return
    if need > 0.8 * free:
        raise ValueError(f"the feature cache needs {need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB of memory "
                         "is free; use linear exit heads, fewer exits or fewer images.")


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every OS reports it
        return None


def _taps(model: MultiExitNet, x: torch.Tensor):
    """Yield (exit index, tap output) for every exit, running the stages only as far as needed."""
    e = 0
    for s, stage in enumerate(model.backbone.stages):
        x = stage(x)
        while e < model.num_exits and model.exits[e].spec.stage == s:
            yield e, x
            e += 1
        if e == model.num_exits:
            return


@torch.no_grad()
def cache_features(model: MultiExitNet, dataset: Dataset, *, batch_size: int = 128, device: str = "cpu",
                   workers: int | None = None, progress: ProgressFn | None = None,
                   cancel: CancelFlag | None = None) -> FeatureCache:
    """Run the frozen backbone once over `dataset` ((image tensor, label) items) in eval mode.

    Returns a FeatureCache on the CPU. Raises Cancelled when `cancel` is set (nothing is kept).
    The model is moved to `device` for the pass and back afterwards; its train/eval mode is kept.
    """
    dataset = _with_eval_transform(dataset, model)
    n, k = len(dataset), model.num_classes
    if n == 0:
        raise ValueError("cannot cache features of an empty dataset")
    home = next(model.parameters()).device
    was_training = model.training
    model.to(device).eval()
    inputs: list[torch.Tensor] = []
    features: list[torch.Tensor] = []
    labels = torch.empty(n, dtype=torch.long)
    teacher = torch.empty(n, k)
    done = 0
    try:
        report(progress, cancel, "caching features", 0, n)
        for x, y in make_loader(dataset, batch_size, shuffle=False, workers=workers):
            b = x.shape[0]
            for e, tap in _taps(model, x.to(device)):  # tap: (batch, channels, h, w) or tokens or a vector
                head = model.exits[e]
                pre = head.pre(tap)
                if len(inputs) <= e:  # first batch: now the shapes are known
                    dtype = torch.float16 if head.spec.kind in MAP_HEADS else torch.float32
                    inputs.append(torch.empty((n, *pre.shape[1:]), dtype=dtype))
                    # a pooling head caches the pooled features themselves; a class-token head does not
                    shared = pre.dim() == 2 and head.pre_is_pooled
                    features.append(inputs[e] if shared else torch.empty(n, pooled_features(tap).shape[1]))
                    if e == model.num_exits - 1:
                        _check_memory(inputs, features)
                inputs[e][done:done + b] = pre.cpu()
                if features[e] is not inputs[e]:
                    features[e][done:done + b] = pooled_features(tap).cpu()
                if e == model.num_exits - 1:
                    teacher[done:done + b] = head.post(pre).float().cpu()
            labels[done:done + b] = torch.as_tensor(y)
            done += b
            report(progress, cancel, "caching features", done, n)
    finally:
        model.to(home).train(was_training)
    root = getattr(dataset, "root", None) or getattr(getattr(dataset, "dataset", None), "root", None)
    meta = {"backbone": model.backbone.spec, "dataset": str(root or type(dataset).__name__)}
    cache = FeatureCache(inputs, features, labels, teacher, list(model.class_names),
                         [s.to_json() for s in model.exit_specs], meta)
    keep = labels != SKIPPED  # items whose file could not be read held another image's place: drop them
    if not bool(keep.all()):
        if not bool(keep.any()):
            raise ValueError("none of the images could be read: there are no features to cache")
        cache = cache.subset(torch.nonzero(keep).flatten())
    return cache

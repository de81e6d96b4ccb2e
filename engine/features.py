"""A cache of what every exit head reads, so retraining exits and policies never re-runs the
frozen backbone: one pass over the data stores each head's `pre` output, the pooled tap
features (the policies' evidence), the labels and the final exit's logits (for distillation).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as save_tensors
from torch.utils.data import Dataset, Subset

from . import distributed as dist
from .diskcache import PartStore, available_memory, dataset_name, fill_part, fingerprint
from .diskcache import part_folders
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
    # A rank's part (cache_features(shard=True)): `index` (N,) the dataset index of each row,
    # ascending, and `total` the samples kept over every rank. None, None: the whole cache.
    index: torch.Tensor | None = None
    total: int | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_exits(self) -> int:
        return len(self.inputs)

    @property
    def samples(self) -> int:
        """Samples over every rank's part (`len(self)` when this cache is the whole)."""
        return len(self) if self.total is None else self.total

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


def with_eval_transform(dataset: Dataset, model: MultiExitNet) -> Dataset:
    """A dataset without a transform yields PIL images; give a shallow copy the model's preset."""
    if isinstance(dataset, Subset):
        inner = with_eval_transform(dataset.dataset, model)
        return dataset if inner is dataset.dataset else Subset(inner, dataset.indices)
    if getattr(dataset, "transform", "absent") is None:
        dataset = copy.copy(dataset)
        dataset.transform = eval_transform(model.backbone.preset)
    return dataset


def _check_memory(inputs: list[torch.Tensor], features: list[torch.Tensor], limit: int | None) -> None:
    """Refuse up front a cache that cannot fit in memory, instead of failing hours later."""
    need = sum(t.numel() * t.element_size() for t in inputs)
    need += sum(f.numel() * f.element_size() for f, x in zip(features, inputs) if f is not x)
    free = available_memory()
    limit = limit if limit is not None else (None if free is None else int(0.8 * free))
    if limit is not None and need > limit:
        raise ValueError(f"the feature cache needs {_size(need)} but only {_size(limit)} of memory may hold it; "
                         "cache on disk (--cache-dir), or use linear exit heads, fewer exits or fewer images.")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


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
                   workers: int | None = None, shard: bool = False, store: str | os.PathLike | None = None,
                   memory_limit: int | None = None, progress: ProgressFn | None = None,
                   cancel: CancelFlag | None = None) -> FeatureCache:
    """Run the frozen backbone once over `dataset` ((image tensor, label) items) in eval mode.

    Returns a FeatureCache on the CPU (unreadable items dropped). `shard`: under torchrun, only this
    rank's part of `dataset` (`engine.distributed.part`), its `index` and `total` placing it among
    every rank's kept samples (`gather_cache` joins the parts). `store`: a folder where the cache
    lives on disk (memory-mapped, one part per rank, resumable: finished chunks are verified and
    skipped) instead of in memory. `memory_limit`: bytes the cache may hold in memory (default: 80 %
    of what is free); a larger in-memory cache is refused, and on disk each chunk stays within a
    quarter of it. The model is moved to `device` for the pass and back; its mode is kept.
    Raises ValueError for an empty dataset or one without a readable image, Cancelled when `cancel`
    is set (finished chunks on disk are kept for the rerun).
    """
    dataset = with_eval_transform(dataset, model)
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot cache features of an empty dataset")
    span = dist.part(n) if shard else range(n)
    if store is not None:
        cache = _cache_on_disk(model, dataset, span, Path(store), batch_size, device, workers, memory_limit,
                               progress, cancel)
    elif not span:  # a rank's part of a dataset smaller than the number of ranks
        cache = _empty_cache(model)
    else:
        mine = dataset if len(span) == n else Subset(dataset, list(span))
        cache = _cache_in_memory(model, mine, batch_size, device, workers, memory_limit, progress, cancel, drop=shard)
        cache.index = torch.as_tensor(span)[cache.index]
    if not shard:
        cache.index = None
        return cache
    cache.total = int(dist.all_sum(torch.tensor([len(cache)]))[0])  # every rank must reach this line
    if cache.total == 0:
        raise ValueError("none of the images could be read: there are no features to cache")
    return cache


def _cache_in_memory(model: MultiExitNet, dataset: Dataset, batch_size: int, device: str, workers: int | None,
                     memory_limit: int | None, progress, cancel, *, drop: bool = False,
                     stage: str = "caching features") -> FeatureCache:
    """The cache of `dataset` in memory, its `index` the positions in `dataset` of the rows kept.
    `drop`: a part of which no item is readable is empty instead of an error (another rank's part
    may have images)."""
    n, k = len(dataset), model.num_classes
    home = next(model.parameters()).device
    was_training = model.training
    model.to(device).eval()
    inputs: list[torch.Tensor] = []
    features: list[torch.Tensor] = []
    labels = torch.empty(n, dtype=torch.long)
    teacher = torch.empty(n, k)
    done = 0
    try:
        report(progress, cancel, stage, 0, n)
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
                        _check_memory(inputs, features, memory_limit)
                inputs[e][done:done + b] = pre.cpu()
                if features[e] is not inputs[e]:
                    features[e][done:done + b] = pooled_features(tap).cpu()
                if e == model.num_exits - 1:
                    teacher[done:done + b] = head.post(pre).float().cpu()
            labels[done:done + b] = torch.as_tensor(y)
            done += b
            report(progress, cancel, stage, done, n)
    finally:
        model.to(home).train(was_training)
    root = getattr(dataset, "root", None) or getattr(getattr(dataset, "dataset", None), "root", None)
    meta = {"backbone": model.backbone.spec, "dataset": str(root or type(dataset).__name__)}
    cache = FeatureCache(inputs, features, labels, teacher, list(model.class_names),
                         [s.to_json() for s in model.exit_specs], meta)
    keep = labels != SKIPPED  # items whose file could not be read held another image's place: drop them
    if not bool(keep.all()):
        if not bool(keep.any()) and not drop:
            raise ValueError("none of the images could be read: there are no features to cache")
        cache = cache.subset(torch.nonzero(keep).flatten())
    cache.index = torch.nonzero(keep).flatten()
    return cache


def _cache_on_disk(model: MultiExitNet, dataset: Dataset, span: range, folder: Path, batch_size: int, device: str,
                   workers: int | None, memory_limit: int | None, progress, cancel) -> FeatureCache:
    """This rank's part `span` of the cache of `dataset`, computed chunk by chunk into a PartStore
    under `folder`; returns it memory-mapped."""
    key = {"kind": "features", "model": fingerprint(model), "samples": len(dataset), "dataset": dataset_name(dataset)}

    def compute(chunk: range, on, store: PartStore) -> dict[str, torch.Tensor]:
        c = _cache_in_memory(model, Subset(dataset, list(chunk)), batch_size, device, workers, None, on, cancel,
                             drop=True, stage="caching features")
        if not store.manifest["info"]:
            store.manifest["info"] = {"class_names": c.class_names, "specs": c.specs, "meta": c.meta,
                                      "shared_features": _shared(c)}
        return {**_arrays(c), "index": torch.as_tensor(chunk)[c.index]}

    store = fill_part(folder, key, span, _row_bytes(model), batch_size, memory_limit, "caching features", "cache",
                      compute, progress, cancel)
    return _from_store(store, model)


def _arrays(cache: FeatureCache) -> dict[str, torch.Tensor]:
    """The cache's per-sample tensors by name (pooled features only where they are not the inputs)."""
    out = {"labels": cache.labels, "teacher_logits": cache.teacher_logits}
    for e, (x, f) in enumerate(zip(cache.inputs, cache.features)):
        out[f"inputs.{e}"] = x
        if f is not x:
            out[f"features.{e}"] = f
    return out


def _shared(cache: FeatureCache) -> list[int]:
    """The exits whose pooled features are their inputs (stored once)."""
    return [e for e, (x, f) in enumerate(zip(cache.inputs, cache.features)) if f is x]


def _from_arrays(t: dict[str, torch.Tensor], class_names: list[str], specs: list[dict], shared: list[int],
                 meta: dict) -> FeatureCache:
    inputs = [t[f"inputs.{e}"] for e in range(len(specs))]
    features = [inputs[e] if e in shared else t[f"features.{e}"] for e in range(len(specs))]
    return FeatureCache(inputs, features, t["labels"], t["teacher_logits"], list(class_names), list(specs),
                        dict(meta), index=t.get("index"))


def _from_store(store: PartStore, model: MultiExitNet) -> FeatureCache:
    """The FeatureCache a PartStore holds, memory-mapped (a part without samples: empty tensors)."""
    info = store.manifest["info"]
    if not info:
        return _empty_cache(model)
    return _from_arrays(store.arrays(), info["class_names"], info["specs"], info["shared_features"],
                        dict(info["meta"], store=str(store.folder)))


def _empty_cache(model: MultiExitNet) -> FeatureCache:
    probe = _probe(model)
    inputs = [torch.empty((0, *x.shape[1:]), dtype=x.dtype) for x, _ in probe]
    features = [inputs[e] if f is None else torch.empty((0, *f.shape[1:])) for e, (_, f) in enumerate(probe)]
    return FeatureCache(inputs, features, torch.empty(0, dtype=torch.long), torch.empty(0, model.num_classes),
                        list(model.class_names), [s.to_json() for s in model.exit_specs], {},
                        index=torch.empty(0, dtype=torch.long))


@torch.no_grad()
def _probe(model: MultiExitNet) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per exit (one cached input, one pooled feature row or None where they are the same), from a
    blank image: the row shapes and types a cache of `model` holds."""
    was = model.training
    model.eval()
    side = model.backbone.preset.crop
    out = []
    try:
        dev = next(model.parameters()).device
        for e, tap in _taps(model, torch.zeros(1, 3, side, side, device=dev)):
            head = model.exits[e]
            pre = head.pre(tap).cpu()
            pre = pre.half() if head.spec.kind in MAP_HEADS else pre.float()
            shared = pre.dim() == 2 and head.pre_is_pooled
            out.append((pre, None if shared else pooled_features(tap).float().cpu()))
    finally:
        model.train(was)
    return out


def _row_bytes(model: MultiExitNet) -> int:
    """Bytes one sample takes in a cache of `model`."""
    size = 8 + 4 * model.num_classes  # label, teacher logits
    for x, f in _probe(model):
        size += x.numel() * x.element_size() + (0 if f is None else f.numel() * f.element_size())
    return size


def gather_cache(cache: FeatureCache, store: str | os.PathLike | None = None) -> FeatureCache | None:
    """Every rank's part of a sharded cache joined in the original order, on rank 0 (None on the
    others); `cache` itself when it is the whole. With `store` (the folder `cache_features` wrote)
    rank 0 reads the other ranks' parts from there (shared storage) instead of over the network.
    Raises ValueError when a part is missing from `store`."""
    if cache.total is None or dist.world() == 1:
        return cache
    if store is None:
        t = dist.gather_in_order(_arrays(cache), cache.index)
    else:
        dist.barrier()  # every part is finished
        parts = [PartStore.open(f).arrays() for f in part_folders(store)] if dist.is_main() else []
        parts = [p for p in parts if p]  # a part without samples holds no arrays
        t = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else None
        t = dist.in_order(t, t.pop("index")) if t else None
    if t is None:
        return None
    return _from_arrays(t, cache.class_names, cache.specs, _shared(cache), cache.meta)

"""Recording every exit's outputs data-parallel: under torchrun each rank records its part of the
data, in memory or on disk (memory-mapped, resumable), and rank 0 gets the Records of all of it in
the original order. In one process, `record_sharded` is `engine.evaluate.record_outputs`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Subset

from . import distributed as dist
from .diskcache import PartStore, dataset_name, fill_part, fingerprint
from .diskcache import part_folders
from .evaluate import drop_skipped, record_outputs
from .features import with_eval_transform
from .records import Records


def record_sharded(model, dataset, *, store: str | os.PathLike | None = None, memory_limit: int | None = None,
                   batch_size: int = 256, device: str = "cpu", with_features: bool = True, progress=None,
                   cancel=None) -> Records | None:
    """`record_outputs(model, dataset, ...)` run data-parallel: under torchrun each
    rank records its part of `dataset` (`engine.distributed.part`) and rank 0 returns the Records of
    every sample in the original order (unreadable ones dropped), the other ranks None; in one
    process it is record_outputs. Every rank must call it, with the same dataset.

    `store`: a folder where each rank's records live on disk (memory-mapped, resumable: finished
    chunks are verified and skipped); chunks hold at most a quarter of `memory_limit` bytes (default:
    80 % of free memory); rank 0 reads the other parts from there, so it must be shared storage.
    Raises ValueError for an empty dataset or one without a readable image, Cancelled."""
    dataset = with_eval_transform(dataset, model)
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty: there is nothing to evaluate")
    span = dist.part(n)
    kw = {"batch_size": batch_size, "device": device, "with_features": with_features, "cancel": cancel}
    if store is None and dist.world() == 1:
        return record_outputs(model, dataset, progress=progress, **kw)
    # every part keeps its unreadable samples (label SKIPPED), so its rows are exactly its samples
    # and the parts interleave back into the original order; rank 0 drops them after joining
    if store is None:
        t = dist.gather_in_order(_record_part(model, dataset, span, progress, **kw), torch.as_tensor(span))
    else:
        t = _record_on_disk(model, dataset, span, Path(store), memory_limit, progress, kw)
    return drop_skipped(_from_arrays(t, model)) if t is not None else None


def _record_on_disk(model, dataset, span: range, store: Path, memory_limit: int | None, progress,
                    kw: dict) -> dict[str, torch.Tensor] | None:
    """`_record_part` of this rank's `span`, chunk by chunk into a PartStore under `store`; every
    rank's arrays in the original order on rank 0, None on the others."""
    key = {"kind": "records", "model": fingerprint(model), "samples": len(dataset), "dataset": dataset_name(dataset),
           "features": kw["with_features"]}
    row = 8 + 4 * model.num_exits * model.num_classes + 4 * sum(s.channels for s in model.exit_specs) * kw["with_features"]
    fill_part(store, key, span, row, kw["batch_size"], memory_limit, "recording exits", "records",
              lambda chunk, on, _store: {**_record_part(model, dataset, chunk, on, **kw), "index": torch.as_tensor(chunk)},
              progress, kw["cancel"])
    dist.barrier()  # every part is on disk
    if not dist.is_main():
        return None
    parts = [p for p in (PartStore.open(f).arrays() for f in part_folders(store)) if p]
    t = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return dist.in_order(t, t.pop("index"))


def _record_part(model, dataset, span: range, progress, **kw) -> dict[str, torch.Tensor]:
    """The arrays of record_outputs on the samples `span` of `dataset`, unreadable ones kept (label
    SKIPPED); empty arrays of the model's shapes when there are none."""
    if len(span):
        sub = dataset if len(span) == len(dataset) else Subset(dataset, list(span))
        return _as_arrays(record_outputs(model, sub, progress=progress, keep_skipped=True, **kw))
    channels = [spec.channels for spec in model.exit_specs] if kw.get("with_features", True) else []
    return _as_arrays(Records(torch.empty(0, model.num_exits, model.num_classes), [torch.empty(0, c) for c in channels],
                              torch.empty(0, dtype=torch.long), model.class_names, model.exit_stages))


def _as_arrays(r: Records) -> dict[str, torch.Tensor]:
    out = {"logits": r.logits.float(), "labels": r.labels.long()}
    out.update({f"features.{e}": f.float() for e, f in enumerate(r.features)})
    return out


def _from_arrays(t: dict[str, torch.Tensor], model) -> Records:
    features = [t[f"features.{e}"] for e in range(model.num_exits) if f"features.{e}" in t]
    return Records(t["logits"], features, t["labels"], model.class_names, model.exit_stages)

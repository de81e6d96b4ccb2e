"""Data parallelism on PyTorch's own runtime.

Launched by `torchrun --nproc_per_node N` (or `--nnodes` with a rendezvous on a cluster), every
process (rank) joins torchrun's process group (`gloo` on CPU, `nccl` on CUDA, one GPU per local
rank) and reads its `part` of the data: every N-th sample, so that each rank holds every class in
proportion however the data is ordered (folders are listed class by class). Rank 0 gathers the
parts back in the original order (`gather_in_order`) and alone writes files and reports
(`is_main`). Without torchrun there is one rank, every part is the whole, and nothing here changes
what the caller computes. Parts on disk: `engine.diskcache`.
"""
from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset


# -- the process group ---------------------------------------------------------------------------
def launched() -> bool:
    """True in a process that torchrun started (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


_JOINED = [False]  # this process joined torchrun's process group (`init`): it ends with `leave`


def init(device: str | None = "cpu") -> None:
    """Join torchrun's process group: `nccl` with one GPU per local rank when `device` is a GPU
    ("auto" where CUDA is available, or "cuda"), `gloo` otherwise. Does nothing without torchrun or
    when already joined."""
    if dist.is_initialized() or not launched():
        return
    cuda = torch.cuda.is_available() and (device in (None, "auto") or str(device).startswith("cuda"))
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo")
    _JOINED[0] = True


def leave(code: int) -> None:
    """End a process that joined torchrun's process group here with exit status `code`, at once,
    once its output and log are flushed; in any other process do nothing. Everything a command
    writes is written and closed by then (`finish` came first), but the interpreter's own exit then
    destroys the distributed runtime's C++ objects, and one of their threads sometimes aborted the
    rank there ("terminate called without an active exception", failing the whole torchrun: 1 of
    70 runs of a tests/test_distributed.py test even after `finish`'s barrier, and again in CI)."""
    if not _JOINED[0]:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            pass
    logging.shutdown()
    os._exit(code)


def finish() -> None:
    """Leave the process group (at the end of a command), so every rank exits cleanly: all ranks
    together, after a barrier. A rank that left while rank 0 still wrote the results sometimes
    aborted in gloo's teardown ("terminate called without an active exception"), failing the whole
    torchrun: 2 of 35 runs of a tests/test_distributed.py test before the barrier, 1 of 70 after."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on the rank that writes files and reports (rank 0; the only one without torchrun)."""
    return rank() == 0


def device(requested: str | None = None) -> str:
    """The device this rank computes on: `requested` unless it is None or "auto"; else this local
    rank's GPU under torchrun on CUDA, any GPU in one process, the CPU otherwise."""
    if requested not in (None, "auto"):
        return str(requested)
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{local_rank()}" if launched() else "cuda"


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# -- parts ---------------------------------------------------------------------------------------
def part(n: int, r: int | None = None, w: int | None = None) -> range:
    """Rank r's part of n samples (of w ranks): samples r, r + w, r + 2w, ... Interleaved rather
    than contiguous, so that every rank sees every class of a folder listed class by class (its
    BatchNorm statistics and its share of each batch are then like the whole data's)."""
    r, w = rank() if r is None else r, world() if w is None else w
    return range(r, n, w)


def shard(dataset: Dataset) -> Dataset:
    """This rank's `part` of `dataset` (the dataset itself in one process)."""
    if world() == 1:
        return dataset
    return Subset(dataset, list(part(len(dataset))))


def _comm(t: torch.Tensor) -> torch.Tensor:
    """`t` where the backend can send it: nccl sends CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return t.to(f"cuda:{local_rank()}")
    return t


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over every rank, on every rank (`t` itself in one process)."""
    if world() == 1:
        return t
    out = _comm(t.detach().clone())
    dist.all_reduce(out)
    return out.to(t.device)


def counts(k: int) -> list[int]:
    """Every rank's `k`, in rank order, on every rank."""
    if world() == 1:
        return [int(k)]
    out = [_comm(torch.zeros(1, dtype=torch.long)) for _ in range(world())]
    dist.all_gather(out, _comm(torch.tensor([int(k)])))
    return [int(t.item()) for t in out]


def _padded(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """`t` padded along dim 0 to the longest rank's length (collectives need equal shapes), on the
    backend's device, and every rank's length."""
    sizes = counts(t.shape[0])
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype)
    padded[:t.shape[0]] = t
    return _comm(padded), sizes


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` concatenated along dim 0 in rank order, on every rank (`t` in one process).
    The ranks' first dimensions may differ."""
    if world() == 1:
        return t
    padded, sizes = _padded(t)
    bucket = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(bucket, padded)
    return torch.cat([b[:s].cpu() for b, s in zip(bucket, sizes)])


def in_order(arrays: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """`arrays` (rows of the samples `index`, one rank's part after another) sorted by sample index:
    the original order."""
    order = torch.argsort(index)
    if bool((order == torch.arange(len(order))).all()):
        return arrays
    return {k: v[order] for k, v in arrays.items()}


def gather_in_order(arrays: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Every rank's `arrays` (rows of the samples `index`) joined in the original sample order on
    rank 0, None on the others; `arrays` itself in one process."""
    if world() == 1:
        return arrays
    got = {k: gather(v) for k, v in arrays.items()}
    everyone = gather(index)
    return in_order(got, everyone) if is_main() else None


def positions(index: torch.Tensor) -> torch.Tensor:
    """Where the samples `index` (this rank's, ascending) fall among every rank's, counted in the
    original order: the rows one process would give them."""
    if world() == 1:
        return torch.arange(len(index))
    return torch.searchsorted(torch.sort(all_gather(index)).values, index)


def average_buffers(module: nn.Module) -> None:
    """Set `module`'s floating-point buffers (BatchNorm running statistics) to their mean over the
    ranks, so every rank holds, and rank 0 saves, statistics of the whole data."""
    if world() == 1:
        return
    for b in module.buffers():
        if b.is_floating_point():
            b.copy_(all_sum(b) / world())


def gather(t: torch.Tensor) -> torch.Tensor | None:
    """Every rank's `t` concatenated along dim 0 in rank order, on rank 0 (None on the others); `t`
    itself in one process. The ranks' first dimensions may differ; the other dimensions may not."""
    if world() == 1:
        return t
    padded, sizes = _padded(t)
    bucket = [torch.empty_like(padded) for _ in sizes] if is_main() else None
    dist.gather(padded, bucket, dst=0)
    if not is_main():
        return None
    return torch.cat([b[:s].cpu() for b, s in zip(bucket, sizes)])


def data_parallel(module: nn.Module) -> nn.Module:
    """`module` wrapped in DistributedDataParallel under torchrun (gradients averaged over the
    ranks at every backward), `module` itself in one process. Buffers are not broadcast from rank 0
    at every step: each rank's BatchNorm tracks its own batches, and `average_buffers` joins them."""
    if world() == 1:
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel
    dev = next(module.parameters()).device
    # newer PyTorch renamed broadcast_buffers (and warns about the old name); every rank starts with
    # the same buffers, so the sync at start that the new name keeps changes nothing here
    new = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   **{"forward_sync_buffers" if new else "broadcast_buffers": False})

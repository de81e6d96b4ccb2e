"""Training exit heads on a frozen backbone, from a feature cache: the backbone is never run, only
the `post` part of the chosen heads learns (AdamW, cosine schedule). Optionally each head also
learns from the last exit's logits (distillation, Hinton et al. 2015).
"""
from __future__ import annotations

import math
import os
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from ..features import FeatureCache
from ..model import MultiExitNet, resolve_index
from ..progress import CancelFlag, ProgressFn, report


def default_exits_to_train(model: MultiExitNet) -> list[int]:
    """Every exit that is not the backbone's own classifier (a last head made new because the
    class count changed is not 'original', so it is included)."""
    return [e for e, head in enumerate(model.exits) if head.spec.kind != "original"]


def train_exits(model: MultiExitNet, cache: FeatureCache, *, epochs: int = 30, lr: float = 1e-2,
                weight_decay: float = 1e-4, batch_size: int = 256, label_smoothing: float = 0.0,
                distill: float | bool = 0.0, distill_temperature: float = 3.0, train_exits: Sequence[int] | None = None,
                val_cache: FeatureCache | None = None, progress: ProgressFn | None = None,
                cancel: CancelFlag | None = None, seed: int = 0, threads: int | None = None) -> dict:
    """Train the heads `train_exits` (default `default_exits_to_train`) of `model` from `cache`.

    Loss per head: (1 - distill) * cross-entropy + distill * T² * KL(teacher ‖ head) at temperature
    T = `distill_temperature`, teacher = the cached last-exit logits (distill=True means 0.5).
    Deterministic for a seed. Under torchrun, with `cache` (and `val_cache`) a rank's part
    (`cache_features(shard=True)`), the heads train with DistributedDataParallel: every rank draws
    the same batches of the whole data and computes the loss of the samples it holds, so the summed
    gradient is the whole batch's, as in one process (up to the order of floating-point sums).
    BatchNorm in conv and deep heads normalises each rank's share of a batch (as DistributedDataParallel
    always does), and its running statistics are averaged over the ranks after every epoch, so
    such heads come close to one process's but not equal (the README states how close).
    `threads`: CPU threads for the run (default: every core, or one for work too small to share).
    Returns the history: {"exits", "loss" (per epoch), "train_acc" and "val_acc" (per epoch, one
    value per trained exit; "val_acc" empty without `val_cache`), "lr", "seconds"}.
    Raises ValueError for a cache of another model or bad arguments; Cancelled when `cancel` is
    set, in which case (as on any error) the heads are restored to their state before training.
    """
    cache.check_matches(model)
    if val_cache is not None:
        val_cache.check_matches(model)
    chosen = default_exits_to_train(model) if train_exits is None else sorted(
        {resolve_index(e, model.num_exits) for e in train_exits})
    if not chosen:
        raise ValueError("every exit is the backbone's own classifier, so there is nothing to train by default; "
                         "name the exits to train with train_exits=[...]")
    if epochs < 1 or batch_size < 1 or len(cache) == 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1 and a non-empty cache "
                         f"(got {epochs}, {batch_size}, {len(cache)} samples)")
    if isinstance(distill, bool):  # distill=True: an even mix of labels and teacher
        distill = 0.5 if distill else 0.0
    if not 0.0 <= distill <= 1.0:
        raise ValueError(f"distill is a weight in [0, 1], got {distill}")
    if distill > 0 and model.num_exits - 1 in chosen:
        raise ValueError("distillation learns from the last exit, so the last exit cannot be trained with it; "
                         "train the last exit first without distill, cache again, then distil the others")
    heads = [model.exits[e].post for e in chosen]
    before = [{k: v.detach().clone() for k, v in h.state_dict().items()} for h in heads]
    modes = [h.training for h in heads]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads or _threads_for(cache, chosen, batch_size))
    try:
        return _fit(model, heads, chosen, cache, val_cache, epochs=epochs, lr=lr, weight_decay=weight_decay,
                    batch_size=batch_size, label_smoothing=label_smoothing, distill=distill,
                    temperature=distill_temperature, progress=progress, cancel=cancel, seed=seed)
    except BaseException:
        with torch.no_grad():  # never leave a half-trained head behind
            for h, state in zip(heads, before):
                h.load_state_dict(state)
        raise
    finally:
        torch.set_num_threads(threads_before)
        for h, mode in zip(heads, modes):
            h.train(mode)


def _threads_for(cache: FeatureCache, chosen: list[int], batch_size: int) -> int:
    """Every core for real work (conv heads on feature maps); one thread for small linear heads,
    whose steps take microseconds, so that waking a second thread costs more than it saves and
    busy neighbours on the same cores can slow them tenfold."""
    values_per_batch = batch_size * sum(cache.inputs[e].shape[1:].numel() for e in chosen)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's processes on this machine share its cores
    return max((os.cpu_count() or 1) // ranks_here, 1) if values_per_batch >= 2**20 else 1


class _Heads(nn.Module):
    """The heads being trained as one module, so that DistributedDataParallel averages all their
    gradients in one backward."""

    def __init__(self, heads: list[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [h(x) for h, x in zip(self.heads, xs)]


def _fit(model: MultiExitNet, heads: list[nn.Module], chosen: list[int], cache: FeatureCache,
         val_cache: FeatureCache | None, *, epochs: int, lr: float, weight_decay: float, batch_size: int,
         label_smoothing: float, distill: float, temperature: float, progress: ProgressFn | None,
         cancel: CancelFlag | None, seed: int) -> dict:
    device = next(model.parameters()).device
    params = [p for h in heads for p in h.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n = cache.samples
    # row[i]: this rank's row of the i-th sample over every rank, in one process's order (-1: another rank's)
    row = torch.full((n,), -1, dtype=torch.long)
    row[dist.positions(cache.index) if cache.index is not None else torch.arange(len(cache))] = torch.arange(len(cache))
    steps = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    g = torch.Generator().manual_seed(seed)
    net = dist.data_parallel(_Heads(heads))
    history: dict = {"exits": list(chosen), "loss": [], "train_acc": [], "val_acc": [], "lr": [], "seconds": 0.0}
    start = time.perf_counter()
    report(progress, cancel, "training exits", 0, epochs, f"training exits {chosen} on {n} samples")
    for epoch in range(epochs):
        for h in heads:
            h.train()
        perm = torch.randperm(n, generator=g)  # the same on every rank
        sums = torch.zeros(2 + len(chosen), dtype=torch.float64)  # loss * samples, samples, correct per exit
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            if idx.numel() < 2 <= n:  # BatchNorm in conv heads cannot learn from a single sample
                continue
            if cancel is not None:
                cancel.check()
            mine = row[idx]
            mine = mine[mine >= 0]  # the batch's samples this rank holds
            y = cache.labels[mine].to(device)
            teacher = cache.teacher_logits[mine].to(device) if distill > 0 else None
            outs = net([cache.inputs[e][mine].to(device, torch.float32) for e in chosen])  # (mine, classes) each
            # each rank's share of the whole batch's mean loss; DDP averages the ranks' gradients, so
            # scaling by the number of ranks makes their sum the whole batch's gradient
            loss = torch.stack([_loss(o, y, teacher, label_smoothing, distill, temperature, idx.numel())
                                for o in outs]).mean()
            opt.zero_grad(set_to_none=True)
            (loss * dist.world()).backward()
            opt.step()
            sched.step()
            sums[0] += loss.item() * idx.numel()
            sums[1] += mine.numel()
            sums[2:] += torch.tensor([float((o.argmax(1) == y).sum()) for o in outs], dtype=torch.float64)
        sums = dist.all_sum(sums)
        for h in heads:  # BatchNorm running statistics of every rank's batches, the same on every rank
            dist.average_buffers(h)
        seen = max(float(sums[1]), 1.0)
        history["loss"].append(float(sums[0]) / seen)
        history["train_acc"].append((sums[2:] / seen).tolist())
        history["lr"].append(opt.param_groups[0]["lr"])
        if val_cache is not None:
            history["val_acc"].append(_accuracy(heads, chosen, val_cache, device))
        history["seconds"] = time.perf_counter() - start
        report(progress, cancel, "training exits", epoch + 1, epochs, _message(history, epoch, epochs))
    for h in heads:
        h.eval()
    return history


def _loss(logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None, label_smoothing: float,
          distill: float, temperature: float, batch: int) -> torch.Tensor:
    """The loss of these samples summed and divided by `batch`, the whole batch's size (these
    samples may be only one rank's share of it)."""
    ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="sum") / batch
    if teacher is None or distill == 0:
        return ce
    kl = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(teacher / temperature, 1),
                  reduction="sum", log_target=True) / batch
    return (1 - distill) * ce + distill * temperature ** 2 * kl


@torch.no_grad()
def _accuracy(heads: list[nn.Module], chosen: list[int], cache: FeatureCache, device: torch.device,
              batch_size: int = 1024) -> list[float]:
    """Accuracy of each head on `cache`, over every rank's part when it is one."""
    correct = torch.zeros(len(chosen), dtype=torch.float64)
    for h in heads:
        h.eval()
    for s in range(0, len(cache), batch_size):
        y = cache.labels[s:s + batch_size].to(device)
        for j, (e, head) in enumerate(zip(chosen, heads)):
            pred = head(cache.inputs[e][s:s + batch_size].to(device, torch.float32)).argmax(1)
            correct[j] += int((pred == y).sum())
    return (dist.all_sum(correct) / max(cache.samples, 1)).tolist()


def _message(history: dict, epoch: int, epochs: int) -> str:
    fmt = lambda accs: " ".join(f"{a:.0%}" for a in accs)  # noqa: E731
    msg = f"epoch {epoch + 1}/{epochs}: loss {history['loss'][-1]:.3f}, train acc {fmt(history['train_acc'][-1])}"
    if history["val_acc"]:
        msg += f", val acc {fmt(history['val_acc'][-1])}"
    return msg

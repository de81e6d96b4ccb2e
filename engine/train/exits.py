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
    Deterministic for a seed.
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
    values_per_batch = batch_size * sum(cache.inputs[e][0].numel() for e in chosen)
    return (os.cpu_count() or 1) if values_per_batch >= 2**20 else 1


def _fit(model: MultiExitNet, heads: list[nn.Module], chosen: list[int], cache: FeatureCache,
         val_cache: FeatureCache | None, *, epochs: int, lr: float, weight_decay: float, batch_size: int,
         label_smoothing: float, distill: float, temperature: float, progress: ProgressFn | None,
         cancel: CancelFlag | None, seed: int) -> dict:
    device = next(model.parameters()).device
    params = [p for h in heads for p in h.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n = len(cache)
    steps = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    g = torch.Generator().manual_seed(seed)
    history: dict = {"exits": list(chosen), "loss": [], "train_acc": [], "val_acc": [], "lr": [], "seconds": 0.0}
    start = time.perf_counter()
    report(progress, cancel, "training exits", 0, epochs, f"training exits {chosen} on {n} samples")
    for epoch in range(epochs):
        for h in heads:
            h.train()
        perm = torch.randperm(n, generator=g)
        loss_sum, seen = 0.0, 0
        correct = torch.zeros(len(chosen))
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            if idx.numel() < 2 <= n:  # BatchNorm in conv heads cannot learn from a single sample
                continue
            if cancel is not None:
                cancel.check()
            y = cache.labels[idx].to(device)
            teacher = cache.teacher_logits[idx].to(device) if distill > 0 else None
            losses = []
            for j, (e, head) in enumerate(zip(chosen, heads)):
                logits = head(cache.inputs[e][idx].to(device, torch.float32))  # (batch, classes)
                losses.append(_loss(logits, y, teacher, label_smoothing, distill, temperature))
                correct[j] += (logits.argmax(1) == y).sum().item()
            loss = torch.stack(losses).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * idx.numel()
            seen += idx.numel()
        history["loss"].append(loss_sum / max(seen, 1))
        history["train_acc"].append((correct / max(seen, 1)).tolist())
        history["lr"].append(opt.param_groups[0]["lr"])
        if val_cache is not None:
            history["val_acc"].append(_accuracy(heads, chosen, val_cache, device))
        history["seconds"] = time.perf_counter() - start
        report(progress, cancel, "training exits", epoch + 1, epochs, _message(history, epoch, epochs))
    for h in heads:
        h.eval()
    return history


def _loss(logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None, label_smoothing: float,
          distill: float, temperature: float) -> torch.Tensor:
    ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if teacher is None or distill == 0:
        return ce
    kl = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(teacher / temperature, 1),
                  reduction="batchmean", log_target=True)
    return (1 - distill) * ce + distill * temperature ** 2 * kl


@torch.no_grad()
def _accuracy(heads: list[nn.Module], chosen: list[int], cache: FeatureCache, device: torch.device,
              batch_size: int = 1024) -> list[float]:
    correct = [0] * len(chosen)
    for h in heads:
        h.eval()
    for s in range(0, len(cache), batch_size):
        y = cache.labels[s:s + batch_size].to(device)
        for j, (e, head) in enumerate(zip(chosen, heads)):
            pred = head(cache.inputs[e][s:s + batch_size].to(device, torch.float32)).argmax(1)
            correct[j] += int((pred == y).sum())
    return [c / max(len(cache), 1) for c in correct]


def _message(history: dict, epoch: int, epochs: int) -> str:
    fmt = lambda accs: " ".join(f"{a:.0%}" for a in accs)  # noqa: E731
    msg = f"epoch {epoch + 1}/{epochs}: loss {history['loss'][-1]:.3f}, train acc {fmt(history['train_acc'][-1])}"
    if history["val_acc"]:
        msg += f", val acc {fmt(history['val_acc'][-1])}"
    return msg

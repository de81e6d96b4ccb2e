"""Training a whole multi-exit network from scratch (the built-in default model).

The data is decoded once into a uint8 tensor and augmented in batches on the training device
(random crop with padding + horizontal flip: `engine.preprocess.augment`), so a 2-core laptop
spends its time in the network, not in JPEG decoding. Every epoch ends with an atomic checkpoint;
a run resumes from it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backbones import build_backbone
from ..backbones.published import load_plain
from ..data.folders import SKIPPED
from ..files import json_text, replacing
from ..model import MultiExitNet
from ..preprocess import augment, normalise
from ..progress import CancelFlag, ProgressFn, report

logger = logging.getLogger(__name__)


@dataclass
class NetworkConfig:
    """Everything that decides a training run; stored in every checkpoint and in the bundle meta."""

    arch: str = "cifar_resnet20"
    head: str = "linear"  # exit head kind for the early exits
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1  # peak SGD learning rate (one-cycle schedule)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    exit_weights: list[float] = field(default_factory=list)  # loss weight per exit ([] = all 1)
    pad: int = 4  # random-crop padding in pixels
    seed: int = 0
    arch_kwargs: dict = field(default_factory=dict)  # e.g. {"stages_per_group": 3} for cifar_resnet56a
    distill: float = 0.0  # weight of distillation from a teacher's logits in every exit's loss (0..1)
    distill_temperature: float = 3.0
    freeze_backbone: bool = False  # train the early exits only, on a frozen backbone (and last exit), as DyCE does
    head_lr_scale: float = 1.0  # early exit heads learn at lr × this (the loss is a mean over exits: each head
    #                             gets 1/num_exits of the gradient the backbone gets)


def decode_dataset(dataset, size: int, *, progress: ProgressFn | None = None, cancel: CancelFlag | None = None):
    """Decode every image of `dataset` (items (PIL image or tensor, label)) to uint8 (N, 3, size, size)
    and the (N,) labels; items of files that could not be read (label SKIPPED) are left out."""
    import numpy as np

    n = len(dataset)
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.long)
    for i in range(n):
        img, y = dataset[i]
        if not isinstance(img, torch.Tensor):
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size))
            img = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        images[i], labels[i] = img, int(y)
        if i % 2000 == 0 or i == n - 1:
            report(progress, cancel, "decoding images", i + 1, n)
    keep = labels != SKIPPED  # an unreadable file's item holds another image: never train on it twice
    if not bool(keep.all()):
        images, labels = images[keep], labels[keep]
    return images, labels


def build_network(cfg: NetworkConfig, class_names: list[str],
                  init: dict[str, torch.Tensor] | None = None) -> MultiExitNet:
    """`cfg.arch` with exits after every stage, starting from the state dict `init` when given: a
    backbone's (classifier included: it becomes the last exit) or a whole network's of this config
    (keys `backbone.*` and `exits.*`, e.g. an earlier run that trained the last exit only)."""
    backbone = build_backbone(cfg.arch, num_classes=len(class_names), **cfg.arch_kwargs)
    whole = init is not None and any(k.startswith("exits.") for k in init)
    if init is not None and not whole:
        backbone.load_state_dict(init)
    model = MultiExitNet.attach(backbone, class_names=class_names, head=cfg.head)
    if whole:
        model.load_state_dict(init)
    return model


def with_new_exits(cfg: NetworkConfig, class_names: list[str], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole-network state dict for `cfg`: the backbone and last exit of `state` (a whole network
    whose early exits may be of another kind), and `cfg`'s early exit heads freshly made."""
    fresh = build_network(cfg, class_names).state_dict()
    last = f"exits.{max(int(k.split('.')[1]) for k in fresh if k.startswith('exits.'))}."
    return {**fresh, **{k: v for k, v in state.items() if k.startswith(("backbone.", last))}}


def _save_checkpoint(path: Path, state: dict) -> None:
    with replacing(path) as tmp:  # a kill mid-write leaves a temporary the next save removes
        torch.save(state, tmp)


def read_checkpoint(path: str | Path, cfg: NetworkConfig, device: str = "cpu") -> dict | None:
    """The training state in checkpoint `path` (None when there is no file), checked: made by
    `train_network` with the same `cfg`, an epoch within it, a readable history. Tensors only are
    unpickled (weights_only). Raises ValueError, one sentence naming the file, for anything else:
    an empty, truncated or foreign file, a folder, another configuration."""
    path = Path(path)
    if not path.exists():
        return None
    fix = "delete it or give another --checkpoint"
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a file; {fix}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (an interrupted write?); {fix}")
    try:
        state = load_plain(path, device)
    except Exception as err:  # noqa: BLE001 - torch raises many types for damaged or hostile files
        logger.debug("cannot load checkpoint %s", path, exc_info=True)
        if path.suffix == ".offramp" or _looks_like_safetensors(path):  # never advise deleting a bundle
            raise ValueError(f"checkpoint {path} is an Offramp bundle, not a training checkpoint; give another "
                             "--checkpoint (a new name, or a file train-backbone wrote)") from None
        raise ValueError(f"checkpoint {path} is not a readable training checkpoint ({type(err).__name__}); {fix}") from None
    try:
        config = json.loads(state["config"])
        epoch, history = state["epoch"], json.loads(state["history"])
        parts_ok = all(isinstance(state[k], dict) for k in ("model", "optimizer", "scheduler"))
    except Exception as err:  # noqa: BLE001 - missing keys, wrong types
        logger.debug("malformed checkpoint %s", path, exc_info=True)
        raise ValueError(f"checkpoint {path} is not an Offramp training checkpoint ({type(err).__name__}); {fix}") from None
    if not parts_ok or not isinstance(history, list) or isinstance(epoch, bool) or not isinstance(epoch, int):
        raise ValueError(f"checkpoint {path} is not an Offramp training checkpoint (malformed state); {fix}")
    if isinstance(config, dict):  # a setting added since the checkpoint was written had its default then
        config = {**asdict(NetworkConfig()), **config}
    if config != asdict(cfg):
        raise ValueError(f"checkpoint {path} was made with another configuration; delete it or use the same options")
    if not 0 <= epoch <= cfg.epochs:
        raise ValueError(f"checkpoint {path} claims epoch {epoch} of a {cfg.epochs}-epoch run; {fix}")
    return {**state, "epoch": epoch, "history": history}


def _exit_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, cfg: NetworkConfig) -> torch.Tensor:
    """One exit's training loss: label cross-entropy, mixed with distillation when `target` (the
    teacher's log-probabilities at the distillation temperature) is given."""
    ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    if target is None:
        return ce
    t = cfg.distill_temperature
    kl = F.kl_div(F.log_softmax(logits / t, 1), target, reduction="batchmean", log_target=True)
    return (1 - cfg.distill) * ce + cfg.distill * t * t * kl


@torch.no_grad()
def accuracy_per_exit(model: MultiExitNet, images: torch.Tensor, labels: torch.Tensor, device: str,
                      batch_size: int = 500) -> list[float]:
    model.eval()
    correct = torch.zeros(model.num_exits)
    preset = model.backbone.preset
    for i in range(0, len(images), batch_size):
        x = normalise(images[i:i + batch_size].to(device), preset.mean, preset.std)
        y = labels[i:i + batch_size].to(device)
        for e, logits in enumerate(model.forward_all(x)):
            correct[e] += (logits.argmax(1) == y).sum().item()
    return (correct / max(1, len(images))).tolist()


def train_network(cfg: NetworkConfig, images: torch.Tensor, labels: torch.Tensor, class_names: list[str], *,
                  device: str = "cpu", checkpoint: str | Path | None = None, val: tuple | None = None,
                  progress: ProgressFn | None = None, cancel: CancelFlag | None = None,
                  init: dict[str, torch.Tensor] | None = None, teacher: torch.nn.Module | None = None,
                  log=print) -> tuple[MultiExitNet, list[dict]]:
    """Train backbone and all exits jointly (weighted sum of per-exit losses) with SGD + one-cycle.

    Each exit's loss is cross-entropy, or with `teacher` (a frozen network whose forward gives logits
    over the same classes, e.g. the fine-tuned network before exits were trained into it) and
    `cfg.distill` = d > 0: (1 - d) * cross-entropy + d * T² * KL(teacher ‖ exit) at T =
    `cfg.distill_temperature` (Hinton et al. 2015), computed on the same augmented batch.

    `images` uint8 (N, 3, H, W) and `labels` (N,). With `checkpoint`, the run resumes from that file
    if it exists (same config required) and rewrites it atomically after every epoch. `init`, a state
    dict of the backbone (e.g. published weights, `engine.backbones.published.load_published`), is
    where a new run starts; a resumed run starts from its checkpoint.
    Returns the model (eval mode, on CPU) and the per-epoch history. Raises Cancelled.
    """
    torch.manual_seed(cfg.seed)
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    model = build_network(cfg, class_names, init).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    preset = model.backbone.preset
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    early = {id(p) for head in model.exits[:-1] for p in head.parameters()} if cfg.head_lr_scale != 1 else set()
    groups = {}  # (decayed, early head) -> parameters; decayed first, as checkpoints of the 2-group days have it
    for p in model.parameters():
        groups.setdefault((p.ndim > 1, id(p) in early), []).append(p)
    groups = sorted(groups.items(), key=lambda g: (not g[0][0], g[0][1]))
    opt = torch.optim.SGD([{"params": ps, "weight_decay": cfg.weight_decay if decayed else 0.0}
                           for (decayed, _), ps in groups], lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[cfg.lr * (cfg.head_lr_scale if head else 1.0) for (_, head), _ in groups],
        total_steps=cfg.epochs * steps_per_epoch, pct_start=0.25, div_factor=10, final_div_factor=100)
    if cfg.distill > 0 and teacher is None:
        raise ValueError(f"distill is {cfg.distill} but no teacher network was given to learn from")
    if not 0.0 <= cfg.distill <= 1.0:
        raise ValueError(f"distill is a weight in [0, 1], got {cfg.distill}")
    if teacher is not None and cfg.distill > 0:
        teacher = teacher.to(device).eval().requires_grad_(False)
    else:
        teacher = None
    weights = cfg.exit_weights or [1.0] * model.num_exits
    if len(weights) != model.num_exits:
        raise ValueError(f"exit_weights has {len(weights)} entries but {cfg.arch} has {model.num_exits} exits")
    for head, w in zip(model.exits, weights):
        head.requires_grad_(w != 0)  # a head with no loss is not trained (nor decayed): exits come later
    if cfg.freeze_backbone:  # the backbone's own classifier, the last exit, is part of what stays fixed
        model.backbone.requires_grad_(False)
        model.exits[-1].requires_grad_(False)
        weights = [*weights[:-1], 0.0]
        if not any(weights):
            raise ValueError("with a frozen backbone only the early exits learn; give them a positive exit weight")
    history: list[dict] = []
    start_epoch = 0
    ckpt = Path(checkpoint) if checkpoint else None
    state = read_checkpoint(ckpt, cfg, device) if ckpt is not None else None
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        except Exception as err:  # noqa: BLE001 - tensors of another model or a damaged file
            logger.debug("cannot resume from %s", ckpt, exc_info=True)
            raise ValueError(f"checkpoint {ckpt} does not fit this network ({type(err).__name__}); delete it or give "
                             "another --checkpoint") from None
        start_epoch, history = state["epoch"], state["history"]
        log(f"resuming from {ckpt} at epoch {start_epoch}/{cfg.epochs}")
    gen = torch.Generator().manual_seed(cfg.seed + start_epoch)
    images_dev, labels_dev = images.to(device), labels.to(device)
    use_amp = device == "cuda"
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        if cfg.freeze_backbone:  # frozen means its BatchNorm statistics too
            model.backbone.eval()
            model.exits[-1].eval()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        order = torch.randperm(len(images), generator=gen).to(device)
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = normalise(augment(images_dev[idx], cfg.pad, gen), preset.mean, preset.std)
            if device == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels_dev[idx]
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                target = None
                if teacher is not None:
                    with torch.no_grad():
                        target = F.log_softmax(teacher(x).float() / cfg.distill_temperature, 1)
                outs = model.forward_all(x)
                loss = sum(w * _exit_loss(o.float(), y, target, cfg) for w, o in zip(weights, outs) if w) / sum(weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            if step % 20 == 0 or step == steps_per_epoch - 1:
                report(progress, cancel, "training network", epoch * steps_per_epoch + step + 1,
                       cfg.epochs * steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / seen:.3f}")
        entry = {"epoch": epoch + 1, "loss": loss_sum / seen, "seconds": time.perf_counter() - t0,
                 "images_per_s": seen / (time.perf_counter() - t0)}
        if val is not None:
            entry["val_accuracy"] = accuracy_per_exit(model, val[0], val[1], device)
        history.append(entry)
        log(json_text(entry))
        if ckpt is not None:
            try:
                _save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                        "scheduler": sched.state_dict(), "epoch": epoch + 1,
                                        "config": json.dumps(asdict(cfg)), "history": json_text(history)})
            except OSError as e:  # a full disk must not end the run: the bundle is what matters
                log(f"could not write the checkpoint {ckpt} ({e.strerror or e}); training goes on without it")
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    return model, history


def _looks_like_safetensors(path: Path) -> bool:
    """Whether `path` starts as a safetensors file does (a bundle): 8 bytes of header length, then "{"."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size

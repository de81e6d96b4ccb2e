"""Published CIFAR-10 ResNet checkpoints (akamaster/pytorch_resnet_cifar10, BSD-2-Clause) onto the
option-A backbones `cifar_resnet{20,32,44,56}a`.

Those files are torch pickles of {"best_prec1": float, "state_dict": {...}} saved from DataParallel
("module." prefixes): `conv1`, `bn1`, `layer{1,2,3}.{i}.conv1/bn1/conv2/bn2`, `linear`. They are read
with `torch.load(weights_only=True)` only, so a file holding anything but tensors and plain containers
is refused by torch before any of it runs. Get them from the project's `pretrained_models/` folder
on GitHub (the SHA-256 of each is printed by `sha256sum`; their names carry its first 8 hex digits).
"""
from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ._base import StagedBackbone
from .cifar import BasicBlock

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, of another network, or damaged."""


def load_plain(path: str | Path, map_location: str | torch.device = "cpu"):
    """`torch.load` with `weights_only=True`: tensors and plain containers, nothing unpickled that
    could run code. torch's warnings about foreign pickles are silenced: the caller turns a failure
    into its own one sentence."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(str(path), map_location=map_location, weights_only=True)

def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: str | Path, *, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the torch checkpoint at `path` (a bare state dict or one under "state_dict" /
    "model"), "module." prefixes removed. Never unpickles anything but tensors and plain containers.

    Raises CheckpointError, in one sentence naming the file, when it is missing, not a file, does not
    match `sha256`, cannot be read safely, or holds no tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if sha256 is not None:
        got = sha256_of(path)
        if got.lower() != sha256.strip().lower():
            raise CheckpointError(f"checkpoint {path} has SHA-256 {got[:16]}…, not the expected {sha256[:16]}…: "
                                  "it is another or a damaged file")
    try:
        obj = load_plain(path)
    except Exception:  # noqa: BLE001 - UnpicklingError, zip errors, EOF: all mean "not usable"
        # torch's own text is not shown: it suggests weights_only=False, which would run the file's code
        log.info("reading checkpoint %s", path, exc_info=True)
        raise CheckpointError(f"checkpoint {path} cannot be read: it is not a PyTorch checkpoint of plain tensors "
                              "(another kind of file, a damaged one, or one holding objects Offramp will not "
                              "unpickle)") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def published_key_map(backbone: StagedBackbone) -> dict[str, str]:
    """Our parameter/buffer name for every key of the published layout, read off the built network
    (stem conv/BN, the blocks in order as layer{g}.{i}, the classifier's linear layer)."""
    ours: dict[str, str] = {}
    stem = backbone.stages[0][0]  # Sequential(conv, BN, ReLU) in front of the first stage's blocks
    for theirs, module_name in (("conv1", "stages.0.0.0"), ("bn1", "stages.0.0.1")):
        module = stem[0] if theirs == "conv1" else stem[1]
        for k in module.state_dict():
            ours[f"{theirs}.{k}"] = f"{module_name}.{k}"
    group, index, width = 0, 0, None
    for s, stage in enumerate(backbone.stages):
        for j, layer in enumerate(stage):
            if not isinstance(layer, BasicBlock):
                continue
            c_out = layer.conv1.out_channels
            if width is not None and c_out != width:
                group, index = group + 1, 0
            width = c_out
            for k in layer.state_dict():
                if not k.startswith("shortcut."):
                    ours[f"layer{group + 1}.{index}.{k}"] = f"stages.{s}.{j}.{k}"
            index += 1
    linear = [(n, m) for n, m in backbone.classifier.named_modules() if isinstance(m, nn.Linear)]
    if len(linear) != 1:
        raise CheckpointError(f"backbone {backbone.spec.get('name')} has no single linear classifier to load into")
    for k in linear[0][1].state_dict():
        ours[f"linear.{k}"] = f"classifier.{linear[0][0]}.{k}"
    return ours


def load_published(backbone: StagedBackbone, path: str | Path, *, sha256: str | None = None) -> StagedBackbone:
    """Load the published checkpoint at `path` into `backbone` (an option-A CIFAR ResNet of the same
    depth and classes), in place; returns it.

    Raises CheckpointError in one sentence when the file is unusable (see read_state_dict) or its keys
    or shapes do not fit the backbone (missing, unexpected, different shape: the first few named)."""
    path = Path(path)
    state = read_state_dict(path, sha256=sha256)
    # BatchNorm's step counters are not weights: older checkpoints (these among them) have none
    mapping = {k: v for k, v in published_key_map(backbone).items()
               if k in state or not k.endswith("num_batches_tracked")}
    name = backbone.spec.get("name", "the backbone")
    missing = sorted(set(mapping) - set(state))
    unexpected = sorted(set(state) - set(mapping))
    if missing or unexpected:
        parts = ([f"missing {len(missing)} keys ({', '.join(missing[:3])}…)"] if missing else []) + \
                ([f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])}…)"] if unexpected else [])
        raise CheckpointError(f"checkpoint {path} does not fit {name}: {'; '.join(parts)} — "
                              "is it a published ResNet of this depth?")
    own = backbone.state_dict()
    # a backbone with tensors the published layout lacks (conv shortcuts: cifar_resnet20, not 20a)
    # would keep them random: refuse rather than start half-trained
    unfilled = sorted(set(own) - set(mapping.values()) - {k for k in own if k.endswith("num_batches_tracked")})
    if unfilled:
        raise CheckpointError(f"checkpoint {path} does not fit {name}: it has no weights for {len(unfilled)} of its "
                              f"tensors ({', '.join(unfilled[:3])}…) — published ResNets load into "
                              "cifar_resnet20a, 32a, 44a or 56a")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[v].shape)}" for k, v in mapping.items()
             if tuple(state[k].shape) != tuple(own[v].shape)]
    if wrong:
        raise CheckpointError(f"checkpoint {path} does not fit {name}: shapes differ ({'; '.join(wrong[:3])})")
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds NaN or infinite values in {', '.join(bad[:3])}")
    loaded = {v: state[k].to(own[v].dtype) for k, v in mapping.items()}
    backbone.load_state_dict({**own, **loaded}, strict=True)
    return backbone

"""Records: every exit's recorded outputs on N labelled samples — what evaluation, the DyCE search
and policy training read instead of running the model again. Recorded by
`engine.evaluate.record_outputs` (or `engine.cascade.record_cascade`); saved and loaded as one
safetensors file (no pickle). `engine.recording.record_sharded` records them data-parallel under
torchrun, and on disk when they outgrow memory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from .files import json_text, write_atomic

_RECORDS_KEY = "offramp.records"
_RECORDS_FORMAT = 1


@dataclass
class Records:
    """Outputs of every exit on N labelled samples (E exits, K classes), all on the CPU."""

    logits: torch.Tensor  # (N, E, K) float32 calibrated logits of every exit
    features: list[torch.Tensor]  # per exit (N, C_e) pooled tap features; [] when not recorded
    labels: torch.Tensor  # (N,) long
    class_names: list[str]
    exit_stages: list[int]  # stage each exit reads

    def __post_init__(self):
        if self.logits.dim() != 3:
            raise ValueError(f"logits must be (samples, exits, classes), got shape {tuple(self.logits.shape)}")
        n, e, k = self.logits.shape
        if self.labels.shape != (n,):
            raise ValueError(f"labels must be ({n},) to match the logits, got {tuple(self.labels.shape)}")
        if self.features and (len(self.features) != e or any(f.shape[0] != n for f in self.features)):
            raise ValueError(f"features must be one (N={n}, C) tensor per exit ({e} exits)")
        if len(self.exit_stages) != e or len(self.class_names) != k:
            raise ValueError(f"records with {e} exits and {k} classes need {e} exit stages and {k} class names, "
                             f"got {len(self.exit_stages)} and {len(self.class_names)}")
        self.class_names = list(self.class_names)
        self.exit_stages = [int(s) for s in self.exit_stages]

    @property
    def num_samples(self) -> int:
        return self.logits.shape[0]

    @property
    def num_exits(self) -> int:
        return self.logits.shape[1]

    @property
    def num_classes(self) -> int:
        return self.logits.shape[2]

    @property
    def features_or_none(self) -> list[torch.Tensor] | None:
        return self.features or None

    def subset(self, idx) -> "Records":
        """The records of the samples `idx` (indices or a boolean mask), in that order."""
        idx = torch.as_tensor(idx)
        if idx.dtype != torch.bool:
            idx = idx.long()
        return Records(self.logits[idx], [f[idx] for f in self.features], self.labels[idx],
                       self.class_names, self.exit_stages)

    def save(self, path: str | Path) -> None:
        """Write one safetensors file (tensors + JSON metadata; no pickle), atomically."""
        tensors = {"logits": self.logits.float().contiguous(), "labels": self.labels.long().contiguous()}
        tensors.update({f"features.{e}": f.float().contiguous() for e, f in enumerate(self.features)})
        meta = {"format": _RECORDS_FORMAT, "class_names": self.class_names, "exit_stages": self.exit_stages,
                "num_features": len(self.features)}
        write_atomic(path, save_tensors(tensors, metadata={_RECORDS_KEY: json_text(meta)}))

    @classmethod
    def load(cls, path: str | Path) -> "Records":
        """Read records written by `save`. Raises ValueError when the file is not such a file."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[_RECORDS_KEY])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            features = [tensors[f"features.{e}"] for e in range(int(meta["num_features"]))]
            return cls(tensors["logits"], features, tensors["labels"], meta["class_names"], meta["exit_stages"])
        except FileNotFoundError:
            raise
        except (SafetensorError, KeyError, ValueError, TypeError, OSError) as err:
            raise ValueError(f"{path} is not an Offramp records file ({err}); record it again with "
                             "record_outputs(...).save(path)") from err

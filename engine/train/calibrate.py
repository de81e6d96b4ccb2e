"""Calibration of exit confidences: temperature scaling (Guo et al., ICML 2017) fitted on held-out
logits, and the expected calibration error that tells whether it helped."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..features import FeatureCache
from ..model import MultiExitNet
from ..evaluate import expected_calibration_error


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 100) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) on (N, K) `logits`.

    Fitted by LBFGS on log T (so T stays positive); returns 1.0 when the fit does not converge
    to a finite value. Raises ValueError when logits and labels disagree in length.
    """
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"need (N, K) logits and N labels, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    # Fitting needs autograd even when called under no_grad or inference_mode (and on inference tensors).
    with torch.inference_mode(False), torch.enable_grad():
        logits = logits.detach().float().cpu().clone()
        labels = labels.detach().long().cpu().clone()
        log_t = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        opt.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, 1e-2), 1e2) if math.isfinite(t) else 1.0


@torch.no_grad()
def calibrate_exits(model: MultiExitNet, cache: FeatureCache) -> list[float]:
    """Fit one temperature per exit on `cache` (held-out data), store it in `model.temperature`
    and return it. Raises ValueError when the cache belongs to another model."""
    return _fit_temperatures(model, cache.exit_logits(model), cache.labels)


def _fit_temperatures(model: MultiExitNet, logits: torch.Tensor, labels: torch.Tensor,
                      keep: Sequence[int] = ()) -> list[float]:
    """Temperatures fitted on uncalibrated `logits` (N, E, K), stored in `model.temperature`; the
    exits in `keep` keep the temperature they have."""
    temps = [float(model.temperature[e]) if e in keep else fit_temperature(logits[:, e], labels)
             for e in range(model.num_exits)]
    model.temperature.copy_(torch.tensor(temps, dtype=model.temperature.dtype))
    return temps


@torch.no_grad()
def calibrate_with_report(model: MultiExitNet, cache: FeatureCache, keep: Sequence[int] = ()) -> dict:
    """`calibrate_exits`, and the expected calibration error of every exit before and after it
    (on the same held-out cache): {"temperatures", "ece_before", "ece_after"}. Exits in `keep`
    keep their temperature (a teacher exit cannot be calibrated on its own predictions)."""
    raw = cache.exit_logits(model)  # uncalibrated, whatever temperature the model holds
    temps = _fit_temperatures(model, raw, cache.labels, keep)
    # A kept exit's ECE against these labels says nothing (a teacher always agrees with itself): None.
    before = [None if e in keep else expected_calibration_error(raw[:, e], cache.labels)
              for e in range(model.num_exits)]
    after = [None if e in keep else expected_calibration_error(raw[:, e] / t, cache.labels)
             for e, t in enumerate(temps)]
    return {"temperatures": temps, "ece_before": before, "ece_after": after, "kept": sorted(keep)}

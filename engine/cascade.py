"""Network selection cascade (Bolukbasi et al. 2017): models of rising cost, cheapest first; after
each model a learned policy reads the evidence so far (every model's answer up to here) and
decides whether the next, dearer model must run. "Exit" i of the cascade is model i.

Each model answers with its last exit (its own classifier), not with its own staged early-exit
run: the cascade then makes one decision per model on one fixed-cost answer, so its records are
exactly what `run` computes, its cost table is simple sums, and the policy interface, training
(`train_bolukbasi`) and scoring (`evaluate_policy`) are the multi-exit ones unchanged. A model's
own early exits would stack a second policy inside each step and double the decisions to learn.

Cost: `Cascade.measure_cost` returns a CostTable whose exits are the models with no shared stages
(stage cost 0) and model i's full FLOPs as exit i's head cost. So `cumulative_flops()[i]` is the
cost of running models 0..i (plus their decisions) and `full_flops` is the largest model alone:
`evaluate_policy`'s saved and flops_speedup are against running only the largest model.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .bundle import Bundle
from .cost import CostTable, count_decision_flops, measure_costs, profile_latency, with_policy_flops
from .evaluate import _length, as_loader, drop_skipped, evaluate_policy
from .model import MultiExitNet
from .policies import Evidence, Policy, pooled_features
from .records import Records
from .progress import CancelFlag, ProgressFn, report


@dataclass
class CascadeOutput:
    """Result of a cascade run on a batch of B samples, M models, K classes."""

    exit_index: torch.Tensor  # (B,) the model that answered
    logits: torch.Tensor  # (B, K) calibrated logits of that model
    model_logits: torch.Tensor  # (B, M, K) every model that ran; NaN where it did not
    ran: torch.Tensor  # (B, M) bool
    model_calls: list[int] = field(default_factory=list)  # samples each model processed (proof of skipping)


def _model_of(m: MultiExitNet | Bundle) -> MultiExitNet:
    if isinstance(m, Bundle):
        return m.model
    if isinstance(m, MultiExitNet):
        return m
    raise TypeError(f"a cascade takes MultiExitNet models or bundles, not {type(m).__name__}")


class Cascade(nn.Module):
    """Models (MultiExitNet or Bundle) of rising cost, each answering with its last exit, and an
    optional default selection policy (a Policy over M "exits" = the models)."""

    def __init__(self, models: Sequence[MultiExitNet | Bundle], policy: Policy | None = None):
        super().__init__()
        nets = [_model_of(m) for m in models]
        if len(nets) < 2:
            raise ValueError(f"a cascade needs at least 2 models, got {len(nets)}")
        names = nets[0].class_names
        for i, m in enumerate(nets[1:], 1):
            if m.class_names != names:
                raise ValueError(f"model {i} predicts classes {m.class_names}, model 0 predicts {names}: "
                                 "every model of a cascade must predict the same classes in the same order")
            if m.backbone.preset.to_json() != nets[0].backbone.preset.to_json():
                raise ValueError(f"model {i} expects input preset {m.backbone.preset.to_json()}, model 0 "
                                 f"{nets[0].backbone.preset.to_json()}: a cascade feeds every model the same image")
        self.models = nn.ModuleList(nets)
        self.policy = policy

    @property
    def num_models(self) -> int:
        return len(self.models)

    @property
    def class_names(self) -> list[str]:
        return self.models[0].class_names

    @property
    def preset(self):
        return self.models[0].backbone.preset

    # -- computing ----------------------------------------------------------------------------
    def answer(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model i's calibrated last-exit logits (B, K) and its last tap's pooled features (B, C);
        its other exit heads are not evaluated."""
        model = self.models[i]
        for stage in model.backbone.stages:
            x = stage(x)  # (B, C, h, w)
        logits = model.exits[-1](x) / model.temperature[-1]
        return logits, pooled_features(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every model's calibrated logits, a list of (B, K)."""
        return [self.answer(i, x)[0] for i in range(self.num_models)]

    @torch.no_grad()
    def run(self, x: torch.Tensor, policy: Policy | None = None) -> CascadeOutput:
        """Run the models in order; after model i, `policy` (default: the cascade's) decides per
        sample whether to stop; only the samples that go on are given to model i+1, and a model no
        sample needs is never run. Models the policy leaves inactive are skipped. ValueError
        without a policy."""
        policy = policy if policy is not None else self.policy
        if policy is None:
            raise ValueError("this cascade has no selection policy: pass one, e.g. train_bolukbasi(...)")
        m, b = self.num_models, x.shape[0]
        active = policy.active_exits(m)
        k = len(self.class_names)
        out = torch.full((b, m, k), float("nan"), device=x.device)
        ran = torch.zeros(b, m, dtype=torch.bool, device=x.device)
        fired = torch.full((b,), m - 1, dtype=torch.long, device=x.device)
        index = torch.arange(b, device=x.device)
        history: list[torch.Tensor] = []
        run_ids: list[int] = []
        calls = [0] * m
        for i in range(m):
            if not (active[i] or i == m - 1):
                continue
            logits, features = self.answer(i, x)
            calls[i] = int(x.shape[0])
            out[index, i] = logits
            ran[index, i] = True
            history.append(logits)
            run_ids.append(i)
            if i == m - 1:
                break
            stop = policy.decide(Evidence(i, m, history, list(run_ids), features, index)).to(torch.bool)
            if stop.any():
                fired[index[stop]] = i
                keep = ~stop
                index, x = index[keep], x[keep]
                history = [h[keep] for h in history]
                if index.numel() == 0:
                    break
        final = out[torch.arange(b, device=x.device), fired]
        return CascadeOutput(fired, final, out, ran, calls)

    # -- cost ---------------------------------------------------------------------------------
    def _example(self, input_size) -> torch.Tensor:
        size = input_size or self.preset.crop
        h, w = (size, size) if isinstance(size, int) else size
        device = next(self.models[0].parameters()).device
        return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)

    @torch.no_grad()
    def measure_policy_flops(self, policy: Policy | None = None, input_size=None) -> list[float]:
        """FLOPs of `policy.decide` after each model (0 after the last and at inactive ones),
        measured with the FLOP counter on the evidence of one real image."""
        policy = policy if policy is not None else self.policy
        if policy is None:
            raise ValueError("no policy to measure: pass one")
        m = self.num_models
        active = policy.active_exits(m)
        x = self._example(input_size)
        flops, history, run_ids = [], [], []
        for i in range(m):
            if i == m - 1 or not active[i]:
                flops.append(0.0)
                continue
            logits, features = self.answer(i, x)
            history.append(logits)
            run_ids.append(i)
            flops.append(count_decision_flops(policy, i, m, history, run_ids, features))
        return flops

    def measure_cost(self, policy: Policy | None = None, *, input_size=None, latency: bool = False,
                     device="cpu", repeats: int = 10) -> CostTable:
        """The cascade's CostTable (see the module doc): model i's full FLOPs (all stages + last
        exit) as exit i's cost, `policy`'s measured decision FLOPs, and with `latency` each model's
        measured batch-1 full-model ms on `device` (the models are moved there)."""
        tables = [measure_costs(model, input_size=input_size) for model in self.models]
        m = self.num_models
        cost = CostTable(list(range(m)), [0.0] * m, [t.full_flops for t in tables])
        if latency:
            ms = [profile_latency(model, t, device, repeats=repeats, input_size=input_size).full_ms
                  for model, t in zip(self.models, tables)]
            cost = replace(cost, stage_ms=[0.0] * m, exit_ms=ms, device=str(device))
        policy = policy if policy is not None else self.policy
        if policy is not None:
            cost.policy_flops = self.measure_policy_flops(policy, input_size)
        return cost


# -- records and evaluation -----------------------------------------------------------------------
def record_cascade(models: Cascade | Sequence[MultiExitNet | Bundle],
                   dataset_or_loader: Dataset | DataLoader | Iterable, *, batch_size: int = 256,
                   device: str | torch.device = "cpu", workers: int | None = None,
                   progress: ProgressFn | None = None, cancel: CancelFlag | None = None) -> Records:
    """Records whose "exits" are the cascade's models: logits (N, M, K) calibrated last-exit logits
    of every model, features = each model's pooled last-tap features, labels; exit_stages 0..M−1.

    Data as in engine.evaluate.record_outputs (a dataset without a transform gets the models'
    preset; one pass over the data). Models run in eval mode on `device`, then go back. Progress
    stage: "recording cascade". Raises Cancelled, ValueError for an empty dataset.
    """
    cascade = models if isinstance(models, Cascade) else Cascade(models)
    loader = as_loader(dataset_or_loader, cascade.preset, batch_size, workers)
    total = _length(loader)
    states = [(next(mm.parameters()).device, mm.training) for mm in cascade.models]
    device = torch.device(device)
    cascade.eval().to(device)
    logits, feats, labels, done = [], [], [], 0
    try:
        report(progress, cancel, "recording cascade", 0, total)
        for batch in loader:
            x, y = batch[0].to(device), batch[1]
            with torch.inference_mode():
                answers = [cascade.answer(i, x) for i in range(cascade.num_models)]
            logits.append(torch.stack([a[0] for a in answers], dim=1).float().cpu())  # (batch, models, classes)
            feats.append([a[1].float().cpu() for a in answers])
            labels.append(torch.as_tensor(y).long().reshape(-1).cpu())
            done += x.shape[0]
            report(progress, cancel, "recording cascade", done, max(total, done))
    finally:
        for mm, (dev, training) in zip(cascade.models, states):
            mm.to(dev).train(training)
    if not logits:
        raise ValueError("the dataset is empty: there is nothing to record")
    features = [torch.cat(col) for col in zip(*feats)]  # outside inference mode: ordinary tensors
    return drop_skipped(Records(torch.cat(logits), features, torch.cat(labels), cascade.class_names,
                                list(range(cascade.num_models))))


def evaluate_cascade(records: Records, policy: Policy, cost: CostTable) -> dict:
    """`evaluate_policy` of the selection policy on cascade records, with the policy's decision
    FLOPs counted (analytically when `cost` has none for it), plus: largest_accuracy (the largest
    model alone), accuracy_loss (largest − cascade), largest_flops, and speedup against the largest
    model alone — measured ms when `cost` has latency (speedup_basis "ms"), else FLOPs ("flops")."""
    if not any(cost.policy_flops) and policy.decision_flops() is not None:
        cost = with_policy_flops(cost, policy)
    out = evaluate_policy(records, policy, cost)
    largest = (records.logits[:, -1].argmax(dim=-1) == records.labels).double().mean().item()
    out.update(largest_accuracy=largest, accuracy_loss=largest - out["accuracy"], largest_flops=cost.full_flops)
    if "speedup" in out:
        out["speedup_basis"] = "ms"
    else:
        out.update(speedup=out["flops_speedup"], speedup_basis="flops")
    return out

"""Category-structure policy network (DESIGN.md, idea 3).

At every early exit a small network reads the exit's pooled tap features plus *category-structure
measures* — how clearly this input sits with one class at this depth, judged against class
prototypes (per-class mean features of the training data at that exit) — and outputs a halting
probability h_e; the sample takes the exit where h_e >= tau. (It is trained end to end on recorded
exit outputs with a differentiable cost-aware objective over the sequential halting
probabilities, λ trading expected loss against expected compute: `engine.train.structure`.)

One network is shared by all exits, with a per-exit linear projection of the features (tap widths
differ) and the exit's one-hot: the measures mean the same thing at every depth, so sharing lets
the deep exits, which few training samples reach undecided, borrow what the early ones learn.

Novelty veto (optional, per early exit): the exit may fire only where the input's atypicality
there, 1 − sim_top1 (how far it sits from its nearest class prototype), is at most a cutoff fitted
on clean calibration data (`engine.train.structure.fit_veto`). A corrupted image whose shallow
features are unlike every class then goes deeper, where the answer holds up better under shift,
even when the exit is confident. The veto reads a measure the decision computes anyway: it adds no
matrix product, so its decision FLOPs are unchanged.
"""
from __future__ import annotations

import math
import operator
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import ROW_CLASSES, Evidence, Policy, linear_stack, numpy_copies, one_frame, register_policy, softmax_row
from .threshold import confidence

# Columns of `structure_measures`, in order.
MEASURES = ("sim_top1", "sim_top2", "sim_gap", "separability", "sim_margin", "agree_prototype",
            "agree_previous", "agree_last", "max_prob", "entropy", "margin")


# -- prototypes and measures ----------------------------------------------------------------------
def compute_prototypes(features_per_exit: Sequence[torch.Tensor], labels: torch.Tensor, num_classes: int, *,
                       centre: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Class prototypes at every exit: the per-class mean of the pooled tap features (minus
    `centre[e]`, the training mean, when given), L2-normalised. Returns one (K, C_e) tensor per exit.

    A class with no sample gets a zero prototype (cosine similarity 0 to every input).
    Raises ValueError when a feature tensor does not have one row per label.
    """
    labels = labels.long().reshape(-1)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).float()  # (K,)
    out = []
    for e, f in enumerate(features_per_exit):
        if f.dim() != 2 or f.shape[0] != labels.shape[0]:
            raise ValueError(f"features of exit {e} have shape {tuple(f.shape)}, expected ({labels.shape[0]}, C)")
        f = f.float() - (centre[e].float() if centre is not None else 0.0)
        sums = torch.zeros(num_classes, f.shape[1]).index_add_(0, labels, f)
        out.append(F.normalize(sums / counts[:, None], dim=1))
    return out


def structure_measures(history: Sequence[torch.Tensor], features: torch.Tensor, prototypes: torch.Tensor, *,
                       centre: torch.Tensor | None = None, proto_temperature: float = 0.1) -> torch.Tensor:
    """Category-structure measures of each input at one exit, (batch, len(MEASURES)).

    `history`: calibrated logits (batch, K) of the exits evaluated so far, the current one last;
    `features`: pooled tap features (batch, C) at this exit; `prototypes`: (K, C) L2-normalised;
    `centre`: (C,) subtracted from the features first (the one the prototypes were built with).
    With s_k = cos(features − centre, prototype_k):
      sim_top1, sim_top2  the nearest and second-nearest prototype similarities; sim_gap = their difference;
      separability        max_k softmax(s / proto_temperature): near 1 when one class's prototype
                          clearly dominates for this input at this depth, 1/K when none does;
      sim_margin          s_top1 − mean of the other K−1 similarities;
      agree_prototype     1 where the exit's argmax is the nearest prototype's class;
      agree_previous      fraction of earlier evaluated exits whose argmax equals this exit's (0 at the first);
      agree_last          1 where the previous evaluated exit had the same argmax (0 at the first);
      max_prob, entropy, margin   `confidence` of the exit's posterior (entropy as 1 − H / log K).
    """
    current = history[-1].float()
    x = features.float() - (centre if centre is not None else 0.0)
    sims = F.normalize(x, dim=1) @ prototypes.T  # (batch, K): the only matrix product here
    k = sims.shape[1]
    top = sims.topk(min(2, k), dim=1)
    s1 = top.values[:, 0]
    s2 = top.values[:, 1] if k > 1 else torch.zeros_like(s1)
    separability = torch.softmax(sims / proto_temperature, dim=1).max(dim=1).values
    others = (sims.sum(dim=1) - s1) / max(k - 1, 1)
    answer = current.argmax(dim=1)
    agree_proto = (answer == top.indices[:, 0]).float()
    previous = [h.argmax(dim=1) == answer for h in history[:-1]]
    agree_prev = torch.stack(previous, 1).float().mean(1) if previous else torch.zeros_like(s1)
    agree_last = previous[-1].float() if previous else torch.zeros_like(s1)
    cols = [s1, s2, s1 - s2, separability, s1 - others, agree_proto, agree_prev, agree_last,
            confidence(current, "max_prob"), confidence(current, "entropy"), confidence(current, "margin")]
    return torch.stack(cols, dim=1)


def structure_measures_one(history: Sequence[np.ndarray], features: np.ndarray, prototypes: np.ndarray,
                           centre: np.ndarray, proto_temperature: float) -> np.ndarray:
    """`structure_measures` of one sample in numpy: `history` its logits rows (each (K,)),
    `features` (C,), `prototypes` (K, C), `centre` (C,). Same columns, same float32."""
    current = history[-1]
    x = features - centre
    sims = prototypes @ (x / max(float(np.sqrt((x * x).sum())), 1e-12))  # (K,)
    k = sims.shape[0]
    nearest = int(sims.argmax())
    s1 = sims[nearest]
    s2 = np.partition(sims, k - 2)[k - 2] if k > 1 else np.float32(0.0)
    separability = softmax_row(sims / np.float32(proto_temperature)).max()
    others = (sims.sum() - s1) / max(k - 1, 1)
    answer = int(current.argmax())
    previous = [float(int(h.argmax()) == answer) for h in history[:-1]]
    p = softmax_row(current)
    top = np.partition(p, k - 2)[k - 2:] if k > 1 else np.concatenate([p, [0.0]])  # the two largest
    entropy = -(p * np.log(np.maximum(p, np.float32(1e-12)))).sum()
    cols = [s1, s2, s1 - s2, separability, s1 - others, float(answer == nearest),
            sum(previous) / len(previous) if previous else 0.0, previous[-1] if previous else 0.0,
            p.max(), 1.0 - entropy / math.log(k) if k > 1 else 1.0, top.max() - top.min()]
    return np.array(cols, dtype=np.float32)


def structure_measures_row(row: Sequence[float], sims: Sequence[float] | None, previous: Sequence[int],
                           proto_temperature: float, probs: bool = True,
                           prototypes: bool = True) -> tuple[list[float], int]:
    """`structure_measures` of one sample in plain Python floats, for the prepared batch-1 path
    (engine.prepared): `row` its logits at this exit, `sims` its cosine similarities to the K
    prototypes, `previous` the argmax of every earlier evaluated exit. Returns (the same columns,
    this exit's argmax); tests hold it to `structure_measures`. A decision that reads only some
    measures skips the rest, which stay 0.0: the six prototype measures with `sims` None, all but
    sim_top1 and agree_prototype of them with `prototypes` False (a novelty veto reads sim_top1),
    the three confidence measures with `probs` False."""
    m = max(row)
    answer = row.index(m)
    k = len(row)
    n = len(previous)
    out = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, previous.count(answer) / n if n else 0.0,
           float(previous[-1] == answer) if n else 0.0, 0.0, 0.0, 0.0]
    if sims is not None:
        s1 = max(sims)
        out[0], out[5] = s1, float(answer == sims.index(s1))
        if prototypes:
            s2 = sorted(sims)[-2] if k > 1 else 0.0
            out[1:5] = [s2, s1 - s2, 1.0 / sum([math.exp((v - s1) / proto_temperature) for v in sims]),
                        s1 - (sum(sims) - s1) / max(k - 1, 1)]
    if probs:
        e = [math.exp(v - m) for v in row]
        total = sum(e)
        entropy = math.log(total) + m - sum(map(operator.mul, e, row)) / total  # log-sum-exp − E[logit]
        second = sorted(e)[-2] if k > 1 else 0.0
        out[8:] = [1.0 / total, 1.0 - entropy / math.log(k) if k > 1 else 1.0, (1.0 - second) / total]
    return out, answer


# -- the policy -----------------------------------------------------------------------------------
@register_policy
class StructurePolicy(Policy):
    """Halting network over pooled features + category-structure measures; exits where h_e >= tau.

    Module state: per early exit e the prototypes `prototypes_e` (K, C_e), the feature centre
    `centre_e` and scale `scale_e` (C_e,), the projection `project[e]` (C_e → proj_dim), and the
    shared `trunk` (proj_dim + measures + exit one-hot → hidden → 1). The last exit decides nothing.
    """

    kind = "structure"

    def __init__(self, feature_widths: Sequence[int], num_classes: int, *, proj_dim: int = 16, hidden: int = 32,
                 tau: float = 0.5, proto_temperature: float = 0.1, veto: Sequence[float | None] | None = None,
                 info: dict | None = None):
        super().__init__()
        if len(feature_widths) < 1 or any(int(c) < 1 for c in feature_widths):
            raise ValueError(f"feature_widths must list one positive width per exit, got {list(feature_widths)}")
        if num_classes < 2:
            raise ValueError(f"a structure policy needs at least 2 classes, got {num_classes}")
        if proj_dim < 0 or hidden < 1:
            raise ValueError(f"proj_dim must be >= 0 and hidden >= 1, got {proj_dim} and {hidden}")
        if not 0 < float(proto_temperature) < math.inf:  # NaN fails this too
            raise ValueError(f"proto_temperature must be a positive number, got {proto_temperature}")
        self.feature_widths = [int(c) for c in feature_widths]
        self.num_classes = int(num_classes)
        self.proj_dim, self.hidden = int(proj_dim), int(hidden)
        self.tau = float(tau)
        self.proto_temperature = float(proto_temperature)
        self.info = dict(info or {})  # how it was trained (λ, loss, epochs, ...), for the manifest
        self.veto = veto
        early = self.feature_widths[:-1]
        for e, c in enumerate(early):
            self.register_buffer(f"prototypes_{e}", torch.zeros(self.num_classes, c))
            self.register_buffer(f"centre_{e}", torch.zeros(c))
            self.register_buffer(f"scale_{e}", torch.ones(c))
        # proj_dim 0: the network reads the measures only (no feature projection)
        self.project = nn.ModuleList(nn.Linear(c, self.proj_dim) for c in early) if self.proj_dim else None
        self.trunk = nn.Sequential(nn.Linear(self.input_width, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))

    @classmethod
    def from_thresholds(cls, thresholds: Sequence[float | None], measure: str, feature_widths: Sequence[int],
                        num_classes: int, *, sharpness: float = 50.0, seed: int = 0,
                        **kw) -> "StructurePolicy":
        """The fixed threshold configuration `thresholds` (one per exit, None: that exit never fires;
        every exit is still evaluated) on confidence `measure` ("max_prob", "entropy" or "margin",
        all among the structure measures) as a structure policy: the trunk's first hidden unit is
        the measure plus (1 − the exit's threshold), read off the exit's one-hot (−2 for None, which
        keeps it at 0), the output `sharpness` × (unit − 1), tau 0.5; so it halts where the measure
        reaches the threshold (up to float rounding at a tie). The other hidden units keep their
        seeded initial weights and get output weight 0: they change nothing until training moves
        them, so training can start here (`engine.train.structure`). Prototypes are not set
        (`set_prototypes`). Raises ValueError for an unknown measure or a length mismatch."""
        if measure not in ("max_prob", "entropy", "margin"):
            raise ValueError(f"unknown confidence measure {measure!r}; choose max_prob, entropy or margin")
        if len(thresholds) != len(feature_widths):
            raise ValueError(f"{len(thresholds)} thresholds for {len(feature_widths)} exits")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            policy = cls(feature_widths, num_classes, tau=0.5, **kw)
        policy.info.update(origin="threshold", measure=measure, thresholds=[None if t is None else float(t)
                                                                             for t in thresholds])
        d, m = policy.proj_dim, len(MEASURES)
        first, last = policy.trunk[0], policy.trunk[2]
        with torch.no_grad():
            first.weight[0].zero_()
            first.bias[0] = 0.0
            first.weight[0, d + MEASURES.index(measure)] = 1.0
            for e, t in enumerate(thresholds[:-1]):
                first.weight[0, d + m + e] = -2.0 if t is None else 1.0 - float(t)
            last.weight.zero_()
            last.weight[0, 0] = float(sharpness)
            last.bias.fill_(-float(sharpness))
        return policy

    @property
    def tau(self) -> float:
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"tau {value} is outside 0..1")
        self._tau = float(value)

    @property
    def veto(self) -> list[float | None]:
        """Per early exit: the most atypicality (1 − sim_top1) at which it may still fire; None: no veto."""
        return list(self._veto)

    @veto.setter
    def veto(self, value: Sequence[float | None] | None) -> None:
        early = len(self.feature_widths) - 1
        cutoffs = [None] * early if value is None else [None if v is None else float(v) for v in value]
        if len(cutoffs) != early or any(v is not None and not -math.inf < v < math.inf for v in cutoffs):
            raise ValueError(f"veto needs one finite cutoff or None per early exit ({early}), got {value!r}")
        self._veto = cutoffs

    def vetoed(self, e: int, measures: torch.Tensor) -> torch.Tensor:
        """(B,) bool: where early exit e's novelty veto forbids firing, from its `fixed_inputs` measures."""
        cutoff = self._veto[e] if e < len(self._veto) else None
        if cutoff is None:
            return torch.zeros(measures.shape[0], dtype=torch.bool, device=measures.device)
        return (1.0 - measures[:, MEASURES.index("sim_top1")]) > cutoff

    @property
    def num_exits(self) -> int:
        return len(self.feature_widths)

    @property
    def input_width(self) -> int:
        """Width of the trunk's input: projected features, measures, exit one-hot."""
        return self.proj_dim + len(MEASURES) + self.num_exits - 1

    def buffers_of(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prototypes, centre, scale) of early exit e."""
        return getattr(self, f"prototypes_{e}"), getattr(self, f"centre_{e}"), getattr(self, f"scale_{e}")

    @torch.no_grad()
    def set_prototypes(self, features_per_exit: Sequence[torch.Tensor], labels: torch.Tensor) -> "StructurePolicy":
        """Fill centre, scale and prototypes of every early exit from TRAINING features (N, C_e) and
        labels (N,). Raises ValueError when the widths are not the policy's."""
        widths = [int(f.shape[1]) for f in features_per_exit]
        if widths[: self.num_exits - 1] != self.feature_widths[:-1]:
            raise ValueError(f"features of widths {widths} do not fit a policy built for {self.feature_widths}")
        early = [f.float() for f in features_per_exit[: self.num_exits - 1]]
        centres = [f.mean(0) for f in early]
        protos = compute_prototypes(early, labels, self.num_classes, centre=centres)
        for e, f in enumerate(early):
            p, c, s = self.buffers_of(e)
            p.copy_(protos[e])
            c.copy_(centres[e])
            s.copy_(f.std(0, unbiased=False).clamp_min(1e-6) if f.shape[0] > 1 else torch.ones_like(c))
        return self

    # -- the one computation shared by decide() and training --------------------------------------
    def fixed_inputs(self, e: int, history: Sequence[torch.Tensor], features: torch.Tensor):
        """What nothing learned changes at early exit e: standardised features (B, C_e) and the
        structure measures (B, len(MEASURES))."""
        prototypes, centre, scale = self.buffers_of(e)
        measures = structure_measures(history, features, prototypes, centre=centre,
                                      proto_temperature=self.proto_temperature)
        return (features.float() - centre) / scale, measures

    def halting_logit(self, e: int, standardised: torch.Tensor, measures: torch.Tensor) -> torch.Tensor:
        """(B,) pre-sigmoid halting score at early exit e from `fixed_inputs`."""
        onehot = torch.zeros(standardised.shape[0], self.num_exits - 1, device=standardised.device)
        onehot[:, e] = 1.0
        parts = [self.project[e](standardised)] if self.project is not None else []
        x = torch.cat([*parts, measures, onehot], dim=1)  # (B, input_width)
        return self.trunk(x).squeeze(1)

    def halting_probabilities(self, logits: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """h (N, E−1) at every early exit for recorded calibrated `logits` (N, E, K) and pooled
        `features` (one (N, C_e) per exit), every earlier exit counted as evaluated (as in run())."""
        cols = []
        for e in range(self.num_exits - 1):
            std, m = self.fixed_inputs(e, [logits[:, j] for j in range(e + 1)], features[e])
            cols.append(torch.sigmoid(self.halting_logit(e, std, m)))
        return torch.stack(cols, 1) if cols else torch.empty(logits.shape[0], 0)

    def exit_decisions(self, logits: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """(N, E−1) bool: would each early exit fire (h >= tau and not vetoed), every earlier exit
        counted as evaluated (as `halting_probabilities`)."""
        cols = []
        for e in range(self.num_exits - 1):
            std, m = self.fixed_inputs(e, [logits[:, j] for j in range(e + 1)], features[e])
            cols.append((torch.sigmoid(self.halting_logit(e, std, m)) >= self.tau) & ~self.vetoed(e, m))
        return torch.stack(cols, 1) if cols else torch.empty(logits.shape[0], 0, dtype=torch.bool)

    # -- Policy interface -------------------------------------------------------------------------
    def decide(self, evidence: Evidence) -> torch.Tensor:
        e = evidence.exit_index
        if e >= self.num_exits - 1:
            return torch.ones(evidence.current.shape[0], dtype=torch.bool, device=evidence.current.device)
        if one_frame(evidence):
            return torch.tensor([self._decide_one(e, evidence)])
        std, m = self.fixed_inputs(e, evidence.logits, evidence.features)
        return (torch.sigmoid(self.halting_logit(e, std, m)) >= self.tau) & ~self.vetoed(e, m)

    def _decide_one(self, e: int, evidence: Evidence) -> bool:
        """`decide` for one frame, in numpy (see engine.policies.base.one_frame)."""
        prototypes, centre, scale = numpy_copies(self, f"buffers{e}", self.buffers_of(e))
        rows = [l[0].float().numpy() for l in evidence.logits]
        features = evidence.features[0].float().numpy()
        measures = structure_measures_one(rows, features, prototypes, centre, self.proto_temperature)
        cutoff = self._veto[e]
        if cutoff is not None and 1.0 - float(measures[0]) > cutoff:  # measures[0]: sim_top1
            return False
        onehot = np.zeros(self.num_exits - 1, dtype=np.float32)
        onehot[e] = 1.0
        parts = [linear_stack([self.project[e]], self, f"project{e}", (features - centre) / scale)] \
            if self.project is not None else []
        x = np.concatenate([*parts, measures, onehot])
        logit = float(linear_stack([m for m in self.trunk if isinstance(m, nn.Linear)], self, "trunk", x)[0])
        z = math.exp(-abs(logit))  # a sigmoid that never overflows
        return (1.0 / (1.0 + z) if logit >= 0 else z / (1.0 + z)) >= self.tau

    @torch.no_grad()
    def folded(self, e: int, spatial: int) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray, float]:
        """Early exit e's decision rearranged for a graph fed the tap's spatial SUM over `spatial`
        positions (engine.prepared): everything before the measures is linear in the pooled features,
        so the projection, standardisation and the trunk's first layer fold into one matrix.

        Returns ([centre × spatial (1, C), prototypes.T (C, K), M (C, hidden), a (hidden,)], W (hidden,
        measures) float64, w2 (hidden,) float64, b2): the trunk's first layer then is
        relu(sum @ M + a + W @ measures), its score w2 · that + b2."""
        prototypes, centre, scale = (t.double() for t in self.buffers_of(e))
        first, last = self.trunk[0], self.trunk[2]
        w1, b1 = first.weight.double(), first.bias.double()
        d, m = self.proj_dim, len(MEASURES)
        a = b1 + w1[:, d + m + e]  # the exit's one-hot picks a column
        fold = torch.zeros(centre.shape[0], self.hidden, dtype=torch.float64)
        if self.project is not None:
            wp = w1[:, :d] @ self.project[e].weight.double()  # (hidden, C)
            a = a + w1[:, :d] @ self.project[e].bias.double() - wp @ (centre / scale)
            fold = (wp / scale).T / spatial
        graph = [(centre * spatial)[None].float(), prototypes.T.contiguous().float(), fold.float(), a.float()]
        return (graph, w1[:, d:d + m].cpu().numpy(), last.weight.double()[0].cpu().numpy(),
                float(last.bias.double()[0]))

    def flops_per_exit(self) -> list[float]:
        """FLOPs of one decision at each exit (multiply-add = 2; matrix products only, as
        `engine.cost.count_flops` counts): prototype similarities, projection, trunk. 0 at the last exit.
        The novelty veto compares a measure computed anyway (sim_top1): no product of its own."""
        k, d, h = self.num_classes, self.proj_dim, self.hidden
        trunk = 2 * self.input_width * h + 2 * h
        return [float(2 * c * k + 2 * c * d + trunk) for c in self.feature_widths[:-1]] + [0.0]

    def decision_flops(self) -> list[float]:
        return self.flops_per_exit()

    def state_key(self) -> tuple:
        return (self.tau, tuple(self._veto), *super().state_key())

    def row_decider(self, num_classes: int, spatial: Sequence[int]) -> "StructureRows | None":
        return StructureRows(self, spatial) if num_classes <= ROW_CLASSES else None

    def to_json(self) -> dict:
        return {"kind": self.kind, "feature_widths": self.feature_widths, "num_classes": self.num_classes,
                "proj_dim": self.proj_dim, "hidden": self.hidden, "tau": self.tau,
                "proto_temperature": self.proto_temperature, "measures": list(MEASURES),
                **({"veto": self.veto} if any(v is not None for v in self._veto) else {}), "info": self.info}

    @classmethod
    def from_json(cls, d: dict, *, num_exits: int, num_classes: int) -> "StructurePolicy":
        widths = d.get("feature_widths")
        if not isinstance(widths, list) or len(widths) != num_exits:
            raise ValueError(f"structure policy needs {num_exits} feature widths, got {widths!r}")
        if d.get("num_classes", num_classes) != num_classes:
            raise ValueError(f"structure policy was built for {d.get('num_classes')} classes, "
                             f"the model has {num_classes}")
        if list(d.get("measures", MEASURES)) != list(MEASURES):
            raise ValueError(f"structure policy uses measures {d.get('measures')}, "
                             f"this Offramp computes {list(MEASURES)}")
        return cls(widths, num_classes, proj_dim=int(d.get("proj_dim", 16)), hidden=int(d.get("hidden", 32)),
                   tau=float(d.get("tau", 0.5)), proto_temperature=float(d.get("proto_temperature", 0.1)),
                   veto=d.get("veto"), info=d.get("info"))

    def describe(self) -> str:
        vetoed = [str(e) for e, v in enumerate(self._veto) if v is not None]
        veto = f", novelty veto at exit {', '.join(vetoed)}" if vetoed else ""
        if self.info.get("origin") == "threshold":
            return f"structure network at a fixed threshold on {self.info.get('measure')}{veto}"
        lam = self.info.get("lambda")
        start = ", from a threshold" if self.info.get("init") == "threshold" else ""
        return (f"structure network (tau {self.tau:.2f}" + (f", λ {lam:g}" if lam is not None else "")
                + f"{start}{veto})")


class StructureRows:
    """`StructurePolicy.decide` for the prepared batch-1 path (a `RowDecider`). The exit's graph
    gives, from the pooled sum, its products with the prototypes and with the folded projection and
    trunk layer (`StructurePolicy.folded`), and the sum itself for its distance from the centre (for
    a wide tap: that distance, from one more operation in the graph); the measures
    (`structure_measures_row`), the novelty veto and the rest of the trunk run on the host, in
    Python floats (after a stage's graph has run, numpy's small calls cost more than the loops).

    Only what the decision reads is computed, with the same answers: a hidden unit whose output
    weight is 0 is left out, and so are the measures no kept unit reads (an exit with a novelty veto
    still gets its prototype products, distance and sim_top1). A policy made from a threshold
    (`StructurePolicy.from_thresholds`) thus reads one unit and one measure."""

    WIDE = 256  # channels from which the graph computes the distance rather than passing the sum on

    def __init__(self, policy: StructurePolicy, spatial: Sequence[int]):
        self.tau, self.temperature, self.k = policy.tau, policy.proto_temperature, policy.num_classes
        self.veto = policy.veto
        self.steps, self.graphs = [], []
        for e in range(policy.num_exits - 1):
            (centre, prototypes_t, fold, a), w, w2, b2 = policy.folded(e, spatial[e])
            keep = [j for j in range(len(w2)) if w2[j] != 0.0]
            read = (w[keep] != 0.0).any(0) if keep else np.zeros(w.shape[1], dtype=bool)  # NaN reads too
            prototypes = bool(read[1:5].any())  # sim_top2, sim_gap, separability, sim_margin
            sims = prototypes or self.veto[e] is not None or bool(read[[0, 5]].any())  # + sim_top1, agree_prototype
            probs = bool(read[8:].any())  # max_prob, entropy, margin
            rows, bias = [fold.T[keep]], [a[keep]]
            wide = centre.shape[1] > self.WIDE
            if sims:
                rows.insert(0, prototypes_t.T)
                bias.insert(0, -(centre @ prototypes_t)[0])
                if not wide:  # the sum itself: the identity's rows cost less than a norm operation
                    rows.append(torch.eye(centre.shape[1]))
                    bias.append(torch.zeros(centre.shape[1]))
            graph = torch.cat(rows).contiguous(), torch.cat(bias)
            self.graphs.append((graph[0], graph[1], centre[0] if sims and wide else None)
                               if graph[0].shape[0] else (None, None, None))
            first = self.k if sims else 0  # where the kept units' values start in the products
            units = [(first + i, w[j].tolist(), float(w2[j])) for i, j in enumerate(keep)]
            host_centre = centre[0].double().tolist() if sims and not wide else None
            self.steps.append((sims, probs, prototypes, host_centre, first + len(keep), units, float(b2)))

    def columns(self, e: int):
        return self.graphs[e]

    def start(self):
        previous: list[int] = []
        k, temperature, tau, veto, steps = self.k, self.temperature, self.tau, self.veto, self.steps
        mul = operator.mul

        def decide(e: int, row: list, more: list, distance: float, tap) -> bool:
            reads_sims, probs, prototypes, centre, rest, units, logit = steps[e]
            sims = None
            if reads_sims:
                if centre is not None:
                    distance = math.dist(more[rest:], centre)
                d = max(distance, 1e-12)
                sims = [v / d for v in more[:k]]
            measures, answer = structure_measures_row(row, sims, previous, temperature, probs, prototypes)
            previous.append(answer)
            cutoff = veto[e]
            if cutoff is not None and 1.0 - measures[0] > cutoff:  # measures[0]: sim_top1
                return False
            for i, w, out in units:  # the trunk: relu(first layer) · output weights, kept units only
                z = more[i] + sum(map(mul, w, measures))
                if z > 0.0:
                    logit += out * z
            z = math.exp(-abs(logit))  # a sigmoid that never overflows
            return (1.0 / (1.0 + z) if logit >= 0 else z / (1.0 + z)) >= tau
        return decide


__all__ = ["MEASURES", "StructurePolicy", "StructureRows", "compute_prototypes", "structure_measures",
           "structure_measures_one", "structure_measures_row"]

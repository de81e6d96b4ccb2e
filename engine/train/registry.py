"""The registry of policy trainers: how each policy family is fitted across the accuracy / cost
trade-off on calibration records. `offramp train-policy --kind`, `engine.fronts` and `engine.bench`
read it, so a new trained family is one module that registers its policy
(`engine.policies.register_policy`) and its trainer (`register_trainer`), imported by
`engine/train/__init__.py`. The λ sweep charges each point its policy's decisions, so the policy
declares them (`Policy.decision_flops`):

    @register_trainer("mine", summary="what it is, in a few words")
    def fit_mine(records, score_records, cost, *, lambdas=None, epochs=None, prototype_records=None,
                 progress=None, cancel=None):
        return lambda_sweep(lambda lam: train_mine(records, cost, lam), score_records, cost,
                            lambdas or (0.01, 0.1), progress=progress, cancel=cancel)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from ..policies import list_policies
from ..splits import split_indices

if TYPE_CHECKING:
    from ..cost import CostTable
    from ..policies import Policy
    from ..progress import CancelFlag, ProgressFn
    from ..records import Records

    FitFront = Callable[..., tuple[list[dict], list[Policy]]]

_TRAINERS: dict[str, "Trainer"] = {}


@dataclass(frozen=True)
class Trainer:
    """How one policy family is fitted.

    `fit(records, score_records, cost, *, lambdas, epochs, prototype_records, progress, cancel)`
    trains on `records`, scores on `score_records` (each point's policy decision FLOPs counted) and
    returns (points, policies): the Pareto front, cheapest first, the policies aligned. `lambdas`
    and `epochs` None mean the family's own defaults (a family may ignore them); `prototype_records`
    is a recording of the training split (None: `records`) for families that read one."""

    kind: str  # the policy kind it fits (a key of engine.policies' registry), also its --kind
    fit: "FitFront"
    name: str  # the policy's name in a bundle unless the user gives one
    summary: str  # a few words for `offramp train-policy --help` ("" for none)
    learned: bool = True  # trained over a λ sweep (False: a fixed rule whose parameters are swept)
    select_fraction: float = 0.0  # part of the calibration records held out of training to score and choose on
    uses_prototypes: bool = False  # reads `prototype_records`, a recording of the training split

    def front(self, records: "Records", cost: "CostTable", *, lambdas: Sequence[float] | None = None,
              epochs: int | None = None, prototype_records: "Records | None" = None,
              progress: "ProgressFn | None" = None,
              cancel: "CancelFlag | None" = None) -> tuple[list[dict], list["Policy"]]:
        """`fit` on calibration `records`, split by `split` into the part trained on and the part
        the points are scored on."""
        fit, score = self.split(records)
        return self.fit(fit, score, cost, lambdas=lambdas, epochs=epochs, prototype_records=prototype_records,
                        progress=progress, cancel=cancel)

    def split(self, records: "Records") -> tuple["Records", "Records"]:
        """(records to train on, records to score and choose on): both `records`, or with a
        `select_fraction` a deterministic stratified split of them, that fraction for choosing."""
        if not self.select_fraction:
            return records, records
        fit, select = split_indices(records.labels.tolist(), val_fraction=self.select_fraction, seed=0)
        return records.subset(fit), records.subset(select)

    def scored_on(self, records: "Records") -> "Records":
        """The part of calibration `records` that `front(records, ...)` scores its points on."""
        return self.split(records)[1]


def register_trainer(kind: str, *, summary: str = "", name: str | None = None, learned: bool = True,
                     select_fraction: float = 0.0, uses_prototypes: bool = False):
    """Decorator: register the function as the trainer of policy kind `kind` (see `Trainer` for
    the fields and the function's signature). Raises ValueError for a kind already registered or
    one that is not a registered policy kind (register the policy first)."""
    def wrap(fit):
        if kind in _TRAINERS:
            raise ValueError(f"a trainer for policy kind {kind!r} is already registered")
        if kind not in list_policies():
            raise ValueError(f"policy kind {kind!r} is not registered; register the policy class first "
                             "(engine.policies.register_policy)")
        if not 0.0 <= select_fraction < 1.0:
            raise ValueError(f"select_fraction must lie in [0, 1), not {select_fraction}")
        _TRAINERS[kind] = Trainer(kind, fit, name or kind, summary, learned, select_fraction, uses_prototypes)
        return fit
    return wrap


def list_trainers(*, learned: bool | None = None) -> list[str]:
    """The policy kinds that can be fitted, sorted; only the learned ones (or only the others)
    with `learned`."""
    return sorted(k for k, t in _TRAINERS.items() if learned is None or t.learned == learned)


def get_trainer(kind: str) -> Trainer:
    """The trainer of policy kind `kind`. Raises ValueError naming the known kinds."""
    if kind not in _TRAINERS:
        raise ValueError(f"unknown policy kind {kind!r}; choose one of {', '.join(list_trainers())}")
    return _TRAINERS[kind]

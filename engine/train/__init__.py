"""Training on a frozen backbone: exit heads from a feature cache and their calibration; policies
over the accuracy / cost trade-off, each family a registered trainer (`register_trainer`,
`list_trainers`, `get_trainer`), the trained ones by the one λ sweep (`engine.train.sweep`)."""
from .calibrate import calibrate_exits, expected_calibration_error, fit_temperature
from .exits import default_exits_to_train, train_exits
from .registry import Trainer, get_trainer, list_trainers, register_trainer
from .sweep import lambda_sweep
from . import bolukbasi, structure, threshold  # noqa: F401  each family registers its trainer on import

__all__ = ["Trainer", "calibrate_exits", "default_exits_to_train", "expected_calibration_error", "fit_temperature",
           "get_trainer", "lambda_sweep", "list_trainers", "register_trainer", "train_exits"]

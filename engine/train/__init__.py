"""Training on a frozen backbone: exit heads from a feature cache, and their calibration."""
from .calibrate import calibrate_exits, expected_calibration_error, fit_temperature
from .exits import default_exits_to_train, train_exits

__all__ = ["calibrate_exits", "default_exits_to_train", "expected_calibration_error", "fit_temperature",
           "train_exits"]

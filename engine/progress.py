"""Progress reporting and cancellation for long work (training, feature caching, evaluation)."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Progress:
    stage: str  # what is happening, e.g. "caching features", "training exits"
    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


ProgressFn = Callable[[Progress], None]


class Cancelled(Exception):
    """Raised inside long work when its cancel flag is set; nothing half-done is kept."""


class CancelFlag:
    """A thread-safe flag a GUI or signal handler sets to ask long work to stop."""

    def __init__(self):
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


def report(progress: Optional[ProgressFn], cancel: Optional[CancelFlag], stage: str, done: int, total: int,
           message: str = "") -> None:
    """Call the progress callback (if any), then raise Cancelled if the flag is set."""
    if progress is not None:
        progress(Progress(stage, done, total, message))
    if cancel is not None:
        cancel.check()

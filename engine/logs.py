"""Where log records go, for the two commands: `offramp --log-level` and `offramp-app --log-level
--log-file`. Modules log through `logging.getLogger(__name__)` and never configure anything; the
command's `main` calls `setup_logging` once (`--log-level` takes `type=str.upper, choices=LEVELS`).

What a user must read still reaches them as one sentence (stderr, the window's banner); the log
holds what that sentence leaves out, such as a worker's traceback.
"""
from __future__ import annotations

import logging
import os
import sys

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
STDERR_FORMAT = "%(levelname)s %(name)s: %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s"


class _Stderr(logging.Handler):
    """Writes to `sys.stderr` as it is when a record comes (tests and embedding code swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never raise into the code that logs
            self.handleError(record)


def setup_logging(level: str = "WARNING", file: str | os.PathLike | None = None) -> None:
    """Send records of `level` and above to stderr and, when `file` is given, append them to it,
    with times and thread names. A second call replaces what the first set up (handlers of other
    code stay). Raises ValueError for an unknown level, OSError when `file` cannot be opened."""
    if level.upper() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}")
    handlers: list[logging.Handler] = [_Stderr()]
    handlers[0].setFormatter(logging.Formatter(STDERR_FORMAT))
    if file is not None:
        to_file = logging.FileHandler(os.fspath(file), encoding="utf-8")  # opened now: raises OSError here
        to_file.setFormatter(logging.Formatter(FILE_FORMAT))
        handlers.append(to_file)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "offramp", False)]:
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        handler.offramp = True  # what a later call replaces
        root.addHandler(handler)
    root.setLevel(level.upper())

"""What the window remembers between runs, in QSettings: the last bundle and source, the device and
runtime, the panels' options, the policy chosen and thresholds edited for each bundle, the window
layout (never the presentation one), and whether the last run ended cleanly.

A run that did not end cleanly (the flag "running" still set at the next start) may have been
killed by its source: that source is then offered, not reopened, so a crash cannot become a loop.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QSettings

if TYPE_CHECKING:
    from .main_window import MainWindow

log = logging.getLogger(__name__)

CAPTURE_SETTINGS = ("folder", "class", "every", "limit", "format")  # remembered as capture/<key>
RETRAIN_SETTINGS = ("mode", "epochs")  # remembered as retrain/<key>
RUNNING = "running"  # set while a window runs; still set at a start: the last run died


def user_settings() -> QSettings:
    """The application's settings (the organisation and application names set in `main`)."""
    return QSettings()


def remembered_bundle(settings: QSettings | None) -> str | None:
    """The last bundle the window loaded, if it still exists; None otherwise."""
    last = str(settings.value("last_bundle", "") or "") if settings is not None else ""
    return last if last and Path(last).is_file() else None


def remembered_source(settings: QSettings | None) -> str | None:
    """The last file source opened, if it still exists (a camera is never reopened unasked)."""
    last = str(settings.value("last_source", "") or "") if settings is not None else ""
    return last if last and not last.startswith("camera:") and Path(last).exists() else None


def _policy_key(bundle_path: str) -> str:
    # a path holds "/", which QSettings reads as groups: key by a digest of the absolute path instead
    return "policy/" + hashlib.sha1(os.path.abspath(bundle_path).encode()).hexdigest()[:16]


def load_policy(settings: QSettings, bundle_path: str) -> dict | None:
    """The policy memory (`PolicyState.memory()`) saved for `bundle_path`, or None."""
    text = settings.value(_policy_key(bundle_path))
    if not text:
        return None
    try:
        memory = json.loads(str(text))
    except ValueError:
        log.warning("ignoring an unreadable remembered policy for %s", bundle_path)
        return None
    return memory if isinstance(memory, dict) else None


def save_policy(settings: QSettings, bundle_path: str, memory: dict) -> None:
    settings.setValue(_policy_key(bundle_path), json.dumps({**memory, "bundle": os.path.abspath(bundle_path)}))


class WindowMemory:
    """Reads the window's settings at start and writes them as they change and at close."""

    def __init__(self, window: "MainWindow", settings: QSettings):
        self.window, self.settings = window, settings
        self.crashed = False  # the last run did not end cleanly (known after `start`)

    def restore(self) -> None:
        """Layout, mirror, device, runtime and the panels' options, as the last run left them."""
        s, w = self.settings, self.window
        if s.value("geometry") is not None:
            w.restoreGeometry(s.value("geometry"))
        if s.value("window_state") is not None:
            w.restoreState(s.value("window_state"))
        w.session.mirror = s.value("mirror", False, type=bool)
        w.actions.mirror.setChecked(w.session.mirror)
        device = s.value("device", "")
        if device:
            w.session.device = str(device)
        runtime = str(s.value("runtime", "") or "")
        if runtime in ("torch", "onnxruntime"):  # anything else (a hand-edited file): the default
            w.session.runtime = runtime
        w.capture_panel.restore({k: s.value(f"capture/{k}") for k in CAPTURE_SETTINGS
                                 if s.value(f"capture/{k}") is not None})
        w.retrain_panel.restore({k: s.value(f"retrain/{k}") for k in RETRAIN_SETTINGS
                                 if s.value(f"retrain/{k}") is not None})

    def start(self) -> str | None:
        """Mark this run as running; returns the source to reopen (None after a run that died: the
        window offers it instead, see `offered_source`)."""
        self.crashed = self.settings.value(RUNNING, False, type=bool)
        self.settings.setValue(RUNNING, True)
        self.settings.sync()
        return None if self.crashed else remembered_source(self.settings)

    def offered_source(self) -> str | None:
        """After a run that died: the source it had open, to offer rather than reopen."""
        return remembered_source(self.settings) if self.crashed else None

    def save(self, key: str, value: Any) -> None:
        self.settings.setValue(key, value)

    def save_panels(self) -> None:
        for key, value in self.window.capture_panel.state().items():
            self.settings.setValue(f"capture/{key}", value)
        for key, value in self.window.retrain_panel.state().items():
            self.settings.setValue(f"retrain/{key}", value)

    def close(self, geometry: Any, window_state: Any) -> None:
        """The clean end of a run: the layout to come back to, and the running flag cleared."""
        s = self.settings
        s.setValue("geometry", geometry)
        s.setValue("window_state", window_state)
        s.setValue("mirror", self.window.session.mirror)
        s.setValue(RUNNING, False)
        s.sync()

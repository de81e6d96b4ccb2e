"""The live views: widgets that describe the loaded model and the frame on screen (the video view,
the exit diagram, the confidence plot, the compute panel). The window keeps them in one tuple,
`MainWindow.live_views`, and feeds them all the same way; a new panel of this kind implements
these four methods and joins the tuple, with no other change to the window.

`show_result`, not `show`: `QWidget.show()` shows the widget, and every live view is a QWidget.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from ..state import ModelInfo
from .theme import Theme


@runtime_checkable
class LiveView(Protocol):
    def set_model(self, info: ModelInfo) -> None:
        """A model was loaded: size the view for its stages and exits; nothing is shown for it yet."""

    def show_result(self, result: Any, frame: Any) -> None:
        """The frame on screen (`app.sources.Frame`) and its `engine.runtime.InferenceResult`; `result`
        None: the frame was not run (no model, or inference failed on it)."""

    def set_theme(self, theme: Theme) -> None:
        """Draw in `theme`'s colours and type from now on (presentation mode and back)."""

    def clear(self) -> None:
        """Show no frame and no result: the empty view of the loaded model."""

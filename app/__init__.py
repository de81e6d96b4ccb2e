"""Offramp desktop app: watch a multi-exit classifier take its off-ramps, live.

The Qt layer (`main_window`, `widgets/`, `session`, `workers`) subscribes to plain-Python state
(`state`, `sources`) and to `engine`; `engine` never imports anything from here.
"""
import os

# pyqtgraph picks a Qt binding on import; make it the one the app is written for.
os.environ.setdefault("PYQTGRAPH_QT_LIB", "PySide6")

"""Where the files shipped in resources/ are (the built-in model, the icon), wherever Offramp runs:
a source checkout, an editable or a wheel install, a PyInstaller-frozen app. Imports no torch, so
the app can find its icon before the engine loads."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

RESOURCES_PACKAGE = "offramp_resources"  # resources/ as a wheel installs it (see pyproject.toml)


def resource_path(name: str) -> Path:
    """Where the shipped file `name` of resources/ (e.g. "default.offramp", "offramp.png") is.

    Looks, in order, in a frozen (PyInstaller) app's data folder, in the installed package
    `offramp_resources` (a wheel install; an editable one maps it onto the checkout) and in
    <repo root>/resources (a source checkout). Returns the first place that has the file, else the
    first place looked at, so that a "missing" error names a sensible path; raises nothing.
    """
    places: list[Path] = []
    if getattr(sys, "frozen", False):
        places.append(Path(getattr(sys, "_MEIPASS", Path(sys.executable).parent)) / "resources")
    try:
        # find_spec only locates the package, it imports nothing
        spec = importlib.util.find_spec(RESOURCES_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        places += [Path(p) for p in spec.submodule_search_locations]
    places.append(Path(__file__).resolve().parent.parent / "resources")
    for place in places:
        if (place / name).is_file():
            return place / name
    return places[0] / name

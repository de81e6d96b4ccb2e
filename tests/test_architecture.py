"""engine/ must never import Qt or the app (DESIGN.md: the engine knows nothing of Qt)."""
import pkgutil
import subprocess
import sys

import engine


def test_engine_imports_no_qt_and_no_app():
    modules = [m.name for m in pkgutil.walk_packages(engine.__path__, "engine.")]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph', 'app', 'shiboken6'))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"engine imported {out.stdout.strip()}"
    assert len(modules) >= 10


# -- the same contracts read from the source: imports inside functions count too ------------------
from import_graph import cycles, project_modules, violations  # noqa: E402

QT = ("PySide6", "shiboken6", "pyqtgraph")
# the app's modules that hold state and logic, not widgets: testable without Qt, so they never import it
PURE_APP = ("app.state", "app.stats", "app.dataset", "app.tasks", "app.platform_check")


def test_engine_never_imports_qt_or_the_app_even_inside_functions():
    assert violations(("engine",), QT + ("app",)) == []


def test_pure_app_modules_never_import_qt():
    assert set(PURE_APP) <= set(project_modules())
    assert violations(PURE_APP, QT) == []


def test_no_import_cycles_at_module_level():
    assert cycles("engine", module_level_only=True) == []
    assert cycles("app", module_level_only=True) == []


def test_the_contract_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The checker itself: a deferred import of Qt in an engine-like module is found."""
    import import_graph
    pkg = tmp_path / "engine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sneaky.py").write_text("def f():\n    from PySide6 import QtCore\n    from ..app import x\n")
    monkeypatch.setattr(import_graph, "ROOT", tmp_path)
    monkeypatch.setattr(import_graph, "PACKAGES", ("engine",))
    found = import_graph.violations(("engine",), QT)
    assert found == ["engine/sneaky.py:2 imports PySide6", "engine/sneaky.py:2 imports PySide6.QtCore"]

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

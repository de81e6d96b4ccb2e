"""Packaging: a wheel carries the built-in model and the icon as the package `offramp_resources`
and every module of engine/ and app/; the built-in model is found where a source checkout, a wheel
install and a frozen (PyInstaller) app keep it."""
from __future__ import annotations

import importlib
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from engine.bundle import RESOURCES_PACKAGE, SUFFIX, default_bundle_path, resource_path

ROOT = Path(__file__).resolve().parents[1]
# the built-in model derives from BSD-2-Clause weights whose licence must travel with it
SHIPPED = ["default" + SUFFIX, "offramp.svg", "offramp.png", "LICENSE-akamaster-resnet-cifar10.txt"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The project's wheel, built offline with the PEP 517 backend (setuptools) in a few seconds."""
    pytest.importorskip("setuptools", reason="building the wheel needs the build backend, setuptools")
    # build a copy: setuptools writes build/ and *.egg-info next to the sources it builds
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("engine", "app", "resources"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    build = "import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", build, str(out)], cwd=src, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = out.glob("offramp-*.whl")
    with zipfile.ZipFile(path) as whl:
        yield whl


def test_wheel_carries_the_built_in_model_and_icon(wheel):
    for name in SHIPPED:
        info = wheel.getinfo(f"{RESOURCES_PACKAGE}/{name}")  # KeyError names a missing file
        assert info.file_size == (ROOT / "resources" / name).stat().st_size


def test_wheel_carries_every_module(wheel):
    # pyproject lists the packages by hand; a new package folder must be added there
    names = set(wheel.namelist())
    sources = [p.relative_to(ROOT).as_posix() for top in ("engine", "app") for p in (ROOT / top).rglob("*.py")
               if "__pycache__" not in p.parts]
    missing = [s for s in sources if s not in names]
    assert sources and not missing, f"add their packages to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_icon_is_a_256_px_png():
    head = (ROOT / "resources" / "offramp.png").read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    assert struct.unpack(">II", head[16:24]) == (256, 256)


def test_wheel_install_finds_its_packaged_model(wheel, tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    for name in SHIPPED:
        wheel.extract(f"{RESOURCES_PACKAGE}/{name}", site)
    monkeypatch.delenv("OFFRAMP_DEFAULT_BUNDLE", raising=False)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, RESOURCES_PACKAGE, raising=False)
    importlib.invalidate_caches()
    assert default_bundle_path() == site / RESOURCES_PACKAGE / f"default{SUFFIX}"
    assert resource_path("offramp.png") == site / RESOURCES_PACKAGE / "offramp.png"


def test_frozen_app_finds_its_bundled_model(tmp_path, monkeypatch):
    (tmp_path / "resources").mkdir()
    (tmp_path / "resources" / f"default{SUFFIX}").write_bytes(b"")
    monkeypatch.delenv("OFFRAMP_DEFAULT_BUNDLE", raising=False)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path), raising=False)
    assert default_bundle_path() == tmp_path / "resources" / f"default{SUFFIX}"
    # a file no place has: the answer is where a frozen app should have had it
    assert resource_path("missing.png") == tmp_path / "resources" / "missing.png"
    monkeypatch.setenv("OFFRAMP_DEFAULT_BUNDLE", str(tmp_path / "mine.offramp"))
    assert default_bundle_path() == tmp_path / "mine.offramp"  # the variable wins everywhere


def test_source_checkout_finds_resources_folder(monkeypatch):
    monkeypatch.delenv("OFFRAMP_DEFAULT_BUNDLE", raising=False)
    monkeypatch.delattr(sys, "frozen", raising=False)
    assert default_bundle_path() == ROOT / "resources" / f"default{SUFFIX}"
    assert resource_path("offramp.svg") == ROOT / "resources" / "offramp.svg"


def test_desktop_entry_names_the_app_and_its_icon():
    text = (ROOT / "packaging" / "offramp.desktop").read_text()
    entry = dict(line.split("=", 1) for line in text.splitlines()[1:] if "=" in line)
    assert text.startswith("[Desktop Entry]\n") and entry["Type"] == "Application"
    assert entry["Exec"].split()[0] == "offramp-app" and entry["Icon"] == "offramp"

#!/usr/bin/env python3
"""Build the installable QGIS plugin zip, and optionally install it into the local QGIS profile.

The zip is self-contained: the plugin code, ``metadata.txt``, the backend source (so the backend
subprocess and "Set up backend" run exactly the code this plugin version was tested with),
``requirements.txt`` with the pinned dependencies, and ``resources/`` (icons and the default
model when one exists). No caches, bytecode or editor files.

    tools/package_plugin.py              -> dist/rscaption_plugin-<version>.zip
    tools/package_plugin.py --install    -> also unzip into the QGIS profile's plugin folder
"""

from __future__ import annotations

import argparse
import configparser
import os
import shutil
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "rscaption_plugin"
EXCLUDE_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ipynb_checkpoints", ".git"}
EXCLUDE_SUFFIXES = (".pyc", ".pyo", ".orig", ".rej", ".swp", "~", ".gpkg-journal", ".gpkg-wal", ".gpkg-shm")


def version() -> str:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "metadata.txt", encoding="utf-8")
    return cfg["general"]["version"].strip()


def _files(src: Path):
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDE_DIRS and not d.startswith(".")
                             and ".tmp-" not in d and ".old-" not in d)
        for name in sorted(filenames):
            if name.endswith(EXCLUDE_SUFFIXES) or name.startswith("."):
                continue
            yield Path(dirpath) / name


def contents() -> list[tuple[Path, str]]:
    """(source file, path inside the zip) for everything that ships."""
    items: list[tuple[Path, str]] = []
    for f in _files(ROOT / PLUGIN):
        rel = f.relative_to(ROOT / PLUGIN).as_posix()
        if rel.split("/")[0] in ("backend", "resources"):
            continue  # a leftover from an in-place install; the tree versions below win
        items.append((f, f"{PLUGIN}/{rel}"))
    items.append((ROOT / "metadata.txt", f"{PLUGIN}/metadata.txt"))
    for f in _files(ROOT / "backend" / "rscaption"):
        items.append((f, f"{PLUGIN}/backend/rscaption/{f.relative_to(ROOT / 'backend' / 'rscaption').as_posix()}"))
    items.append((ROOT / "requirements.txt", f"{PLUGIN}/requirements.txt"))
    for extra in ("pyproject.toml", "LICENSE", "README.md"):
        if (ROOT / extra).is_file():
            items.append((ROOT / extra, f"{PLUGIN}/{'backend/' if extra == 'pyproject.toml' else ''}{extra}"))
    for f in _files(ROOT / "resources"):
        items.append((f, f"{PLUGIN}/resources/{f.relative_to(ROOT / 'resources').as_posix()}"))
    return items


def build(dist: Path | None = None) -> Path:
    dist = Path(dist or ROOT / "dist")
    dist.mkdir(parents=True, exist_ok=True)
    out = dist / f"{PLUGIN}-{version()}.zip"
    tmp = out.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for src, arc in contents():
            # Model weights are already compressed; storing them saves minutes on big checkpoints.
            compress = zipfile.ZIP_STORED if src.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
            zf.write(src, arc, compress_type=compress)
    os.replace(tmp, out)
    return out


def profile_plugins_dir() -> Path:
    base = os.environ.get("QGIS_CUSTOM_CONFIG_PATH")
    if base:
        return Path(base) / "profiles" / "default" / "python" / "plugins"
    if sys.platform == "win32":
        root = Path(os.environ.get("APPDATA", Path.home())) / "QGIS" / "QGIS3"
    elif sys.platform == "darwin":
        root = Path.home() / "Library" / "Application Support" / "QGIS" / "QGIS3"
    else:
        root = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "QGIS" / "QGIS3"
    return root / "profiles" / "default" / "python" / "plugins"


def install(zip_path: Path, plugins_dir: Path | None = None) -> Path:
    plugins_dir = Path(plugins_dir or profile_plugins_dir())
    plugins_dir.mkdir(parents=True, exist_ok=True)
    target = plugins_dir / PLUGIN
    if target.exists():
        shutil.rmtree(target)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(plugins_dir)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="also install into the QGIS profile")
    parser.add_argument("--plugins-dir", type=Path, help="install here instead of the default profile")
    parser.add_argument("--dist", type=Path, help="output folder (default: dist/)")
    args = parser.parse_args(argv)
    out = build(args.dist)
    size = out.stat().st_size / 1e6
    print(f"built {out} ({size:.1f} MB)")
    if args.install:
        target = install(out, args.plugins_dir)
        print(f"installed to {target}; enable 'rscaption' in Plugins > Manage and Install Plugins")
    return 0


if __name__ == "__main__":
    sys.exit(main())

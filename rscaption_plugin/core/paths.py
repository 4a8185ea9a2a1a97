"""Where the plugin finds its backend, resources and Python environments.

The same code runs from the source tree (``rscaption_plugin/`` beside ``backend/`` and
``resources/``) and from the packaged zip (everything inside the plugin folder), so every lookup
tries the packaged place first and the source-tree place second.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent.parent
_REPO_DIR = PLUGIN_DIR.parent


def _first_existing(*candidates: Path) -> Path | None:
    for path in candidates:
        if path.exists():
            return path
    return None


def backend_dir() -> Path:
    """The directory that contains the ``rscaption`` package (goes on sys.path / PYTHONPATH)."""
    found = _first_existing(PLUGIN_DIR / "backend" / "rscaption", _REPO_DIR / "backend" / "rscaption")
    return found.parent if found else PLUGIN_DIR / "backend"


def resources_dir() -> Path:
    return _first_existing(PLUGIN_DIR / "resources", _REPO_DIR / "resources") or PLUGIN_DIR / "resources"


def icon_path(name: str) -> str:
    return str(resources_dir() / "icons" / name)


def requirements_file() -> Path | None:
    return _first_existing(PLUGIN_DIR / "requirements.txt", _REPO_DIR / "requirements.txt")


def default_model_dir() -> Path | None:
    """The embedded default model, when one has been trained and shipped."""
    path = resources_dir() / "default_model"
    return path if (path / "config.json").is_file() else None


def cache_dir() -> Path:
    """Per-user cache, outside the plugin folder so a plugin update does not wipe the backend."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rscaption"


def backend_venv_dir() -> Path:
    return cache_dir() / "backend-venv"


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def project_venv_python() -> Path | None:
    """The developer's ``.venv`` next to the source tree (``make setup``), if this is one."""
    path = venv_python(_REPO_DIR / ".venv")
    return path if path.exists() else None


def default_backend_python() -> str | None:
    """Project venv if present, else the env made by "Set up backend", else nothing."""
    for candidate in (project_venv_python(), venv_python(backend_venv_dir())):
        if candidate is not None and candidate.exists():
            return str(candidate)
    return None


def default_python_note() -> str:
    """What an empty "Backend Python" means for this copy of the plugin, in the Settings' words: an
    installed plugin has no project ``.venv`` beside it, only the "Set up backend" environment."""
    setup = venv_python(backend_venv_dir())
    made = "made" if setup.exists() else "not made yet"
    if project_venv_python() is not None:
        return (f"empty: this source tree's .venv ({project_venv_python()}), else the \"Set up backend\" "
                f"environment ({setup}, {made})")
    return f"empty: the environment \"Set up backend\" makes ({setup}, {made})"


def torch_importable() -> bool:
    """Whether QGIS's own Python could run the backend in-process; never imports torch."""
    try:
        return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("rasterio") is not None
    except (ImportError, ValueError):
        return False


def ensure_backend_on_path() -> None:
    """Make ``import rscaption`` resolve to the backend shipped with this plugin."""
    path = str(backend_dir())
    if path not in sys.path:
        sys.path.insert(0, path)


def subprocess_env(extra: dict | None = None) -> dict:
    """Environment for the backend subprocess: our backend first on PYTHONPATH, and none of
    QGIS's Python settings (PYTHONHOME etc.), which would break another interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE")}
    parts = [str(backend_dir())]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("PYTHONUNBUFFERED", "1")
    default = default_model_dir()
    if default is not None:
        env.setdefault("RSCAPTION_DEFAULT_MODEL", str(default))
    if extra:
        env.update(extra)
    return env


def resolve_model(name: str | None) -> str:
    """Empty means "default"; the backend finds the embedded model itself (it walks up to
    ``resources/default_model`` and honours ``RSCAPTION_DEFAULT_MODEL``), which keeps the model id
    recorded in the GeoPackage the short, portable "default"."""
    return (name or "default").strip() or "default"

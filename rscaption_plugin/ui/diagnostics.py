"""About / diagnostics: one block of text a user can paste into a bug report.

Collected without importing torch in QGIS (find_spec only); the backend's own view (torch
version, device) comes from the last hello a subprocess sent, or from an explicit probe.
"""

from __future__ import annotations

import platform
import sys

from qgis.core import Qgis
from qgis.PyQt.QtCore import QT_VERSION_STR
from qgis.PyQt.QtGui import QGuiApplication
from qgis.PyQt.QtWidgets import QDialog, QDialogButtonBox, QPlainTextEdit, QPushButton, QVBoxLayout

from ..core.model_card import card_summary, model_dir
from ..core.paths import PLUGIN_DIR, backend_dir, backend_venv_dir, default_model_dir, torch_importable
from ..core.settings import PluginSettings

LAST_BACKEND: dict = {}  # updated by the plugin whenever a task reports its backend


def plugin_version() -> str:
    for path in (PLUGIN_DIR / "metadata.txt", PLUGIN_DIR.parent / "metadata.txt"):
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.startswith("version="):
                    return line.split("=", 1)[1].strip()
    return "?"


def collect(settings: PluginSettings | None = None, probe: dict | None = None) -> str:
    settings = settings or PluginSettings.load()
    try:
        from osgeo import gdal

        gdal_version = gdal.__version__
    except ImportError:
        gdal_version = "?"
    python = settings.python()
    backend = dict(LAST_BACKEND)
    if probe:
        backend.update(probe)
    lines = [
        "rscaption diagnostics",
        f"plugin:          {plugin_version()} ({PLUGIN_DIR})",
        f"QGIS:            {Qgis.QGIS_VERSION} (Qt {QT_VERSION_STR}, GDAL {gdal_version})",
        f"QGIS Python:     {sys.version.split()[0]} ({sys.base_exec_prefix})",
        f"platform:        {platform.platform()}",
        f"backend source:  {backend_dir()}",
        f"backend mode:    {settings.backend_mode} (torch importable in QGIS: {torch_importable()})",
        f"backend Python:  {python or 'none configured'}",
        f"setup env:       {backend_venv_dir()} ({'exists' if backend_venv_dir().exists() else 'not created'})",
        f"device setting:  {settings.device}",
        f"default model:   {settings.default_model} -> {model_dir(settings.default_model) or default_model_dir() or 'not installed'}",
        f"model card:      {card_summary(settings.default_model)}",
    ]
    if backend:
        lines += [
            f"last backend:    mode {backend.get('mode', '?')}, device {backend.get('device', '?')}, "
            f"torch {backend.get('torch', '?')}, python {backend.get('python') or backend.get('executable') or '?'}",
        ]
        if backend.get("torch_error"):
            lines.append(f"backend error:   {backend['torch_error']}")
    else:
        lines.append("last backend:    not contacted yet (use Probe backend)")
    return "\n".join(lines)


def probe_backend(settings: PluginSettings | None = None) -> dict:
    """Start the configured backend subprocess and return its hello (blocking: run in a task)."""
    from ..core.backend_client import BackendClient

    settings = settings or PluginSettings.load()
    client = BackendClient(settings.python(), settings.device)
    try:
        hello = client.start()
    finally:
        client.close()
    info = {"mode": "subprocess", **{k: hello.get(k) for k in ("device", "torch", "executable", "version")}}
    LAST_BACKEND.update(info)
    return info


class AboutDialog(QDialog):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWindowTitle("rscaption — About / diagnostics")
        lay = QVBoxLayout(self)
        self.text = QPlainTextEdit()
        self.text.setReadOnly(True)
        self.text.setMinimumSize(700, 320)
        lay.addWidget(self.text)
        buttons = QDialogButtonBox()
        copy = QPushButton("Copy diagnostics")
        copy.clicked.connect(self.copy)
        probe = QPushButton("Probe backend")
        probe.clicked.connect(self.probe)
        self.probe_button = probe
        buttons.addButton(copy, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.addButton(probe, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.addButton(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        lay.addWidget(buttons)
        self.refresh()

    def refresh(self) -> None:
        self.text.setPlainText(
            "rscaption captions remote-sensing rasters tile by tile and finds tiles by text.\n\n" + collect())

    def copy(self) -> str:
        text = collect()
        QGuiApplication.clipboard().setText(text)
        return text

    def probe(self) -> None:
        from qgis.core import QgsApplication, QgsTask

        self.probe_button.setEnabled(False)
        result = {}

        def work(_task):
            result.update(probe_backend())
            return True

        def done(exception, _value=None):
            self.probe_button.setEnabled(True)
            if exception is not None:
                LAST_BACKEND["torch_error"] = str(exception)
            self.refresh()

        self._task = QgsTask.fromFunction("rscaption: probe backend", work, on_finished=done)
        QgsApplication.taskManager().addTask(self._task)

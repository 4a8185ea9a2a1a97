"""User settings persisted with QgsSettings under ``rscaption/``.

One small typed wrapper so the dialogs, the tasks and the Processing algorithms agree on keys
and defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from qgis.core import QgsSettings

PREFIX = "rscaption/"
BACKEND_MODES = ("auto", "inprocess", "subprocess")
#: What the dialogs show for each mode (Settings, caption dialog): never the stored key.
MODE_LABELS = {"auto": "Automatic", "inprocess": "In-process (QGIS's Python)",
               "subprocess": "Local subprocess (a separate Python)"}
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class PluginSettings:
    backend_mode: str = "auto"  # auto: in-process when torch imports in QGIS, else subprocess
    backend_python: str = ""  # empty: paths.default_backend_python(); the caption dialog, the
    # search dock and Processing all run the backend with this one setting
    default_model: str = "default"
    device: str = "auto"
    tile_size: int = 0  # 0: auto, from the ground resolution and the model card
    overlap: int = 0
    batch_size: int = 8
    # what the caption dialog chose last time (restored when it opens again)
    last_mode: str = ""  # "": the backend_mode above
    last_output: str = "temp"  # "temp" or "file"
    last_output_path: str = ""

    @classmethod
    def load(cls) -> "PluginSettings":
        s = QgsSettings()
        out = cls()
        for f in fields(cls):
            default = getattr(out, f.name)
            value = s.value(PREFIX + f.name, default)
            try:
                value = type(default)(value)
            except (TypeError, ValueError):
                value = default
            setattr(out, f.name, value)
        if out.backend_mode not in BACKEND_MODES:
            out.backend_mode = "auto"
        return out

    def save(self) -> None:
        s = QgsSettings()
        for f in fields(self):
            s.setValue(PREFIX + f.name, getattr(self, f.name))

    def python(self) -> str | None:
        from .paths import default_backend_python

        return self.backend_python.strip() or default_backend_python()

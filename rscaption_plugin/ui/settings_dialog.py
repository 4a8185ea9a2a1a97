"""Settings dialog: backend Python and mode, default model, device, tiling defaults.

The mode list reads as the caption dialog's (never the stored keys) and, like it, offers
In-process only where QGIS's Python can import torch; the note under Backend Python says what an
empty field means for this copy of the plugin (an installed zip has no project .venv).
"""

from __future__ import annotations

from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..core.paths import default_backend_python, default_python_note, torch_importable
from ..core.settings import BACKEND_MODES, DEVICES, MODE_LABELS, PluginSettings
from .dialog_state import NO_TORCH_TIP
from .wrap_label import WrapLabel


class SettingsDialog(QDialog):
    def __init__(self, parent=None, settings: PluginSettings | None = None):
        super().__init__(parent)
        self.setWindowTitle("rscaption — Settings")
        self.settings = settings or PluginSettings.load()
        form = QFormLayout(self)

        self.mode_combo = QComboBox()
        for mode in BACKEND_MODES:
            self.mode_combo.addItem(MODE_LABELS[mode], mode)
        inprocess = torch_importable()
        if not inprocess:  # as in the caption dialog: disabled, with the reason as its tooltip
            index = self.mode_combo.findData("inprocess")
            self.mode_combo.model().item(index).setEnabled(False)
            self.mode_combo.setItemData(index, NO_TORCH_TIP, Qt.ItemDataRole.ToolTipRole)
        mode = self.settings.backend_mode if inprocess or self.settings.backend_mode != "inprocess" else "auto"
        self.mode_combo.setCurrentIndex(max(0, self.mode_combo.findData(mode)))
        form.addRow("Backend mode", self.mode_combo)

        self.python_edit = QLineEdit(self.settings.backend_python)
        self.python_edit.setPlaceholderText(default_backend_python() or "run \"Set up backend\" to create one")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.python_edit, 1)
        row.addWidget(browse)
        holder = QWidget()
        holder.setLayout(row)
        form.addRow("Backend Python", holder)
        self.python_note = WrapLabel(default_python_note())
        form.addRow("", self.python_note)

        self.model_edit = QLineEdit(self.settings.default_model)
        form.addRow("Default model", self.model_edit)
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICES))
        self.device_combo.setCurrentText(self.settings.device)
        form.addRow("Device", self.device_combo)
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(0, 8192)
        self.tile_spin.setSpecialValueText("auto (from ground resolution)")
        self.tile_spin.setValue(self.settings.tile_size)
        form.addRow("Tile size", self.tile_spin)
        self.overlap_spin = QSpinBox()
        self.overlap_spin.setRange(0, 4096)
        self.overlap_spin.setValue(self.settings.overlap)
        form.addRow("Overlap", self.overlap_spin)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 512)
        self.batch_spin.setValue(self.settings.batch_size)
        form.addRow("Batch size", self.batch_spin)

        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Backend Python executable")
        if path:
            self.python_edit.setText(path)

    def values(self) -> PluginSettings:
        return PluginSettings(
            backend_mode=self.mode_combo.currentData(), backend_python=self.python_edit.text().strip(),
            default_model=self.model_edit.text().strip() or "default", device=self.device_combo.currentText(),
            tile_size=self.tile_spin.value(), overlap=self.overlap_spin.value(), batch_size=self.batch_spin.value(),
        )

    def accept(self) -> None:
        self.settings = self.values()
        self.settings.save()
        super().accept()

"""The "Compare two dates" dialog: collects a ChangeJob, never runs anything itself.

Two inputs of one kind: two raster layers (both dates are captioned on the before date's grid),
or two tile layers already captioned by rscaption (their captions and embeddings are reused).
What could make the comparison misleading (resolutions more than 2x apart, bands that do not
mean the same colours) is said under the inputs as soon as they are chosen, before any run.
"""

from __future__ import annotations

import os
import re
import tempfile

from qgis.core import QgsProject, QgsRasterLayer
from qgis.gui import QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .dialog_state import NO_TORCH_TIP, availability, remembered_mode
from ..core.change_inputs import check_captioned, check_rasters
from ..core.change_task import ChangeJob
from ..core.layers import gpkg_path_of
from ..core.model_card import card_tile_size
from ..core.paths import torch_importable
from ..core.qgis_compat import LAYER_FILTER_POLYGON, LAYER_FILTER_RASTER
from ..core.raster_source import RasterSourceError, check_raster
from ..core.settings import BACKEND_MODES, DEVICES, MODE_LABELS, PluginSettings

RASTERS, CAPTIONED = "rasters", "captioned"


class ChangeRequest:
    """What the dialog hands to the plugin: the job plus how and where to show it."""

    def __init__(self, job: ChangeJob, mode: str, python: str | None, layer_name: str, temporary: bool,
                 add_date_layers: bool = False):
        self.job, self.mode, self.python = job, mode, python
        self.layer_name, self.temporary, self.add_date_layers = layer_name, temporary, add_date_layers


def date_key(layer) -> str:
    """A sortable date read from the layer's name or file (``..._20090818.tif``, "NAIP 2020"), so
    the earlier raster is offered as "before"; "" when none is found."""
    for text in (layer.name(), os.path.basename(layer.source().split("|")[0])):
        found = re.findall(r"(?<!\d)((?:19|20)\d{2})(\d{4})?(?!\d)", text)
        if found:
            year, rest = found[-1]
            return year + (rest or "0000")
    return ""


class ChangeDialog(QDialog):
    def __init__(self, iface=None, parent=None, settings: PluginSettings | None = None):
        super().__init__(parent or (iface.mainWindow() if iface else None))
        self.iface = iface
        self.settings = settings or PluginSettings.load()
        self.setWindowTitle("rscaption — Compare two dates")
        self.request: ChangeRequest | None = None
        self.check = None  # the InputCheck of the chosen inputs
        self._build()
        self._preselect()

    # -- layout --------------------------------------------------------------------------------
    def _build(self) -> None:
        root = QVBoxLayout(self)
        form = QFormLayout()
        root.addLayout(form)
        self.kind_combo = QComboBox()
        self.kind_combo.addItem("Two raster layers (caption both dates)", RASTERS)
        self.kind_combo.addItem("Two captioned tile layers (reuse their captions)", CAPTIONED)
        form.addRow("Compare", self.kind_combo)
        self.before_combo = QgsMapLayerComboBox()
        self.after_combo = QgsMapLayerComboBox()
        self.swap_button = QPushButton("⇅ Swap")
        self.swap_button.setToolTip("exchange the two dates")
        self.swap_button.clicked.connect(lambda: self.swap())
        form.addRow("Before (earlier date)", self.before_combo)
        row = QHBoxLayout()
        row.addWidget(self.after_combo, 1)
        row.addWidget(self.swap_button)
        form.addRow("After (later date)", _wrap(row))
        self.warning_label = QLabel("")  # what may make the comparison misleading, before any run
        self.warning_label.setWordWrap(True)
        self.warning_label.setStyleSheet("color: #a05a00")
        root.addWidget(self.warning_label)  # full width (a wrapped label in a form row is cut short)
        form = QFormLayout()
        root.addLayout(form)

        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.addItem("default")
        if self.settings.default_model and self.settings.default_model != "default":
            self.model_combo.addItem(self.settings.default_model)
            self.model_combo.setCurrentText(self.settings.default_model)
        self.model_combo.setToolTip("'default' (embedded), a checkpoint directory, or a hub id")
        form.addRow("Model", self.model_combo)
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(16, 8192)
        self.tile_spin.setSuffix(" px")
        self.tile_spin.setValue(self.settings.tile_size or card_tile_size("default", 256))
        self.auto_tile_check = QCheckBox("Auto (from ground resolution)")
        self.auto_tile_check.setChecked(not self.settings.tile_size)
        self.tile_spin.setEnabled(not self.auto_tile_check.isChecked())
        self.auto_tile_check.toggled.connect(lambda on: self.tile_spin.setEnabled(not on))
        row = QHBoxLayout()
        row.addWidget(self.tile_spin)
        row.addWidget(self.auto_tile_check)
        self.tiles_row = _wrap(row)
        form.addRow("Tiles", self.tiles_row)
        self.k_spin = QSpinBox()
        self.k_spin.setRange(1, 1000)
        self.k_spin.setValue(20)
        form.addRow("Most changed tiles to list", self.k_spin)

        backend = QGroupBox("Backend")
        bform = QFormLayout(backend)
        self.mode_combo = QComboBox()
        for mode in BACKEND_MODES:
            self.mode_combo.addItem(MODE_LABELS.get(mode, mode), mode)
        self._inprocess = torch_importable()
        if not self._inprocess:
            index = self.mode_combo.findData("inprocess")
            self.mode_combo.model().item(index).setEnabled(False)
            self.mode_combo.setItemData(index, NO_TORCH_TIP, Qt.ItemDataRole.ToolTipRole)
        self.mode_combo.setCurrentIndex(
            max(0, self.mode_combo.findData(remembered_mode(self.settings, self._inprocess))))
        bform.addRow("Mode", self.mode_combo)
        self.python_edit = QLineEdit(self.settings.python() or "")
        self.python_edit.setPlaceholderText("python of an env with rscaption's requirements (Set up backend)")
        bform.addRow("Backend Python", self.python_edit)
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICES))
        self.device_combo.setCurrentText(self.settings.device)
        bform.addRow("Device", self.device_combo)
        root.addWidget(backend)

        out = QGroupBox("Output")
        oform = QFormLayout(out)
        self.output_combo = QComboBox()
        self.output_combo.addItem("Temporary layer (GeoPackage in a temp folder)", "temp")
        self.output_combo.addItem("GeoPackage file", "file")
        oform.addRow("Write to", self.output_combo)
        self.output_file = QgsFileWidget()
        self.output_file.setStorageMode(QgsFileWidget.StorageMode.SaveFile)
        self.output_file.setFilter("GeoPackage (*.gpkg)")
        self.output_file.setEnabled(False)
        self.output_combo.currentIndexChanged.connect(
            lambda _i: self.output_file.setEnabled(self.output_combo.currentData() == "file"))
        oform.addRow("GeoPackage", self.output_file)
        self.resume_check = QCheckBox("Resume an unfinished run of the same inputs")
        self.resume_check.setChecked(True)
        oform.addRow("", self.resume_check)
        self.dates_check = QCheckBox("Also add both dates' caption layers")
        oform.addRow("", self.dates_check)
        root.addWidget(out)

        self.message_label = QLabel("")  # why Compare is disabled, or what to fix in the form
        self.message_label.setWordWrap(True)
        self.message_label.setStyleSheet("color: #b00020")
        root.addWidget(self.message_label)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.compare_button = buttons.button(QDialogButtonBox.StandardButton.Ok)
        self.compare_button.setText("Compare")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        root.addWidget(buttons)

        self.kind_combo.currentIndexChanged.connect(lambda _i: self._kind_changed())
        self.before_combo.layerChanged.connect(lambda _l: self._update())
        self.after_combo.layerChanged.connect(lambda _l: self._update())
        self.mode_combo.currentIndexChanged.connect(lambda _i: self._update())
        self.python_edit.textChanged.connect(lambda _t: self._update())
        self._kind_changed()

    def _preselect(self) -> None:
        """The project's two rasters, earlier date first, when there are two to compare."""
        rasters = [layer for layer in QgsProject.instance().mapLayers().values() if isinstance(layer, QgsRasterLayer)]
        rasters.sort(key=lambda layer: (date_key(layer) or "9999", layer.name()))
        if len(rasters) >= 2 and self.kind() == RASTERS:
            self.before_combo.setLayer(rasters[0])
            self.after_combo.setLayer(rasters[1])
        self._update()

    # -- reactions -----------------------------------------------------------------------------
    def kind(self) -> str:
        return self.kind_combo.currentData()

    def _kind_changed(self) -> None:
        rasters = self.kind() == RASTERS
        for combo in (self.before_combo, self.after_combo):
            combo.setFilters(LAYER_FILTER_RASTER if rasters else LAYER_FILTER_POLYGON)
        self.tiles_row.setEnabled(rasters)  # captioned inputs keep their own grid...
        self.model_combo.setEnabled(rasters)  # ...and their own model (another's embeddings do not compare)
        self.model_combo.setToolTip("'default' (embedded), a checkpoint directory, or a hub id" if rasters
                                    else "the model that captioned the two layers is used")
        self._update()

    def swap(self) -> None:
        before, after = self.before_combo.currentLayer(), self.after_combo.currentLayer()
        self.before_combo.setLayer(after)
        self.after_combo.setLayer(before)
        self._update()

    def _update(self) -> None:
        """Check the inputs (warnings below them) and the backend; Compare only when both allow."""
        before, after = self.before_combo.currentLayer(), self.after_combo.currentLayer()
        check = (check_rasters if self.kind() == RASTERS else check_captioned)(before, after)
        self.check = check
        self.warning_label.setText("\n".join(f"⚠ {w}" for w in check.warnings))
        self.warning_label.setVisible(bool(check.warnings))
        if self.height() < self.sizeHint().height():  # room for the wrapped warnings; never shrinks
            self.resize(self.width(), self.sizeHint().height())
        state = availability(self.mode_combo.currentData(), self.python_edit.text(), self._inprocess)
        reason = "\n".join(check.errors) or state.reason
        self.compare_button.setEnabled(check.ok and state.can_run)
        self.compare_button.setToolTip(reason)
        self.message_label.setText(reason)

    # -- result --------------------------------------------------------------------------------
    def _input_path(self, layer) -> str:
        if self.kind() == RASTERS:
            return check_raster(layer)
        return gpkg_path_of(layer)

    def build_request(self) -> ChangeRequest:
        """Validate the form; raises ValueError with a message for the user."""
        before, after = self.before_combo.currentLayer(), self.after_combo.currentLayer()
        check = (check_rasters if self.kind() == RASTERS else check_captioned)(before, after)
        if not check.ok:
            raise ValueError(check.errors[0])
        before_path, after_path = self._input_path(before), self._input_path(after)
        if self.output_combo.currentData() == "file":
            out = self.output_file.filePath().strip()
            if not out:
                raise ValueError("choose an output GeoPackage")
            if not out.lower().endswith(".gpkg"):
                out += ".gpkg"
            if os.path.exists(out) and not self.resume_check.isChecked():
                raise ValueError(f"{out} exists: tick Resume to continue it or choose another file")
            temporary = False
        else:
            out = os.path.join(tempfile.mkdtemp(prefix="rscaption-change-"),
                               f"{_safe(before.name())}_to_{_safe(after.name())}.gpkg")
            temporary = True
        rasters = self.kind() == RASTERS
        job = ChangeJob(
            before=before_path, after=after_path, out=out,
            model=(self.model_combo.currentText().strip() or "default") if rasters else "default",
            tile_size=None if (self.auto_tile_check.isChecked() or not rasters) else self.tile_spin.value(),
            k=self.k_spin.value(), device=self.device_combo.currentText(), resume=self.resume_check.isChecked(),
            batch_size=self.settings.batch_size)
        return ChangeRequest(job, self.mode_combo.currentData(), self.python_edit.text().strip() or None,
                             f"changes {before.name()} → {after.name()}", temporary, self.dates_check.isChecked())

    def done(self, result) -> None:
        """Stop following the layer combos once closed: the dialog object outlives ``exec`` (the
        caller reads ``request``), and a later project change must not check layers being removed."""
        for combo in (self.before_combo, self.after_combo):
            try:
                combo.layerChanged.disconnect()
            except (TypeError, RuntimeError):
                pass
        super().done(result)

    def accept(self) -> None:
        if not self.compare_button.isEnabled():
            return
        try:
            self.request = self.build_request()
        except (ValueError, RasterSourceError) as exc:
            self.message_label.setText(str(exc))
            return
        super().accept()


def _wrap(layout) -> QWidget:
    w = QWidget()
    layout.setContentsMargins(0, 0, 0, 0)
    w.setLayout(layout)
    return w


def _safe(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_" else "_" for c in name or "raster")
    return keep.strip("_") or "raster"

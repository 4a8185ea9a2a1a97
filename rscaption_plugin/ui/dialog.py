"""The "Caption raster layer" dialog: collects a CaptionJob, never runs anything itself.

Built in code (no .ui file) so it stays readable in a diff and works unchanged on Qt5 and Qt6.
"""

from __future__ import annotations

import os
import tempfile

from qgis.core import QgsRasterLayer, QgsRectangle, QgsVectorLayer
from qgis.gui import QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .dialog_state import HELP_TEXT, NO_TORCH_TIP, availability, remember, remembered_mode
from ..core.footprint import tile_choice
from ..core.model_card import card_summary, card_tile_size, model_languages, read_card
from ..core.paths import torch_importable
from ..core.qgis_compat import GEOMETRY_POLYGON, LAYER_FILTER_POLYGON, LAYER_FILTER_RASTER
from ..core.raster_source import RasterSourceError, can_export, check_raster, export_to_geotiff, extent_in_layer_crs
from ..core.runner import CaptionJob
from ..core.settings import BACKEND_MODES, DEVICES, PluginSettings

EXTENT_LAYER, EXTENT_CANVAS, EXTENT_SELECTION = "layer", "canvas", "selection"


#: Names shown for caption language codes (others show their code).
LANGUAGE_NAMES = {"en": "English", "zh": "Chinese (中文)"}

class CaptionRequest:
    """What the dialog hands to the plugin: the job plus how and where to show it."""

    def __init__(self, job: CaptionJob, mode: str, python: str | None, layer_name: str, temporary: bool):
        self.job, self.mode, self.python = job, mode, python
        self.layer_name, self.temporary = layer_name, temporary


def parse_bands(text: str) -> list[int] | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        bands = [int(part) for part in text.replace(";", ",").replace(" ", ",").split(",") if part]
    except ValueError:
        raise ValueError(f"bands must be band numbers like 1,2,3, got '{text}'") from None
    if not bands or any(b < 1 for b in bands):
        raise ValueError("band numbers start at 1")
    return bands


def selection_bbox(vlayer: QgsVectorLayer) -> QgsRectangle | None:
    """Union bounding box of the selected features (in the vector layer's CRS)."""
    if vlayer is None or vlayer.selectedFeatureCount() == 0:
        return None
    return vlayer.boundingBoxOfSelected()


class CaptionDialog(QDialog):
    def __init__(self, iface=None, parent=None, settings: PluginSettings | None = None):
        super().__init__(parent or (iface.mainWindow() if iface else None))
        self.iface = iface
        self.settings = settings or PluginSettings.load()
        self.setWindowTitle("rscaption — Caption raster layer")
        self.request: CaptionRequest | None = None
        self._build()
        self._preselect()

    # -- layout --------------------------------------------------------------------------------
    def _build(self) -> None:
        root = QVBoxLayout(self)
        form = QFormLayout()
        root.addLayout(form)

        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(LAYER_FILTER_RASTER)
        self.layer_combo.layerChanged.connect(self._layer_changed)
        form.addRow("Raster layer", self.layer_combo)
        self.source_note = QLabel("")
        self.source_note.setWordWrap(True)
        form.addRow("", self.source_note)
        self.export_check = QCheckBox("If the layer is not a file, write a temporary GeoTIFF of the extent")
        self.export_check.setChecked(True)
        form.addRow("", self.export_check)

        self.extent_combo = QComboBox()
        self.extent_combo.addItem("Whole layer", EXTENT_LAYER)
        self.extent_combo.addItem("Map canvas extent", EXTENT_CANVAS)
        self.extent_combo.addItem("Selected features of a polygon layer (union bbox)", EXTENT_SELECTION)
        self.mask_combo = QgsMapLayerComboBox()
        self.mask_combo.setFilters(LAYER_FILTER_POLYGON)
        self.mask_combo.setEnabled(False)
        self.extent_combo.currentIndexChanged.connect(
            lambda _i: self.mask_combo.setEnabled(self.extent_combo.currentData() == EXTENT_SELECTION))
        form.addRow("Extent", self.extent_combo)
        form.addRow("Selection layer", self.mask_combo)

        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.addItem("default")
        if self.settings.default_model and self.settings.default_model != "default":
            self.model_combo.addItem(self.settings.default_model)
            self.model_combo.setCurrentText(self.settings.default_model)
        self.model_combo.setToolTip("'default' (embedded), a checkpoint directory, or a hub id")
        browse = QPushButton("Checkpoint…")
        browse.clicked.connect(self._browse_model)
        row = QHBoxLayout()
        row.addWidget(self.model_combo, 1)
        row.addWidget(browse)
        form.addRow("Model", _wrap(row))
        self.card_label = QLabel("")
        self.card_label.setWordWrap(True)
        form.addRow("", self.card_label)
        self.language_combo = QComboBox()
        self.language_combo.setToolTip("caption language; models list the languages they have decoders for")
        form.addRow("Caption language", self.language_combo)
        self.model_combo.currentTextChanged.connect(self._model_changed)

        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(16, 8192)
        self.tile_spin.setSuffix(" px")
        self.auto_tile_check = QCheckBox("Auto (from ground resolution)")
        self.auto_tile_check.setToolTip("keep the ground footprint the model was trained on")
        self.auto_tile_check.setChecked(not self.settings.tile_size)
        self.overlap_spin = QSpinBox()
        self.overlap_spin.setRange(0, 4096)
        self.overlap_spin.setSuffix(" px")
        self.overlap_spin.setValue(self.settings.overlap)
        row = QHBoxLayout()
        row.addWidget(QLabel("size"))
        row.addWidget(self.tile_spin)
        row.addWidget(self.auto_tile_check)
        row.addWidget(QLabel("overlap"))
        row.addWidget(self.overlap_spin)
        form.addRow("Tiles", _wrap(row))
        self.footprint_label = QLabel("")
        self.footprint_label.setWordWrap(True)
        form.addRow("", self.footprint_label)
        self.auto_tile_check.toggled.connect(lambda _on: self._update_footprint())
        self.tile_spin.valueChanged.connect(lambda _v: self._update_footprint())
        self.bands_edit = QLineEdit()
        self.bands_edit.setPlaceholderText("auto (RGB, or grey repeated); e.g. 4,3,2")
        form.addRow("Bands", self.bands_edit)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 512)
        self.batch_spin.setValue(self.settings.batch_size)
        form.addRow("Batch size", self.batch_spin)

        backend = QGroupBox("Backend")
        bform = QFormLayout(backend)
        self.mode_combo = QComboBox()
        for mode in BACKEND_MODES:
            self.mode_combo.addItem({"auto": "Automatic", "inprocess": "In-process (QGIS's Python)",
                                     "subprocess": "Local subprocess"}[mode], mode)
        self._inprocess = torch_importable()
        if not self._inprocess:  # never offer what cannot run: disabled, with the reason as its tooltip
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
        self.backend_note = QLabel(
            "torch is importable in QGIS's Python: in-process mode available" if torch_importable()
            else "QGIS's Python has no torch: the backend runs as a local subprocess")
        self.backend_note.setWordWrap(True)
        bform.addRow("", self.backend_note)
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
        self.output_file.setFilePath(self.settings.last_output_path)
        self.output_combo.setCurrentIndex(max(0, self.output_combo.findData(self.settings.last_output)))
        oform.addRow("GeoPackage", self.output_file)
        self.resume_check = QCheckBox("Resume an existing file (skip tiles already captioned)")
        self.resume_check.setChecked(True)
        oform.addRow("", self.resume_check)
        root.addWidget(out)

        self.message_label = QLabel("")  # why Caption is disabled, or what to fix in the form
        self.message_label.setWordWrap(True)
        self.message_label.setStyleSheet("color: #b00020")
        root.addWidget(self.message_label)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
                                   | QDialogButtonBox.StandardButton.Help)
        self.caption_button = buttons.button(QDialogButtonBox.StandardButton.Ok)
        self.caption_button.setText("Caption")
        self.help_button = buttons.button(QDialogButtonBox.StandardButton.Help)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        buttons.helpRequested.connect(self.show_help)
        root.addWidget(buttons)
        self.help_box: QMessageBox | None = None
        self.mode_combo.currentIndexChanged.connect(lambda _i: self._update_backend())
        self.python_edit.textChanged.connect(lambda _t: self._update_backend())
        self._model_changed(self.model_combo.currentText())
        self._update_backend()

    def _preselect(self) -> None:
        active = self.iface.activeLayer() if self.iface else None
        if isinstance(active, QgsRasterLayer):
            self.layer_combo.setLayer(active)
        self._layer_changed(self.layer_combo.currentLayer())

    # -- reactions -----------------------------------------------------------------------------
    def _layer_changed(self, layer) -> None:
        self._update_footprint()
        if layer is None:
            self.source_note.setText("")
            return
        try:
            path = check_raster(layer)
            self.source_note.setText(f"file: {path} · {layer.bandCount()} band(s) · {layer.crs().authid()}")
        except RasterSourceError as exc:
            self.source_note.setText(str(exc))

    def _model_changed(self, name: str) -> None:
        fallback = self.settings.tile_size or 256
        self.tile_spin.setValue(self.settings.tile_size or card_tile_size(name, fallback))
        self.card_label.setText(card_summary(name))
        self.card_label.setToolTip(card_summary(name, full=True))
        current = self.language_combo.currentData() or "en"
        self.language_combo.clear()
        for code in model_languages(name):
            self.language_combo.addItem(LANGUAGE_NAMES.get(code, code), code)
        self.language_combo.setCurrentIndex(max(0, self.language_combo.findData(current)))
        self._update_footprint()

    def _update_footprint(self) -> None:
        """Show what the run will use; in auto mode the spin box mirrors the chosen size."""
        auto = self.auto_tile_check.isChecked()
        self.tile_spin.setEnabled(not auto)
        layer = self.layer_combo.currentLayer()
        card = read_card(self.model_combo.currentText())
        choice = tile_choice(layer, card, None if auto else self.tile_spin.value())
        if auto and self.tile_spin.value() != choice.tile_px:
            self.tile_spin.blockSignals(True)
            self.tile_spin.setValue(choice.tile_px)
            self.tile_spin.blockSignals(False)
        if layer is None:
            self.footprint_label.setText("")
            return
        text = choice.describe()
        self.footprint_label.setText(text[len("tiles: "):] if text.startswith("tiles: ") else text)

    def _update_backend(self) -> None:
        """Caption is enabled only when the chosen mode has a backend; the reason shows otherwise."""
        state = availability(self.mode_combo.currentData(), self.python_edit.text(), self._inprocess)
        self.caption_button.setEnabled(state.can_run)
        self.caption_button.setToolTip(state.reason)
        self.message_label.setText(state.reason)

    def show_help(self) -> None:
        """A non-modal help window (the dialog stays usable beside it)."""
        if self.help_box is None:
            self.help_box = QMessageBox(QMessageBox.Icon.Information, "rscaption — help", HELP_TEXT,
                                        QMessageBox.StandardButton.Close, self)
            self.help_box.setModal(False)
        self.help_box.show()
        self.help_box.raise_()

    def _browse_model(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "rscaption checkpoint directory")
        if path:
            self.model_combo.setCurrentText(path)

    # -- result --------------------------------------------------------------------------------
    def extent_for(self, layer) -> list[float] | None:
        """The tiling extent in the raster's CRS, or None for the whole layer."""
        choice = self.extent_combo.currentData()
        if choice == EXTENT_LAYER:
            return None
        if choice == EXTENT_CANVAS:
            if self.iface is None or self.iface.mapCanvas() is None:
                raise ValueError("no map canvas to take the extent from")
            canvas = self.iface.mapCanvas()
            rect = extent_in_layer_crs(canvas.extent(), canvas.mapSettings().destinationCrs(), layer)
        else:
            vlayer = self.mask_combo.currentLayer()
            if vlayer is None or vlayer.geometryType() != GEOMETRY_POLYGON:
                raise ValueError("choose a polygon layer with selected features")
            rect = selection_bbox(vlayer)
            if rect is None:
                raise ValueError(f"no features are selected in '{vlayer.name()}'")
            rect = extent_in_layer_crs(rect, vlayer.crs(), layer)
        rect = rect.intersect(layer.extent())
        if rect.isEmpty():
            raise ValueError("the chosen extent does not overlap the raster")
        return [rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()]

    def build_request(self) -> CaptionRequest:
        """Validate the form; raises ValueError with a message for the user."""
        layer = self.layer_combo.currentLayer()
        if layer is None:
            raise ValueError("choose a raster layer")
        extent = self.extent_for(layer)
        try:
            raster = check_raster(layer)
        except RasterSourceError:
            if not (self.export_check.isChecked() and can_export(layer)):
                raise
            rect = QgsRectangle(*extent) if extent else None
            raster = export_to_geotiff(layer, rect)
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
            out = os.path.join(tempfile.mkdtemp(prefix="rscaption-"), f"{_safe(layer.name())}_captions.gpkg")
            temporary = True
        overlap = self.overlap_spin.value()
        if overlap >= self.tile_spin.value():
            raise ValueError("overlap must be smaller than the tile size")
        job = CaptionJob(
            raster=raster, out=out, model=self.model_combo.currentText().strip() or "default",
            tile_size=None if self.auto_tile_check.isChecked() else self.tile_spin.value(), overlap=overlap,
            bands=parse_bands(self.bands_edit.text()),
            extent=extent, batch_size=self.batch_spin.value(), device=self.device_combo.currentText(),
            resume=self.resume_check.isChecked(), language=self.language_combo.currentData() or "en",
        )
        name = f"{layer.name()} captions"
        return CaptionRequest(job, self.mode_combo.currentData(), self.python_edit.text().strip() or None,
                              name, temporary)

    def accept(self) -> None:
        if not self.caption_button.isEnabled():
            return
        try:
            self.request = self.build_request()
        except (ValueError, RasterSourceError) as exc:
            self.message_label.setText(str(exc))  # in the dialog, beside the fields to fix
            return
        remember(self.settings, self.mode_combo.currentData(), self.output_combo.currentData(),
                 self.output_file.filePath().strip())
        super().accept()


def _wrap(layout) -> QWidget:
    w = QWidget()
    layout.setContentsMargins(0, 0, 0, 0)
    w.setLayout(layout)
    return w


def _safe(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_" else "_" for c in name or "raster")
    return keep.strip("_") or "raster"

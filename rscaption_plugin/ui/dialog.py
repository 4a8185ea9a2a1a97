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
    QDoubleSpinBox,
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
from ..core.run_record import read_run_record
from ..core.run_warnings import has_crs, input_warnings
from ..core.runner import CaptionJob
from ..core.settings import BACKEND_MODES, DEVICES, MODE_LABELS, PluginSettings
from .resume_form import EXTENT_FILE, apply_record, resume_problem, show_note
from .wrap_label import WrapLabel

EXTENT_LAYER, EXTENT_CANVAS, EXTENT_SELECTION = "layer", "canvas", "selection"


#: Names shown for caption language codes (others show their code).
LANGUAGE_NAMES = {"en": "English", "zh": "Chinese (中文)"}

class CaptionRequest:
    """What the dialog hands to the plugin: the job plus how and where to show it."""

    def __init__(self, job: CaptionJob, mode: str, python: str | None, layer_name: str, temporary: bool,
                 warnings: list[str] | None = None):
        self.job, self.mode, self.python = job, mode, python
        self.layer_name, self.temporary = layer_name, temporary
        self.warnings = list(warnings or [])  # shown in the dialog; the message bar repeats them after the run


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
        self.setMinimumWidth(780)  # room for the check boxes and fewer lines of notes; they grow in height
        self.request: CaptionRequest | None = None
        self.record = None  # the run recorded in the chosen output file (run_record.RunRecord)
        self.warnings: list[str] = []  # input warnings for the chosen layer and model (run_warnings)
        self._build()
        self._preselect()
        self._output_changed()

    # -- layout --------------------------------------------------------------------------------
    def _build(self) -> None:
        root = QVBoxLayout(self)
        form = QFormLayout()
        root.addLayout(form)

        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(LAYER_FILTER_RASTER)
        self.layer_combo.layerChanged.connect(self._layer_changed)
        form.addRow("Raster layer", self.layer_combo)
        self.source_note = WrapLabel()
        form.addRow("", self.source_note)
        self.export_check = QCheckBox("Not a file: write a temporary GeoTIFF of the extent")
        self.export_check.setToolTip("for layers that are not a raster file on disk (memory, virtual, calculator)")
        self.export_check.setChecked(True)
        form.addRow("", self.export_check)

        self.extent_combo = QComboBox()
        self.extent_combo.addItem("Whole layer", EXTENT_LAYER)
        self.extent_combo.addItem("Map canvas extent", EXTENT_CANVAS)
        self.extent_combo.addItem("Selected features (union bbox) of", EXTENT_SELECTION)
        self.mask_combo = QgsMapLayerComboBox()
        self.mask_combo.setFilters(LAYER_FILTER_POLYGON)
        self.mask_combo.setEnabled(False)
        self.extent_combo.currentIndexChanged.connect(
            lambda _i: self.mask_combo.setEnabled(self.extent_combo.currentData() == EXTENT_SELECTION))
        self.mask_combo.setToolTip("the polygon layer whose selected features bound the extent")
        row = QHBoxLayout()
        row.addWidget(self.extent_combo, 1)
        row.addWidget(self.mask_combo, 1)
        form.addRow("Extent", _wrap(row))

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
        self.card_label = WrapLabel()
        form.addRow("", self.card_label)
        self.language_combo = QComboBox()
        self.language_combo.setToolTip("caption language; models list the languages they have decoders for")
        form.addRow("Caption language", self.language_combo)
        self.model_combo.currentTextChanged.connect(self._model_changed)

        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(16, 8192)
        self.tile_spin.setSuffix(" px")
        self.auto_tile_check = QCheckBox("Auto")
        self.auto_tile_check.setToolTip("from the ground resolution: keep the ground footprint the model was "
                                        "trained on")
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
        # asked only for a layer without a CRS: its metres per pixel are otherwise unknown
        self.ground_spin = QDoubleSpinBox()
        self.ground_spin.setRange(0.0, 100000.0)
        self.ground_spin.setDecimals(3)
        self.ground_spin.setSuffix(" m/px")
        self.ground_spin.setSpecialValueText("unknown: enter metres per pixel")
        self.ground_spin.setToolTip("the raster has no CRS: how many metres one pixel covers on the ground "
                                    "(sets the tile size and lets the model check its scene names)")
        form.addRow("Ground resolution", self.ground_spin)
        self.ground_row = (form.labelForField(self.ground_spin), self.ground_spin)
        self.footprint_label = WrapLabel()
        form.addRow("", self.footprint_label)
        self.auto_tile_check.toggled.connect(lambda _on: self._update_footprint())
        self.tile_spin.valueChanged.connect(lambda _v: self._update_footprint())
        self.ground_spin.valueChanged.connect(lambda _v: self._update_footprint())
        self.bands_edit = QLineEdit()
        self.bands_edit.setPlaceholderText("auto (RGB, or grey repeated); e.g. 4,3,2")
        self.bands_edit.editingFinished.connect(self._update_footprint)
        form.addRow("Bands", self.bands_edit)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 512)
        self.batch_spin.setValue(self.settings.batch_size)

        backend = QGroupBox("Backend")
        bform = QFormLayout(backend)
        self.mode_combo = QComboBox()
        for mode in BACKEND_MODES:
            self.mode_combo.addItem(MODE_LABELS[mode], mode)
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
        self.python_browse = QPushButton("Browse…")
        self.python_browse.clicked.connect(self._browse_python)
        row = QHBoxLayout()
        row.addWidget(self.python_edit, 1)
        row.addWidget(self.python_browse)
        bform.addRow("Backend Python", _wrap(row))
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICES))
        self.device_combo.setCurrentText(self.settings.device)
        row = QHBoxLayout()
        row.addWidget(self.device_combo, 1)
        row.addWidget(QLabel("batch size"))
        row.addWidget(self.batch_spin)
        bform.addRow("Device", _wrap(row))
        self.backend_note = WrapLabel(
            "QGIS's Python has torch: In-process is available" if torch_importable()
            else "QGIS's Python has no torch: the backend runs as a local subprocess")
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
        self.resume_note = WrapLabel()  # the settings a resume restores from the file
        self.resume_note.setVisible(False)
        oform.addRow("", self.resume_note)
        root.addWidget(out)
        self.output_file.fileChanged.connect(lambda _p: self._output_changed())
        self.output_combo.currentIndexChanged.connect(lambda _i: self._output_changed())
        self.resume_check.toggled.connect(lambda _on: self._output_changed())

        self.warning_label = WrapLabel()  # what the run will warn about, before it starts
        self.warning_label.setStyleSheet("color: #8a5a00")
        root.addWidget(self.warning_label)
        self.message_label = WrapLabel()  # why Caption is disabled, or what to fix in the form
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
        for box in (self.export_check, self.auto_tile_check, self.resume_check):
            box.setMinimumWidth(box.sizeHint().width())  # check boxes are never cut
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
        no_crs = layer is not None and not has_crs(layer)
        for widget in self.ground_row:
            widget.setVisible(no_crs)
        self._update_footprint()
        if layer is None:
            self.source_note.setText("")
            return
        crs = (layer.crs().authid() or layer.crs().description()) if has_crs(layer) else "no CRS"
        try:
            path = check_raster(layer)
            self.source_note.setText(f"file: {breakable(path)} · {layer.bandCount()} band(s) · {crs}")
            self.source_note.setToolTip(path)
        except RasterSourceError as exc:
            self.source_note.setText(str(exc))
        show_note(self)

    def _model_changed(self, name: str) -> None:
        fallback = self.settings.tile_size or 256
        self.tile_spin.setValue(self.settings.tile_size or card_tile_size(name, fallback))
        self.card_label.setText(card_summary(name, tiling_hints=False))  # the footprint line says those
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
        choice = tile_choice(layer, card, None if auto else self.tile_spin.value(), self.declared_ground())
        if auto and self.tile_spin.value() != choice.tile_px:
            self.tile_spin.blockSignals(True)
            self.tile_spin.setValue(choice.tile_px)
            self.tile_spin.blockSignals(False)
        if layer is None:
            self.footprint_label.setText("")
            self.warning_label.setText("")
            return
        text = choice.describe()
        self.footprint_label.setText(text[len("tiles: "):] if text.startswith("tiles: ") else text)
        try:
            bands = parse_bands(self.bands_edit.text())
        except ValueError:
            bands = None
        self.warnings = input_warnings(layer, card, choice.m_per_px, bands)
        self.warning_label.setText("\n".join(w[0].upper() + w[1:] for w in self.warnings))

    def declared_ground(self) -> float | None:
        """The metres per pixel typed for a layer without a CRS (None: not asked, or left unknown)."""
        layer = self.layer_combo.currentLayer()
        if layer is None or has_crs(layer) or self.ground_spin.value() <= 0:
            return None
        return float(self.ground_spin.value())

    def _output_changed(self) -> None:
        """A chosen output that an earlier run wrote: with Resume ticked, its tile settings are put
        back in the form (the backend refuses a resume with other ones), and the note says so."""
        path = self.output_file.filePath().strip() if self.output_combo.currentData() == "file" else ""
        if path and not path.lower().endswith(".gpkg"):
            path += ".gpkg"
        self.record = read_run_record(path) if path and self.resume_check.isChecked() else None
        apply_record(self, self.record)

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

    def _browse_python(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Backend Python executable", self.python_edit.text())
        if path:
            self.python_edit.setText(path)

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
        if choice == EXTENT_FILE:
            return list(self.record.extent) if self.record is not None and self.record.extent else None
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
            if os.path.exists(out):  # a refused resume starts nothing: no layer, no write
                problem = resume_problem(self, layer, raster, out)
                if problem:
                    raise ValueError(problem)
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
            ground_resolution=self.declared_ground(),
            target_resolution=self.record.target_resolution if self.record is not None and not temporary else None,
        )
        name = f"{layer.name()} captions"
        return CaptionRequest(job, self.mode_combo.currentData(), self.python_edit.text().strip() or None,
                              name, temporary, self.warnings)

    def accept(self) -> None:
        if not self.caption_button.isEnabled():
            return
        try:
            self.request = self.build_request()
        except (ValueError, RasterSourceError) as exc:
            self.message_label.setText(str(exc))  # in the dialog, beside the fields to fix
            return
        remember(self.settings, self.mode_combo.currentData(), self.output_combo.currentData(),
                 self.output_file.filePath().strip(), self.python_edit.text())
        super().accept()


def breakable(path: str) -> str:
    """``path`` with a zero-width break after each separator, so a long path wraps between folders
    rather than mid-name (the tooltip keeps the plain path)."""
    return path.replace("/", "/\u200b").replace("\\", "\\\u200b")


def _wrap(layout) -> QWidget:
    w = QWidget()
    layout.setContentsMargins(0, 0, 0, 0)
    w.setLayout(layout)
    return w


def _safe(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_" else "_" for c in name or "raster")
    return keep.strip("_") or "raster"

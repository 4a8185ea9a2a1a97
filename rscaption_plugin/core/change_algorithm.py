"""Processing algorithm ``rscaption:change``: what changed between two dates of the same place.

The scriptable twin of the "Compare two dates" dialog (``processing.run``, the modeler, batch
mode, ``qgis_process``). Processing already runs algorithms off the GUI thread, so it calls
``change_task.run_change`` directly, with the same backend modes as the dialog. Either input may
be a raster or a tile layer already captioned by rscaption (whose captions are then reused).
"""

from __future__ import annotations

import json
import os

from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorLayer,
)
from qgis.PyQt.QtGui import QIcon

from .change_inputs import check_rasters
from .change_layers import CHANGE_LAYER, change_uri, store_change_style
from .change_task import ChangeJob, run_change
from .layers import gpkg_path_of, is_rscaption_gpkg
from .paths import icon_path
from .qgis_compat import NUMBER_INTEGER, SOURCE_VECTOR_POLYGON
from .raster_source import RasterSourceError, check_raster
from .runner import Callbacks, LargeRunRefused, RunError
from .settings import BACKEND_MODES, PluginSettings


def _date_input(raster, tiles, when: str) -> str:
    """The one input of a date: a raster file, or the GeoPackage of a captioned tile layer."""
    if (raster is None) == (tiles is None):
        raise QgsProcessingException(f"{when}: give either a raster or a captioned tile layer (one of the two)")
    if raster is not None:
        try:
            return check_raster(raster)
        except RasterSourceError as exc:
            raise QgsProcessingException(f"{when}: {exc}") from None
    path = gpkg_path_of(tiles)
    if not is_rscaption_gpkg(path):
        raise QgsProcessingException(f"{when}: '{tiles.name()}' is not a tile layer made by rscaption (a GeoPackage "
                                     "with its embeddings)")
    return path


class ChangeAlgorithm(QgsProcessingAlgorithm):
    BEFORE, AFTER, TILE_SIZE, MODEL, K = "BEFORE", "AFTER", "TILE_SIZE", "MODEL", "K"
    BEFORE_TILES, AFTER_TILES = "BEFORE_TILES", "AFTER_TILES"
    BACKEND, PYTHON, DEVICE, BATCH_SIZE, OVERWRITE, CONFIRM_LARGE, OUTPUT = (
        "BACKEND", "PYTHON", "DEVICE", "BATCH_SIZE", "OVERWRITE", "CONFIRM_LARGE", "OUTPUT")

    def name(self):
        return "change"

    def displayName(self):
        return "What changed between two dates"

    def shortHelpString(self):
        return ("Captions two dates of the same place tile by tile on the before date's grid and scores each "
                "tile's land-use change from 0 to 1. Writes a GeoPackage with the layer 'changes' (change, "
                "caption_before, caption_after, scene_before, scene_after, confidence and a summary such as "
                "'farmland -> residential area'), both dates' tile layers and their embeddings. Either input "
                "may be a raster or a tile layer captioned by rscaption (its captions are reused). A warning "
                "is given when the rasters differ in resolution by more than 2x or in band meaning. Finished "
                "tiles are kept when cancelled; running again with the same output resumes.")

    def icon(self):
        return QIcon(icon_path("change.svg"))

    def createInstance(self):
        return ChangeAlgorithm()

    def initAlgorithm(self, config=None):
        s = PluginSettings.load()
        # a raster or a captioned tile layer for each date: two typed parameters each, so Processing
        # opens a path as what it is (a layer parameter of any type tries OGR on a GeoTIFF and logs it)
        self.addParameter(QgsProcessingParameterRasterLayer(self.BEFORE, "Before (earlier date): raster",
                                                            optional=True))
        self.addParameter(QgsProcessingParameterVectorLayer(
            self.BEFORE_TILES, "… or before: tile layer captioned by rscaption", [SOURCE_VECTOR_POLYGON], optional=True))
        self.addParameter(QgsProcessingParameterRasterLayer(self.AFTER, "After (later date): raster", optional=True))
        self.addParameter(QgsProcessingParameterVectorLayer(
            self.AFTER_TILES, "… or after: tile layer captioned by rscaption", [SOURCE_VECTOR_POLYGON], optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.TILE_SIZE, "Tile size in pixels (0: auto, from the ground resolution)", NUMBER_INTEGER,
            defaultValue=s.tile_size, minValue=0))
        self.addParameter(QgsProcessingParameterString(self.MODEL, "Model ('default', checkpoint dir or hub id)",
                                                       defaultValue=s.default_model))
        self.addParameter(QgsProcessingParameterNumber(self.K, "Most changed tiles to report", NUMBER_INTEGER,
                                                       defaultValue=10, minValue=1))
        self.addParameter(QgsProcessingParameterEnum(self.BACKEND, "Backend mode", options=list(BACKEND_MODES),
                                                     defaultValue=max(0, BACKEND_MODES.index(s.backend_mode))))
        self.addParameter(QgsProcessingParameterString(self.PYTHON, "Backend Python (subprocess mode)", optional=True))
        self.addParameter(QgsProcessingParameterString(self.DEVICE, "Device (auto, cpu, cuda, mps)",
                                                       defaultValue=s.device))
        self.addParameter(QgsProcessingParameterNumber(self.BATCH_SIZE, "Batch size", NUMBER_INTEGER,
                                                       defaultValue=s.batch_size, minValue=1))
        self.addParameter(QgsProcessingParameterBoolean(self.OVERWRITE, "Overwrite instead of resuming",
                                                        defaultValue=False))
        self.addParameter(QgsProcessingParameterBoolean(self.CONFIRM_LARGE, "Run even if it plans a very large "
                                                        "number of tiles", defaultValue=False))
        self.addParameter(QgsProcessingParameterFileDestination(self.OUTPUT, "Output change GeoPackage",
                                                                "GeoPackage (*.gpkg)"))
        self.addOutput(QgsProcessingOutputNumber("SCORED", "Tiles scored"))
        self.addOutput(QgsProcessingOutputNumber("CHANGED", "Tiles changed"))
        self.addOutput(QgsProcessingOutputString("SUMMARY", "Run summary (JSON)"))
        self.addOutput(QgsProcessingOutputString("TOP", "Most changed tiles (JSON)"))

    def processAlgorithm(self, parameters, context, feedback):
        rasters = [self.parameterAsRasterLayer(parameters, key, context) for key in (self.BEFORE, self.AFTER)]
        tiles = [self.parameterAsVectorLayer(parameters, key, context) for key in (self.BEFORE_TILES, self.AFTER_TILES)]
        before_path = _date_input(rasters[0], tiles[0], "before")
        after_path = _date_input(rasters[1], tiles[1], "after")
        before, after = rasters[0] or tiles[0], rasters[1] or tiles[1]
        if rasters[0] is not None and rasters[1] is not None:
            check = check_rasters(*rasters)
            if not check.ok:
                raise QgsProcessingException(check.errors[0])
            for warning in check.warnings:
                feedback.pushWarning(warning)
        out = self.parameterAsFileOutput(parameters, self.OUTPUT, context)
        if not out.lower().endswith(".gpkg"):
            out = os.path.splitext(out)[0] + ".gpkg"
        job = ChangeJob(
            before=before_path, after=after_path, out=out,
            model=self.parameterAsString(parameters, self.MODEL, context) or "default",
            tile_size=self.parameterAsInt(parameters, self.TILE_SIZE, context) or None,
            k=self.parameterAsInt(parameters, self.K, context),
            batch_size=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
            device=self.parameterAsString(parameters, self.DEVICE, context) or None,
            overwrite=self.parameterAsBool(parameters, self.OVERWRITE, context),
            confirm_large=self.parameterAsBool(parameters, self.CONFIRM_LARGE, context))
        mode = BACKEND_MODES[self.parameterAsEnum(parameters, self.BACKEND, context)]
        python = self.parameterAsString(parameters, self.PYTHON, context) or PluginSettings.load().python()
        names = (before.name(), after.name())  # read now: the layers may be gone by the end of a long run
        cb = Callbacks(on_progress=lambda done, total: feedback.setProgress(100.0 * done / total if total else 0),
                       on_backend=lambda info: feedback.pushInfo(f"backend: {info.get('mode')} on "
                                                                 f"{info.get('device') or '?'}"),
                       on_log=feedback.pushInfo, should_cancel=feedback.isCanceled)
        try:
            summary = run_change(job, mode, python, cb)
        except LargeRunRefused as exc:
            raise QgsProcessingException(f"{exc}; tick \"Run even if it plans a very large number of tiles\" to "
                                         "start it anyway") from None
        except RunError as exc:
            raise QgsProcessingException(str(exc)) from None
        top = list(summary.get("top") or [])
        for rank, tile in enumerate(top, 1):
            feedback.pushInfo(f"{rank:>3}. {float(tile.get('change') or 0):.2f}  tile {tile.get('tile_id')}: "
                              f"{tile.get('summary')}")
        if summary.get("cancelled"):
            feedback.reportError(f"cancelled; finished tiles kept in {out}: run again to resume")
        if os.path.exists(out):
            problem = store_change_style(out)  # the file carries its own style (reopened, shared)
            if problem:
                feedback.pushInfo(f"style not saved into {out}: {problem}")
            else:
                details = QgsProcessingContext.LayerDetails(f"changes {names[0]} → {names[1]}", context.project(),
                                                            self.OUTPUT)
                context.addLayerToLoadOnCompletion(change_uri(out, CHANGE_LAYER), details)
        return {self.OUTPUT: out, "SCORED": summary.get("scored", 0), "CHANGED": summary.get("changed", 0),
                "SUMMARY": json.dumps(summary), "TOP": json.dumps(top)}

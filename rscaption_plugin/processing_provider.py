"""Processing provider: ``rscaption:caption`` and ``rscaption:search`` (and ``rscaption:change``, in
``core/change_algorithm.py``).

Makes the plugin scriptable (``processing.run``), usable in the graphical modeler and in
``qgis_process``. Processing already runs algorithms off the GUI thread, so the algorithms call
the runner directly, with the same backend modes as the dialogs.
"""

from __future__ import annotations

import json
import os

from qgis.core import (
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorLayer,
    QgsProcessingProvider,
)
from qgis.PyQt.QtGui import QIcon

from .core.layers import gpkg_path_of, is_rscaption_gpkg, tile_filter
from .core.paths import icon_path
from .core.qgis_compat import NUMBER_DOUBLE, NUMBER_INTEGER, SOURCE_VECTOR_POLYGON, field_type
from .core.raster_source import RasterSourceError, check_raster
from .core.runner import Callbacks, CaptionJob, LargeRunRefused, RunError, run_caption, run_search
from .core.settings import BACKEND_MODES, PluginSettings


def _settings() -> PluginSettings:
    return PluginSettings.load()


def _large_run_tiles() -> int:
    """The backend's threshold (rscaption.engine.run_size is standard library only: cheap to import)."""
    from .core.paths import ensure_backend_on_path

    ensure_backend_on_path()
    from rscaption.engine.run_size import LARGE_RUN_TILES

    return LARGE_RUN_TILES


def _large_run_message(exc: LargeRunRefused, label: str) -> str:
    from .ui.large_run import format_duration

    return (f"this run plans {exc.tiles:,} tiles, about {format_duration(exc.seconds)} (a conservative "
            f"estimate), more than {_large_run_tiles():,}; tick \"{label}\" to start it anyway, or choose a "
            "smaller extent or a larger tile size")


class CaptionAlgorithm(QgsProcessingAlgorithm):
    INPUT, EXTENT, TILE_SIZE, OVERLAP, BANDS = "INPUT", "EXTENT", "TILE_SIZE", "OVERLAP", "BANDS"
    MODEL, BACKEND, PYTHON, DEVICE, BATCH_SIZE, OVERWRITE, OUTPUT = (
        "MODEL", "BACKEND", "PYTHON", "DEVICE", "BATCH_SIZE", "OVERWRITE", "OUTPUT")
    CONFIRM_LARGE = "CONFIRM_LARGE"

    @staticmethod
    def confirm_label() -> str:
        return f"Run even if it plans more than {_large_run_tiles():,} tiles"

    def name(self):
        return "caption"

    def displayName(self):
        return "Caption raster tiles"

    def shortHelpString(self):
        return ("Splits a raster into tiles, captions each tile with an image-captioning model and writes "
                "a GeoPackage (layer 'tiles' with caption, confidence, row, col, model, time; plus the tile "
                "embeddings for text search). Finished tiles are kept if the run is cancelled; running "
                "again with the same output resumes. Tile size 0 means auto: the tile size is chosen from the "
                "raster's ground resolution (metres per pixel, measured at the raster centre for geographic "
                "CRSs) so tiles cover the ground footprint the model was trained on; a raster without a CRS "
                "gets the model's pixel tile size.")

    def icon(self):
        return QIcon(icon_path("caption.svg"))

    def createInstance(self):
        return CaptionAlgorithm()

    def initAlgorithm(self, config=None):
        s = _settings()
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Raster layer"))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Extent (default: whole raster)", optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.TILE_SIZE, "Tile size in pixels (0: auto, from the ground resolution)", NUMBER_INTEGER,
            defaultValue=s.tile_size, minValue=0))
        self.addParameter(QgsProcessingParameterNumber(
            self.OVERLAP, "Overlap in pixels", NUMBER_INTEGER, defaultValue=s.overlap,
            minValue=0))
        self.addParameter(QgsProcessingParameterString(self.BANDS, "Bands (e.g. 1,2,3; empty: auto)", optional=True))
        self.addParameter(QgsProcessingParameterString(self.MODEL, "Model ('default', checkpoint dir or hub id)",
                                                       defaultValue=s.default_model))
        self.addParameter(QgsProcessingParameterEnum(self.BACKEND, "Backend mode", options=list(BACKEND_MODES),
                                                     defaultValue=max(0, BACKEND_MODES.index(s.backend_mode))))
        self.addParameter(QgsProcessingParameterString(self.PYTHON, "Backend Python (subprocess mode)",
                                                       optional=True))
        self.addParameter(QgsProcessingParameterString(self.DEVICE, "Device (auto, cpu, cuda, mps)",
                                                       defaultValue=s.device))
        self.addParameter(QgsProcessingParameterNumber(
            self.BATCH_SIZE, "Batch size", NUMBER_INTEGER, defaultValue=s.batch_size,
            minValue=1))
        self.addParameter(QgsProcessingParameterBoolean(self.OVERWRITE, "Overwrite instead of resuming",
                                                        defaultValue=False))
        # off by default: a batch run or a model must not start days of work unnoticed
        self.addParameter(QgsProcessingParameterBoolean(self.CONFIRM_LARGE, self.confirm_label(), defaultValue=False))
        self.addParameter(QgsProcessingParameterFileDestination(self.OUTPUT, "Output GeoPackage",
                                                                "GeoPackage (*.gpkg)"))
        self.addOutput(QgsProcessingOutputNumber("WRITTEN", "Tiles captioned"))
        self.addOutput(QgsProcessingOutputString("SUMMARY", "Run summary (JSON)"))

    def processAlgorithm(self, parameters, context, feedback):
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        try:
            raster = check_raster(layer)
        except RasterSourceError as exc:
            raise QgsProcessingException(str(exc)) from None
        # read now: the layer may be gone (removed from the project) by the end of a long run
        layer_name = layer.name()
        extent = None
        if parameters.get(self.EXTENT):
            rect = self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs())
            if not rect.isEmpty():
                rect = rect.intersect(layer.extent())
                if rect.isEmpty():
                    raise QgsProcessingException("the extent does not overlap the raster")
                extent = [rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()]
        out = self.parameterAsFileOutput(parameters, self.OUTPUT, context)
        if not out.lower().endswith(".gpkg"):
            out = os.path.splitext(out)[0] + ".gpkg"
        bands_text = self.parameterAsString(parameters, self.BANDS, context)
        try:
            from .ui.dialog import parse_bands

            bands = parse_bands(bands_text)
        except ValueError as exc:
            raise QgsProcessingException(str(exc)) from None
        job = CaptionJob(
            raster=raster, out=out, model=self.parameterAsString(parameters, self.MODEL, context) or "default",
            tile_size=self.parameterAsInt(parameters, self.TILE_SIZE, context) or None,
            overlap=self.parameterAsInt(parameters, self.OVERLAP, context), bands=bands, extent=extent,
            batch_size=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
            device=self.parameterAsString(parameters, self.DEVICE, context) or None,
            overwrite=self.parameterAsBool(parameters, self.OVERWRITE, context),
            confirm_large=self.parameterAsBool(parameters, self.CONFIRM_LARGE, context),
        )
        mode = BACKEND_MODES[self.parameterAsEnum(parameters, self.BACKEND, context)]
        python = self.parameterAsString(parameters, self.PYTHON, context) or _settings().python()

        def on_backend(info):
            feedback.pushInfo(f"backend: {info.get('mode')} on {info.get('device') or '?'}")

        cb = Callbacks(
            on_progress=lambda done, total: feedback.setProgress(100.0 * done / total if total else 0),
            on_backend=on_backend, on_log=feedback.pushDebugInfo, should_cancel=feedback.isCanceled)
        try:
            summary = run_caption(job, mode, python, cb)
        except LargeRunRefused as exc:
            raise QgsProcessingException(_large_run_message(exc, self.confirm_label())) from None
        except RunError as exc:
            raise QgsProcessingException(str(exc)) from None
        feedback.pushInfo(json.dumps(summary))
        if summary.get("cancelled"):
            feedback.reportError(f"cancelled; {summary.get('written')} finished tiles kept in {out}")
        if os.path.exists(out):
            from .core.layers import store_default_style

            problem = store_default_style(out)  # the file carries its own style (reopened, shared)
            if problem:
                feedback.pushInfo(f"style not saved into {out}: {problem}")
            details = QgsProcessingContext.LayerDetails(f"{layer_name} captions", context.project(), self.OUTPUT)
            context.addLayerToLoadOnCompletion(f"{out}|layername=tiles", details)
        return {self.OUTPUT: out, "WRITTEN": summary.get("written", 0), "SUMMARY": json.dumps(summary)}


class SearchAlgorithm(QgsProcessingAlgorithm):
    INPUT, QUERY, K, THRESHOLD, MODEL, BACKEND, PYTHON, DEVICE, OUTPUT = (
        "INPUT", "QUERY", "K", "THRESHOLD", "MODEL", "BACKEND", "PYTHON", "DEVICE", "OUTPUT")

    def name(self):
        return "search"

    def displayName(self):
        return "Search captioned tiles"

    def shortHelpString(self):
        return ("Ranks the tiles of an rscaption GeoPackage against a text query (cosine similarity of the "
                "model's text and image embeddings) and writes the top matches with rank and score.")

    def icon(self):
        return QIcon(icon_path("search.svg"))

    def createInstance(self):
        return SearchAlgorithm()

    def initAlgorithm(self, config=None):
        s = _settings()
        self.addParameter(QgsProcessingParameterVectorLayer(
            self.INPUT, "Captioned tile layer (rscaption GeoPackage)", [SOURCE_VECTOR_POLYGON]))
        self.addParameter(QgsProcessingParameterString(self.QUERY, "Query"))
        self.addParameter(QgsProcessingParameterNumber(self.K, "Number of results",
                                                       NUMBER_INTEGER, 10, minValue=1))
        self.addParameter(QgsProcessingParameterNumber(self.THRESHOLD, "Minimum score",
                                                       NUMBER_DOUBLE, -1.0,
                                                       minValue=-1.0, maxValue=1.0))
        self.addParameter(QgsProcessingParameterString(self.MODEL, "Model (empty: the one recorded in the file)",
                                                       optional=True))
        self.addParameter(QgsProcessingParameterEnum(self.BACKEND, "Backend mode", options=list(BACKEND_MODES),
                                                     defaultValue=max(0, BACKEND_MODES.index(s.backend_mode))))
        self.addParameter(QgsProcessingParameterString(self.PYTHON, "Backend Python (subprocess mode)",
                                                       optional=True))
        self.addParameter(QgsProcessingParameterString(self.DEVICE, "Device", defaultValue=s.device))
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, "Matches",
                                                            SOURCE_VECTOR_POLYGON))
        self.addOutput(QgsProcessingOutputString("HITS", "Hits (JSON)"))

    def processAlgorithm(self, parameters, context, feedback):
        layer = self.parameterAsVectorLayer(parameters, self.INPUT, context)
        gpkg = gpkg_path_of(layer)
        if not is_rscaption_gpkg(gpkg):
            raise QgsProcessingException("the input layer is not an rscaption GeoPackage (no embeddings table)")
        query = self.parameterAsString(parameters, self.QUERY, context).strip()
        if not query:
            raise QgsProcessingException("the query is empty")
        k = self.parameterAsInt(parameters, self.K, context)
        threshold = self.parameterAsDouble(parameters, self.THRESHOLD, context)
        mode = BACKEND_MODES[self.parameterAsEnum(parameters, self.BACKEND, context)]
        python = self.parameterAsString(parameters, self.PYTHON, context) or _settings().python()
        try:
            hits = run_search(gpkg, query, k, mode, python,
                              model=self.parameterAsString(parameters, self.MODEL, context) or None,
                              device=self.parameterAsString(parameters, self.DEVICE, context) or None,
                              cb=Callbacks(should_cancel=feedback.isCanceled))
        except RunError as exc:
            raise QgsProcessingException(str(exc)) from None
        hits = [h for h in hits if h.get("score") is None or h["score"] >= threshold]

        fields = QgsFields(layer.fields())
        fields.append(QgsField("rank", field_type("Int")))
        fields.append(QgsField("score", field_type("Double")))
        sink, dest = self.parameterAsSink(parameters, self.OUTPUT, context, fields, layer.wkbType(), layer.crs())
        by_id = {}
        if hits:
            from qgis.core import QgsFeatureRequest

            for feat in layer.getFeatures(QgsFeatureRequest().setFilterExpression(tile_filter([h["tile_id"] for h in hits]))):
                by_id[feat["tile_id"]] = feat
        for rank, hit in enumerate(hits, 1):
            src = by_id.get(hit["tile_id"])
            if src is None:
                continue
            feat = QgsFeature(fields)
            feat.setGeometry(src.geometry())
            feat.setAttributes(list(src.attributes()) + [rank, hit.get("score")])
            sink.addFeature(feat, QgsFeatureSink.Flag.FastInsert)
            feedback.pushInfo(f"{rank:>3}. {hit.get('score'):.3f}  tile {hit['tile_id']}: {hit.get('caption')}")
        return {self.OUTPUT: dest, "HITS": json.dumps(hits)}


class RscaptionProvider(QgsProcessingProvider):
    def id(self):
        return "rscaption"

    def name(self):
        return "rscaption"

    def longName(self):
        return "rscaption — remote-sensing tile captioning and text search"

    def icon(self):
        return QIcon(icon_path("rscaption.svg"))

    def loadAlgorithms(self):
        self.addAlgorithm(CaptionAlgorithm())
        self.addAlgorithm(SearchAlgorithm())
        from .core.change_algorithm import ChangeAlgorithm  # rscaption:change, in its own module

        self.addAlgorithm(ChangeAlgorithm())

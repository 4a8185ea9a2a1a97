"""Turn a QGIS raster layer into a file path the backend (rasterio) can read, or refuse clearly.

The backend reads rasters with rasterio in another thread or process, so only a file on disk is
usable directly. Web services are refused with a sentence that says what to do; local non-file
layers (memory, virtual rasters, calculator outputs) can be written to a GeoTIFF for the
requested extent first.
"""

from __future__ import annotations

import os
import tempfile

from qgis.core import (
    QgsCoordinateTransform,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterFileWriter,
    QgsRasterLayer,
    QgsRasterPipe,
    QgsRectangle,
)

from .qgis_compat import RASTER_WRITE_OK

NETWORK_PROVIDERS = {"wms", "wcs", "arcgismapserver", "arcgisfeatureserver", "xyz", "mbtilesvectortiles",
                     "postgresraster"}


class RasterSourceError(ValueError):
    """The layer cannot be handed to the backend; str() tells the user what to do instead."""


def raster_file_path(layer: QgsRasterLayer) -> str | None:
    """The local file behind a GDAL raster layer, or None when there is none."""
    if layer is None or layer.providerType() != "gdal":
        return None
    parts = QgsProviderRegistry.instance().decodeUri("gdal", layer.source())
    path = parts.get("path") or layer.source()
    if not path or path.startswith("/vsi") or "://" in path:
        return None
    return path if os.path.isfile(path) else None


def check_raster(layer: QgsRasterLayer) -> str:
    """A readable file path for ``layer``; raises RasterSourceError with the reason otherwise."""
    if layer is None or not layer.isValid():
        raise RasterSourceError("choose a valid raster layer")
    provider = layer.providerType()
    if provider in NETWORK_PROVIDERS:
        raise RasterSourceError(
            f"'{layer.name()}' is a web/database layer ({provider}); rscaption reads raster files. "
            "Save the area you need with Raster > Conversion > Translate (or right-click > Export > "
            "Save As... GeoTIFF) and caption that file.")
    path = raster_file_path(layer)
    if path is None:
        raise RasterSourceError(
            f"'{layer.name()}' is not a raster file on disk ({provider} layer); "
            "use \"write a temporary GeoTIFF\" or export it to GeoTIFF first.")
    return path


def can_export(layer: QgsRasterLayer) -> bool:
    return layer is not None and layer.isValid() and layer.providerType() not in NETWORK_PROVIDERS


def export_to_geotiff(layer: QgsRasterLayer, extent: QgsRectangle | None = None, path: str | None = None) -> str:
    """Write the layer (raw band values, not the rendered image) for ``extent`` (layer CRS) to a
    GeoTIFF at native resolution; used for virtual/memory layers the backend cannot open."""
    if not can_export(layer):
        raise RasterSourceError(f"'{layer.name()}' cannot be exported here; save it as GeoTIFF first")
    provider = layer.dataProvider()
    full = layer.extent()
    extent = QgsRectangle(full if extent is None or extent.isEmpty() else full.intersect(extent))
    if extent.isEmpty():
        raise RasterSourceError("the chosen extent does not overlap the raster")
    xres = layer.rasterUnitsPerPixelX() or 1.0
    yres = layer.rasterUnitsPerPixelY() or 1.0
    width = max(1, int(round(extent.width() / xres)))
    height = max(1, int(round(extent.height() / yres)))
    if path is None:
        path = os.path.join(tempfile.mkdtemp(prefix="rscaption-raster-"), f"{layer.name() or 'raster'}.tif")
    pipe = QgsRasterPipe()
    if not pipe.set(provider.clone()):
        raise RasterSourceError(f"cannot read '{layer.name()}' for export")
    writer = QgsRasterFileWriter(path)
    writer.setOutputFormat("GTiff")
    err = writer.writeRaster(pipe, width, height, extent, layer.crs(), QgsProject.instance().transformContext())
    if err != RASTER_WRITE_OK:
        raise RasterSourceError(f"writing a temporary GeoTIFF for '{layer.name()}' failed (error {int(err)})")
    return path


def extent_in_layer_crs(rect: QgsRectangle, src_crs, layer) -> QgsRectangle:
    if src_crs is None or not src_crs.isValid() or src_crs == layer.crs():
        return QgsRectangle(rect)
    xform = QgsCoordinateTransform(src_crs, layer.crs(), QgsProject.instance())
    return xform.transformBoundingBox(rect)

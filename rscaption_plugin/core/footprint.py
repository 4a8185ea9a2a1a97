"""Ground footprint of the caption dialog's tiles, from a layer's CRS and pixel size.

The dialog shows what ``--tile-size auto`` will pick before anything runs, so it measures the
ground resolution through the QGIS API (works for any raster layer, and QGIS's Python may have no
rasterio) and hands the numbers to the backend's pure-Python helpers (``rscaption.raster.ground`` for the
metres, ``rscaption.raster.tile_size`` for the choice and the sentence), which the CLI and the worker use
too: the dialog and the run say the same thing.
"""

from __future__ import annotations

import math

from qgis.core import QgsUnitTypes

from .paths import ensure_backend_on_path
from .qgis_compat import DISTANCE_DEGREES, DISTANCE_METERS, DISTANCE_UNKNOWN

ensure_backend_on_path()
from rscaption.raster.ground import pixel_metres  # noqa: E402  (pure maths, no rasterio/torch)
from rscaption.raster.tile_size import TileChoice, choose_tile_size  # noqa: E402


def layer_ground_resolution(layer) -> float | None:
    """Metres per pixel of a raster layer; None without a valid CRS or with unknown units."""
    if layer is None or not layer.crs().isValid():
        return None
    crs = layer.crs()
    px, py = layer.rasterUnitsPerPixelX(), layer.rasterUnitsPerPixelY()
    if not (px > 0 and py > 0):
        return None
    if crs.mapUnits() == DISTANCE_UNKNOWN:
        return None
    try:
        if crs.isGeographic():
            to_deg = QgsUnitTypes.fromUnitToUnitFactor(crs.mapUnits(), DISTANCE_DEGREES)
            lat = layer.extent().center().y() * to_deg
            res = pixel_metres((px, 0.0), (0.0, py), angular_factor=math.radians(to_deg), lat_deg=lat)
        else:
            to_m = QgsUnitTypes.fromUnitToUnitFactor(crs.mapUnits(), DISTANCE_METERS)
            res = pixel_metres((px, 0.0), (0.0, py), linear_factor=to_m)
    except (TypeError, ValueError):
        return None
    m = res.m_per_px
    return m if math.isfinite(m) and m > 0 else None


def tile_choice(layer, card: dict, tile_px: int | None = None, declared_m: float | None = None) -> TileChoice:
    """What a run would use: ``tile_px`` None means auto; ``declared_m`` is the ground resolution
    a person gave for a layer without a CRS (the layer's own measure wins, as in the backend)."""
    return choose_tile_size(card or {}, layer_ground_resolution(layer) or declared_m or None, tile_px)

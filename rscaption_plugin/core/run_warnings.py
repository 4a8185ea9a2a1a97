"""Warnings about a run's input, said in the caption dialog before anything starts.

The backend logs the same warnings when the run starts (``rscaption.raster.input_check``), but a
log line at Info level is where nobody looks: a person choosing a 60 m/px raster for a model
trained at 0.3-10 m/px, or a raster without a CRS, should read it beside the Caption button. The
resolution sentence is the backend's own function (pure Python), so the dialog and the run say
the same words; the rest reads the layer through the QGIS API (QGIS's Python may lack rasterio).
"""

from __future__ import annotations

from qgis.core import Qgis

from .paths import ensure_backend_on_path

ensure_backend_on_path()
from rscaption.raster.tile_size import resolution_warning  # noqa: E402  (pure maths, no rasterio/torch)

NO_CRS = ("warning: this raster has no CRS, so its ground resolution is unknown: tiles are cut at the "
          "model's pixel size whatever ground they cover, and captions and their confidence are guesses. "
          "Enter its ground resolution (metres per pixel) to fix both")
FLOAT_BAND = ("warning: one floating-point band (an elevation model, slope or index?) is not imagery; "
              "captions of it will be guesses")
_FLOATS = (Qgis.DataType.Float32, Qgis.DataType.Float64)


def has_crs(layer) -> bool:
    return layer is not None and layer.crs().isValid()


def input_warnings(layer, card: dict, m_per_px: float | None, bands: list[int] | None = None) -> list[str]:
    """One line per problem with ``layer`` as input for a model with ``card`` at ``m_per_px``
    (measured, or given for a layer without a CRS; None: unknown)."""
    if layer is None:
        return []
    found = []
    if not has_crs(layer) and not m_per_px:
        found.append(NO_CRS)
    chosen = bands or list(range(1, layer.bandCount() + 1))
    if layer.bandCount() == 1 and chosen and _is_float(layer, chosen[0]):
        found.append(FLOAT_BAND)
    far = resolution_warning(card or {}, m_per_px)
    if far:
        found.append(far)
    return found


def _is_float(layer, band: int) -> bool:
    try:
        return layer.dataProvider().dataType(band) in _FLOATS
    except (AttributeError, TypeError, ValueError):
        return False


def unique(lines) -> list[str]:
    """Lines in order, each once (the dialog's and the backend's resolution warnings are the same
    sentence)."""
    seen, out = set(), []
    for line in lines:
        if line and line not in seen:
            seen.add(line)
            out.append(line)
    return out

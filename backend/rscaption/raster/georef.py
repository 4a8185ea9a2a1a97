"""Where a raster's pixels lie when the file has ground control points instead of a geotransform.

Scanned maps and many level-1 satellite products carry GCPs and no geotransform: GDAL then reports
the identity transform and no CRS, and without this the tiles' polygons landed in pixel coordinates,
nowhere near the map. An affine transform fitted to the GCPs (GDAL's least squares, through
``rasterio.transform.from_gcps``) places them in the GCPs' CRS. GCPs that give no affine transform
(fewer than three, or all on one line) leave pixel coordinates; GCPs that bend (a warped scan) more
than :data:`MAX_MISFIT_PX` away from their fit are still used, said to be approximate. Every case
other than a plain geotransform comes with one line for the user (:attr:`Georef.note`).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

MAX_MISFIT_PX = 1.0  # an affine fit further than this from a GCP places tiles visibly wrong


@dataclass(frozen=True)
class Georef:
    transform: object | None  # affine.Affine; None: pixel coordinates (no georeferencing)
    crs: object | None  # rasterio CRS or None
    source: str  # "geotransform", "gcps" or "none"
    note: str | None = None  # one line for the user when the placement is not a plain geotransform


def dataset_georef(ds) -> Georef:
    """The transform and CRS the tiles are placed with, for an open rasterio dataset."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        transform, crs = ds.transform, ds.crs
        gcps, gcp_crs = ds.gcps if transform.is_identity else ([], None)
    if gcps:
        return _from_gcps(gcps, gcp_crs or crs, os.path.basename(ds.name))
    if crs is None and transform.is_identity:
        return Georef(None, None, "none")
    return Georef(transform, crs, "geotransform")


def georef_note(path: str) -> str | None:
    """The one line :func:`dataset_georef` has for ``path`` (None for a plain geotransform or an
    unreadable file: the tiler reports that in its own words)."""
    import rasterio

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(path) as ds:
                return dataset_georef(ds).note
    except Exception:
        return None


def _from_gcps(gcps, crs, name: str) -> Georef:
    from rasterio.transform import from_gcps

    n = len(gcps)
    try:
        fit = from_gcps(gcps)
        inverse = ~fit  # a degenerate fit (GDAL gives all zeros) has no inverse
    except Exception:
        fit = inverse = None
    if fit is None or not all(math.isfinite(v) for v in fit[:6]) or fit.determinant == 0:
        return Georef(None, None, "none",
                      f"warning: {name} has no geotransform and its {n} GCP(s) give no affine transform "
                      "(fewer than 3, or all on one line): tiles are placed in pixel coordinates; "
                      "georeference it first (gdalwarp)")
    misfit = max(math.hypot(c - g.col, r - g.row)
                 for g in gcps for c, r in [_apply(inverse, g.x, g.y)])
    where = f" ({_crs_name(crs)})" if crs is not None else " (no CRS given with them)"
    if misfit > MAX_MISFIT_PX:
        return Georef(fit, crs, "gcps",
                      f"warning: {name} has no geotransform; its {n} GCPs are not affine (off by up to "
                      f"{misfit:.1f} px from the best fit{where}): tile polygons are approximate; "
                      "warp it (gdalwarp) for exact placement")
    return Georef(fit, crs, "gcps",
                  f"note: {name} has no geotransform: tiles are placed by an affine fit to its {n} GCPs{where}")


def _apply(t, x: float, y: float) -> tuple[float, float]:
    return t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f


def _crs_name(crs) -> str:
    try:
        epsg = crs.to_epsg()
    except Exception:
        epsg = None
    return f"EPSG:{epsg}" if epsg else "its own CRS"


__all__ = ["Georef", "dataset_georef", "georef_note", "MAX_MISFIT_PX"]

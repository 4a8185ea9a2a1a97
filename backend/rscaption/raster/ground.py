"""Ground resolution of a raster in metres per pixel, for choosing tiles by footprint.

A captioner sees a tile as a fixed number of pixels, but what it learned is a patch of ground: a
model trained on 256 px at 0.3 m (77 m of ground) needs far fewer pixels per tile on a 10 m
Sentinel-2 scene. Everything here answers "how many metres does one (output) pixel cover".

The maths (:func:`pixel_metres`) imports nothing beyond ``math`` so the QGIS plugin can use it with
values read through the QGIS API, in a QGIS Python without rasterio; only
:func:`ground_resolution`, which reads a file, imports rasterio (inside the call).

Projected CRSs: the pixel vectors' lengths times the CRS's linear unit in metres (feet CRSs
exist). Like the CRS's own grid, this ignores the projection's scale factor (at most a few per
mil for UTM/State Plane; Web Mercator overstates ground size away from the equator).
Geographic CRSs: the pixel's extent in metres at the raster centre, from the WGS84 ellipsoid's
meridional and prime-vertical radii of curvature, which is exact to first order over one pixel
(ellipsoid choice changes it by well under 0.1 %). Non-square pixels (every geographic raster
away from the equator) are summarised by the geometric mean of their sides, the side of a square
pixel of the same area, so a tile's area on the ground is what the model expects.
No CRS or no geotransform: None, and the caller keeps a pixel tile size (GCPs without a
geotransform count as the affine fit the tiler places tiles with, ``georef.py``).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

# WGS84: semi-major axis and first eccentricity squared.
_A = 6378137.0
_E2 = 6.69437999014e-3


@dataclass(frozen=True)
class GroundResolution:
    x_m: float  # metres covered by one step along a row (one column)
    y_m: float  # metres covered by one step down a column (one row)

    @property
    def m_per_px(self) -> float:
        return math.sqrt(self.x_m * self.y_m)


def pixel_metres(col_vec: tuple[float, float], row_vec: tuple[float, float], *,
                 linear_factor: float | None = None, angular_factor: float | None = None,
                 lat_deg: float | None = None) -> GroundResolution:
    """Metres of one pixel from its geotransform vectors (col_vec = (a, d), row_vec = (b, e)).

    Give ``linear_factor`` (metres per CRS unit) for a projected CRS, or ``angular_factor``
    (radians per CRS unit) and the centre latitude ``lat_deg`` for a geographic one.
    """
    if linear_factor is not None:
        return GroundResolution(math.hypot(*col_vec) * linear_factor, math.hypot(*row_vec) * linear_factor)
    if angular_factor is None or lat_deg is None:
        raise ValueError("pixel_metres needs linear_factor, or angular_factor and lat_deg")
    phi = math.radians(max(-89.9, min(89.9, lat_deg)))
    w = 1.0 - _E2 * math.sin(phi) ** 2
    east = _A / math.sqrt(w) * math.cos(phi)  # metres per radian of longitude
    north = _A * (1.0 - _E2) / w ** 1.5  # metres per radian of latitude

    def length(vec):
        return math.hypot(vec[0] * angular_factor * east, vec[1] * angular_factor * north)

    return GroundResolution(length(col_vec), length(row_vec))


def ground_resolution(path, target_resolution: float | None = None) -> GroundResolution | None:
    """Metres per output pixel of a raster file, or None without a CRS/geotransform.

    ``target_resolution`` is the tiler's resampling target in CRS units per pixel (``--resolution``);
    the output pixel is then that much larger or smaller than the native one.
    Raises :class:`RasterError` (one line) when the file cannot be opened.
    """
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    from ..errors import RasterError
    from .georef import dataset_georef

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(str(path)) as ds:
                geo = dataset_georef(ds)  # GCPs without a geotransform: their affine fit, like the tiler
                crs, t, width, height = geo.crs, geo.transform, ds.width, ds.height
    except RasterioError as exc:
        if not os.path.exists(str(path)) and "://" not in str(path) and not str(path).startswith("/vsi"):
            raise RasterError(f"raster not found: {path}") from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RasterError(f"cannot open {path} as a raster: {first}") from None
    if crs is None or t is None or t.is_identity:
        return None
    col_vec, row_vec = (t.a, t.d), (t.b, t.e)
    try:
        if crs.is_geographic:
            cy = t.f + t.d * width / 2.0 + t.e * height / 2.0
            _, rad_per_unit = crs.units_factor
            # the centre's latitude in degrees, whatever angular unit the CRS counts in
            res = pixel_metres(col_vec, row_vec, angular_factor=rad_per_unit,
                               lat_deg=math.degrees(cy * rad_per_unit))
        else:
            _, m_per_unit = crs.linear_units_factor
            res = pixel_metres(col_vec, row_vec, linear_factor=m_per_unit)
    except Exception:  # a CRS without usable units (engineering, local): no metres to give
        return None
    if target_resolution:
        native = (math.hypot(*col_vec), math.hypot(*row_vec))
        res = GroundResolution(res.x_m * target_resolution / native[0], res.y_m * target_resolution / native[1])
    if not (math.isfinite(res.m_per_px) and res.m_per_px > 0):
        return None
    return res


__all__ = ["GroundResolution", "pixel_metres", "ground_resolution"]

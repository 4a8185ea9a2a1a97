"""The after date read on the before date's tile grid.

Two dates only compare tile by tile if tile (row, col) covers the same ground on both. The later
raster is therefore never tiled on its own grid: it is warped (rasterio ``WarpedVRT``: reprojected
and resampled) onto the earlier raster's CRS, transform and size, and that virtual raster is what
the caption pipeline tiles, with the earlier raster's tiling parameters. Ground outside the later
raster becomes nodata there (its nodata value, or an added alpha band when it has none), so those
tiles are skipped by the tiler and reported as not scored, never as changed.

The VRT is a small XML file beside the run's other work files; its bytes depend only on both
rasters' georeferencing and the later raster's path, so a resumed run finds it unchanged and the
caption store's fingerprint check passes.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from ..errors import RasterError

RESOLUTION_WARN_RATIO = 2.0


@dataclass(frozen=True)
class Grid:
    """A raster's pixel grid: what the before date's tiles are cut from."""
    crs_wkt: str | None
    transform: tuple  # the 6 affine coefficients a, b, c, d, e, f
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        a, b, c, d, e, f = self.transform
        xs = [c + a * i + b * j for i in (0, self.width) for j in (0, self.height)]
        ys = [f + d * i + e * j for i in (0, self.width) for j in (0, self.height)]
        return min(xs), min(ys), max(xs), max(ys)

    def same_as(self, other: "Grid") -> bool:
        """Same size, same CRS and transforms equal to a thousandth of a pixel."""
        if (self.width, self.height) != (other.width, other.height) or not _same_crs(self.crs_wkt, other.crs_wkt):
            return False
        px = max(abs(self.transform[0]), abs(self.transform[4]), 1e-12)
        return all(abs(x - y) <= 1e-3 * px for x, y in zip(self.transform, other.transform))

    def to_dict(self) -> dict:
        return {"crs_wkt": self.crs_wkt, "transform": list(self.transform), "width": self.width,
                "height": self.height}


def raster_grid(path: str) -> Grid:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                return Grid(ds.crs.to_wkt() if ds.crs else None, tuple(ds.transform)[:6], ds.width, ds.height)
    except RasterioError as exc:
        raise RasterError(f"cannot open {path} as a raster: {' '.join(str(exc).split())}") from None


def store_grid(meta: dict, path: str) -> Grid:
    """The grid a caption file was cut from (its ``tiling`` metadata)."""
    t = meta.get("tiling") or {}
    try:
        return Grid(t.get("crs_wkt"), tuple(float(v) for v in t["transform"]), int(t["width"]), int(t["height"]))
    except (KeyError, TypeError, ValueError):
        raise RasterError(f"{path} does not record the grid it was tiled from (metadata 'tiling'); "
                          "give its raster instead") from None


def _same_crs(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return not a and not b
    if a == b:
        return True
    from rasterio.crs import CRS

    try:
        return CRS.from_wkt(a) == CRS.from_wkt(b)
    except Exception:
        return False


def overlap(grid: Grid, after_path: str) -> tuple[float, str]:
    """(fraction of the before grid's area the after raster covers, one line saying it). No
    overlap at all is an error: there is nothing to compare."""
    import rasterio
    from rasterio.warp import transform_bounds

    with rasterio.open(after_path) as ds:
        a_bounds, a_crs = ds.bounds, ds.crs
    b = grid.bounds
    if grid.crs_wkt and a_crs is not None:
        try:
            a = transform_bounds(a_crs, grid.crs_wkt, *a_bounds, densify_pts=21)
        except Exception as exc:
            raise RasterError(f"cannot bring {after_path} into the before raster's CRS: {exc}") from None
    else:
        a = tuple(a_bounds)
    w = max(0.0, min(b[2], a[2]) - max(b[0], a[0]))
    h = max(0.0, min(b[3], a[3]) - max(b[1], a[1]))
    area = (b[2] - b[0]) * (b[3] - b[1])
    frac = (w * h / area) if area > 0 else 0.0
    if frac <= 0:
        raise RasterError(f"{os.path.basename(after_path)} does not overlap the before raster: nothing to compare")
    if frac >= 0.999:
        return frac, "overlap: the after raster covers the whole before raster"
    return frac, (f"overlap: the after raster covers {100 * frac:.1f} % of the before raster; only tiles inside "
                  "the overlap are compared (the others say 'no data on the after date')")


def input_warnings(before: str | None, after: str, before_m: float | None = None) -> list[str]:
    """Differences that make appearance differ for reasons other than the ground: resolution (more
    than 2x either way) and what the bands mean (count, colour interpretation, type, names).
    ``before`` None (a reused caption file whose raster is gone): the resolution check alone, from
    ``before_m``."""
    import rasterio

    from ..raster.ground import ground_resolution

    out = []
    rb, ra = ground_resolution(before) if before else None, ground_resolution(after)
    mb = rb.m_per_px if rb else before_m
    if mb and ra and mb > 0 and ra.m_per_px > 0:
        ratio = max(mb, ra.m_per_px) / min(mb, ra.m_per_px)
        if ratio > RESOLUTION_WARN_RATIO:
            which = "coarser" if ra.m_per_px > mb else "finer"
            out.append(f"warning: the after raster is {ratio:.1f}x {which} than the before raster "
                       f"({ra.m_per_px:.3g} vs {mb:.3g} m per pixel); it is resampled to the before grid, "
                       "and differences of sharpness can read as change")
    if not before:
        return out
    with rasterio.open(before) as b, rasterio.open(after) as a:
        diffs = []
        if b.count != a.count:
            diffs.append(f"{b.count} vs {a.count} bands")
        n = min(b.count, a.count, 4)
        ci_b = [c.name for c in b.colorinterp[:n]]
        ci_a = [c.name for c in a.colorinterp[:n]]
        if ci_b != ci_a and not (b.count == a.count and _rgb_like(ci_b) == _rgb_like(ci_a)):
            diffs.append(f"colour interpretation {'/'.join(ci_b)} vs {'/'.join(ci_a)}")
        if b.dtypes[0] != a.dtypes[0]:
            diffs.append(f"{b.dtypes[0]} vs {a.dtypes[0]} values")
        db, da = [d for d in b.descriptions[:n]], [d for d in a.descriptions[:n]]
        if any(db) and any(da) and db != da:
            diffs.append(f"band names {db} vs {da}")
        if diffs:
            out.append("warning: the two rasters' bands may not mean the same (" + "; ".join(diffs) +
                       "); each is read as RGB by its own colour interpretation, so a change of bands reads as change")
    return out


def _rgb_like(ci: list[str]) -> bool:
    return ci[:3] == ["red", "green", "blue"]


def aligned_after(after: str, grid: Grid, workdir: str, before_m: float | None = None) -> tuple[str, bool]:
    """A raster on ``grid`` with the after date's pixels: ``after`` itself when it already is on it,
    else a warped VRT in ``workdir``. Returns (path, warped). ``before_m``: the grid's metres per
    pixel; a much finer after raster is averaged down rather than sampled bilinearly (aliasing)."""
    if raster_grid(after).same_as(grid):
        return after, False
    import rasterio
    import rasterio.shutil
    from rasterio.enums import ColorInterp, Resampling
    from rasterio.vrt import WarpedVRT

    os.makedirs(workdir, exist_ok=True)
    target = os.path.join(workdir, "after_on_before_grid.vrt")
    with rasterio.open(os.path.abspath(after)) as src:
        if grid.crs_wkt is None or src.crs is None:
            raise RasterError("cannot put the after raster on the before raster's grid: "
                              f"{'the before' if grid.crs_wkt is None else 'the after'} raster has no CRS")
        from ..raster.ground import ground_resolution

        ra = ground_resolution(after)
        finer = bool(before_m and ra and ra.m_per_px * 1.5 < before_m)
        has_mask = src.nodata is not None or ColorInterp.alpha in src.colorinterp
        with WarpedVRT(src, crs=grid.crs_wkt, transform=_affine(grid.transform), width=grid.width,
                       height=grid.height, resampling=Resampling.average if finer else Resampling.bilinear,
                       add_alpha=not has_mask) as vrt:
            tmp = target + ".tmp.vrt"
            rasterio.shutil.copy(vrt, tmp, driver="VRT")
    _replace_if_changed(tmp, target)
    return target, True


def _replace_if_changed(tmp: str, target: str) -> None:
    """Keep the old file (and its mtime) when the bytes are the same: a resume sees the same raster."""
    with open(tmp, "rb") as f:
        new = f.read()
    if os.path.exists(target):
        with open(target, "rb") as f:
            if f.read() == new:
                os.remove(tmp)
                return
    os.replace(tmp, target)


def _affine(t):
    from affine import Affine

    return Affine(*t[:6])

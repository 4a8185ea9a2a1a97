"""Warnings before a run for inputs that are not the imagery a captioner was trained on.

A one-band floating-point raster is almost always an elevation model, a slope or an index: the
pipeline stretches it to grey and the model writes confident imagery captions about it ("cars
parked in the airport" on a DSM). Saying so before the run costs one metadata read.

The same read says how tiles are placed when the raster has GCPs and no geotransform
(``georef.py``), and whether a requested resolution enlarges each tile from a handful of source
pixels (``--resolution 1e-9`` made 65,536 one-pixel tiles without a word).
"""

from __future__ import annotations

import math

# A tile enlarged more than this many times (per side) from its source pixels is mostly blur.
UPSAMPLE_WARN = 4.0


def imagery_warning(path: str, bands=None) -> str | None:
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    try:
        with warnings.catch_warnings():  # no CRS is said once, in the tile-size line
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                count, dtypes = src.count, src.dtypes
    except Exception:
        return None  # the tiler reports unreadable rasters in its own words
    chosen = [dtypes[b - 1] for b in bands if 1 <= b <= count] if bands else list(dtypes)
    if count == 1 and chosen and chosen[0].startswith("float"):
        return ("warning: one floating-point band (an elevation model, slope or index?) is not imagery; "
                "captions of it will be guesses")
    return None


def upsample_warning(path: str, tiling) -> str | None:
    """One line when ``tiling`` (TilingParams) reads each tile from far fewer source pixels than
    it has: the source pixels per tile and the factor, from the tiler's own arithmetic."""
    if tiling is None or not tiling.target_resolution:
        return None
    import warnings

    import rasterio

    from .georef import dataset_georef
    from .tiling import source_tile_px, upsample_factor

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(path) as src:
                t = dataset_georef(src).transform
    except Exception:
        return None
    res = (math.hypot(t.a, t.d), math.hypot(t.b, t.e)) if t is not None else (1.0, 1.0)
    if not all(r > 0 for r in res):
        return None
    size, target = tiling.tile_size, tiling.target_resolution
    sx, sy = source_tile_px(size, (target / res[0], target / res[1]))
    factor = upsample_factor(size, (sx, sy))
    if factor <= UPSAMPLE_WARN:
        return None
    return (f"warning: each {size} px tile is upsampled {factor:,.0f}x from {sx} x {sy} source pixels "
            f"(resolution {target:g} against the raster's {math.sqrt(res[0] * res[1]):g} per pixel): "
            "the captions describe blur; a coarser resolution gives fewer, sharper tiles")


def input_warnings(path: str, card: dict, m_per_px: float | None, bands=None, tiling=None) -> list[str]:
    from .georef import georef_note
    from .tile_size import resolution_warning

    found = (georef_note(path), imagery_warning(path, bands), upsample_warning(path, tiling),
             resolution_warning(card, m_per_px))
    return [w for w in found if w]

"""Warnings before a run for inputs that are not the imagery a captioner was trained on.

A one-band floating-point raster is almost always an elevation model, a slope or an index: the
pipeline stretches it to grey and the model writes confident imagery captions about it ("cars
parked in the airport" on a DSM). Saying so before the run costs one metadata read.
"""

from __future__ import annotations


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


def input_warnings(path: str, card: dict, m_per_px: float | None, bands=None) -> list[str]:
    from .tile_size import resolution_warning

    return [w for w in (imagery_warning(path, bands), resolution_warning(card, m_per_px)) if w]

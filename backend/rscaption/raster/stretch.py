"""Contrast stretch from any raster data type to the uint8 images the models were trained on.

Captioning models see 8-bit photographs, so 16-bit, integer and float rasters must be mapped to
0-255. A per-tile stretch would make neighbouring tiles disagree (the same roof bright in one tile,
dark in the next) and would change with the tile size, so the stretch is computed **once per
raster**, from a decimated read of the whole tiling region (GDAL serves it from an overview when the
file has one), and applied unchanged to every tile. The sample is bounded (``MAX_SAMPLE_SIDE`` on
the long side), so computing it costs the same memory for a 1 GB raster as for a 1 MB one.

uint8 rasters are passed through untouched: they already are display-ready imagery, and stretching
them would change the colours the models expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_SAMPLE_SIDE = 1024


def sample_shape(height: int, width: int, max_side: int = MAX_SAMPLE_SIDE) -> tuple[int, int]:
    """Shape of the decimated read used for statistics: the region itself when small enough."""
    scale = min(1.0, max_side / max(height, width, 1))
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass(frozen=True)
class Stretch:
    """Linear map ``low -> 0, high -> 255`` per source band; ``method='none'`` leaves uint8 as is."""

    method: str  # "none" or "percentile"
    bands: tuple[int, ...]  # 1-based source bands the lows/highs belong to
    lows: tuple[float, ...]
    highs: tuple[float, ...]
    percentiles: tuple[float, float]

    def apply(self, data: np.ndarray) -> np.ndarray:
        """(bands, H, W) array of the source bands in ``self.bands`` order -> uint8, NaN -> 0."""
        if self.method == "none":
            return data.astype(np.uint8, copy=False)
        out = np.empty(data.shape, dtype=np.uint8)
        for i, (low, high) in enumerate(zip(self.lows, self.highs)):
            band = (data[i].astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
            np.clip(band, 0, 255, out=band)
            out[i] = np.nan_to_num(np.rint(band), nan=0.0)
        return out

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "bands": list(self.bands),
            "lows": [float(v) for v in self.lows],
            "highs": [float(v) for v in self.highs],
            "percentiles": list(self.percentiles),
        }


def identity(bands: tuple[int, ...], percentiles: tuple[float, float]) -> Stretch:
    return Stretch("none", tuple(bands), (0.0,) * len(bands), (255.0,) * len(bands), tuple(percentiles))


def percentile_stretch(
    sample: np.ndarray, valid: np.ndarray, bands: tuple[int, ...], percentiles: tuple[float, float]
) -> Stretch:
    """Per-band percentiles of ``sample`` (bands, H, W) over ``valid`` (bands, H, W) bool pixels.

    Nodata, masked and non-finite pixels are left out, otherwise a -9999 nodata or a NaN border
    would drag the low end down and wash every tile out. A band with no valid pixel, or a constant
    band, still gets a usable (non-zero width) range so ``apply`` never divides by zero.
    """
    lows, highs = [], []
    for i in range(len(bands)):
        values = sample[i][valid[i] & np.isfinite(sample[i])]
        if values.size == 0:
            low, high = 0.0, 1.0
        else:
            low, high = (float(v) for v in np.percentile(values, percentiles))
            if not high > low:
                high = low + 1.0
        lows.append(low)
        highs.append(high)
    return Stretch("percentile", tuple(bands), tuple(lows), tuple(highs), tuple(percentiles))

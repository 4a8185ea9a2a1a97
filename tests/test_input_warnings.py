"""Warnings before a run: non-imagery inputs (one float band) and ground resolutions far from the
model card's, on real rasters through the real CLI."""

import subprocess
import sys

import numpy as np
import rasterio
from rasterio.transform import from_origin

from conftest import geotiff_path
from rscaption.raster.input_check import imagery_warning
from rscaption.raster.tile_size import resolution_warning

CARD = {"tile_size_by_resolution": [[0.3, 256], [10.0, 64]]}


def test_resolution_warning_only_far_outside_the_trained_range():
    assert resolution_warning(CARD, 0.3) is None and resolution_warning(CARD, 5.0) is None
    assert resolution_warning(CARD, 25.0) is None, "within 3x of the coarsest anchor"
    w = resolution_warning(CARD, 300.0)
    assert w.startswith("warning: 300") and "0.30-10.00 m/px" in w
    assert "m/px is far from" in resolution_warning(CARD, 0.05)
    assert resolution_warning(CARD, None) is None
    assert resolution_warning({"ground_resolution_m": 0.3}, 10.0).startswith("warning")
    assert resolution_warning({}, 300.0) is None


def test_one_float_band_is_not_imagery(tmp_path):
    assert "not imagery" in imagery_warning(str(geotiff_path("dsm_float32.tif")))
    assert imagery_warning(str(geotiff_path("RGB.byte.tif"))) is None
    assert imagery_warning(str(geotiff_path("byte.tif"))) is None, "one 8-bit band is a grey image"
    # a float RGB is imagery (reflectance); choosing its first band alone is not flagged either
    p = tmp_path / "refl.tif"
    with rasterio.open(p, "w", driver="GTiff", width=8, height=8, count=3, dtype="float32", crs="EPSG:32633",
                       transform=from_origin(0, 80, 10, 10)) as dst:
        dst.write(np.random.default_rng(0).random((3, 8, 8), dtype=np.float32))
    assert imagery_warning(str(p)) is None
    assert imagery_warning(str(tmp_path / "missing.tif")) is None


def test_cli_prints_the_warnings_before_captioning(tmp_path, tiny_model_dir):
    out = tmp_path / "dsm.gpkg"
    r = subprocess.run([sys.executable, "-m", "rscaption.cli", "caption", str(geotiff_path("dsm_float32.tif")),
                        "-o", str(out), "--model", tiny_model_dir, "--quiet"],
                       capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("tiles:"))
    assert "not imagery" in lines[i + 1]
    assert out.exists()

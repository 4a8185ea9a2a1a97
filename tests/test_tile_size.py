"""`--tile-size auto`: ground resolution of real and written rasters, the card's interpolation, and
the CLI / pipeline end to end with a tiny real model whose card carries resolution anchors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

from conftest import geotiff_path
from rscaption.errors import RasterError
from rscaption.raster.ground import ground_resolution, pixel_metres
from rscaption.store.gpkg import TileStore
from rscaption.raster.tile_size import auto_tile_size, choose_tile_size, describe_footprint

ANCHORS = [[0.3, 256], [10.0, 64]]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def write_raster(path: Path, crs=None, transform=None, size=(128, 128), seed=0) -> Path:
    """A random RGB uint8 GeoTIFF; ``crs``/``transform`` None writes an ungeoreferenced one."""
    width, height = size
    data = np.random.default_rng(seed).integers(0, 256, (3, height, width), dtype=np.uint8)
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint8"}
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(data)
    return path


def utm_raster(path: Path, res: float, size=(128, 128)) -> Path:
    return write_raster(path, "EPSG:32633", Affine(res, 0, 500000, 0, -res, 5000000), size)


def model_with_anchors(directory: Path, anchors=ANCHORS) -> str:
    """A tiny real captioner whose card says how tile size follows ground resolution, written the
    way a trained checkpoint carries it (``config.json`` "card")."""
    from rscaption.models.tiny import build_tiny_captioner

    build_tiny_captioner().save(str(directory))
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["card"]["tile_size_by_resolution"] = anchors
    config_path.write_text(json.dumps(config))
    return str(directory)


@pytest.fixture(scope="module")
def anchored_model(tmp_path_factory) -> str:
    return model_with_anchors(tmp_path_factory.mktemp("anchored_model"))


# -- the card's rule ---------------------------------------------------------------------------------
def test_anchors_interpolate_in_log_log_space_and_clamp_outside():
    card = {"tile_size_by_resolution": ANCHORS, "tile_size": 256, "ground_resolution_m": 0.3}
    assert auto_tile_size(card, 0.3) == 256 and auto_tile_size(card, 10.0) == 64
    # the geometric middle of the resolutions gets the geometric middle of the sizes
    assert auto_tile_size(card, math.sqrt(0.3 * 10.0)) == 128
    assert auto_tile_size(card, 5.0) == 84  # the NAIP case of the issue
    assert auto_tile_size(card, 0.05) == 256 and auto_tile_size(card, 300.0) == 64  # clamped to the ends
    # order in the card does not matter, and a third anchor bends the curve
    three = {"tile_size_by_resolution": [[10, 64], [0.3, 256], [1.0, 224]]}
    assert auto_tile_size(three, 1.0) == 224
    assert auto_tile_size(three, math.sqrt(0.3 * 1.0)) == round(math.sqrt(256 * 224))
    sizes = [auto_tile_size(card, r) for r in np.geomspace(0.1, 50, 40)]
    assert sizes == sorted(sizes, reverse=True)


def test_single_anchor_or_trained_resolution_keeps_the_footprint_within_limits():
    assert auto_tile_size({"tile_size_by_resolution": [[0.3, 256]]}, 0.6) == 128
    shipped = {"tile_size": 256, "ground_resolution_m": 0.3}  # the current default model's card
    assert auto_tile_size(shipped, 0.3) == 256
    assert auto_tile_size(shipped, 0.6) == 128
    assert auto_tile_size(shipped, 10.0) == 32  # 7.7 px would be useless: clamped to 32
    assert auto_tile_size(shipped, 0.05) == 1024  # 1536 px would be unaffordable: clamped to 1024
    # no hints at all: the card's pixel size, else 256; unknown resolution: the card's pixel size
    assert auto_tile_size({"tile_size": 200}, 10.0) == 200
    assert auto_tile_size({}, 10.0) == 256
    assert auto_tile_size({"tile_size_by_resolution": ANCHORS, "tile_size": 224}, None) == 224
    # broken anchors are ignored rather than crashing a run
    assert auto_tile_size({"tile_size_by_resolution": [["x", 1], [0, 5]], "tile_size": 96}, 3.0) == 96


def test_footprint_sentences():
    assert describe_footprint(84, 5.0, auto=True) == \
        "tiles: 84 px at 5.00 m/px = 420 m footprint (auto from the model card)"
    assert describe_footprint(256, None, auto=True) == \
        "tiles: 256 px (raster has no CRS: pixel tile size; footprint unknown)"
    assert describe_footprint(64, 300.0, auto=False) == \
        "tiles: 64 px at 300.00 m/px = 19.2 km footprint (as given)"
    choice = choose_tile_size({"tile_size_by_resolution": ANCHORS}, 10.0, "auto")
    assert (choice.tile_px, choice.footprint_m, choice.auto) == (64, 640.0, True)
    assert choose_tile_size({"tile_size_by_resolution": ANCHORS}, 10.0, 100).to_dict() == \
        {"tile_size": 100, "ground_resolution_m": 10.0, "footprint_m": 1000.0, "auto": False}


# -- ground resolution of rasters ---------------------------------------------------------------------
def test_real_naip_5m_in_utm_metres():
    raster = geotiff_path("m_4709963_se_14_1_20200831.tif")
    with rasterio.open(raster) as ds:
        assert ds.crs.to_epsg() == 26914
    res = ground_resolution(raster)
    assert res.m_per_px == pytest.approx(5.0, rel=1e-6)
    assert 80 <= auto_tile_size({"tile_size_by_resolution": ANCHORS}, res.m_per_px) <= 90


@pytest.mark.parametrize("res, tile_px", [(10.0, 64), (0.3, 256)])
def test_projected_rasters_in_metres(tmp_path, res, tile_px):
    got = ground_resolution(utm_raster(tmp_path / "utm.tif", res))
    assert (got.x_m, got.y_m) == (pytest.approx(res), pytest.approx(res))
    assert auto_tile_size({"tile_size_by_resolution": ANCHORS}, got.m_per_px) == tile_px


def test_us_feet_crs_is_converted_to_metres(tmp_path):
    # NAD83 / New York Long Island (ftUS), 1 ft pixels
    path = write_raster(tmp_path / "ft.tif", "EPSG:2263", Affine(1.0, 0, 980000, 0, -1.0, 200000))
    assert ground_resolution(path).m_per_px == pytest.approx(1200 / 3937, rel=1e-9)  # the US survey foot


def test_rotated_transform_uses_the_pixel_vector_lengths(tmp_path):
    transform = Affine.translation(500000, 5000000) @ Affine.rotation(30) @ Affine.scale(10, -10)
    got = ground_resolution(write_raster(tmp_path / "rot.tif", "EPSG:32633", transform))
    assert got.m_per_px == pytest.approx(10.0)


def test_geographic_raster_is_measured_in_metres_at_its_centre(tmp_path):
    step = 0.0001
    path = write_raster(tmp_path / "wgs84.tif", "EPSG:4326",
                        Affine(step, 0, 10.0, 0, -step, 45.0 + 64 * step))  # centred on 45 N
    got = ground_resolution(path)
    pyproj = pytest.importorskip("pyproj")
    geod = pyproj.Geod(ellps="WGS84")
    _, _, east = geod.inv(10.0064, 45.0, 10.0064 + step, 45.0)
    _, _, north = geod.inv(10.0064, 45.0 - step / 2, 10.0064, 45.0 + step / 2)
    assert got.x_m == pytest.approx(east, rel=1e-4) and got.y_m == pytest.approx(north, rel=1e-4)
    assert 7.8 < got.x_m < 8.0 and 11.0 < got.y_m < 11.2  # a degree of longitude shrinks with latitude
    assert got.m_per_px == pytest.approx(math.sqrt(east * north), rel=1e-4)


def test_resampling_target_resolution_is_what_the_tiles_get(tmp_path):
    path = utm_raster(tmp_path / "utm.tif", 10.0)
    assert ground_resolution(path, target_resolution=20.0).m_per_px == pytest.approx(20.0)
    step = 0.0001
    geo = write_raster(tmp_path / "geo.tif", "EPSG:4326", Affine(step, 0, 10.0, 0, -step, 45.0064))
    assert ground_resolution(geo, target_resolution=2 * step).m_per_px == \
        pytest.approx(2 * ground_resolution(geo).m_per_px)


def test_rasters_without_crs_have_no_ground_resolution(tmp_path):
    assert ground_resolution(write_raster(tmp_path / "plain.tif")) is None
    assert ground_resolution(write_raster(tmp_path / "nocrs.tif", None, Affine(10, 0, 0, 0, -10, 0))) is None
    with pytest.raises(RasterError, match="raster not found"):
        ground_resolution(tmp_path / "missing.tif")


def test_pixel_metres_needs_units():
    with pytest.raises(ValueError):
        pixel_metres((1, 0), (0, -1))


# -- pipeline and CLI ---------------------------------------------------------------------------------
def test_pipeline_without_tiling_picks_auto_and_records_it(tmp_path, anchored_model):
    from rscaption.models.registry import load_model
    from rscaption.engine.pipeline import caption_raster, default_tiling_for

    cap = load_model(anchored_model, device="cpu")
    raster = utm_raster(tmp_path / "utm10.tif", 10.0)
    assert default_tiling_for(cap, str(raster)).tile_size == 64
    assert default_tiling_for(cap, 0.3).tile_size == 256
    out = tmp_path / "auto.gpkg"
    summary = caption_raster(str(raster), str(out), model=cap, batch_size=4)
    assert summary.total == 4  # 128 px / 64 px tiles
    with TileStore.open(str(out)) as store:
        meta = store.metadata()
    assert meta["tiling_params"]["tile_size"] == 64
    assert meta["tile_footprint"] == {"tile_size": 64, "ground_resolution_m": pytest.approx(10.0),
                                      "footprint_m": pytest.approx(640.0), "auto": True}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rscaption.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=300)


@pytest.mark.slow
def test_cli_auto_prints_the_footprint_and_stores_the_tile_size(tmp_path, anchored_model):
    raster = utm_raster(tmp_path / "utm10.tif", 10.0)
    out = tmp_path / "cli.gpkg"
    r = run_cli("caption", str(raster), "-o", str(out), "--model", anchored_model, "-q")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "tiles: 64 px at 10.00 m/px = 640 m footprint (auto from the model card)" in lines
    assert lines[-1].startswith("done: 4 tiles captioned")
    with TileStore.open(str(out)) as store:
        meta = store.metadata()
    assert meta["tiling_params"]["tile_size"] == 64 and meta["tile_footprint"]["auto"] is True

    plain = write_raster(tmp_path / "plain.tif", size=(96, 96))
    r = run_cli("caption", str(plain), "-o", str(tmp_path / "plain.gpkg"), "--model", anchored_model,
                "--tile-size", "auto", "-q")
    assert r.returncode == 0, r.stderr
    assert "tiles: 256 px (raster has no CRS: pixel tile size; footprint unknown)" in r.stderr.splitlines()
    with TileStore.open(str(tmp_path / "plain.gpkg")) as store:
        assert store.metadata()["tiling_params"]["tile_size"] == 256


def test_cli_rejects_a_bad_tile_size_in_one_line():
    r = run_cli("caption", "x.tif", "-o", "x.gpkg", "--tile-size", "big")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--tile-size" in r.stderr.strip().splitlines()[-1]

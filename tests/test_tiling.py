"""Tiling against real GeoTIFFs: exact windows, polygons, masks, band choice, stretch, memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from conftest import geotiff_path
from rscaption.errors import RasterError
from rscaption.raster.tiling import RasterTiler, TilingParams

def windows(tiler):
    return [t.window for t in tiler.plan()]


def xy(t, col, row):
    return t.a * col + t.b * row + t.c, t.d * col + t.e * row + t.f


def ring(t, col, row, w, h):
    corners = ((col, row), (col, row + h), (col + w, row + h), (col + w, row), (col, row))
    return [(t.a * c + t.b * r + t.c, t.d * c + t.e * r + t.f) for c, r in corners]


def test_rgb_byte_exact_windows_and_polygons():
    path = geotiff_path("RGB.byte.tif")
    with RasterTiler(path, TilingParams(tile_size=256)) as tiler, rasterio.open(path) as ds:
        assert (tiler.width, tiler.height, tiler.epsg) == (791, 718, 32618)
        tiles = tiler.plan()
        cols, rows = [0, 256, 512, 535], [0, 256, 462]  # last ones shifted inward onto the edge
        assert windows(tiler) == [(c, r, 256, 256) for r in rows for c in cols]
        assert [t.tile_id for t in tiles] == list(range(12))
        assert [(t.row, t.col) for t in tiles] == [(r, c) for r in range(3) for c in range(4)]
        for t in tiles:
            assert np.allclose(t.polygon, ring(ds.transform, *t.window), rtol=0, atol=1e-6)
            xs, ys = zip(*t.polygon)
            assert t.bounds == pytest.approx((min(xs), min(ys), max(xs), max(ys)))
        # the last tile ends exactly on the raster's lower-right corner
        assert tiles[-1].bounds[2] == pytest.approx(ds.bounds.right)
        assert tiles[-1].bounds[1] == pytest.approx(ds.bounds.bottom)
        assert RasterTiler(path, TilingParams(tile_size=256)).plan() == tiles  # deterministic


def test_overlap_stride():
    with RasterTiler(geotiff_path("RGB.byte.tif"), TilingParams(tile_size=256, overlap=64)) as tiler:
        cols, rows = [0, 192, 384, 535], [0, 192, 384, 462]
        assert windows(tiler) == [(c, r, 256, 256) for r in rows for c in cols]


def test_extent_snapped_and_clipped():
    path = geotiff_path("RGB.byte.tif")
    with rasterio.open(path) as ds:
        t = ds.transform
    # pixel window cols 100..400, rows 50..350, nudged inside by a fraction of a pixel: snapped outward
    (minx, maxy), (maxx, miny) = xy(t, 100.3, 50.2), xy(t, 399.6, 349.9)
    with RasterTiler(path, TilingParams(tile_size=256, extent=(minx, miny, maxx, maxy))) as tiler:
        assert tiler.region == (100, 50, 300, 300)
        assert windows(tiler) == [(c, r, 256, 256) for r in (50, 94) for c in (100, 144)]
    # an extent reaching past the raster's top is clipped to it; smaller than a tile: read whole, padded
    (minx, maxy), (maxx, miny) = xy(t, 350, -50), xy(t, 450, 60)
    with RasterTiler(path, TilingParams(tile_size=256, extent=(minx, miny, maxx, maxy))) as tiler:
        assert tiler.region == (350, 0, 100, 60)
        assert windows(tiler) == [(350, 0, 100, 60)]
        image = tiler.read(tiler.plan()[0])
        assert image.array.shape == (256, 256, 3)
        assert image.array[:60, :100].any()
        assert not image.array[60:].any() and not image.array[:, 100:].any()  # padding


def test_nodata_corners_skipped_and_filled_black():
    path = geotiff_path("RGB.byte.tif")
    params = TilingParams(tile_size=64, nodata_threshold=1.0)  # skip only all-nodata tiles
    with RasterTiler(path, params) as tiler, rasterio.open(path) as ds:
        skipped = kept_partial = 0
        for tile in tiler.plan():
            win = Window(*tile.window)
            valid = ds.dataset_mask(window=win) > 0
            image = tiler.read(tile)
            if image is None:
                skipped += 1
                assert not valid.any()
                continue
            assert image.valid_fraction == pytest.approx(valid.mean())
            raw = np.moveaxis(ds.read(window=win), 0, -1)
            assert np.array_equal(image.array[valid], raw[valid])  # uint8 passes through unchanged
            assert not image.array[~valid].any()
            kept_partial += not valid.all()
        assert skipped > 0 and kept_partial > 0
    with RasterTiler(path, TilingParams(tile_size=64)) as tiler:  # default: skip when >= 95 % nodata
        assert sum(tiler.read(t) is None for t in tiler.plan()) >= skipped


@pytest.mark.parametrize("name", ["RGBA.byte.tif", "alpha.tif"])
def test_alpha_band_is_mask_not_colour(name):
    path = geotiff_path(name)
    with RasterTiler(path, TilingParams(tile_size=256, nodata_threshold=1.0)) as tiler, rasterio.open(path) as ds:
        assert tiler.bands == (1, 2, 3) and tiler.alpha_bands == (4,)
        seen = 0
        for tile in tiler.plan():
            alpha = ds.read(4, window=Window(*tile.window)) > 0
            image = tiler.read(tile)
            if not alpha.any():
                assert image is None
                continue
            seen += 1
            assert image.valid_fraction == pytest.approx(alpha.mean())
            assert not image.array[~alpha].any()
        assert seen > 0


def test_shade_nodata_255_threshold():
    path = geotiff_path("shade.tif")
    with RasterTiler(path, TilingParams(tile_size=128)) as tiler, rasterio.open(path) as ds:
        assert tiler.bands == (1, 1, 1)
        skipped = 0
        for tile in tiler.plan():
            invalid = (ds.read(1, window=Window(*tile.window)) == 255).mean()
            image = tiler.read(tile)
            assert (image is None) == (invalid >= 0.95)
            skipped += image is None
            if image is not None:
                assert image.valid_fraction == pytest.approx(1 - invalid)
        assert 0 < skipped < len(tiler.plan())


def test_single_band_smaller_than_tile_is_padded():
    path = geotiff_path("byte.tif")
    with RasterTiler(path, TilingParams(tile_size=256)) as tiler, rasterio.open(path) as ds:
        (tile,) = tiler.plan()
        assert tile.window == (0, 0, 20, 20)
        left, bottom, right, top = ds.bounds
        assert tile.bounds == pytest.approx((left, bottom, right, top))  # polygon: data only, not padding
        image = tiler.read(tile)
        assert image.array.shape == (256, 256, 3) and image.array.dtype == np.uint8
        assert image.valid_fraction == 1.0
        raw = ds.read(1)
        for c in range(3):
            assert np.array_equal(image.array[:20, :20, c], raw)
        assert not image.array[20:].any() and not image.array[:, 20:].any()


def test_naip_four_bands_uses_rgb():
    with RasterTiler(geotiff_path("m_4709963_se_14_1_20200831.tif"), TilingParams()) as tiler:
        assert tiler.bands == (1, 2, 3)
        assert tiler.describe()["stretch"]["method"] == "none"


def test_float64_stretched_with_recorded_percentiles():
    path = geotiff_path("cog_float64_4band.tif")
    with RasterTiler(path, TilingParams(tile_size=128)) as tiler, rasterio.open(path) as ds:
        info = tiler.describe()
        assert info["stretch"]["method"] == "percentile" and info["dtypes"] == ["float64"] * 3
        data = ds.read([1, 2, 3])  # small raster: the statistics sample is the whole raster
        assert info["stretch"]["lows"] == pytest.approx(np.percentile(data, 2, axis=(1, 2)).tolist())
        assert info["stretch"]["highs"] == pytest.approx(np.percentile(data, 98, axis=(1, 2)).tolist())
        arrays = [tiler.read(t).array for t in tiler.plan()]
        assert all(a.dtype == np.uint8 and a.shape == (128, 128, 3) for a in arrays)
        stacked = np.stack(arrays)
        assert stacked.min() == 0 and stacked.max() == 255
        json.dumps(info)


def test_float32_nodata_excluded_from_stretch(tmp_path):
    src = geotiff_path("dsm_float32.tif")
    # The shared DSM has its nodata value declared but no nodata pixels: punch a hole in a copy.
    path = tmp_path / "dsm_hole.tif"
    with rasterio.open(src) as ds:
        profile, data = ds.profile, ds.read(1)
    data[:50, :50] = -9999
    data[60:70, 60:70] = np.nan
    with rasterio.open(path, "w", **profile) as out:
        out.write(data, 1)
    with RasterTiler(path, TilingParams(tile_size=128)) as tiler:
        stretch = tiler.describe()["stretch"]
        valid = data[(data != -9999) & np.isfinite(data)]
        assert stretch["lows"][0] == pytest.approx(np.percentile(valid, 2))
        assert stretch["highs"][0] == pytest.approx(np.percentile(valid, 98))
        tile = tiler.plan()[0]
        image = tiler.read(tile)
        assert image.valid_fraction == pytest.approx(1 - (2500 + 100) / 128**2)
        assert not image.array[:50, :50].any() and not image.array[60:70, 60:70].any()
        assert image.array[100:128, 100:128].any()


def test_target_resolution_resamples():
    path = geotiff_path("RGB.byte.tif")  # 300 m pixels
    with RasterTiler(path, TilingParams(tile_size=256, target_resolution=600)) as tiler, rasterio.open(path) as ds:
        assert windows(tiler) == [(c, r, 512, 512) for r in (0, 206) for c in (0, 279)]
        assert tiler.describe()["resampling"] == "average"
        tile = tiler.plan()[0]
        image = tiler.read(tile)
        assert image.array.shape == (256, 256, 3)
        win = Window(*tile.window)
        native, native_valid = ds.read(1, window=win), ds.read_masks(1, window=win) > 0
        valid = ds.read_masks(1, window=win, out_shape=(256, 256)) > 0
        assert abs(image.array[..., 0][valid].mean() - native[native_valid].mean()) < 3
    with RasterTiler(path, TilingParams(tile_size=256, target_resolution=150)) as tiler:
        tile = next(t for t in tiler.plan() if t.window[:2] == (256, 256))
        assert tile.window == (256, 256, 128, 128)
        assert tiler.describe()["resampling"] == "bilinear"
        assert tiler.read(tile).array.shape == (256, 256, 3)


def test_geographic_polygons_in_degrees():
    with RasterTiler(geotiff_path("world.rgb.tif"), TilingParams(tile_size=256)) as tiler:
        assert tiler.epsg == 4326
        tiles = tiler.plan()
        assert windows(tiler) == [(0, 0, 256, 256), (256, 0, 256, 256)]
        for t in tiles:
            for x, y in t.polygon:
                assert -180 - 1e-6 <= x <= 180 + 1e-6 and -90 - 1e-6 <= y <= 90 + 1e-6
        assert tiles[0].bounds[0] == pytest.approx(-180, abs=1) and tiles[1].bounds[2] == pytest.approx(180, abs=1)
        assert all(tiler.read(t) is not None for t in tiles)


def test_odd_crs_without_epsg():
    with RasterTiler(geotiff_path("goes.tif"), TilingParams(tile_size=256)) as tiler:
        assert tiler.epsg is None and "Geostationary" in tiler.crs_wkt
        assert len(tiler.plan()) == 9
        info = tiler.describe()
        assert info["georeferenced"] and info["n_rows"] == 3 and info["n_cols"] == 3
        json.dumps(info)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_not_georeferenced_uses_qgis_pixel_coordinates(tmp_path):
    path = tmp_path / "plain.tif"
    with rasterio.open(path, "w", driver="GTiff", width=300, height=200, count=3, dtype="uint8") as ds:
        ds.write(np.full((3, 200, 300), 80, np.uint8))
    with RasterTiler(path, TilingParams(tile_size=256)) as tiler:
        assert tiler.crs_wkt is None and tiler.epsg is None
        assert tiler.describe()["georeferenced"] is False
        assert tiler.plan()[1].bounds == pytest.approx((44, -200, 300, 0))


def test_bad_inputs_raise_one_line_raster_errors(tmp_path):
    rgb = geotiff_path("RGB.byte.tif")
    fake = tmp_path / "notes.tif"
    fake.write_text("this is not a raster\n")
    cases = [
        (lambda: RasterTiler(tmp_path / "missing.tif"), "not found"),
        (lambda: RasterTiler(fake), "cannot open"),
        (lambda: RasterTiler(rgb, TilingParams(bands=(1, 2, 5))), "band 5 is out of range"),
        (lambda: RasterTiler(rgb, TilingParams(bands=(1, 2))), "1 or 3 bands"),
        (lambda: RasterTiler(rgb, TilingParams(extent=(0, 0, 10, 10))), "does not overlap"),
        (lambda: TilingParams(tile_size=256, overlap=256), "overlap"),
        (lambda: TilingParams(nodata_threshold=0), "nodata threshold"),
    ]
    for make, text in cases:
        with pytest.raises(RasterError) as info:
            make()
        message = str(info.value)
        assert text in message and "\n" not in message


def test_user_bands_single_replicated():
    with RasterTiler(geotiff_path("RGB.byte.tif"), TilingParams(tile_size=128, bands=[2])) as tiler:
        assert tiler.bands == (2, 2, 2) and tiler.band_source == "user"
        image = tiler.read(tiler.plan()[20])
        assert np.array_equal(image.array[..., 0], image.array[..., 2])
    assert TilingParams(bands=[3, 2, 1]).to_dict()["bands"] == [3, 2, 1]


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    from rscaption.raster.tiling import RasterTiler, TilingParams
    with RasterTiler(sys.argv[1], TilingParams(tile_size=256)) as tiler:
        kept = sum(tiler.read(t) is not None for t in tiler.plan())
    print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


def write_synthetic(path, size):
    """Tiled, compressed, written a band of rows at a time so this process never holds it whole."""
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32618",
                   transform=from_origin(500000, 4000000, 1, 1), tiled=True, blockxsize=256,
                   blockysize=256, compress="deflate")
    ramp = (np.arange(size) % 251).astype(np.uint8)
    with rasterio.open(path, "w", **profile) as ds:
        for row in range(0, size, 512):
            h = min(512, size - row)
            ds.write(np.broadcast_to(ramp, (3, h, size)) + np.uint8(row % 7), window=Window(0, row, size, h))


@pytest.mark.slow
def test_peak_memory_flat_as_raster_grows(tmp_path):
    peaks = {}
    for size in (1024, 8192):  # 3 MB vs 200 MB of pixels
        path = tmp_path / f"synthetic_{size}.tif"
        write_synthetic(path, size)
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path)], capture_output=True, text=True,
                             check=True).stdout.split()
        assert int(out[0]) == (size // 256) ** 2
        peaks[size] = int(out[1])
    assert peaks[8192] < peaks[1024] + 30, peaks
    assert peaks[8192] < 1.3 * peaks[1024], peaks


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_paletted_band_expanded_through_colour_table(tmp_path):
    path = tmp_path / "classes.tif"
    data = np.zeros((1, 64, 64), np.uint8)
    data[0, :, 32:] = 1
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8",
                       crs="EPSG:32618", transform=from_origin(0, 640, 10, 10)) as ds:
        ds.write(data)
        ds.write_colormap(1, {0: (255, 0, 0, 255), 1: (0, 0, 255, 255)})
    with RasterTiler(path, TilingParams(tile_size=64)) as tiler:
        assert tiler.band_source == "palette"
        image = tiler.read(tiler.plan()[0]).array
        assert image[0, 0].tolist() == [255, 0, 0] and image[0, 40].tolist() == [0, 0, 255]

"""Reliability round 2 (issue 21), rasters and planning: GCP-only rasters, memory that grows with
the plan, tiles upsampled from a few source pixels, complex-valued bands, and option values that
are not finite. Real rasters written with rasterio, the real CLI, the real worker loop, a
subprocess where the process's memory is the subject."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import rasterio
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.transform import from_origin

from conftest import ROOT
from rscaption.raster.input_check import input_warnings
from rscaption.raster.tiling import RasterTiler, TilingParams
from rscaption.store.gpkg import TileStore
from test_bad_inputs import one_error_line, run_main

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "backend"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
UTM18 = CRS.from_epsg(32618)


def write_rgb(path, width, height, transform=None, crs=None, gcps=None, dtype="uint8"):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (3, height, width)).astype(dtype)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype=dtype,
                       transform=transform, crs=crs) as dst:
        dst.write(data)
        if gcps is not None:
            dst.gcps = gcps
    return path


def layer_srs(gpkg) -> int:
    with sqlite3.connect(gpkg) as conn:
        return conn.execute("SELECT srs_id FROM gpkg_geometry_columns WHERE table_name='tiles'").fetchone()[0]


# -- 9. a raster georeferenced only by GCPs -----------------------------------------------------------
def gcp(col, row, x, y):
    return GroundControlPoint(row=row, col=col, x=x, y=y)


def test_gcp_only_raster_is_placed_by_its_gcps(tmp_path, capsys, tiny_model_dir):
    # 100 x 80 px at 0.3 m: the four corners tie it to UTM 18N; the file has no geotransform
    corners = [gcp(0, 0, 500000, 4000000), gcp(100, 0, 500030, 4000000), gcp(0, 80, 500000, 3999976),
               gcp(100, 80, 500030, 3999976)]
    raster = write_rgb(tmp_path / "scan.tif", 100, 80, gcps=(corners, UTM18))
    with rasterio.open(raster) as src:
        assert src.crs is None and src.transform.is_identity and len(src.gcps[0]) == 4
    out = tmp_path / "o.gpkg"
    rc, err = run_main(capsys, "caption", raster, "-o", out, "--model", tiny_model_dir, "-q")
    assert rc == 0, err
    lines = err.splitlines()
    assert ("note: scan.tif has no geotransform: tiles are placed by an affine fit to its 4 GCPs (EPSG:32618)"
            in lines), err
    assert lines[0] == "tiles: 256 px at 0.30 m/px = 77 m footprint (auto from the model card)"  # the fit's m/px
    with TileStore.open(out) as store:
        (tile,) = store.tiles()
    assert tile["bounds"] == pytest.approx((500000, 3999976, 500030, 4000000))  # not (0, -80, 100, 0)
    assert layer_srs(out) == 32618


@pytest.mark.parametrize("points, said", [
    ([gcp(0, 0, 0, 0), gcp(50, 40, 15, -12), gcp(100, 80, 30, -24)],  # all on one line
     "warning: line.tif has no geotransform and its 3 GCP(s) give no affine transform (fewer than 3, or all "
     "on one line): tiles are placed in pixel coordinates; georeference it first (gdalwarp)"),
    ([gcp(0, 0, 0, 0), gcp(100, 0, 30, 0), gcp(0, 80, 0, -24), gcp(100, 80, 60, -48)],  # a bent scan
     "warning: line.tif has no geotransform; its 4 GCPs are not affine (off by up to 16.0 px from the best "
     "fit (EPSG:32618)): tile polygons are approximate; warp it (gdalwarp) for exact placement"),
])
def test_gcps_without_an_affine_transform_are_said_plainly(tmp_path, points, said):
    raster = write_rgb(tmp_path / "line.tif", 100, 80, gcps=(points, UTM18))
    assert said in input_warnings(str(raster), {}, None)
    with RasterTiler(raster, TilingParams(tile_size=64)) as tiler:
        if "pixel coordinates" in said:  # where QGIS shows an ungeoreferenced raster
            assert not tiler.georeferenced and tiler.plan()[0].polygon[1] == (0.0, -64.0)
        else:
            assert tiler.georeferenced and tiler.epsg == 32618


# -- 13. planning does not grow with the raster --------------------------------------------------------
VRT = """<VRTDataset rasterXSize="{n}" rasterYSize="{n}">
  <SRS>EPSG:32618</SRS>
  <GeoTransform>500000, 0.3, 0, 4000000, 0, -0.3</GeoTransform>
{bands}</VRTDataset>
"""
BAND = """  <VRTRasterBand dataType="Byte" band="{b}">
    <SimpleSource>
      <SourceFilename relativeToVRT="1">small.tif</SourceFilename>
      <SourceBand>{b}</SourceBand>
      <SrcRect xOff="0" yOff="0" xSize="64" ySize="64"/>
      <DstRect xOff="0" yOff="0" xSize="64" ySize="64"/>
    </SimpleSource>
  </VRTRasterBand>
"""
PEAK_RSS = """
import json, resource, sys
from rscaption.engine.pipeline import caption_raster
from rscaption.models.registry import load_model
from rscaption.raster.tiling import TilingParams

raster, out, model = sys.argv[1:4]
cap = load_model(model, device="cpu")
seen = {"records": 0}

def progress(done, total, records):
    seen["records"] += len(records)
    seen["total"] = total

summary = caption_raster(raster, out, model=cap, tiling=TilingParams(tile_size=256), device="cpu",
                         batch_size=4, on_progress=progress, should_cancel=lambda: seen["records"] > 0,
                         confirm_large=True)
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "total": seen["total"],
                  "written": summary.written}))
"""


def peak_rss_of_first_tiles(tmp_path, tiny_model_dir, n: int) -> dict:
    folder = tmp_path / str(n)
    folder.mkdir()
    write_rgb(folder / "small.tif", 64, 64, transform=from_origin(500000, 4000000, 0.3, 0.3), crs=UTM18)
    (folder / "huge.vrt").write_text(VRT.format(n=n, bands="".join(BAND.format(b=b) for b in (1, 2, 3))))
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(folder / "huge.vrt"), str(folder / "o.gpkg"),
                           tiny_model_dir], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_memory_does_not_grow_with_the_planned_tiles(tmp_path, tiny_model_dir):
    """A 240,000 px square VRT plans 879,844 tiles (past the large-run guard: --yes): counting,
    planning, opening the output and the first batches must cost what a 100-tile raster costs (the
    lists of tiles, keys and tiles left grew the peak by 1.1 GB here; 2.4M tiles stay flat too)."""
    small = peak_rss_of_first_tiles(tmp_path, tiny_model_dir, 2_560)
    huge = peak_rss_of_first_tiles(tmp_path, tiny_model_dir, 240_000)
    assert (small["total"], huge["total"]) == (100, 938 * 938)
    assert small["written"] > 0 and huge["written"] > 0  # the first tiles were read and captioned
    growth_mb = (huge["peak_kb"] - small["peak_kb"]) / 1024
    assert growth_mb < 48, f"peak RSS grew {growth_mb:.0f} MB for {huge['total']:,} planned tiles"


def test_lazy_plan_matches_the_list_and_finds_windows(tmp_path):
    raster = write_rgb(tmp_path / "r.tif", 700, 500, transform=from_origin(500000, 4000000, 0.3, 0.3), crs=UTM18)
    for params in (TilingParams(tile_size=128), TilingParams(tile_size=128, overlap=40),
                   TilingParams(tile_size=96, extent=(500010, 3999880, 500150, 3999990)),
                   TilingParams(tile_size=64, target_resolution=0.45)):
        with RasterTiler(raster, params) as tiler:
            lazy, listed = tiler.tiles(), tiler.plan()
            assert len(lazy) == tiler.count_tiles() == len(listed) and list(lazy) == listed
            assert lazy[-1] == listed[-1] and lazy[2:5] == listed[2:5]
            assert [lazy.index_of(t.window) for t in listed] == list(range(len(listed)))
            assert lazy.index_of((1, 0, 128, 128)) is None
            assert tiler.describe()["n_rows"] == listed[-1].row + 1


# -- 14. tiles upsampled from a handful of source pixels ---------------------------------------------
def small_raster(tmp_path, side=16):
    return write_rgb(tmp_path / "s.tif", side, side, transform=from_origin(500000, 4000000, 0.3, 0.3), crs=UTM18)


def test_one_pixel_tiles_need_confirmation(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "o.gpkg"
    rc, err = run_main(capsys, "caption", small_raster(tmp_path), "-o", out, "--model", tiny_model_dir,
                       "--tile-size", "256", "--resolution", "1e-9", "-q")
    assert rc == 2
    assert one_error_line(err) == (
        "rscaption: error: this run plans 256 tiles, about 51 s at 5 tiles/s, each upsampled 256x from 1 x 1 "
        "source pixels (more than 16x: captions of blur); confirm it (rscaption caption --yes) to start it, "
        "or choose a coarser resolution")
    assert not out.exists()


def test_upsampled_tiles_are_said_with_the_source_pixels_and_factor(tmp_path, capsys, tiny_model_dir):
    raster = small_raster(tmp_path)
    out = tmp_path / "o.gpkg"
    # 2 x 2 source pixels of the corner, each its own 256 px tile: confirmed, and said
    rc, err = run_main(capsys, "caption", raster, "-o", out, "--model", tiny_model_dir, "--tile-size", "256",
                       "--resolution", "0.3", "--extent", "500000", "3999999.4", "500000.6", "4000000", "-q")
    assert rc == 0 and "is upsampled" not in err, err  # the raster's own resolution: no word
    rc, err = run_main(capsys, "caption", raster, "-o", tmp_path / "o2.gpkg", "--model", tiny_model_dir,
                       "--tile-size", "256", "--resolution", "1e-9", "--yes", "-q",
                       "--extent", "500000", "3999999.4", "500000.6", "4000000")
    assert rc == 0, err
    assert ("warning: each 256 px tile is upsampled 256x from 1 x 1 source pixels (resolution 1e-09 against the "
            "raster's 0.3 per pixel): the captions describe blur; a coarser resolution gives fewer, sharper tiles"
            in err.splitlines()), err
    # 8x: said, no confirmation needed; 2x: nothing to say
    said = input_warnings(str(raster), {}, None, tiling=TilingParams(tile_size=256, target_resolution=0.0375))
    assert [w for w in said if "upsampled" in w] == [
        "warning: each 256 px tile is upsampled 8x from 32 x 32 source pixels (resolution 0.0375 against the "
        "raster's 0.3 per pixel): the captions describe blur; a coarser resolution gives fewer, sharper tiles"]
    assert not input_warnings(str(raster), {}, None, tiling=TilingParams(tile_size=256, target_resolution=0.15))


# -- 22. complex-valued bands --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_complex_raster_is_refused_in_one_line(tmp_path, capsys, tiny_model_dir, dtype):
    raster = tmp_path / "slc.tif"
    values = (np.arange(64 * 64).reshape(1, 64, 64) * (1 + 2j)).astype(dtype)
    with rasterio.open(raster, "w", driver="GTiff", width=64, height=64, count=1, dtype=dtype,
                       transform=from_origin(500000, 4000000, 10, 10), crs=UTM18) as dst:
        dst.write(values)
    out = tmp_path / "o.gpkg"
    with _no_complex_warning():
        rc, err = run_main(capsys, "caption", raster, "-o", out, "--model", tiny_model_dir, "-q")
    assert rc == 2
    assert one_error_line(err) == (f"rscaption: error: band 1 of {raster} is complex-valued ({dtype}, e.g. radar "
                                   "SLC): captioning needs real-valued imagery; convert it to amplitude first")
    assert not out.exists()


class _no_complex_warning:
    """numpy's ComplexWarning (the imaginary part dropped) must not be raised at all."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self.seen = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        assert not [w for w in self.seen if "Complex" in type(w.message).__name__]


# -- option values that are not finite, and --overlap's bound ----------------------------------------
@pytest.mark.parametrize("argv, said", [
    (["caption", "r.tif", "-o", "o.gpkg", "--overlap", "100000"],
     "argument --overlap: must be at most 8,191 (allowed: 0 to 8,191), got 100000"),
    (["caption", "r.tif", "-o", "o.gpkg", "--overlap", "-3"], "argument --overlap: must be from 0 to 8,191, got -3"),
    (["caption", "r.tif", "-o", "o.gpkg", "--extent", "nan", "0", "1", "1"],
     "argument --extent: must be a finite number, got nan"),
    (["caption", "r.tif", "-o", "o.gpkg", "--extent", "0", "0", "inf", "1"],
     "argument --extent: must be a finite number, got inf"),
    (["search", "g.gpkg", "a river", "--min-confidence", "nan"],
     "argument --min-confidence: must be a number from 0 to 1, got nan"),
    (["search", "g.gpkg", "a river", "--min-confidence", "inf"],
     "argument --min-confidence: must be a number from 0 to 1, got inf"),
    (["search", "g.gpkg", "a river", "--bbox", "0", "0", "1", "nan"],
     "argument --bbox: must be a finite number, got nan"),
])
def test_non_finite_and_unbounded_options_are_one_line(tmp_path, capsys, argv, said):
    cmd = argv[0]
    argv = [str(tmp_path / a) if a.endswith((".tif", ".gpkg")) else a for a in argv]
    rc, err = run_main(capsys, *argv)
    assert rc == 2
    assert one_error_line(err) == f"rscaption {cmd}: error: {said} (see rscaption {cmd} --help)"


def test_worker_refuses_non_finite_extent_and_confidence(tmp_path):
    from rscaption.worker import serve

    lines = ['{"cmd": "caption", "raster": "r.tif", "out": "o.gpkg", "extent": [NaN, 0, 1, 1]}',
             '{"cmd": "caption", "raster": "r.tif", "out": "o.gpkg", "extent": [0, 0, 1e999, 1]}',
             '{"cmd": "search", "gpkg": "g.gpkg", "query": "a river", "min_confidence": NaN}',
             '{"cmd": "similar", "gpkg": "g.gpkg", "tile_id": 1, "min_confidence": Infinity}']
    out = io.StringIO()
    serve(io.StringIO("".join(line + "\n" for line in lines)), out, heartbeat_s=0)
    errors = [m["message"] for m in map(json.loads, out.getvalue().splitlines()) if m["type"] == "error"]
    assert errors == [
        "bad request: 'caption' request: 'extent' must be 4 finite numbers [xmin, ymin, xmax, ymax], "
        "got [nan, 0, 1, 1]",
        "bad request: 'caption' request: 'extent' must be 4 finite numbers [xmin, ymin, xmax, ymax], "
        "got [0, 0, inf, 1]",
        "bad request: 'search' request: 'min_confidence' must be a number between 0 and 1, got nan",
        "bad request: 'similar' request: 'min_confidence' must be a number between 0 and 1, got inf"]

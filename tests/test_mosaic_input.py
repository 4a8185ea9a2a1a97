"""Inputs at mosaic scale: a VRT over several files and GDAL virtual paths (/vsizip/ here; /vsicurl/
and /vsis3/ take the same code path but need a network) are tiled and captioned like one GeoTIFF."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from mosaic_data import assert_same_tiles, stored, write_geotiff, write_mosaic
from rscaption.cli import main
from rscaption.errors import RasterError
from rscaption.store.gpkg import TileStore
from rscaption.store.gpkg_sql import register_functions
from rscaption.engine.pipeline import caption_raster, raster_fingerprint
from rscaption.raster.tiling import RasterTiler, TilingParams

W, H = 160, 104  # pieces cut at 87 and 57 px: not on the 32 px tile grid
PARAMS = TilingParams(tile_size=32)


@pytest.fixture(scope="module")
def rasters(tmp_path_factory):
    root = tmp_path_factory.mktemp("mosaic")
    tif = write_geotiff(root / "whole.tif", W, H)
    vrt = write_mosaic(root / "pieces", W, H, cols=2, rows=2)
    archive = root / "whole.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(tif, "inner/whole.tif")
    return {"tif": str(tif), "vrt": str(vrt), "zip": f"/vsizip/{archive}/inner/whole.tif"}


@pytest.fixture(scope="module")
def whole_result(rasters, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "whole.gpkg"
    caption_raster(rasters["tif"], str(out), model=tiny_model_dir, tiling=PARAMS, batch_size=4)
    return stored(out)


def test_vrt_reads_the_same_pixels_as_the_single_geotiff(rasters):
    with RasterTiler(rasters["tif"], PARAMS) as a, RasterTiler(rasters["vrt"], PARAMS) as b:
        assert [t.window for t in a.plan()] == [t.window for t in b.plan()]
        assert [t.polygon for t in a.plan()] == [t.polygon for t in b.plan()]
        skipped = 0
        for ta, tb in zip(a.plan(), b.plan()):
            ia, ib = a.read(ta), b.read(tb)
            assert (ia is None) == (ib is None)
            if ia is None:
                skipped += 1
                continue
            np.testing.assert_array_equal(ia.array, ib.array)
            assert ia.valid_fraction == ib.valid_fraction
        assert 0 < skipped < len(a.plan())  # the nodata corner is skipped in both


def test_vrt_mosaic_captions_equal_the_single_geotiff(rasters, whole_result, tiny_model_dir, tmp_path):
    out = tmp_path / "vrt.gpkg"
    summary = caption_raster(rasters["vrt"], str(out), model=tiny_model_dir, tiling=PARAMS, batch_size=4)
    assert summary.written == len(whole_result) > 0
    assert_same_tiles(stored(out), whole_result)


def test_gdal_virtual_path_is_captioned_and_resumed(rasters, whole_result, tiny_model_dir, tmp_path):
    path = rasters["zip"]
    assert not os.path.exists(path)  # only GDAL can see it
    fp = raster_fingerprint(path)
    assert fp["checksum_method"] == "gdal-window-checksums" and fp["path"] == path
    out = tmp_path / "zip.gpkg"
    rc = main(["caption", path, "-o", str(out), "--model", tiny_model_dir, "--tile-size", "32",
               "--batch-size", "4", "-q"])
    assert rc == 0
    assert_same_tiles(stored(out), whole_result)
    with TileStore.open(str(out)) as store:
        assert store.metadata()["source_raster"]["path"] == path
    again = caption_raster(path, str(out), model=tiny_model_dir, tiling=PARAMS, batch_size=4)
    # resumed: every tile except those the random tiny model left without words (redone as damaged)
    kept = sum(1 for r in whole_result.values() if r[3].strip())
    assert again.resumed == kept and again.written == len(whole_result) - kept
    assert_same_tiles(stored(out), whole_result)
    # `rscaption check --repair` reopens the recorded virtual path to caption a damaged tile again
    damaged = next(tid for tid, r in whole_result.items() if r[3].strip())
    conn = sqlite3.connect(out)
    register_functions(conn)  # the R-tree triggers call the ST_ functions GDAL would provide
    with conn:
        conn.execute("UPDATE tiles SET caption = NULL WHERE tile_id = ?", (damaged,))
    conn.close()
    main(["check", str(out), "--repair"])  # exit 1 while the tiny model leaves some captions empty
    assert_same_tiles(stored(out), whole_result)


def test_unopenable_virtual_path_is_one_line(tmp_path, tiny_model_dir):
    bad = f"/vsizip/{tmp_path}/missing.zip/a.tif"
    with pytest.raises(RasterError, match=r"^cannot open /vsizip/.*missing\.zip/a\.tif as a raster: "):
        RasterTiler(bad, PARAMS)
    proc = subprocess.run([sys.executable, "-m", "rscaption.cli", "caption", bad, "-o", str(tmp_path / "o.gpkg"),
                           "--model", tiny_model_dir, "--tile-size", "32"],
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("rscaption: error: ") and "missing.zip" in lines[0]
    assert not (tmp_path / "o.gpkg").exists()

"""The raster half of the bad-input matrix (issue 11): odd, damaged and borderline rasters built here
with rasterio, each run through the real CLI with a tiny model (the model is irrelevant to what is
checked: the message, what is captioned, what is kept)."""

from __future__ import annotations

import hashlib
import re
import struct
import sys

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp
from affine import Affine

from rscaption.store.gpkg import TileStore
from rscaption.engine.local import usable_cores
from rscaption.raster.tiling import RasterTiler, TilingParams
from conftest import ROOT
from test_bad_inputs import one_error_line, run_main

sys.path.insert(0, str(ROOT / "tools"))
from kill_soak import integrity  # noqa: E402  (the fault tests' PRAGMA integrity_check)

UTM = "EPSG:32633"


def from_origin(west, north, xres, yres) -> Affine:
    return Affine(xres, 0.0, west, 0.0, -yres, north)  # rasterio's helper warns about Affine's `*`


def write_raster(path, count=3, dtype="uint8", width=64, height=64, crs=UTM, data=None, nodata=None,
                 colorinterp=None, res=1.0, origin=(500000.0, 4000000.0), **profile):
    """A small real GeoTIFF; random imagery unless ``data`` is given."""
    prof = dict(driver="GTiff", width=width, height=height, count=count, dtype=dtype, **profile)
    if crs is not None:
        prof.update(crs=crs, transform=from_origin(origin[0], origin[1], res, res))
    if nodata is not None:
        prof["nodata"] = nodata
    if data is None:
        data = (np.random.default_rng(0).random((count, height, width)) * 200 + 20).astype(dtype)
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(data)
        if colorinterp:
            ds.colorinterp = colorinterp
    return path


def caption(capsys, model, raster, out, *extra):
    """(exit status, stderr lines, stored metadata or None) of one `rscaption caption` run."""
    rc, err = run_main(capsys, "caption", raster, "-o", out, "--model", model, "-q", *extra)
    assert "Traceback" not in err and "Warning" not in err, err
    meta = None
    if rc == 0:
        with TileStore.open(out) as store:
            meta = store.metadata()
    return rc, [line for line in err.splitlines() if line.strip()], meta


def tiles_of(out) -> list[dict]:
    with TileStore.open(out) as store:
        return store.tiles()


# -- files that are not (whole) rasters ---------------------------------------------------------------
def test_missing_empty_and_text_files(tmp_path, capsys, tiny_model_dir):
    missing, empty, text = tmp_path / "nope.tif", tmp_path / "empty.tif", tmp_path / "notes.tif"
    empty.write_bytes(b"")
    text.write_text("this is not a raster\n" * 20)
    out = tmp_path / "o.gpkg"
    rc, err = run_main(capsys, "caption", missing, "-o", out, "--model", tiny_model_dir)
    assert rc == 2 and one_error_line(err) == f"rscaption: error: raster not found: {missing}"
    for path in (empty, text):
        rc, err = run_main(capsys, "caption", path, "-o", out, "--model", tiny_model_dir)
        assert rc == 2 and one_error_line(err) == (
            f"rscaption: error: cannot open {path} as a raster: '{path}' not recognized as being in a "
            "supported file format.")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncated", "scrambled"])
def test_damaged_geotiff_header(tmp_path, capsys, tiny_model_dir, damage):
    good = write_raster(tmp_path / "good.tif")
    data = bytearray(good.read_bytes())
    bad = tmp_path / f"{damage}.tif"
    if damage == "truncated":
        data = data[:100]
    else:  # the first directory (IFD) starts at byte 8
        for i in range(8, 200):
            data[i] = (i * 31) % 256
    bad.write_bytes(bytes(data))
    rc, err = run_main(capsys, "caption", bad, "-o", tmp_path / "o.gpkg", "--model", tiny_model_dir)
    assert rc == 2 and one_error_line(err) == (
        f"rscaption: error: cannot open {bad} as a raster: {bad.name}: "
        "TIFFReadDirectory:Failed to read directory at offset 8")
    assert not (tmp_path / "o.gpkg").exists()


def tiled_raster(path):
    """128 x 256 px in 32 px deflate blocks: later blocks can be cut or damaged alone."""
    return write_raster(path, width=128, height=256, tiled=True, blockxsize=32, blockysize=32, compress="deflate")


@pytest.mark.parametrize("damage, reason", [
    ("truncated", r"TIFFFillTile:Read error at row \d+, col \d+, tile \d+; got \d+ bytes, expected \d+"),
    ("scrambled", r"ZIPDecode:Decoding error at scanline \d+"),
])
def test_damaged_geotiff_data_keeps_finished_tiles(tmp_path, capsys, tiny_model_dir, damage, reason):
    """The header is fine, a later block is not: the run stops at that window with one line naming
    the raster and the window, and the batches finished before it stay in the output."""
    data = bytearray(tiled_raster(tmp_path / "good.tif").read_bytes())
    bad = tmp_path / f"{damage}.tif"
    if damage == "truncated":
        data = data[:int(len(data) * 0.85)]
    else:
        for i in range(len(data) // 2, len(data) // 2 + 2000):
            data[i] ^= 0x5A
    bad.write_bytes(bytes(data))
    out = tmp_path / "o.gpkg"
    rc, lines, _ = caption(capsys, tiny_model_dir, bad, out, "--tile-size", "32", "--batch-size", "2")
    assert rc == 2 and len(lines) == 2 and lines[0].startswith("tiles: 32 px")
    m = re.fullmatch(rf"rscaption: error: cannot read tile (\d+) of {re.escape(str(bad))} \(pixel window "
                     rf"col (\d+), row (\d+), 32 x 32\): {reason}", lines[1])
    assert m, lines[1]
    failed, col, row = int(m[1]), int(m[2]), int(m[3])
    assert (col, row) == (32 * (failed % 4), 32 * (failed // 4))
    kept = [t["tile_id"] for t in tiles_of(out)]
    # batches of 2: every batch the model finished is kept; at most the batches the reader had queued
    # ahead of the model workers (local_engine: workers + 1) were read but not captioned
    assert set(kept) <= set(range(failed)) and len(set(kept)) == len(kept)
    assert len(kept) >= failed - failed % 2 - 2 * (usable_cores() + 1) > 0
    assert integrity(out) == "ok"
    rc, lines2, _ = caption(capsys, tiny_model_dir, bad, out, "--tile-size", "32", "--batch-size", "2")
    assert rc == 2 and lines2[-1] == lines[1]  # a resume stops at the same window, keeps what it had
    assert set(kept) <= {t["tile_id"] for t in tiles_of(out)} <= set(range(failed))


def test_huge_declared_sizes(tmp_path, capsys, tiny_model_dir):
    """A sparse 100,000 px BigTIFF (no pixel written) is refused by its tile count before a read; a
    16 px GeoTIFF whose header claims 65,000 px stops at its first window in one line."""
    sparse = tmp_path / "sparse.tif"
    with rasterio.open(sparse, "w", driver="GTiff", width=100_000, height=100_000, count=3, dtype="uint8",
                       crs=UTM, transform=from_origin(500000, 4000000, 1, 1), tiled=True, blockxsize=512,
                       blockysize=512, compress="deflate", sparse_ok=True, BIGTIFF="YES"):
        pass
    rc, lines, _ = caption(capsys, tiny_model_dir, sparse, tmp_path / "s.gpkg", "--tile-size", "32")
    assert rc == 2 and lines[-1] == (
        "rscaption: error: this run plans 9,765,625 tiles, about 22.6 days at 5 tiles/s (more than 100,000); "
        "confirm it (rscaption caption --yes) to start it, or choose a smaller extent or a coarser resolution")
    assert not (tmp_path / "s.gpkg").exists()

    small = write_raster(tmp_path / "small.tif", count=1, width=16, height=16)
    data = bytearray(small.read_bytes())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        tag, typ = struct.unpack_from("<HH", data, ifd + 2 + 12 * i)
        if tag in (256, 257):  # ImageWidth, ImageLength (SHORT)
            assert typ == 3
            struct.pack_into("<H", data, ifd + 2 + 12 * i + 8, 65000)
    liar = tmp_path / "liar.tif"
    liar.write_bytes(bytes(data))
    rc, lines, _ = caption(capsys, tiny_model_dir, liar, tmp_path / "l.gpkg", "--tile-size", "256")
    assert rc == 2 and len(lines) == 2
    assert lines[1].startswith(f"rscaption: error: cannot read tile 0 of {liar} (pixel window col 0, row 0, "
                               "256 x 256): TIFFReadEncodedStrip:Read error at scanline")


# -- bands --------------------------------------------------------------------------------------------
CI = ColorInterp


@pytest.mark.parametrize("count, interp, bands, source", [
    (1, None, [1, 1, 1], "default"),                                   # grey replicated
    (2, None, [1, 1, 1], "default"),                                   # grey + NIR: the first, replicated
    (4, (CI.red, CI.green, CI.blue, CI.alpha), [1, 2, 3], "colorinterp"),  # RGBA: alpha is a mask only
    (5, None, [1, 2, 3], "default"),                                   # multispectral, no colours named
    (5, (CI.blue, CI.green, CI.red, CI.undefined, CI.undefined), [3, 2, 1], "colorinterp"),  # BGR + NIR
])
def test_default_band_choice(tmp_path, capsys, tiny_model_dir, count, interp, bands, source):
    raster = tmp_path / f"b{count}.tif"
    data = (np.random.default_rng(count).random((count, 64, 64)) * 200 + 20).astype("uint8")
    if interp and CI.alpha in interp:
        data[3] = 255
        data[3, :, :32] = 0  # the left half transparent: those tiles are skipped as nodata
    write_raster(raster, count=count, data=data, colorinterp=interp)
    rc, _, meta = caption(capsys, tiny_model_dir, raster, tmp_path / "o.gpkg", "--tile-size", "32")
    assert rc == 0
    assert meta["tiling"]["bands"] == bands and meta["tiling"]["band_source"] == source
    summary = meta["last_run"]
    assert summary["skipped_nodata"] == (2 if interp and CI.alpha in interp else 0)
    assert summary["written"] == 4 - summary["skipped_nodata"]
    with RasterTiler(raster, TilingParams(tile_size=32)) as tiler:
        img = tiler.read(tiler.plan()[-1]).array
    if bands == [1, 1, 1]:
        assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
    else:
        assert not (img[..., 0] == img[..., 2]).all()


@pytest.mark.parametrize("arg, said", [
    ("0", "rscaption caption: error: argument --bands: band numbers start at 1 (see rscaption caption --help)"),
    ("x", "rscaption caption: error: argument --bands: expected comma-separated band numbers like 1,2,3, "
          "got 'x' (see rscaption caption --help)"),
    ("4", "rscaption: error: band 4 is out of range: {raster} has 3 band(s) (1-based)"),
    ("1,2", "rscaption: error: give 1 or 3 bands (1-based), got [1, 2]"),
])
def test_bands_option_validation(tmp_path, capsys, tiny_model_dir, arg, said):
    raster = write_raster(tmp_path / "rgb.tif")
    rc, err = run_main(capsys, "caption", raster, "-o", tmp_path / "o.gpkg", "--model", tiny_model_dir,
                       "--tile-size", "32", "--bands", arg)
    assert rc == 2 and one_error_line(err) == said.format(raster=raster)
    assert not (tmp_path / "o.gpkg").exists()


# -- values -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, nodata, hole", [
    ("uint16", 0, 0),
    ("float32", None, np.nan),        # NaN marks the hole, no nodata value declared
    ("float32", -9999.0, -9999.0),
    ("float32", float("nan"), np.nan),
])
def test_16_bit_and_float_with_nodata(tmp_path, capsys, tiny_model_dir, dtype, nodata, hole):
    """The left half is nodata: its tiles are skipped, the rest are stretched from valid pixels only."""
    rng = np.random.default_rng(1)
    data = (rng.random((3, 64, 64)) * 3000 + 100).astype(dtype)
    data[:, :, :32] = hole
    raster = write_raster(tmp_path / "v.tif", dtype=dtype, data=data, nodata=nodata)
    rc, lines, meta = caption(capsys, tiny_model_dir, raster, tmp_path / "o.gpkg", "--tile-size", "32")
    assert rc == 0 and meta["last_run"]["skipped_nodata"] == 2 and meta["last_run"]["written"] == 2
    low, high = meta["tiling"]["stretch"]["lows"], meta["tiling"]["stretch"]["highs"]
    assert all(100 <= lo < hi <= 3100 for lo, hi in zip(low, high)), (low, high)
    tiles = tiles_of(tmp_path / "o.gpkg")
    assert [t["col"] for t in tiles] == [1, 1] and all(t["caption"].strip() for t in tiles)
    assert not any("warning" in line for line in lines)  # three float bands are imagery enough


def test_all_nodata_raster_is_refused_with_no_output(tmp_path, capsys, tiny_model_dir):
    raster = write_raster(tmp_path / "blank.tif", data=np.zeros((3, 64, 64), "uint8"), nodata=0)
    out = tmp_path / "o.gpkg"
    rc, lines, _ = caption(capsys, tiny_model_dir, raster, out, "--tile-size", "32")
    assert rc == 2 and lines[-1] == (
        f"rscaption: error: every tile of {raster} is nodata (4 of 4 at --nodata-threshold 0.95): nothing to "
        "caption; check the raster's nodata value, --bands or --extent")
    assert not out.exists() and not (tmp_path / "o.gpkg.lock").exists()


# -- georeferencing and size --------------------------------------------------------------------------
def test_geographic_raster(tmp_path, capsys, tiny_model_dir):
    raster = write_raster(tmp_path / "wgs84.tif", crs="EPSG:4326", res=0.0001, origin=(10.0, 50.0))
    out = tmp_path / "o.gpkg"
    rc, lines, meta = caption(capsys, tiny_model_dir, raster, out)
    assert rc == 0
    assert re.fullmatch(r"tiles: \d+ px at \d+\.\d\d m/px = [\d,]+ m footprint \(auto from the model card\)", lines[0])
    m_per_px = float(lines[0].split(" at ")[1].split(" m/px")[0])
    assert 7.0 < m_per_px < 11.2  # 0.0001 deg at 50 N: 7.2 m east-west, 11.1 m north-south
    with TileStore.open(out) as store:
        assert store.srs_id == 4326
        (minx, miny, maxx, maxy), = [t["bounds"] for t in store.tiles()]
    assert (minx, maxy) == pytest.approx((10.0, 50.0)) and (maxx, miny) == pytest.approx((10.0064, 49.9936))


def test_raster_without_crs_uses_pixel_tiles_and_says_so(tmp_path, capsys, tiny_model_dir):
    raster = tmp_path / "plain.tif"
    out = tmp_path / "o.gpkg"
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning):  # writing it; reading it stays quiet
        write_raster(raster, crs=None)
    rc, lines, meta = caption(capsys, tiny_model_dir, raster, out)
    assert rc == 0 and lines[0] == "tiles: 256 px (raster has no CRS: pixel tile size; footprint unknown)"
    assert lines[1].startswith("done: 1 tiles captioned") and len(lines) == 2
    assert meta["tiling"]["georeferenced"] is False
    with TileStore.open(out) as store:
        assert store.srs_id == -1
        assert store.tiles()[0]["bounds"] == (0.0, -64.0, 64.0, 0.0)  # x = column, y = -row (QGIS's placement)


def test_one_pixel_raster(tmp_path, capsys, tiny_model_dir):
    raster = write_raster(tmp_path / "dot.tif", width=1, height=1, res=10.0)
    out = tmp_path / "o.gpkg"
    rc, _, meta = caption(capsys, tiny_model_dir, raster, out, "--tile-size", "32")
    assert rc == 0 and meta["last_run"]["written"] == 1
    (tile,) = tiles_of(out)
    assert tile["window"] == (0, 0, 1, 1) and tile["valid_fraction"] == 1.0
    assert tile["bounds"] == (500000.0, 3999990.0, 500010.0, 4000000.0)


# -- options out of range -----------------------------------------------------------------------------
@pytest.mark.parametrize("extra, said", [
    (["--overlap", "32"], "rscaption: error: --overlap must be between 0 and tile size - 1 (31)"),
    (["--overlap", "-1"], "rscaption caption: error: argument --overlap: must be from 0 to 8,191, got -1 "
                          "(see rscaption caption --help)"),
    (["--batch-size", "0"], "rscaption caption: error: argument --batch-size: must be a positive integer, got 0 "
                            "(see rscaption caption --help)"),
    (["--beam-size", "0"], "rscaption caption: error: argument --beam-size: must be a positive integer, got 0 "
                           "(see rscaption caption --help)"),
    (["--nodata-threshold", "2"], "rscaption: error: nodata threshold must be in (0, 1], got 2.0"),
    (["--nodata-threshold", "0"], "rscaption: error: nodata threshold must be in (0, 1], got 0.0"),
    (["--resolution", "-1"], "rscaption caption: error: argument --resolution: must be a finite number above 0, "
                             "got -1 (see rscaption caption --help)"),
    (["--extent", "500064", "3999936", "500000", "4000000"],
     "rscaption: error: extent must have minx < maxx and miny < maxy, got (500064.0, 3999936.0, 500000.0, 4000000.0)"),
    (["--extent", "0", "0", "10", "10"],
     "rscaption: error: extent (0.0, 0.0, 10.0, 10.0) does not overlap the raster rgb.tif (its bounds are "
     "(500000.0, 3999936.0, 500064.0, 4000000.0) in the raster CRS)"),
    (["--language", "xx"], "rscaption: error: model '{model}' has no 'xx' captions; languages: en"),
])
def test_options_out_of_range(tmp_path, capsys, tiny_model_dir, extra, said):
    raster = write_raster(tmp_path / "rgb.tif")
    out = tmp_path / "o.gpkg"
    rc, err = run_main(capsys, "caption", raster, "-o", out, "--model", tiny_model_dir, "--tile-size", "32", *extra)
    assert rc == 2 and one_error_line(err) == said.format(model=tiny_model_dir)
    assert not out.exists()


def test_cuda_without_cuda(tmp_path, capsys, tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, err = run_main(capsys, "caption", write_raster(tmp_path / "rgb.tif"), "-o", tmp_path / "o.gpkg",
                       "--model", tiny_model_dir, "--device", "cuda")
    assert rc == 2 and one_error_line(err) == "rscaption: error: device 'cuda' requested but CUDA is not available here"


# -- output paths -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, said", [
    ("/dev/null", "rscaption: error: the output must be a .gpkg file, got /dev/null"),
    ("{tmp}/tiles.txt", "rscaption: error: the output must be a .gpkg file, got {tmp}/tiles.txt"),
    ("{tmp}/rgb.tif", "rscaption: error: the output must be a .gpkg file, got {tmp}/rgb.tif"),
    ("{tmp}/no/such/folder/o.gpkg", "rscaption: error: cannot write {tmp}/no/such/folder/o.gpkg: its folder does "
                                    "not exist"),
])
def test_special_output_paths(tmp_path, capsys, tiny_model_dir, name, said):
    raster = write_raster(tmp_path / "rgb.tif")
    before = hashlib.sha256(raster.read_bytes()).hexdigest()
    rc, err = run_main(capsys, "caption", raster, "-o", name.format(tmp=tmp_path), "--model", tiny_model_dir,
                       "--tile-size", "32", "--overwrite")
    assert rc == 2 and one_error_line(err) == said.format(tmp=tmp_path)
    assert hashlib.sha256(raster.read_bytes()).hexdigest() == before
    assert not (tmp_path / "no").exists()


def test_output_equal_to_a_geopackage_raster_input(tmp_path, capsys, tiny_model_dir):
    """A raster GeoPackage given as its own output: refused even with --overwrite (which would
    otherwise delete the input)."""
    raster = tmp_path / "scene.gpkg"
    with rasterio.open(raster, "w", driver="GPKG", width=64, height=64, count=3, dtype="uint8", crs="EPSG:3857",
                       transform=from_origin(0, 640, 10, 10)) as ds:
        ds.write(np.full((3, 64, 64), 100, np.uint8))
    before = hashlib.sha256(raster.read_bytes()).hexdigest()
    for extra in ([], ["--overwrite"]):
        rc, err = run_main(capsys, "caption", raster, "-o", raster, "--model", tiny_model_dir, "--tile-size", "32",
                           *extra)
        assert rc == 2 and one_error_line(err) == (
            f"rscaption: error: the output {raster} is the input raster; choose another .gpkg file")
    assert hashlib.sha256(raster.read_bytes()).hexdigest() == before

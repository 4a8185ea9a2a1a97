"""Runaway runs are refused with the tile count and an estimated time unless confirmed (issue 11).

The rasters are VRTs that declare a huge size over a source file that does not exist: GDAL opens
them, but any pixel read fails, so a refusal that comes back cleanly proves nothing was read.
"""

from __future__ import annotations

import time

import pytest

from rscaption.cli import main
from rscaption.errors import RasterError
from rscaption.engine.pipeline import caption_raster
from rscaption.protocol import ProtocolError, parse_request
from rscaption.engine.run_size import LARGE_RUN_TILES, LargeRunError, describe
from rscaption.raster.tiling import RasterTiler, TilingParams
from test_plugin_support import tiny_model_dir
from test_worker import Worker

VRT = """<VRTDataset rasterXSize="{w}" rasterYSize="{h}">
  <SRS>EPSG:32618</SRS>
  <GeoTransform>500000, 0.3, 0, 4000000, 0, -0.3</GeoTransform>
  <VRTRasterBand dataType="Byte" band="1">
    <SimpleSource>
      <SourceFilename relativeToVRT="1">missing-source.tif</SourceFilename>
      <SourceBand>1</SourceBand>
      <SrcRect xOff="0" yOff="0" xSize="8" ySize="8"/>
      <DstRect xOff="0" yOff="0" xSize="8" ySize="8"/>
    </SimpleSource>
  </VRTRasterBand>
</VRTDataset>
"""
HUGE_TILES = 3907 * 3907  # 1,000,000 px / 256 px tiles, the last one pulled back onto the edge


def vrt(tmp_path, w, h, name="huge.vrt"):
    path = tmp_path / name
    path.write_text(VRT.format(w=w, h=h))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


def test_tile_count_without_a_tile_list(tmp_path):
    with RasterTiler(vrt(tmp_path, 1_000_000, 1_000_000), TilingParams(tile_size=256)) as tiler:
        assert tiler.count_tiles() == HUGE_TILES
    with RasterTiler(vrt(tmp_path, 700, 500, "small.vrt"), TilingParams(tile_size=128, overlap=16)) as tiler:
        assert tiler.count_tiles() == 7 * 5 == len(tiler.plan())


def test_pipeline_refuses_before_reading_a_pixel(tmp_path, tiny):
    out = tmp_path / "o.gpkg"
    t0 = time.monotonic()
    with pytest.raises(LargeRunError) as info:
        caption_raster(str(vrt(tmp_path, 1_000_000, 1_000_000)), str(out), model=tiny,
                       tiling=TilingParams(tile_size=256), device="cpu")
    assert time.monotonic() - t0 < 30 and not out.exists()
    assert info.value.tiles == HUGE_TILES and info.value.seconds == pytest.approx(HUGE_TILES / 5.0)
    assert str(info.value) == (f"this run plans 15,264,649 tiles, about 35.3 days at 5 tiles/s (more than "
                               f"100,000); confirm it (rscaption caption --yes) to start it, or choose a "
                               f"smaller extent or a coarser resolution")


def test_cli_refuses_without_yes_and_starts_with_it(tmp_path, tiny, capsys):
    out = tmp_path / "o.gpkg"
    rc = main(["caption", str(vrt(tmp_path, 1_000_000, 1_000_000)), "-o", str(out), "--model", tiny,
               "--tile-size", "256"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"rscaption: error: this run plans {describe(HUGE_TILES)}")
    assert not out.exists()
    # just over the threshold: --yes gets past the guard, to the first (impossible) pixel read
    small = vrt(tmp_path, 12_800, 8_032, "over.vrt")
    with RasterTiler(small, TilingParams(tile_size=32)) as tiler:
        assert tiler.count_tiles() == 400 * 251 > LARGE_RUN_TILES
    rc = main(["caption", str(small), "-o", str(out), "--model", tiny, "--tile-size", "32", "--yes", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot read tile" in err and "this run plans" not in err


def test_protocol_carries_the_confirmation():
    base = '{"cmd": "caption", "raster": "a", "out": "b.gpkg", "confirm_large": %s}'
    assert parse_request(base % "true")["confirm_large"] is True
    with pytest.raises(ProtocolError, match="'confirm_large' must be bool"):
        parse_request(base % "1")


def test_worker_answers_large_run_with_the_count(tmp_path, tiny):
    raster = str(vrt(tmp_path, 1_000_000, 1_000_000))
    w = Worker()
    try:
        w.until(lambda m: m["type"] == "hello")
        w.send("caption", raster=raster, out=str(tmp_path / "w.gpkg"), model=tiny, tile_size=256)
        err, _ = w.until(lambda m: m["type"] in ("done", "error"))
        assert err["type"] == "error" and err["kind"] == "large_run"
        assert err["tiles"] == HUGE_TILES and err["seconds"] == pytest.approx(HUGE_TILES / 5.0)
        assert "15,264,649 tiles" in err["message"]
        w.send("shutdown")
        assert w.proc.wait(30) == 0
    finally:
        if w.proc.poll() is None:
            w.proc.kill()


def test_absurd_resolution_is_caught_by_the_same_guard(tmp_path):
    """``--resolution 0.001`` on a 0.3 m raster: 300x the pixels, refused by count, not by memory."""
    path = vrt(tmp_path, 20_000, 20_000, "res.vrt")
    with RasterTiler(path, TilingParams(tile_size=256, target_resolution=0.001)) as tiler:
        assert tiler.count_tiles() > LARGE_RUN_TILES


def test_tile_much_larger_than_the_raster_is_refused(tmp_path):
    with pytest.raises(RasterError, match=r"tile size 4096 px is more than 4x the larger side of .* \(500 px"):
        RasterTiler(vrt(tmp_path, 500, 300, "tiny.vrt"), TilingParams(tile_size=4096))
    with RasterTiler(vrt(tmp_path, 1, 1, "one.vrt"), TilingParams(tile_size=1024)) as tiler:  # card sizes stay fine
        assert tiler.count_tiles() == 1

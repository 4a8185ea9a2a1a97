"""Resume never trusts damaged output, and `rscaption check [--repair]` finds and redoes it (issue 11)."""

from __future__ import annotations

import shutil
import sqlite3

import numpy as np
import pytest

from conftest import geotiff_path
from rscaption.cli import main
from rscaption.store.gpkg import TileStore
from rscaption.store.gpkg_sql import register_functions
from rscaption.engine.pipeline import caption_raster
from rscaption.raster.tiling import TilingParams

PARAMS = TilingParams(tile_size=128)


@pytest.fixture(scope="module")
def raster(tmp_path_factory):
    """A private copy of a shared GeoTIFF (the repair test deletes it)."""
    dst = tmp_path_factory.mktemp("raster") / "rgb.tif"
    shutil.copy(geotiff_path("RGB.byte.tif"), dst)
    return dst


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_model_dir, raster):
    out = tmp_path_factory.mktemp("good") / "good.gpkg"
    caption_raster(str(raster), str(out), model=tiny_model_dir, tiling=PARAMS, device="cpu")
    with TileStore.open(out) as store:
        return out, {t["tile_id"]: t["caption"] for t in store.tiles()}, store.embeddings()


def damage(path, *statements):
    con = sqlite3.connect(path)
    register_functions(con)
    for sql in statements:
        con.execute(sql)
    con.commit()
    con.close()


def damaged_copy(good, tmp_path):
    out = tmp_path / "damaged.gpkg"
    shutil.copy(good[0], out)
    ids = sorted(good[1])
    damage(out,
           f"UPDATE tiles SET caption = NULL WHERE tile_id = {ids[0]}",
           f"UPDATE tiles SET caption = '  ' WHERE tile_id = {ids[1]}",
           f"DELETE FROM rscaption_embeddings WHERE tile_id = {ids[2]}",
           f"UPDATE rscaption_embeddings SET embedding = zeroblob(12) WHERE tile_id = {ids[3]}")
    return out, ids[:4]


def test_damaged_tiles_are_listed_with_why(good, tmp_path):
    out, bad = damaged_copy(good, tmp_path)
    with TileStore.open(out) as store:
        found = store.damaged()
    assert [(d.tile_id, d.reason) for d in found] == [
        (bad[0], "no caption"), (bad[1], "no caption"), (bad[2], "no embedding"),
        (bad[3], "embedding has 3 values, not 32")]


def test_resume_redoes_damaged_tiles_instead_of_counting_them_resumed(good, tmp_path, tiny_model_dir, raster):
    out, bad = damaged_copy(good, tmp_path)
    s = caption_raster(str(raster), str(out), model=tiny_model_dir, tiling=PARAMS, device="cpu")
    assert s.written == 4 and s.resumed == len(good[1]) - 4
    with TileStore.open(out) as store:
        assert store.damaged() == []
        assert {t["tile_id"]: t["caption"] for t in store.tiles()} == good[1]
        ids, emb = store.embeddings()
    assert ids.tolist() == good[2][0].tolist()
    np.testing.assert_allclose(emb, good[2][1], atol=1e-5)


def test_resume_after_the_embeddings_table_was_emptied(good, tmp_path, tiny_model_dir, raster):
    out = tmp_path / "empty.gpkg"
    shutil.copy(good[0], out)
    damage(out, "DELETE FROM rscaption_embeddings")
    s = caption_raster(str(raster), str(out), model=tiny_model_dir, tiling=PARAMS, device="cpu")
    assert (s.written, s.resumed) == (len(good[1]), 0)
    with TileStore.open(out) as store:
        assert store.damaged() == [] and len(store.embeddings()[0]) == len(good[1])


def run_main(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_check_reports_then_repairs(good, tmp_path, capsys):
    rc, out, _ = run_main(capsys, "check", good[0])
    assert rc == 0 and out.strip() == f"{good[0]}: ok: {len(good[1])} tiles, none damaged"
    path, bad = damaged_copy(good, tmp_path)
    rc, out, _ = run_main(capsys, "check", path)
    assert rc == 1
    assert out.strip() == (f"{path}: 4 damaged tile(s) of {len(good[1])}: {bad[0]} (no caption), "
                           f"{bad[1]} (no caption), {bad[2]} (no embedding), "
                           f"{bad[3]} (embedding has 3 values, not 32)")
    rc, out, err = run_main(capsys, "check", path, "--repair")
    assert rc == 0, err
    assert out.strip().splitlines()[1:] == ["repaired: 4 tile(s) captioned again",
                                            f"{path}: ok: {len(good[1])} tiles, none damaged"]
    with TileStore.open(path) as store:
        assert {t["tile_id"]: t["caption"] for t in store.tiles()} == good[1]


def test_repair_without_the_source_raster_says_so(tmp_path, tiny_model_dir, capsys):
    src = tmp_path / "gone.tif"
    shutil.copy(geotiff_path("RGB.byte.tif"), src)
    out = tmp_path / "o.gpkg"
    caption_raster(str(src), str(out), model=tiny_model_dir, tiling=TilingParams(tile_size=256), device="cpu")
    damage(out, "UPDATE tiles SET caption = NULL WHERE fid = 1")
    src.unlink()
    rc, _, err = run_main(capsys, "check", out, "--repair")
    assert rc == 2
    assert err.strip() == (f"rscaption: error: cannot repair {out}: its source raster {src} is gone; "
                           "put it back at that path, or caption the raster again with --overwrite")

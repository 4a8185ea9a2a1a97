"""The GeoPackage store: round trips through sqlite, then the real consumer, QGIS (offscreen)."""

from __future__ import annotations

import os
import signal
import sqlite3

import numpy as np
import pytest

from conftest import geotiff_path
from rscaption.store import gpkg_sql
from rscaption.errors import StoreError
from rscaption.store.gpkg import GPKG_APPLICATION_ID, TileRecord, TileStore, now_iso
from rscaption.raster.tiling import RasterTiler, TilingParams

DIM = 8


def records_for(tiles, model="tiny"):
    rng = np.random.default_rng(0)
    return [
        TileRecord(tile_id=t.tile_id, row=t.row, col=t.col, polygon=t.polygon, caption=f"tile {t.tile_id}",
                   confidence=0.5, embedding=rng.standard_normal(DIM).astype(np.float32), key=f"key-{t.tile_id}",
                   model=model, created=now_iso(), window=t.window, valid_fraction=1.0)
        for t in tiles
    ]


def store_for_raster(raster, out, tile_size=256):
    with RasterTiler(raster, TilingParams(tile_size=tile_size)) as tiler:
        tiles = tiler.plan()
        store = TileStore.create(out, tiler.crs_wkt, tiler.epsg, DIM, {"tiling": tiler.describe()})
    records = records_for(tiles)
    store.add(records)
    store.close()
    return tiles, records


def test_round_trip_resume_and_metadata(tmp_gpkg):
    tiles, records = store_for_raster(geotiff_path("RGB.byte.tif"), tmp_gpkg, tile_size=128)
    with TileStore.open(tmp_gpkg) as store:
        assert store.count() == len(tiles) == 42
        assert store.done_keys() == {r.key for r in records}
        assert store.add(records[:3]) == 0  # keys already stored are skipped, not duplicated
        ids, emb = store.embeddings()
        assert ids.tolist() == list(range(42)) and emb.dtype == np.float32
        assert np.array_equal(emb, np.stack([r.embedding for r in records]))
        meta = store.metadata()
        assert meta["embed_dim"] == DIM and meta["epsg"] == 32618 and meta["tiling"]["n_tiles"] == 42
        store.set_metadata({"finished": True, "tiling": {"changed": 1}})
        rows = store.tiles()
        assert [r["tile_id"] for r in rows] == list(range(42))
        assert rows[5]["window"] == tiles[5].window and rows[5]["caption"] == "tile 5"
        xs, ys = zip(*tiles[5].polygon)
        assert rows[5]["bounds"] == pytest.approx((min(xs), min(ys), max(xs), max(ys)))
    with TileStore.open(tmp_gpkg, readonly=True) as store:
        assert store.metadata()["finished"] is True and store.metadata()["tiling"] == {"changed": 1}
    con = sqlite3.connect(tmp_gpkg)
    assert con.execute("PRAGMA application_id").fetchone()[0] == GPKG_APPLICATION_ID
    assert con.execute("PRAGMA user_version").fetchone()[0] == 10200
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    srs = {r[0] for r in con.execute("SELECT srs_id FROM gpkg_spatial_ref_sys")}
    assert {-1, 0, 4326, 32618} <= srs
    bounds = con.execute("SELECT min_x, min_y, max_x, max_y FROM gpkg_contents WHERE table_name = 'tiles'").fetchone()
    all_xy = np.array([xy for t in tiles for xy in t.polygon])
    assert bounds == pytest.approx((*all_xy.min(axis=0), *all_xy.max(axis=0)))
    assert con.execute("SELECT count(*) FROM rtree_tiles_geom").fetchone()[0] == 42
    con.close()


def test_batches_survive_a_crash(tmp_gpkg, tmp_path):
    """Each add() is committed: a second connection sees it before the writer closes."""
    with RasterTiler(geotiff_path("world.rgb.tif"), TilingParams(tile_size=128)) as tiler:
        tiles = tiler.plan()
        store = TileStore.create(tmp_gpkg, tiler.crs_wkt, tiler.epsg, DIM, {})
    store.add(records_for(tiles[:3]))
    with TileStore.open(tmp_gpkg, readonly=True) as reader:
        assert reader.done_keys() == {"key-0", "key-1", "key-2"}
    store.close()


def test_deleted_features_drop_out_of_embeddings(tmp_gpkg):
    store_for_raster(geotiff_path("RGB.byte.tif"), tmp_gpkg)
    con = sqlite3.connect(tmp_gpkg)  # a plain client (no ST_ functions) can still delete rows
    con.execute("DELETE FROM tiles WHERE tile_id IN (1, 4)")
    con.commit()
    con.close()
    with TileStore.open(tmp_gpkg) as store:
        ids, emb = store.embeddings()
        assert ids.tolist() == [0, 2, 3, 5, 6, 7, 8, 9, 10, 11] and emb.shape == (10, DIM)
        assert store.count() == 10


def test_errors(tmp_gpkg, tmp_path):
    store_for_raster(geotiff_path("byte.tif"), tmp_gpkg)
    with pytest.raises(StoreError, match="already exists"):
        TileStore.create(tmp_gpkg, None, 26711, DIM, {})
    with TileStore.create(tmp_gpkg, None, 26711, 4, {}, overwrite=True) as store:
        assert store.count() == 0
        with pytest.raises(StoreError, match="embedding has 8 values"):
            with RasterTiler(geotiff_path("byte.tif")) as tiler:
                store.add(records_for(tiler.plan()))
    text = tmp_path / "notes.gpkg"
    text.write_text("not a database " * 100)
    for bad in (text, tmp_path / "missing.gpkg"):
        with pytest.raises(StoreError):
            TileStore.open(bad)
    plain = tmp_path / "plain.gpkg"
    sqlite3.connect(plain).execute("CREATE TABLE x (a)").connection.close()
    with pytest.raises(StoreError, match="not an rscaption GeoPackage"):
        TileStore.open(plain)


# -- QGIS, the real consumer ----------------------------------------------------------------------
def open_tiles_layer(path):
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(f"{path}|layername=tiles", "tiles", "ogr")
    assert layer.isValid(), path
    return layer


def collect_warnings():
    from qgis.core import Qgis, QgsApplication

    seen = []

    def on_message(message, tag, level):
        if level in (Qgis.Warning, Qgis.Critical):
            seen.append((tag, message))

    QgsApplication.messageLog().messageReceived.connect(on_message)
    return seen, on_message


def test_qgis_reads_layer_crs_and_grid_aligned_geometries(qgis_app, tmp_gpkg):
    from qgis.core import QgsApplication, QgsFeatureSource

    seen, handler = collect_warnings()
    tiles, _ = store_for_raster(geotiff_path("RGB.byte.tif"), tmp_gpkg)
    layer = open_tiles_layer(tmp_gpkg)
    try:
        assert layer.featureCount() == len(tiles) == 12
        names = layer.fields().names()
        for name in ("tile_id", "row", "col", "caption", "confidence", "model", "tile_key", "valid_fraction"):
            assert name in names
        assert layer.crs().authid() == "EPSG:32618"
        assert layer.hasSpatialIndex() == QgsFeatureSource.SpatialIndexPresent
        by_id = {t.tile_id: t for t in tiles}
        for feature in layer.getFeatures():
            tile = by_id[feature["tile_id"]]
            ring = [(p.x(), p.y()) for p in feature.geometry().asPolygon()[0]]
            assert np.allclose(ring, tile.polygon, rtol=0, atol=1e-6)
            assert (feature["row"], feature["col"]) == (tile.row, tile.col)
        # an edit in QGIS (delete) keeps the R-tree and the embeddings consistent
        fid = next(layer.getFeatures()).id()
        assert layer.dataProvider().deleteFeatures([fid])
    finally:
        del layer
        QgsApplication.messageLog().messageReceived.disconnect(handler)
    with TileStore.open(tmp_gpkg) as store:
        assert store.embeddings()[0].size == 11
    con = sqlite3.connect(tmp_gpkg)
    assert con.execute("SELECT count(*) FROM rtree_tiles_geom").fetchone()[0] == 11
    con.close()
    assert not seen, seen


def test_qgis_custom_crs_from_wkt(qgis_app, tmp_gpkg):
    from qgis.core import QgsCoordinateReferenceSystem

    with RasterTiler(geotiff_path("goes.tif")) as tiler:
        wkt = tiler.crs_wkt
    store_for_raster(geotiff_path("goes.tif"), tmp_gpkg)
    layer = open_tiles_layer(tmp_gpkg)
    try:
        crs = layer.crs()
        assert crs.isValid() and not crs.isGeographic()
        assert "geos" in crs.toProj()
        assert crs == QgsCoordinateReferenceSystem.fromWkt(wkt)
        assert layer.featureCount() == 9
    finally:
        del layer


def test_qgis_places_ungeoreferenced_tiles_on_the_image(qgis_app, tmp_path):
    """Pixel-coordinate polygons (y = -row) must coincide with the raster as QGIS draws it."""
    import warnings

    import rasterio
    from qgis.core import QgsRasterLayer

    path = tmp_path / "plain.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", driver="GTiff", width=300, height=200, count=1, dtype="uint8") as ds:
            ds.write(np.full((1, 200, 300), 7, np.uint8))
    with RasterTiler(path, TilingParams(tile_size=128)) as tiler:
        xs, ys = zip(*[xy for t in tiler.plan() for xy in t.polygon])
    raster = QgsRasterLayer(str(path), "plain")
    try:
        extent = raster.extent()
        assert (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()) == pytest.approx(
            (min(xs), min(ys), max(xs), max(ys)))
    finally:
        del raster


def store_and_records(path):
    with RasterTiler(geotiff_path("RGB.byte.tif"), TilingParams(tile_size=128)) as tiler:
        tiles = tiler.plan()
        store = TileStore.create(path, tiler.crs_wkt, tiler.epsg, DIM)
    return store, records_for(tiles)


def test_a_ctrl_c_inside_the_rtree_trigger_cancels_after_the_commit(tmp_gpkg, monkeypatch):
    """SQLite replaces what a Python SQL function raises by "user-defined function raised
    exception", and Python raises a Ctrl-C at the next bytecode, often inside the R-tree trigger's
    envelope function. Such a Ctrl-C is still a cancel (the CLI's exit 130), and it comes after
    the batch is committed: no finished tile is lost. A real SIGINT, sent from inside the trigger."""
    store, records = store_and_records(tmp_gpkg)
    envelope = gpkg_sql.envelope

    def interrupted(blob):
        os.kill(os.getpid(), signal.SIGINT)
        return envelope(blob)

    with store:
        store.add(records[:5])
        monkeypatch.setattr(gpkg_sql, "envelope", interrupted)
        with pytest.raises(KeyboardInterrupt):
            store.add(records[5:10])
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert store.count() == 10
        assert store.add(records[5:12]) == 2 and store.count() == 12


def test_a_failure_inside_the_rtree_trigger_is_one_line_and_rolled_back(tmp_gpkg, monkeypatch):
    store, records = store_and_records(tmp_gpkg)
    with store:
        store.add(records[:5])

        def fails(blob):
            raise ValueError("in the trigger")

        monkeypatch.setattr(gpkg_sql, "envelope", fails)
        with pytest.raises(StoreError, match="^cannot write to .*: user-defined function raised exception"):
            store.add(records[5:10])
        monkeypatch.undo()
        assert store.count() == 5
        assert store.add(records[5:10]) == 5 and store.count() == 10

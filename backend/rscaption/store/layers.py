"""GeoPackages with polygon layers of any name, for files that hold more than one ``tiles`` layer.

A caption file has one layer, ``tiles``, and ``TileStore`` owns it. A change file (``rscaption
change``) holds three: ``changes`` and each date's tiles. The GeoPackage rules are the same
(core tables, one SRS, an R-tree per layer kept right by the standard triggers), so they live here
beside ``gpkg.py`` and reuse its schema, rather than being written a second time elsewhere.

Everything is written on one connection the caller commits: a file is built under a temporary
name and moved into place whole, so a reader never sees half of it.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from ..errors import StoreError
from .gpkg import _CORE_SCHEMA, GPKG_APPLICATION_ID, GPKG_USER_VERSION, TileStore, _statements
from .gpkg_sql import register_functions


def rtree_triggers(table: str, geom: str = "geom") -> str:
    """The GeoPackage R-tree triggers (spec annex, current revision) of one layer."""
    rtree = f"rtree_{table}_{geom}"
    box = f'ST_MinX(NEW."{geom}"), ST_MaxX(NEW."{geom}"), ST_MinY(NEW."{geom}"), ST_MaxY(NEW."{geom}")'
    new_ok = f'(NEW."{geom}" NOT NULL AND NOT ST_IsEmpty(NEW."{geom}"))'
    new_empty = f'(NEW."{geom}" IS NULL OR ST_IsEmpty(NEW."{geom}"))'
    old_ok = f'(OLD."{geom}" NOT NULL AND NOT ST_IsEmpty(OLD."{geom}"))'
    old_empty = f'(OLD."{geom}" IS NULL OR ST_IsEmpty(OLD."{geom}"))'
    return f"""
CREATE TRIGGER "{rtree}_insert" AFTER INSERT ON "{table}" WHEN {new_ok}
BEGIN INSERT OR REPLACE INTO "{rtree}" VALUES (NEW.fid, {box}); END;
CREATE TRIGGER "{rtree}_update6" AFTER UPDATE OF "{geom}" ON "{table}"
WHEN OLD.fid = NEW.fid AND {new_ok} AND {old_ok}
BEGIN UPDATE "{rtree}" SET minx = ST_MinX(NEW."{geom}"), maxx = ST_MaxX(NEW."{geom}"),
  miny = ST_MinY(NEW."{geom}"), maxy = ST_MaxY(NEW."{geom}") WHERE id = NEW.fid; END;
CREATE TRIGGER "{rtree}_update7" AFTER UPDATE OF "{geom}" ON "{table}"
WHEN OLD.fid = NEW.fid AND {new_ok} AND {old_empty}
BEGIN INSERT INTO "{rtree}" VALUES (NEW.fid, {box}); END;
CREATE TRIGGER "{rtree}_update2" AFTER UPDATE OF "{geom}" ON "{table}"
WHEN OLD.fid = NEW.fid AND {new_empty}
BEGIN DELETE FROM "{rtree}" WHERE id = OLD.fid; END;
CREATE TRIGGER "{rtree}_update5" AFTER UPDATE ON "{table}"
WHEN OLD.fid != NEW.fid AND {new_ok}
BEGIN DELETE FROM "{rtree}" WHERE id = OLD.fid;
  INSERT OR REPLACE INTO "{rtree}" VALUES (NEW.fid, {box}); END;
CREATE TRIGGER "{rtree}_update4" AFTER UPDATE ON "{table}"
WHEN OLD.fid != NEW.fid AND {new_empty}
BEGIN DELETE FROM "{rtree}" WHERE id IN (OLD.fid, NEW.fid); END;
CREATE TRIGGER "{rtree}_delete" AFTER DELETE ON "{table}" WHEN OLD."{geom}" NOT NULL
BEGIN DELETE FROM "{rtree}" WHERE id = OLD.fid; END;
"""


def new_geopackage(path: str, crs_wkt: str | None, epsg: int | None,
                   attach: dict[str, str] | None = None) -> tuple[sqlite3.Connection, int]:
    """An empty GeoPackage (core tables, the CRS) on a connection inside an open transaction;
    returns it and the layers' srs_id. The caller commits and closes. ``attach``: schema name ->
    a GeoPackage to read from, attached read-only before the transaction (SQLite refuses it inside)."""
    if os.path.exists(path):
        os.remove(path)
    if epsg is not None and not crs_wkt:
        from rasterio.crs import CRS

        crs_wkt = CRS.from_epsg(epsg).to_wkt()
    try:
        conn = sqlite3.connect(Path(path).absolute().as_uri(), uri=True, isolation_level=None)
        register_functions(conn)
        for name, source in (attach or {}).items():
            conn.execute(f"ATTACH DATABASE ? AS {name}", (Path(source).absolute().as_uri() + "?mode=ro",))
        conn.execute("BEGIN")
        conn.execute(f"PRAGMA application_id = {GPKG_APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {GPKG_USER_VERSION}")
        for statement in _statements(_CORE_SCHEMA):
            conn.execute(statement)
        srs_id = TileStore._insert_srs(conn, crs_wkt, epsg)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot create GeoPackage {path}: {exc}") from None
    return conn, srs_id


def add_polygon_layer(conn: sqlite3.Connection, table: str, columns_sql: str, srs_id: int,
                      description: str) -> None:
    """A polygon feature table ``table`` (fid, geom, then ``columns_sql``) with its R-tree."""
    conn.execute(f'CREATE TABLE "{table}" (fid INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, geom POLYGON, '
                 f"{columns_sql})")
    conn.execute(f'CREATE VIRTUAL TABLE "rtree_{table}_geom" USING rtree(id, minx, maxx, miny, maxy)')
    for statement in _statements(rtree_triggers(table)):
        conn.execute(statement)
    conn.execute("INSERT INTO gpkg_contents (table_name, data_type, identifier, description, srs_id)"
                 " VALUES (?, 'features', ?, ?, ?)", (table, table, description, srs_id))
    conn.execute("INSERT INTO gpkg_geometry_columns VALUES (?, 'geom', 'POLYGON', ?, 0, 0)", (table, srs_id))
    conn.execute("INSERT INTO gpkg_extensions VALUES (?, 'geom', 'gpkg_rtree_index', "
                 "'http://www.geopackage.org/spec120/#extension_rtree', 'write-only')", (table,))


def add_attributes_table(conn: sqlite3.Connection, table: str, columns_sql: str, description: str) -> None:
    """A non-spatial table registered as GeoPackage attributes (QGIS lists it, GDAL reads it)."""
    conn.execute(f'CREATE TABLE "{table}" ({columns_sql})')
    conn.execute("INSERT INTO gpkg_contents (table_name, data_type, identifier, description)"
                 " VALUES (?, 'attributes', ?, ?)", (table, table, description))


def set_layer_extent(conn: sqlite3.Connection, table: str) -> None:
    """gpkg_contents' extent of a layer from its R-tree (QGIS zooms to it)."""
    conn.execute(f'UPDATE gpkg_contents SET (min_x, max_x, min_y, max_y) = (SELECT min(minx), max(maxx), '
                 f'min(miny), max(maxy) FROM "rtree_{table}_geom") WHERE table_name = ?', (table,))

"""The output GeoPackage, written with plain ``sqlite3``.

Why not GDAL/OGR: the backend must run where only rasterio's wheel is installed, and it must write
tile by tile, each batch committed at once, so that a killed or cancelled run keeps everything it
finished and can resume from ``done_keys()``. A few hundred lines of SQL give a standard
GeoPackage 1.2 that QGIS, GDAL and any sqlite client read:

* layer ``tiles``: one polygon per captioned tile (GeoPackage binary geometry with envelope) plus
  its caption, confidence, model, pixel window and ``tile_key`` (the resume key, unique);
* ``rtree_tiles_geom``: the standard R-tree spatial index with the standard triggers, so edits
  made later in QGIS keep it right. The triggers call ``ST_MinX``... which GDAL provides; this
  module registers the same functions on its own connections;
* ``rscaption_embeddings`` (tile_id -> little-endian float32 blob) for text search without
  re-running the image encoder;
* ``rscaption_metadata`` (key -> JSON value): model, tiling parameters, raster, format version.

The default rollback journal is kept (not WAL) so the file on disk is always the whole database:
it can be copied or opened by QGIS while a run is still writing, and readers only block a writer
for the duration of a commit (a busy timeout covers that).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sqlite3
import struct
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import integrity as store_check
from ..errors import StoreError
from .gpkg_sql import envelope, interrupts_deferred, register_functions
from .run_lock import busy_error, is_busy
from .tile_style import hide_internal_tables, write_default_style

GPKG_APPLICATION_ID = 0x47504B47  # "GPKG"
GPKG_USER_VERSION = 10200
FORMAT_VERSION = 1
TABLE, GEOM = "tiles", "geom"
RTREE = f"rtree_{TABLE}_{GEOM}"
BUSY_TIMEOUT_S = 30.0
OPEN_BUSY_S = 5.0  # opening waits this long for another writer's commit, then says the file is busy
CUSTOM_SRS_ID = 100000

WGS84_WKT = (
    'GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563,AUTHORITY["EPSG","7030"]],'
    'AUTHORITY["EPSG","6326"]],PRIMEM["Greenwich",0,AUTHORITY["EPSG","8901"]],'
    'UNIT["degree",0.0174532925199433,AUTHORITY["EPSG","9122"]],AXIS["Latitude",NORTH],'
    'AXIS["Longitude",EAST],AUTHORITY["EPSG","4326"]]'
)


@dataclass
class TileRecord:
    tile_id: int
    row: int
    col: int
    polygon: list  # closed ring of (x, y) in the store's CRS
    caption: str
    confidence: float
    embedding: np.ndarray  # float32 [D]
    key: str
    model: str
    created: str  # ISO 8601
    window: tuple[int, int, int, int]  # col_off, row_off, width, height
    valid_fraction: float


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- GeoPackage geometry encoding ------------------------------------------------------------------
def encode_polygon(ring, srs_id: int) -> bytes:
    """GeoPackage binary: 'GP', version 0, flags (little-endian, xy envelope), srs_id, envelope, WKB."""
    points = [(float(x), float(y)) for x, y in ring]
    if points[0] != points[-1]:
        points.append(points[0])
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    header = b"GP" + struct.pack("<BBi4d", 0, 0b00000011, srs_id, min(xs), max(xs), min(ys), max(ys))
    wkb = struct.pack("<BIII", 1, 3, 1, len(points)) + struct.pack(f"<{2 * len(points)}d", *sum(points, ()))
    return header + wkb


# -- schema ----------------------------------------------------------------------------------------
_CORE_SCHEMA = """
CREATE TABLE gpkg_spatial_ref_sys (
  srs_name TEXT NOT NULL, srs_id INTEGER NOT NULL PRIMARY KEY, organization TEXT NOT NULL,
  organization_coordsys_id INTEGER NOT NULL, definition TEXT NOT NULL, description TEXT);
CREATE TABLE gpkg_contents (
  table_name TEXT NOT NULL PRIMARY KEY, data_type TEXT NOT NULL, identifier TEXT UNIQUE,
  description TEXT DEFAULT '',
  last_change DATETIME NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
  min_x DOUBLE, min_y DOUBLE, max_x DOUBLE, max_y DOUBLE, srs_id INTEGER,
  CONSTRAINT fk_gc_r_srs_id FOREIGN KEY (srs_id) REFERENCES gpkg_spatial_ref_sys(srs_id));
CREATE TABLE gpkg_geometry_columns (
  table_name TEXT NOT NULL, column_name TEXT NOT NULL, geometry_type_name TEXT NOT NULL,
  srs_id INTEGER NOT NULL, z TINYINT NOT NULL, m TINYINT NOT NULL,
  CONSTRAINT pk_geom_cols PRIMARY KEY (table_name, column_name),
  CONSTRAINT uk_gc_table_name UNIQUE (table_name),
  CONSTRAINT fk_gc_tn FOREIGN KEY (table_name) REFERENCES gpkg_contents(table_name),
  CONSTRAINT fk_gc_srs FOREIGN KEY (srs_id) REFERENCES gpkg_spatial_ref_sys (srs_id));
CREATE TABLE gpkg_extensions (
  table_name TEXT, column_name TEXT, extension_name TEXT NOT NULL, definition TEXT NOT NULL,
  scope TEXT NOT NULL, CONSTRAINT ge_tce UNIQUE (table_name, column_name, extension_name));
"""

_DATA_SCHEMA = f"""
CREATE TABLE "{TABLE}" (
  fid INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, "{GEOM}" POLYGON,
  tile_id INTEGER NOT NULL, "row" INTEGER, "col" INTEGER, caption TEXT, confidence REAL,
  model TEXT, created TEXT, px_col_off INTEGER, px_row_off INTEGER, px_width INTEGER,
  px_height INTEGER, valid_fraction REAL, tile_key TEXT UNIQUE);
CREATE INDEX idx_{TABLE}_tile_id ON "{TABLE}"(tile_id);
CREATE TABLE rscaption_embeddings (tile_id INTEGER PRIMARY KEY, embedding BLOB NOT NULL);
CREATE TABLE rscaption_metadata (key TEXT PRIMARY KEY NOT NULL, value TEXT);
CREATE VIRTUAL TABLE "{RTREE}" USING rtree(id, minx, maxx, miny, maxy);
"""

# The GeoPackage R-tree triggers (spec annex, current revision: update1/update3 replaced by
# update5/6/7), keeping the index right whoever inserts, edits or deletes features later.
_BOX = f'ST_MinX(NEW."{GEOM}"), ST_MaxX(NEW."{GEOM}"), ST_MinY(NEW."{GEOM}"), ST_MaxY(NEW."{GEOM}")'
_NEW_OK = f'(NEW."{GEOM}" NOT NULL AND NOT ST_IsEmpty(NEW."{GEOM}"))'
_NEW_EMPTY = f'(NEW."{GEOM}" IS NULL OR ST_IsEmpty(NEW."{GEOM}"))'
_OLD_OK = f'(OLD."{GEOM}" NOT NULL AND NOT ST_IsEmpty(OLD."{GEOM}"))'
_OLD_EMPTY = f'(OLD."{GEOM}" IS NULL OR ST_IsEmpty(OLD."{GEOM}"))'
_RTREE_TRIGGERS = f"""
CREATE TRIGGER "{RTREE}_insert" AFTER INSERT ON "{TABLE}" WHEN {_NEW_OK}
BEGIN INSERT OR REPLACE INTO "{RTREE}" VALUES (NEW.fid, {_BOX}); END;
CREATE TRIGGER "{RTREE}_update6" AFTER UPDATE OF "{GEOM}" ON "{TABLE}"
WHEN OLD.fid = NEW.fid AND {_NEW_OK} AND {_OLD_OK}
BEGIN UPDATE "{RTREE}" SET minx = ST_MinX(NEW."{GEOM}"), maxx = ST_MaxX(NEW."{GEOM}"),
  miny = ST_MinY(NEW."{GEOM}"), maxy = ST_MaxY(NEW."{GEOM}") WHERE id = NEW.fid; END;
CREATE TRIGGER "{RTREE}_update7" AFTER UPDATE OF "{GEOM}" ON "{TABLE}"
WHEN OLD.fid = NEW.fid AND {_NEW_OK} AND {_OLD_EMPTY}
BEGIN INSERT INTO "{RTREE}" VALUES (NEW.fid, {_BOX}); END;
CREATE TRIGGER "{RTREE}_update2" AFTER UPDATE OF "{GEOM}" ON "{TABLE}"
WHEN OLD.fid = NEW.fid AND {_NEW_EMPTY}
BEGIN DELETE FROM "{RTREE}" WHERE id = OLD.fid; END;
CREATE TRIGGER "{RTREE}_update5" AFTER UPDATE ON "{TABLE}"
WHEN OLD.fid != NEW.fid AND {_NEW_OK}
BEGIN DELETE FROM "{RTREE}" WHERE id = OLD.fid;
  INSERT OR REPLACE INTO "{RTREE}" VALUES (NEW.fid, {_BOX}); END;
CREATE TRIGGER "{RTREE}_update4" AFTER UPDATE ON "{TABLE}"
WHEN OLD.fid != NEW.fid AND {_NEW_EMPTY}
BEGIN DELETE FROM "{RTREE}" WHERE id IN (OLD.fid, NEW.fid); END;
CREATE TRIGGER "{RTREE}_delete" AFTER DELETE ON "{TABLE}" WHEN OLD."{GEOM}" NOT NULL
BEGIN DELETE FROM "{RTREE}" WHERE id = OLD.fid; END;
"""

_TILE_COLUMNS = ("fid", "tile_id", "row", "col", "caption", "confidence", "model", "created",
                 "px_col_off", "px_row_off", "px_width", "px_height", "valid_fraction", "tile_key")


def _statements(script: str):
    """Split a script into statements (executescript() would commit the surrounding transaction)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""


def _write_hint(exc: sqlite3.Error) -> str:
    """A full disk reaches SQLite as SQLITE_FULL (ENOSPC) or as a write I/O error (EFBIG, quotas):
    the failed batch was rolled back, so say what the user can do."""
    if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
        return (" (is the disk full?); the tiles written so far are kept: free some space and run the "
                "same command again to resume")
    return ""


def _srs_name(wkt: str) -> str:
    match = re.match(r'\s*\w+\s*\[\s*"([^"]*)"', wkt or "")
    return match.group(1) if match else "unnamed"


class TileStore:
    """One rscaption GeoPackage; safe to share between threads (calls are serialised)."""

    def __init__(self, conn: sqlite3.Connection, path: str, meta: dict | None = None):
        self._conn = conn
        self.path = path
        self._lock = threading.Lock()
        meta = self.metadata() if meta is None else meta
        self.embed_dim = int(meta["embed_dim"])
        self.srs_id = int(self._one("SELECT srs_id FROM gpkg_geometry_columns WHERE table_name = ?", TABLE))

    # -- opening -----------------------------------------------------------------------------------
    @staticmethod
    def _connect(path: str, readonly: bool = False) -> sqlite3.Connection:
        uri = Path(path).absolute().as_uri() + ("?mode=ro" if readonly else "")
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        register_functions(conn)
        return conn

    @classmethod
    def create(cls, path, crs_wkt: str | None, epsg: int | None, embed_dim: int, metadata: dict | None = None,
               overwrite: bool = False) -> "TileStore":
        """New store; CRS by EPSG code when known, else the WKT as a custom SRS (id 100000)."""
        path = str(path)
        if os.path.exists(path):
            if not overwrite:
                raise StoreError(f"{path} already exists (choose another file, resume it, or overwrite)")
            for stale in (path, path + "-journal", path + "-wal", path + "-shm"):
                if os.path.exists(stale):
                    os.remove(stale)
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise StoreError(f"folder of {path} does not exist")
        if epsg is not None and not crs_wkt:
            from rasterio.crs import CRS  # only for the definition text of a bare EPSG code
            crs_wkt = CRS.from_epsg(epsg).to_wkt()
        with interrupts_deferred():  # a Ctrl-C waits for the commit or the clean-up
            conn = None
            try:
                conn = cls._connect(path)
                conn.execute("BEGIN")
                conn.execute(f"PRAGMA application_id = {GPKG_APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {GPKG_USER_VERSION}")
                for statement in _statements(_CORE_SCHEMA + _DATA_SCHEMA + _RTREE_TRIGGERS):
                    conn.execute(statement)
                srs_id = cls._insert_srs(conn, crs_wkt, epsg)
                rows = [
                    (TABLE, "features", TABLE, "rscaption tile captions", srs_id),
                    ("rscaption_embeddings", "attributes", "rscaption_embeddings", "tile image embeddings", None),
                    ("rscaption_metadata", "attributes", "rscaption_metadata", "rscaption run metadata", None),
                ]
                conn.executemany("INSERT INTO gpkg_contents (table_name, data_type, identifier, description, srs_id)"
                                 " VALUES (?, ?, ?, ?, ?)", rows)
                conn.execute("INSERT INTO gpkg_geometry_columns VALUES (?, ?, 'POLYGON', ?, 0, 0)", (TABLE, GEOM, srs_id))
                conn.execute("INSERT INTO gpkg_extensions VALUES (?, ?, 'gpkg_rtree_index', "
                             "'http://www.geopackage.org/spec120/#extension_rtree', 'write-only')", (TABLE, GEOM))
                hide_internal_tables(conn)  # QGIS and GDAL list ``tiles`` alone as a layer
                internal = {"rscaption_format": FORMAT_VERSION, "embed_dim": int(embed_dim), "crs_wkt": crs_wkt,
                            "epsg": epsg, "store_created": now_iso()}
                cls._write_metadata(conn, {**(metadata or {}), **internal})
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn is not None:
                    conn.close()
                if os.path.exists(path):  # nothing was committed: leave no half-made file behind
                    os.remove(path)
                raise StoreError(f"cannot create GeoPackage {path}: {exc}") from None
        return cls(conn, path)

    @staticmethod
    def _insert_srs(conn, crs_wkt, epsg) -> int:
        conn.executemany("INSERT INTO gpkg_spatial_ref_sys VALUES (?, ?, ?, ?, ?, ?)", [
            ("Undefined cartesian SRS", -1, "NONE", -1, "undefined", "undefined cartesian coordinate reference system"),
            ("Undefined geographic SRS", 0, "NONE", 0, "undefined", "undefined geographic coordinate reference system"),
            ("WGS 84 geodetic", 4326, "EPSG", 4326, WGS84_WKT, "longitude/latitude coordinates in decimal degrees"),
        ])
        if epsg is not None:
            srs_id, organization = int(epsg), "EPSG"
        elif crs_wkt:
            srs_id, organization = CUSTOM_SRS_ID, "NONE"
        else:
            return -1  # not georeferenced: pixel coordinates
        if srs_id != 4326:
            conn.execute("INSERT INTO gpkg_spatial_ref_sys VALUES (?, ?, ?, ?, ?, ?)",
                         (_srs_name(crs_wkt), srs_id, organization, srs_id, crs_wkt, "raster CRS"))
        return srs_id

    @classmethod
    def open(cls, path, readonly: bool = False, any_embedding_size: bool = False) -> "TileStore":
        """``any_embedding_size``: for ``check`` and the writers that redo wrong-size embeddings
        (``integrity.validate``); a reader keeps the refusal."""
        path = str(path)
        if not os.path.isfile(path):
            raise StoreError(f"GeoPackage not found: {path}")
        conn = None
        try:
            conn = cls._connect(path, readonly)
            conn.execute(f"PRAGMA busy_timeout = {int(OPEN_BUSY_S * 1000)}")  # a commit takes milliseconds
            (app_id,) = conn.execute("PRAGMA application_id").fetchone()
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            needed = {TABLE, "rscaption_embeddings", "rscaption_metadata", "gpkg_geometry_columns"}
            if app_id != GPKG_APPLICATION_ID or not needed <= names:
                raise StoreError(f"{path} is not an rscaption GeoPackage")
            meta = store_check.validate(conn, path, TABLE, FORMAT_VERSION,  # types, sizes: one clear line
                                        any_embedding_size=any_embedding_size)
            store = cls(conn, path, meta)
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            if is_busy(exc):  # locked by a writer, not damaged: say who when its lock file tells
                raise busy_error(path) from None
            raise StoreError(f"{path} is not an rscaption GeoPackage or is damaged ({exc})") from None
        except StoreError:
            conn.close()
            raise
        except (KeyError, TypeError, ValueError):
            conn.close()
            raise StoreError(f"{path} is not an rscaption GeoPackage (metadata missing)") from None
        return store

    # -- writing ------------------------------------------------------------------------------------
    def add(self, records: list[TileRecord]) -> int:
        """Write records in one committed transaction; keys already stored are skipped. Returns added."""
        rows, blobs, box = [], [], [math.inf, math.inf, -math.inf, -math.inf]
        for r in records:
            emb = np.asarray(r.embedding, dtype="<f4").reshape(-1)
            if emb.size != self.embed_dim:
                raise StoreError(f"tile {r.tile_id}: embedding has {emb.size} values, store expects {self.embed_dim}")
            geom = encode_polygon(r.polygon, self.srs_id)
            minx, maxx, miny, maxy = envelope(geom)
            box = [min(box[0], minx), min(box[1], miny), max(box[2], maxx), max(box[3], maxy)]
            col_off, row_off, width, height = (int(v) for v in r.window)
            rows.append((geom, int(r.tile_id), int(r.row), int(r.col), r.caption, float(r.confidence), r.model,
                         r.created, col_off, row_off, width, height, float(r.valid_fraction), r.key))
            blobs.append((int(r.tile_id), emb.tobytes()))
        if not rows:
            return 0
        added = 0
        with self._lock, interrupts_deferred():  # a Ctrl-C cancels after the commit, not inside the triggers
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                for row, blob in zip(rows, blobs):
                    cur = self._conn.execute(
                        f'INSERT OR IGNORE INTO "{TABLE}" ("{GEOM}", tile_id, "row", "col", caption, confidence, '
                        "model, created, px_col_off, px_row_off, px_width, px_height, valid_fraction, tile_key) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
                    if cur.rowcount == 1:
                        added += 1
                        self._conn.execute("INSERT OR REPLACE INTO rscaption_embeddings VALUES (?, ?)", blob)
                self._conn.execute(
                    "UPDATE gpkg_contents SET min_x = min(coalesce(min_x, :a), :a), min_y = min(coalesce(min_y, :b), :b),"
                    " max_x = max(coalesce(max_x, :c), :c), max_y = max(coalesce(max_y, :d), :d),"
                    " last_change = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE table_name = :t",
                    {"a": box[0], "b": box[1], "c": box[2], "d": box[3], "t": TABLE})
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if is_busy(exc):
                    raise busy_error(self.path) from None
                raise StoreError(f"cannot write to {self.path}: {exc}{_write_hint(exc)}") from None
        return added

    def write_default_style(self) -> None:
        """The tiles layer's default QGIS style, into the file (``tile_style.py``): a file made by
        the CLI on a server opens in QGIS as the plugin shows it."""
        with self._lock, interrupts_deferred():
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                write_default_style(self._conn)
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise StoreError(f"cannot write the layer style to {self.path}: {exc}{_write_hint(exc)}") from None

    def set_metadata(self, values: dict):
        with self._lock, interrupts_deferred():
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._write_metadata(self._conn, values)
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if is_busy(exc):
                    raise busy_error(self.path) from None
                raise StoreError(f"cannot write metadata to {self.path}: {exc}{_write_hint(exc)}") from None

    @staticmethod
    def _write_metadata(conn, values: dict):
        conn.executemany("INSERT OR REPLACE INTO rscaption_metadata (key, value) VALUES (?, ?)",
                         [(str(k), json.dumps(v)) for k, v in values.items()])

    # -- reading ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _reading(self):
        """Serialise a read; a damaged page (sqlite3.DatabaseError) becomes one StoreError line."""
        with self._lock:
            try:
                yield
            except sqlite3.DatabaseError as exc:
                if is_busy(exc):
                    raise busy_error(self.path) from None
                raise StoreError(f"cannot read {self.path}: the file is damaged ({exc})") from None

    def _one(self, sql, *args):
        with self._reading():
            row = self._conn.execute(sql, args).fetchone()
        return None if row is None else row[0]

    def metadata(self) -> dict:
        with self._reading():
            rows = self._conn.execute("SELECT key, value FROM rscaption_metadata").fetchall()
        return {k: json.loads(v) if v is not None else None for k, v in rows}

    def done_keys(self) -> set[str]:
        with self._reading():
            return {r[0] for r in self._conn.execute(f'SELECT tile_key FROM "{TABLE}" WHERE tile_key IS NOT NULL')}

    def damaged(self) -> list:
        """Tiles whose caption is missing or whose embedding is missing or of the wrong size."""
        with self._reading():
            return store_check.damaged_tiles(self._conn, TABLE, self.embed_dim)

    def drop_damaged(self) -> list:
        """Delete damaged tiles so a resume captions them again; returns what was dropped."""
        with self._reading():
            return store_check.drop_damaged(self._conn, TABLE, self.embed_dim)

    def count(self) -> int:
        return int(self._one(f'SELECT count(*) FROM "{TABLE}"'))

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of tiles still present in the layer (features deleted in QGIS drop out)."""
        with self._reading():
            rows = self._conn.execute(
                f'SELECT tile_id, embedding FROM rscaption_embeddings WHERE tile_id IN (SELECT tile_id FROM "{TABLE}")'
                " ORDER BY tile_id").fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        if not rows:
            return ids, np.zeros((0, self.embed_dim), dtype=np.float32)
        data = b"".join(r[1] for r in rows)
        if len(data) != 4 * self.embed_dim * len(rows):
            raise StoreError(f"{self.path}: stored embeddings do not match embed_dim {self.embed_dim} "
                             f"(run 'rscaption check {self.path} --repair')")
        return ids, np.frombuffer(data, dtype="<f4").reshape(len(rows), self.embed_dim).astype(np.float32)

    def embeddings_of(self, tile_ids: list[int]) -> dict[int, np.ndarray]:
        """float32 vectors of the given tiles by primary key (a search's few finalists, not all rows)."""
        out = {}
        with self._reading():
            for i in range(0, len(tile_ids), 500):
                part = tile_ids[i:i + 500]
                for t, blob in self._conn.execute(f"SELECT tile_id, embedding FROM rscaption_embeddings WHERE tile_id"
                                                  f" IN ({','.join('?' * len(part))})", part):
                    if isinstance(blob, bytes) and len(blob) == 4 * self.embed_dim:
                        out[int(t)] = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        return out

    def tiles_by_id(self, tile_ids: list[int]) -> dict[int, dict]:
        """Attributes (``_TILE_COLUMNS``) of the given tiles only; of duplicates the last fid wins."""
        columns, out = ", ".join(f'"{c}"' for c in _TILE_COLUMNS), {}
        with self._reading():
            for i in range(0, len(tile_ids), 500):
                part = tile_ids[i:i + 500]
                for row in self._conn.execute(f'SELECT {columns} FROM "{TABLE}" WHERE tile_id IN '
                                              f"({','.join('?' * len(part))}) ORDER BY fid", part):
                    out[int(row[1])] = dict(zip(_TILE_COLUMNS, row))
        return out

    def tiles(self) -> list[dict]:
        """Tile attributes ordered by tile_id, with ``window`` and ``bounds`` (minx, miny, maxx, maxy)."""
        columns = ", ".join(f'"{c}"' for c in _TILE_COLUMNS)
        with self._reading():
            rows = self._conn.execute(f'SELECT {columns}, "{GEOM}" FROM "{TABLE}" ORDER BY tile_id, fid').fetchall()
        out = []
        for row in rows:
            item = dict(zip(_TILE_COLUMNS, row[:-1]))
            item["window"] = (item["px_col_off"], item["px_row_off"], item["px_width"], item["px_height"])
            env = envelope(row[-1])
            item["bounds"] = None if env is None else (env[0], env[2], env[1], env[3])
            out.append(item)
        return out

    def close(self):
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

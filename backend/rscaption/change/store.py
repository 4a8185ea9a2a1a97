"""The change GeoPackage: layer ``changes`` plus each date's tiles and embeddings, in one file.

Layers (all in the before date's CRS, one polygon per tile of its grid; ``tile_id`` joins them):

* ``changes``: the score and its reasons (:data:`CHANGE_COLUMNS`);
* ``tiles_before``, ``tiles_after``: each date's tiles with the columns of a caption file's
  ``tiles`` layer, and tables ``rscaption_embeddings_before`` / ``_after``, so either date stays
  searchable by text (``change/search.py``) after the captioning work files are gone;
* ``rscaption_metadata``: ``kind`` = ``"change"``, the model (as in a caption file, so search finds
  the text tower), and ``change``: inputs, scorer, grid, overlap, warnings, summary.

The file is written whole under a temporary name and moved into place, so a reader or a resumed
run never meets half a change file.
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct
from pathlib import Path

import numpy as np

from ..errors import StoreError
from ..store.layers import add_attributes_table, add_polygon_layer, new_geopackage, set_layer_extent

KIND = "change"
DATES = ("before", "after")
CHANGE_COLUMNS = (
    ("tile_id", "INTEGER NOT NULL"), ("row", "INTEGER"), ("col", "INTEGER"), ("change", "REAL"),
    ("changed", "INTEGER"), ("cosine_change", "REAL"), ("caption_before", "TEXT"), ("caption_after", "TEXT"),
    ("scene_before", "TEXT"), ("scene_after", "TEXT"), ("p_scene_before", "REAL"), ("p_scene_after", "REAL"),
    ("confidence", "REAL"), ("confidence_before", "REAL"), ("confidence_after", "REAL"), ("summary", "TEXT"),
    ("status", "TEXT"), ("valid_fraction_before", "REAL"), ("valid_fraction_after", "REAL"),
)
TILE_COLUMNS = ("tile_id", "row", "col", "caption", "confidence", "model", "created", "px_col_off", "px_row_off",
                "px_width", "px_height", "valid_fraction", "tile_key")
_TILE_SQL = ('tile_id INTEGER NOT NULL, "row" INTEGER, "col" INTEGER, caption TEXT, confidence REAL, model TEXT, '
             "created TEXT, px_col_off INTEGER, px_row_off INTEGER, px_width INTEGER, px_height INTEGER, "
             "valid_fraction REAL, tile_key TEXT UNIQUE")


def _q(name: str) -> str:
    return f'"{name}"'


def _with_srs(blob, srs_id: int):
    """A GeoPackage geometry blob with its header's srs_id set (each date's file chose its own id)."""
    if blob is None or len(blob) < 8 or bytes(blob[:2]) != b"GP":
        return blob
    order = "<" if blob[3] & 1 else ">"
    return bytes(blob[:4]) + struct.pack(order + "i", srs_id) + bytes(blob[8:])


def write_change_file(path: str, crs_wkt, epsg, embed_dim: int, metadata: dict, sources: dict[str, str],
                      rows: list[dict]) -> None:
    """Write the whole change file at ``path`` (replaced if present). ``sources``: date -> the
    caption GeoPackage whose tiles and embeddings are copied; ``rows``: one per ``changes`` feature."""
    tmp = path + ".tmp"
    conn, srs_id = new_geopackage(tmp, crs_wkt, epsg, attach={f"src_{d}": sources[d] for d in DATES})
    try:
        conn.create_function("rscaption_srs", 2, _with_srs, deterministic=True)
        cols = ", ".join(f"{_q(n)} {t}" for n, t in CHANGE_COLUMNS)
        add_polygon_layer(conn, "changes", cols, srs_id, "rscaption: what changed between two dates")
        conn.execute('CREATE INDEX idx_changes_tile_id ON "changes"(tile_id)')
        for date in DATES:
            add_polygon_layer(conn, f"tiles_{date}", _TILE_SQL, srs_id, f"rscaption tile captions, {date} date")
            add_attributes_table(conn, f"rscaption_embeddings_{date}",
                                 "tile_id INTEGER PRIMARY KEY, embedding BLOB NOT NULL", f"tile embeddings, {date} date")
        add_attributes_table(conn, "rscaption_metadata", "key TEXT PRIMARY KEY NOT NULL, value TEXT",
                             "rscaption run metadata")
        geoms: dict[int, bytes] = {}
        for date in DATES:
            src, names = f"src_{date}", ", ".join(_q(c) for c in TILE_COLUMNS)
            conn.execute(f'INSERT OR IGNORE INTO "tiles_{date}" (geom, {names}) SELECT rscaption_srs(geom, ?), '
                         f"{names} FROM {src}.tiles ORDER BY tile_id, fid", (srs_id,))
            conn.execute(f'INSERT OR IGNORE INTO "rscaption_embeddings_{date}" SELECT tile_id, embedding FROM '
                         f"{src}.rscaption_embeddings WHERE tile_id IN (SELECT tile_id FROM {src}.tiles)")
            for tid, geom in conn.execute(f'SELECT tile_id, geom FROM "tiles_{date}"'):
                geoms.setdefault(int(tid), geom)
        names = [n for n, _ in CHANGE_COLUMNS]
        conn.executemany(f'INSERT INTO "changes" (geom, {", ".join(_q(n) for n in names)}) VALUES '
                         f"({', '.join('?' * (len(names) + 1))})",
                         [(geoms.get(int(r["tile_id"])), *[_plain(r.get(n)) for n in names]) for r in rows])
        for table in ("changes", "tiles_before", "tiles_after"):
            set_layer_extent(conn, table)
        values = {**metadata, "kind": KIND, "rscaption_format": 1, "embed_dim": int(embed_dim),
                  "crs_wkt": crs_wkt, "epsg": epsg}
        conn.executemany("INSERT OR REPLACE INTO rscaption_metadata VALUES (?, ?)",
                         [(k, json.dumps(v)) for k, v in values.items()])
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        conn.close()
        os.remove(tmp)
        raise StoreError(f"cannot write {path}: {exc}") from None
    except BaseException:
        conn.close()
        os.remove(tmp)
        raise
    conn.close()
    os.replace(tmp, path)


def _plain(v):
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def is_change_file(path) -> bool:
    """True for a GeoPackage ``rscaption change`` wrote (never raises)."""
    try:
        if not os.path.isfile(path):
            return False
        conn = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM rscaption_metadata WHERE key = 'kind'").fetchone()
        finally:
            conn.close()
        return row is not None and json.loads(row[0]) == KIND
    except (sqlite3.Error, ValueError, TypeError, OSError):
        return False


class ChangeFile:
    """A change file opened read-only; ``metadata()`` and ``path`` let search's ``model_for_store``
    find the model that made its embeddings."""

    def __init__(self, path: str):
        self.path = str(path)
        if not is_change_file(self.path):
            raise StoreError(f"{path} is not an rscaption change file")
        self._conn = sqlite3.connect(Path(self.path).absolute().as_uri() + "?mode=ro", uri=True,
                                     check_same_thread=False)
        self._meta = None

    def metadata(self) -> dict:
        if self._meta is None:
            rows = self._read("SELECT key, value FROM rscaption_metadata")
            self._meta = {k: json.loads(v) if v is not None else None for k, v in rows}
        return self._meta

    @property
    def embed_dim(self) -> int:
        return int(self.metadata()["embed_dim"])

    def _read(self, sql, args=()):
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from None

    def embeddings(self, date: str) -> tuple[np.ndarray, np.ndarray]:
        rows = self._read(f'SELECT tile_id, embedding FROM "rscaption_embeddings_{date}" WHERE tile_id IN '
                          f'(SELECT tile_id FROM "tiles_{date}") ORDER BY tile_id')
        dim = self.embed_dim
        good = [(t, b) for t, b in rows if isinstance(b, bytes) and len(b) == 4 * dim]
        ids = np.array([t for t, _ in good], np.int64)
        if not good:
            return ids, np.zeros((0, dim), np.float32)
        mat = np.frombuffer(b"".join(b for _, b in good), "<f4").reshape(len(good), dim).astype(np.float32)
        ok = np.isfinite(mat).all(1)
        return ids[ok], mat[ok]

    def changes(self, where: str | None = None) -> dict[int, dict]:
        """``changes`` rows by tile_id; ``where`` is an already checked SQLite expression."""
        names = [n for n, _ in CHANGE_COLUMNS]
        sql = f'SELECT {", ".join(_q(n) for n in names)} FROM "changes"' + (f" WHERE ({where})" if where else "")
        return {int(r[0]): dict(zip(names, r)) for r in self._read(sql + " ORDER BY tile_id")}

    def top(self, k: int) -> list[dict]:
        names = [n for n, _ in CHANGE_COLUMNS]
        rows = self._read(f'SELECT {", ".join(_q(n) for n in names)} FROM "changes" WHERE change IS NOT NULL '
                          "ORDER BY change DESC, tile_id LIMIT ?", (int(k),))
        return [dict(zip(names, r)) for r in rows]

    def close(self):
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

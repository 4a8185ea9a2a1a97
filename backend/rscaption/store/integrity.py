"""Validation of an rscaption GeoPackage, and the damaged tiles inside one.

Why a module of its own: an output file is input too. A user (or a crash, a disk, another tool)
may leave it with metadata of the wrong types, a foreign embedding size or tiles whose caption or
embedding is missing. Opening such a file must give one sentence naming the file and the fault,
not an ``AttributeError`` three calls later, and resuming must never count a damaged tile as done.

* :func:`validate` runs inside ``TileStore.open``: schema, metadata types, embedding size;
  whole-file faults raise :class:`StoreError`.
* :func:`damaged_tiles` lists per-tile faults (NULL/empty caption, missing or wrong-size
  embedding, an embedding with NaN or infinite values, a tile id on several rows, an embedding
  whose tile row was deleted); ``rscaption check`` reports them and the pipeline redoes them on resume
  (:func:`drop_damaged` deletes them so they are captioned again, not counted as resumed).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

from ..errors import StoreError

# Metadata keys whose value must be a JSON object when present; the second set may also be null
# (``tile_footprint`` is null for runs that did not choose the tile size, ``last_run`` before one ends).
OBJECT_KEYS = ("model", "source_raster", "software")
OBJECT_OR_NULL_KEYS = ("tiling", "tiling_params", "tile_footprint", "last_run", "caption_options")
TILE_COLUMNS = {"fid", "tile_id", "row", "col", "caption", "confidence", "tile_key"}


@dataclass(frozen=True)
class Damage:
    tile_id: int
    key: str | None
    reason: str


def _type_name(value) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string",
                                         bool: "a boolean"}.get(type(value), type(value).__name__)


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')}


def read_metadata(conn: sqlite3.Connection, path: str) -> dict:
    """The metadata table as a dict; a value that is not JSON is a damaged file, said so."""
    out = {}
    for key, value in conn.execute("SELECT key, value FROM rscaption_metadata"):
        try:
            out[key] = json.loads(value) if value is not None else None
        except (TypeError, ValueError):
            raise StoreError(f"{path}: metadata '{key}' is not valid JSON") from None
    return out


def validate(conn: sqlite3.Connection, path: str, table: str, format_version: int,
             any_embedding_size: bool = False) -> dict:
    """Check what every reader relies on; returns the metadata. Raises StoreError naming the fault.
    ``any_embedding_size``: for ``check`` and the writers that redo wrong-size embeddings as damage
    (resume, repair), so a file whose every embedding was truncated can be repaired, not only
    overwritten; a reader (search) still refuses it."""
    missing = TILE_COLUMNS - _columns(conn, table)
    if missing:
        raise StoreError(f"{path}: layer '{table}' lacks column(s) {', '.join(sorted(missing))}")
    if "embedding" not in _columns(conn, "rscaption_embeddings"):
        raise StoreError(f"{path}: table rscaption_embeddings has no 'embedding' column")
    meta = read_metadata(conn, path)
    if "rscaption_format" not in meta or "embed_dim" not in meta:
        raise StoreError(f"{path} is not an rscaption GeoPackage (metadata missing)")
    version = meta.get("rscaption_format")
    if isinstance(version, bool) or not isinstance(version, int):
        raise StoreError(f"{path}: metadata 'rscaption_format' must be an integer, got {_type_name(version)}")
    if version > format_version:
        raise StoreError(f"{path} was written by a newer rscaption (format {version}; "
                         f"format {format_version} supported)")
    dim = meta.get("embed_dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise StoreError(f"{path}: metadata 'embed_dim' must be a positive integer, got {dim!r}")
    for key in OBJECT_KEYS + OBJECT_OR_NULL_KEYS:
        if key in meta and not isinstance(meta[key], dict) and not (meta[key] is None and key in OBJECT_OR_NULL_KEYS):
            raise StoreError(f"{path}: metadata '{key}' must be an object, got {_type_name(meta[key])}")
    # Not one vector of the declared size: a foreign or rewritten file. EXISTS stops at the first
    # good row, so opening a 10^6-tile file does not read every embedding; the sizes are only
    # counted for the message.
    if any_embedding_size:
        return meta
    (good,) = conn.execute("SELECT EXISTS (SELECT 1 FROM rscaption_embeddings WHERE length(embedding) = ?)",
                           (4 * dim,)).fetchone()
    sizes = {} if good else dict(conn.execute("SELECT length(embedding), count(*) FROM rscaption_embeddings GROUP BY 1"))
    if sizes:
        found = ", ".join(str((n or 0) // 4) for n in sorted(sizes, key=lambda n: n or 0))
        raise StoreError(f"{path}: its embeddings have {found} values but the metadata says embed_dim {dim}")
    return meta


def damaged_tiles(conn: sqlite3.Connection, table: str, embed_dim: int) -> list[Damage]:
    """Tiles a resume must not trust, ordered by tile_id, one entry per tile id (its first fault)."""
    rows = conn.execute(
        f'SELECT t.tile_id, t.tile_key, t.caption, e.tile_id IS NOT NULL, length(e.embedding) '
        f'FROM "{table}" t LEFT JOIN rscaption_embeddings e ON e.tile_id = t.tile_id '
        f"WHERE t.caption IS NULL OR trim(t.caption) = '' OR e.embedding IS NULL "
        f"OR length(e.embedding) != ? ORDER BY t.tile_id, t.fid", (4 * int(embed_dim),)).fetchall()
    out = []
    for tile_id, key, caption, has_row, nbytes in rows:
        if caption is None or not str(caption).strip():
            reason = "no caption"
        elif not has_row or nbytes is None:
            reason = "no embedding"
        else:
            reason = f"embedding has {nbytes // 4} values, not {embed_dim}"
        out.append(Damage(int(tile_id), key, reason))
    out += nonfinite_embeddings(conn, table, embed_dim)
    out += lost_rows(conn, table)
    first = {}
    for d in out:
        first.setdefault(d.tile_id, d)
    return sorted(first.values(), key=lambda d: d.tile_id)


def lost_rows(conn: sqlite3.Connection, table: str) -> list[Damage]:
    """Rows that break the one-row-one-embedding pairing: a tile id on several rows (search and
    ``similar`` would show the tile twice with one vector) and an embedding whose tile row was
    deleted (the tile is gone from the layer and from search, yet the file still holds it). Both
    are redone whole: their rows and embedding dropped, the pipeline captions the tile again."""
    dup = conn.execute(f'SELECT tile_id, min(tile_key), count(*) FROM "{table}" '
                       "GROUP BY tile_id HAVING count(*) > 1").fetchall()
    out = [Damage(int(t), key, f"{n} rows with this tile id") for t, key, n in dup]
    orphans = conn.execute(f'SELECT e.tile_id FROM rscaption_embeddings e WHERE NOT EXISTS '
                           f'(SELECT 1 FROM "{table}" t WHERE t.tile_id = e.tile_id)').fetchall()
    return out + [Damage(int(t), None, "tile row deleted, its embedding left") for (t,) in orphans]


def nonfinite_embeddings(conn: sqlite3.Connection, table: str, embed_dim: int, batch: int = 8192) -> list[Damage]:
    """Tiles whose embedding has the right size but a NaN or infinite value: one such vector
    turns every score it meets into NaN, so search would rank nothing. One pass over the
    embeddings in chunks (about a second per 10^6 tiles of 256 values)."""
    import numpy as np

    width = 4 * int(embed_dim)
    cur = conn.execute(f'SELECT e.tile_id, e.embedding, t.tile_key FROM rscaption_embeddings e '
                       f'JOIN "{table}" t ON t.tile_id = e.tile_id '
                       f"WHERE t.caption IS NOT NULL AND trim(t.caption) != '' AND length(e.embedding) = ?",
                       (width,))
    out = []
    while True:
        rows = cur.fetchmany(batch)
        if not rows:
            return out
        blobs = [r[1] if isinstance(r[1], bytes) else bytes(width) for r in rows]
        vecs = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(rows), int(embed_dim))
        for i in np.flatnonzero(~np.isfinite(vecs).all(axis=1)):
            out.append(Damage(int(rows[i][0]), rows[i][2], "embedding has NaN or infinite values"))


def drop_damaged(conn: sqlite3.Connection, table: str, embed_dim: int) -> list[Damage]:
    """Delete damaged tiles (row and embedding) in one transaction so a resume captions them again."""
    damage = damaged_tiles(conn, table, embed_dim)
    if damage:
        ids = [(d.tile_id,) for d in damage]
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(f'DELETE FROM "{table}" WHERE tile_id = ?', ids)
            conn.executemany("DELETE FROM rscaption_embeddings WHERE tile_id = ?", ids)
            conn.execute("COMMIT")
        except sqlite3.Error:
            conn.execute("ROLLBACK")
            raise
    return damage


def describe(damage: list[Damage], total: int, first: int = 10) -> str:
    """One line: how many tiles are damaged and the first few ids with why."""
    if not damage:
        return f"ok: {total} tiles, none damaged"
    shown = ", ".join(f"{d.tile_id} ({d.reason})" for d in damage[:first])
    more = f", ... ({len(damage) - first} more)" if len(damage) > first else ""
    return f"{len(damage)} damaged tile(s) of {total}: {shown}{more}"

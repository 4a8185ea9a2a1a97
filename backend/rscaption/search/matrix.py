"""The stored tile embeddings as one contiguous float16 matrix, loaded once per file and kept.

Why: a text query against a 10^6-tile GeoPackage must answer in about 100 ms in a warm backend.
Reading a million 1 KB blobs out of ``rscaption_embeddings`` row by row takes seconds, so:

* the matrix is held in memory per file (a small LRU shared by the CLI, the worker and the
  plugin's in-process backend) and reused while the file is unchanged: its signature (inode, size,
  mtime, SQLite's file change counter, the ``-wal`` file) is one ``stat`` and a 100-byte read per
  query. When the signature moves, the database *state* (tile count, largest fid, largest embedded
  tile_id: index lookups only) says whether the embeddings changed or only attributes did;
* for cold starts a copy is kept inside the GeoPackage (table ``rscaption_search_matrix``: parts
  of tile ids + float16 rows; metadata ``search_matrix`` records the state it was built from). It
  is ignored when stale and rewritten after a rebuild, so existing files, resume and
  ``rscaption check`` need nothing: they change the state, the copy goes stale, the next search
  rebuilds it. The table is not registered in ``gpkg_contents``, so GIS clients do not list it.

float16 halves memory (512 MB for 10^6 x 256) and bandwidth; :mod:`rscaption.search` re-scores the
few rows near the cut-off with the stored float32 vectors, so rankings and scores stay exact.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import StoreError
from ..store.gpkg import TABLE
from ..store.run_lock import busy_error, is_busy

MATRIX_TABLE = "rscaption_search_matrix"
META_KEY = "search_matrix"
FORMAT = 1
PART_ROWS = 32_768          # 16 MB of float16 per part at 256-d: big reads, bounded extra memory
PERSIST_MIN_ROWS = 20_000   # smaller files load from the embeddings table in well under a second
QUIET_S = 10.0              # a file written this recently is probably being captioned: do not persist
CACHE_FILES = 2             # matrices kept in memory (each up to ~0.5 GB at 10^6 tiles)


def connect_ro(path) -> sqlite3.Connection:
    """Read-only connection. Not memory-mapped: mapped pages would count as this process's memory
    (a 10^6-tile file is 1.7 GB) for a few hundred ms saved on a cold load."""
    uri = Path(path).absolute().as_uri() + "?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None, check_same_thread=False)


def file_signature(path) -> tuple:
    """Changes whenever a transaction commits to the file (rollback journal or WAL)."""
    st = os.stat(path)
    with open(path, "rb") as fh:
        header = fh.read(28)
    counter = int.from_bytes(header[24:28], "big") if len(header) >= 28 else -1
    try:
        wal = os.stat(f"{path}-wal")
        wal_sig = (wal.st_size, wal.st_mtime_ns)
    except OSError:
        wal_sig = None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, counter, wal_sig


def db_state(conn: sqlite3.Connection) -> tuple:
    """What the matrix depends on, from indexes only (no table scan). Tiles and embeddings are
    added together (``TileStore.add``) and dropped together (``drop_damaged``); a feature deleted
    or added in QGIS moves the tile count or the largest fid; a re-captioned tile gets a new fid.
    An embedding damaged by hand is caught later: search re-reads its finalists' vectors."""
    n_tiles, max_fid = conn.execute(f'SELECT count(*), max(fid) FROM "{TABLE}"').fetchone()
    (max_id,) = conn.execute("SELECT max(tile_id) FROM rscaption_embeddings").fetchone()
    return int(n_tiles), int(max_fid or 0), int(max_id if max_id is not None else -1)


@dataclass
class SearchMatrix:
    path: str
    tile_ids: np.ndarray      # int64 [N], ascending
    vectors: np.ndarray       # float16 [N, D], row i belongs to tile_ids[i]
    state: tuple
    signature: tuple = ()
    source: str = "embeddings"  # or "stored copy": where it was loaded from (benchmarks report it)
    stored: bool = False        # the file holds a current copy (read from it or written now)
    masks: OrderedDict = field(default_factory=OrderedDict)  # filter -> bool [N], for this signature
    damaged: np.ndarray | None = None  # bool [N]: rows with a NaN or infinite value (never ranked)

    def __post_init__(self):
        if self.damaged is None and self.rows:
            bad = ~np.isfinite(self.vectors).all(axis=1)  # one NaN would make every score NaN
            self.damaged = bad if bad.any() else None

    @property
    def rows(self) -> int:
        return len(self.tile_ids)

    def approx_scores(self, queries: np.ndarray) -> np.ndarray:
        """[Q, N] float32: dot products of the float16 rows and queries (float32 accumulation), one
        pass over the matrix for all queries."""
        import torch

        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float16).T)
        with torch.inference_mode():
            out = torch.mm(torch.from_numpy(self.vectors), torch.from_numpy(q))
            return out.T.float().numpy()  # float16 arithmetic on the CPU is slow: select in float32

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Row numbers of the given tile ids (ids not in the matrix are left out)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.rows == 0 or ids.size == 0:
            return np.zeros(0, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.tile_ids, ids), self.rows - 1)
        return pos[self.tile_ids[pos] == ids]


def stream_embeddings(conn: sqlite3.Connection, path: str, dim: int, batch: int = 8192):
    """Embeddings of the tiles still in the layer, in tile_id order, straight into float16 rows."""
    present = np.fromiter((r[0] for r in conn.execute(f'SELECT DISTINCT tile_id FROM "{TABLE}" ORDER BY tile_id')),
                          dtype=np.int64)
    ids_out = np.empty(len(present), dtype=np.int64)
    out = np.empty((len(present), dim), dtype=np.float16)
    n, width = 0, 4 * dim
    cur = conn.execute("SELECT tile_id, embedding FROM rscaption_embeddings ORDER BY tile_id")
    while True:
        rows = cur.fetchmany(batch)
        if not rows:
            break
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        keep = np.isin(ids, present, assume_unique=True) if len(ids) else ids.astype(bool)
        blobs = [r[1] for r, k in zip(rows, keep) if k]
        data = b"".join(b for b in blobs if isinstance(b, bytes))
        if len(data) != width * len(blobs):
            raise StoreError(f"{path}: stored embeddings do not match embed_dim {dim} "
                             f"(run 'rscaption check {path} --repair')")
        m = len(blobs)
        ids_out[n:n + m] = ids[keep]
        out[n:n + m] = np.frombuffer(data, dtype="<f4").reshape(m, dim)
        n += m
    return ids_out[:n], out[:n]


def read_stored(conn: sqlite3.Connection, state: tuple, dim: int):
    """The copy kept in the file, or None when absent, stale or inconsistent."""
    row = conn.execute("SELECT value FROM rscaption_metadata WHERE key = ?", (META_KEY,)).fetchone()
    if row is None or row[0] is None:
        return None
    try:
        meta = json.loads(row[0])
        ok = (isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("dim") == dim
              and tuple(meta.get("state") or ()) == tuple(state))
    except (TypeError, ValueError):
        return None
    if not ok:
        return None
    rows = int(meta.get("rows", -1))
    ids = np.empty(max(rows, 0), dtype=np.int64)
    out = np.empty((max(rows, 0), dim), dtype=np.float16)
    n = 0
    try:
        for part_ids, part_vec in conn.execute(f"SELECT tile_ids, vectors FROM {MATRIX_TABLE} ORDER BY part"):
            m = len(part_ids) // 8
            if n + m > rows or len(part_vec) != 2 * dim * m:
                return None
            ids[n:n + m] = np.frombuffer(part_ids, dtype="<i8")
            out[n:n + m] = np.frombuffer(part_vec, dtype="<f2").reshape(m, dim)
            n += m
    except sqlite3.OperationalError:  # no such table: metadata copied without it
        return None
    return (ids, out) if n == rows else None


def persist(matrix: SearchMatrix, dim: int) -> bool:
    """Write the matrix into its file if the file still has the state it was built from.
    Never waits for a writer: a busy file is simply left without the copy this time."""
    try:
        conn = sqlite3.connect(Path(matrix.path).absolute().as_uri() + "?mode=rw", uri=True, timeout=0,
                               isolation_level=None)
    except sqlite3.Error:
        return False
    try:
        conn.execute("BEGIN IMMEDIATE")
        if db_state(conn) != tuple(matrix.state):
            conn.execute("ROLLBACK")
            return False
        conn.execute(f"CREATE TABLE IF NOT EXISTS {MATRIX_TABLE} "
                     "(part INTEGER PRIMARY KEY, tile_ids BLOB NOT NULL, vectors BLOB NOT NULL)")
        conn.execute(f"DELETE FROM {MATRIX_TABLE}")
        for part, start in enumerate(range(0, matrix.rows, PART_ROWS)):
            stop = start + PART_ROWS
            conn.execute(f"INSERT INTO {MATRIX_TABLE} VALUES (?, ?, ?)",
                         (part, matrix.tile_ids[start:stop].astype("<i8").tobytes(),
                          matrix.vectors[start:stop].astype("<f2").tobytes()))
        meta = {"format": FORMAT, "dtype": "float16", "dim": dim, "rows": matrix.rows,
                "state": list(matrix.state), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        conn.execute("INSERT OR REPLACE INTO rscaption_metadata (key, value) VALUES (?, ?)",
                     (META_KEY, json.dumps(meta)))
        conn.execute("COMMIT")
        return True
    except sqlite3.Error:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return False
    finally:
        conn.close()


_CACHE: OrderedDict[str, SearchMatrix] = OrderedDict()
_LOCK = threading.Lock()


def load_matrix(path, dim: int, *, persist_min_rows: int | None = None, quiet_s: float = QUIET_S,
                use_cache: bool = True) -> SearchMatrix:
    """The file's matrix: from memory while the file is unchanged, else from the copy inside the
    file when it is current, else from the embeddings table (then the copy is refreshed)."""
    path = os.path.abspath(os.fspath(path))
    key = os.path.realpath(path)
    with _LOCK:
        sig = file_signature(path)
        cached = _CACHE.get(key) if use_cache else None
        if cached is not None and cached.signature == sig and cached.vectors.shape[1] == dim:
            _CACHE.move_to_end(key)
            return cached
        conn = connect_ro(path)
        try:
            conn.execute("BEGIN")  # one snapshot for the state and the rows
            try:
                state = db_state(conn)
                if cached is not None and cached.state == state and cached.vectors.shape[1] == dim:
                    cached.signature, cached.masks = sig, OrderedDict()  # attributes may have changed
                    return cached
                _CACHE.pop(key, None)  # free the old rows before reading the new ones
                cached = None
                loaded, source = read_stored(conn, state, dim), "stored copy"
                if loaded is None:
                    loaded, source = stream_embeddings(conn, path, dim), "embeddings"
            finally:
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            if is_busy(exc):  # a writer kept it locked past the busy timeout: not damage
                raise busy_error(path) from None
            raise StoreError(f"cannot read {path}: the file is damaged ({exc})") from None
        finally:
            conn.close()
        matrix = SearchMatrix(path, loaded[0], loaded[1], state, sig, source, source == "stored copy")
        limit = PERSIST_MIN_ROWS if persist_min_rows is None else persist_min_rows
        if not matrix.stored and matrix.rows >= limit and time.time() - os.stat(path).st_mtime >= quiet_s:
            matrix.stored = persist(matrix, dim)
            if matrix.stored:
                matrix.signature = file_signature(path)
        if use_cache:
            _CACHE[key] = matrix
            while len(_CACHE) > CACHE_FILES:
                _CACHE.popitem(last=False)
        return matrix


def refresh_stored_matrix(path, dim: int) -> SearchMatrix:
    """Build the copy inside the file now (e.g. right after a run), whatever its size or age."""
    matrix = load_matrix(path, dim, persist_min_rows=0, quiet_s=0.0, use_cache=False)
    if not matrix.stored:
        raise StoreError(f"cannot write the search matrix into {path} (read-only or busy)")
    return matrix


def forget(path=None) -> None:
    """Drop cached matrices (one file, or all): tests and benchmarks measuring cold loads."""
    with _LOCK:
        if path is None:
            _CACHE.clear()
        else:
            _CACHE.pop(os.path.realpath(os.path.abspath(os.fspath(path))), None)

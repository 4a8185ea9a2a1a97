"""Synthetic rscaption GeoPackages of any size, written fast with the real schema.

Why: search has to stay interactive on 10^6-tile mosaics, and nobody can caption a million tiles to
measure it. The benchmark (and tests of the search path) need files that look like real outputs to
every reader: the schema comes from :meth:`TileStore.create`, geometry blobs are byte-identical to
:func:`rscaption.store.gpkg.encode_polygon`, the R-tree is filled, and the model metadata names a real
model so that ``rscaption search`` loads it. Only the content is synthetic: tiles on a grid,
embeddings drawn around a few cluster centres (so queries have structure to find), captions and
confidences from those clusters.

Rows are built with numpy and inserted with ``executemany`` in one transaction; the R-tree insert
trigger (which calls Python ``ST_*`` functions per row) is dropped for the bulk insert and the
index rows are written directly, then the trigger is put back exactly as it was.
"""

from __future__ import annotations

import os

import numpy as np

from ..store.gpkg import RTREE, TABLE, TileStore, now_iso

CHUNK = 50_000
_GEOM = np.dtype([("magic", "S2"), ("version", "u1"), ("flags", "u1"), ("srs", "<i4"), ("env", "<f8", 4),
                  ("order", "u1"), ("gtype", "<u4"), ("rings", "<u4"), ("points", "<u4"), ("xy", "<f8", 10)])
WORDS = ("river", "forest", "farmland", "dense residential area", "parking lot", "beach", "lake", "bridge",
         "airport", "industrial area", "meadow", "freeway", "harbor", "golf course", "desert", "stadium")


def polygon_blobs(minx: np.ndarray, miny: np.ndarray, size: float, srs_id: int) -> list[bytes]:
    """GeoPackage polygon blobs (envelope, little-endian) of axis-aligned squares, vectorised."""
    n = len(minx)
    rec = np.zeros(n, dtype=_GEOM)
    rec["magic"], rec["version"], rec["flags"], rec["srs"] = b"GP", 0, 0b00000011, srs_id
    maxx, maxy = minx + size, miny + size
    rec["env"] = np.stack([minx, maxx, miny, maxy], axis=1)
    rec["order"], rec["gtype"], rec["rings"], rec["points"] = 1, 3, 1, 5
    # the ring the tiler makes for a north-up raster: top-left, bottom-left, bottom-right, top-right
    rec["xy"] = np.stack([minx, maxy, minx, miny, maxx, miny, maxx, maxy, minx, maxy], axis=1)
    raw, step = rec.tobytes(), _GEOM.itemsize
    return [raw[i:i + step] for i in range(0, n * step, step)]


def unit_rows(rng: np.random.Generator, centres: np.ndarray, labels: np.ndarray, noise: float) -> np.ndarray:
    vec = centres[labels] + noise * rng.standard_normal((len(labels), centres.shape[1]), dtype=np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    return vec.astype("<f4")


def write_synthetic_store(path, n: int, embed_dim: int, model: dict, *, centres: np.ndarray | None = None,
                          tile_m: float = 256.0, epsg: int = 32618, seed: int = 0, noise: float = 0.08,
                          chunk: int = CHUNK) -> str:
    """A GeoPackage of ``n`` tiles on a square grid; ``model`` is the metadata entry ``{"id", "hash"}``
    of the model whose text tower will search it. ``centres`` [C, D] (unit rows) are the cluster
    centres of the embeddings, e.g. text embeddings of :data:`WORDS`; random ones otherwise."""
    path = os.fspath(path)
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.standard_normal((len(WORDS), embed_dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    centres = np.asarray(centres, dtype=np.float32)
    words = [WORDS[i % len(WORDS)] for i in range(len(centres))]
    cols = int(np.ceil(np.sqrt(n)))
    x0, y0 = 500_000.0, 4_000_000.0
    meta = {"model": model, "source_raster": {"path": "synthetic", "checksum": f"synthetic-{n}-{seed}"},
            "software": {"name": "rscaption", "version": "synthetic"}, "language": "en", "synthetic": True}
    store = TileStore.create(path, None, epsg, embed_dim, meta, overwrite=True)
    conn, srs_id = store._conn, store.srs_id  # the bulk insert needs the raw connection
    created = now_iso()
    trigger = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?",
                           (f"{RTREE}_insert",)).fetchone()[0]
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(f'DROP TRIGGER "{RTREE}_insert"')
    for start in range(0, n, chunk):
        ids = np.arange(start, min(n, start + chunk), dtype=np.int64)
        row, col = ids // cols, ids % cols
        minx, miny = x0 + col * tile_m, y0 - (row + 1) * tile_m
        blobs = polygon_blobs(minx, miny, tile_m, srs_id)
        labels = rng.integers(0, len(centres), len(ids))
        conf = rng.random(len(ids))
        emb = unit_rows(rng, centres, labels, noise)
        tile_ids, fids = ids, ids + 1  # tile ids count from 0 like the tiler's, fids from 1
        conn.executemany(
            f'INSERT INTO "{TABLE}" (fid, geom, tile_id, "row", "col", caption, confidence, model, created, '
            "px_col_off, px_row_off, px_width, px_height, valid_fraction, tile_key) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 256, 256, 1.0, ?)",
            zip(fids.tolist(), blobs, tile_ids.tolist(), row.tolist(), col.tolist(),
                (f"an aerial image of a {words[c]}" for c in labels.tolist()), conf.tolist(),
                (model.get("id"),) * len(ids), (created,) * len(ids), (col * 256).tolist(), (row * 256).tolist(),
                (f"synthetic:{t}" for t in tile_ids.tolist())))
        conn.executemany(f'INSERT INTO "{RTREE}" VALUES (?, ?, ?, ?, ?)',
                         zip(fids.tolist(), minx.tolist(), (minx + tile_m).tolist(), miny.tolist(),
                             (miny + tile_m).tolist()))
        raw, step = emb.tobytes(), 4 * embed_dim
        conn.executemany("INSERT INTO rscaption_embeddings VALUES (?, ?)",
                         zip(tile_ids.tolist(), (raw[i:i + step] for i in range(0, len(raw), step))))
    conn.execute(trigger)
    conn.execute("UPDATE gpkg_contents SET min_x = ?, min_y = ?, max_x = ?, max_y = ? WHERE table_name = ?",
                 (x0, y0 - ((n - 1) // cols + 1) * tile_m, x0 + cols * tile_m, y0, TABLE))
    conn.execute("COMMIT")
    store.set_metadata({"finished": now_iso()})
    store.close()
    return path

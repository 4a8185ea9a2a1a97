"""Tiles that look like a given tile: rank a GeoPackage's tiles by image-embedding similarity.

Why a separate path from text search: the query is already in the file (the chosen tile's stored
image embedding), so no model is loaded and no torch is needed; ranking is the same cosine as
:func:`rscaption.search.rank`. The query tile itself is left out of the results: it would always be
first with score 1.0 and tells the user nothing, so ``k`` hits are ``k`` *other* tiles.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import StoreError
from ..store.gpkg import TileStore
from .query import SearchHit, _int_or, rank, warn_damaged


def similar(store: TileStore | str | os.PathLike, tile_id: int, k: int = 10,
            min_confidence: float | None = None) -> list[SearchHit]:
    """The ``k`` tiles most similar to ``tile_id`` (best first, the tile itself excluded).

    ``store`` is an open :class:`TileStore` or a GeoPackage path. ``min_confidence`` keeps only
    tiles whose caption confidence reaches it before ranking (the query tile need not reach it).
    """
    if isinstance(store, (str, os.PathLike)):
        path = os.fspath(store)
        if not os.path.exists(path):
            raise StoreError(f"{path} does not exist")
        with TileStore.open(path) as opened:
            return similar(opened, tile_id, k, min_confidence)
    if min_confidence is not None and not 0.0 <= float(min_confidence) <= 1.0:
        raise StoreError(f"the minimum confidence must be between 0 and 1, not {min_confidence}")
    try:
        tile_id = int(tile_id)
    except (TypeError, ValueError):
        raise StoreError(f"the tile id must be a whole number, not {tile_id!r}") from None
    tile_ids, emb = store.embeddings()
    attrs = {int(t["tile_id"]): t for t in store.tiles() if t.get("tile_id") is not None}
    where = np.flatnonzero(tile_ids == tile_id)
    if len(where) == 0:
        if tile_id in attrs:
            raise StoreError(f"tile {tile_id} of {store.path} has no stored embedding "
                             f"(run 'rscaption check {store.path} --repair')")
        span = f" (its tile ids run {int(tile_ids.min())}..{int(tile_ids.max())})" if len(tile_ids) else ""
        raise StoreError(f"tile {tile_id} is not in {store.path}{span}")
    query = emb[where[0]]
    finite = np.isfinite(emb).all(axis=1)
    if not finite[where[0]]:
        raise StoreError(f"tile {tile_id} of {store.path} has NaN or infinite embedding values "
                         f"(run 'rscaption check {store.path} --repair')")
    keep = (tile_ids != tile_id) & finite
    if not finite.all():
        warn_damaged(store.path, int(np.count_nonzero(~finite)))
    if min_confidence:
        keep &= np.array([(attrs.get(int(t), {}).get("confidence") or 0.0) >= float(min_confidence)
                          for t in tile_ids], dtype=bool)
    tile_ids, emb = tile_ids[keep], emb[keep]
    order, scores = rank(query, emb, max(0, int(k)))
    hits = []
    for i, score in zip(order, scores):
        t = attrs.get(int(tile_ids[i]), {})
        conf = t.get("confidence")
        hits.append(SearchHit(tile_id=int(tile_ids[i]), row=_int_or(t.get("row"), -1), col=_int_or(t.get("col"), -1),
                              score=float(score), caption=str(t.get("caption") or ""),
                              confidence=None if conf is None else float(conf)))
    return hits

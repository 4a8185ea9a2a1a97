"""Text search over a captioned GeoPackage.

Search needs only the text tower of the model that made the stored image embeddings, so the model
is taken from the file's metadata and its hash is checked: ranking embeddings from one model
against a query embedded by another gives confident nonsense, which is worse than an error.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from .errors import ModelError, StoreError
from .gpkg import TileStore


@dataclass
class SearchHit:
    tile_id: int
    row: int
    col: int
    score: float
    caption: str
    confidence: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def rank(query_embedding: np.ndarray, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine ranking; embeddings are stored L2-normalised so this is a dot product.
    Ties break by position (tile_id order) so rankings are reproducible across reopenings."""
    q = np.asarray(query_embedding, dtype=np.float32).reshape(-1)
    scores = embeddings.astype(np.float32) @ q
    order = np.lexsort((np.arange(len(scores)), -scores))[: max(0, k)]
    return order, scores[order]


def model_for_store(store: TileStore, model=None, device=None):
    """The model recorded in the store, or an explicit one whose hash matches."""
    from .models.registry import load_model

    meta = store.metadata().get("model", {})
    want_hash = meta.get("hash")
    if model is not None and not isinstance(model, (str, os.PathLike)):
        cap = model
    else:
        candidates = [str(model)] if model is not None else [meta.get("id"), "default"]
        cap, errors = None, []
        for name in [c for c in candidates if c]:
            try:
                cap = load_model(name, device=device)
            except ModelError as e:
                errors.append(str(e))
                continue
            if model is None and want_hash and cap.model_hash != want_hash:
                errors.append(f"model '{name}' has hash {cap.model_hash[:12]}, the file needs {want_hash[:12]}")
                cap = None
                continue
            break
        if cap is None:
            raise ModelError(f"cannot load the model that made {store.path} ({meta.get('id')}): "
                             + "; ".join(errors) + ". Pass --model with that checkpoint")
    if want_hash and cap.model_hash != want_hash:
        raise StoreError(f"{store.path} was made by model {meta.get('id')} ({want_hash[:12]}), "
                         f"not {cap.model_id} ({cap.model_hash[:12]}); its embeddings are not comparable")
    return cap


def search_store(gpkg_path: str, query: str, k: int = 10, model=None, device=None,
                 min_confidence: float | None = None) -> list[SearchHit]:
    """Top ``k`` tiles for ``query``; ``min_confidence`` keeps only tiles whose caption confidence
    reaches it *before* ranking, so k confident tiles come back rather than fewer than k."""
    if not query or not query.strip():
        raise StoreError("the search query is empty")
    if not os.path.exists(gpkg_path):
        raise StoreError(f"{gpkg_path} does not exist")
    if min_confidence is not None and not 0.0 <= float(min_confidence) <= 1.0:
        raise StoreError(f"the minimum confidence must be between 0 and 1, not {min_confidence}")
    with TileStore.open(gpkg_path) as store:
        tile_ids, emb = store.embeddings()
        if len(tile_ids) == 0:
            return []
        cap = model_for_store(store, model, device)
        attrs = {t["tile_id"]: t for t in store.tiles()}
        if min_confidence:
            keep = np.array([(attrs.get(int(t), {}).get("confidence") or 0.0) >= float(min_confidence)
                             for t in tile_ids], dtype=bool)
            tile_ids, emb = tile_ids[keep], emb[keep]
            if len(tile_ids) == 0:
                return []
        q = cap.embed_texts([query.strip()])[0]
        if q.shape[-1] != emb.shape[1]:  # another model's vectors: ranking them would be nonsense
            raise StoreError(f"{gpkg_path} holds {emb.shape[1]}-d embeddings but model {cap.model_id} "
                             f"makes {q.shape[-1]}-d ones; search it with the model that captioned it")
        order, scores = rank(q, emb, k)
    hits = []
    for i, s in zip(order, scores):
        t = attrs.get(int(tile_ids[i]), {})
        conf = t.get("confidence")
        hits.append(SearchHit(tile_id=int(tile_ids[i]), row=_int_or(t.get("row"), -1), col=_int_or(t.get("col"), -1),
                              score=float(s), caption=str(t.get("caption") or ""),
                              confidence=None if conf is None else float(conf)))
    return hits


def _int_or(value, default: int) -> int:
    """A tile's row/col as int; NULL or non-numeric (edited in QGIS, damaged) -> ``default``."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default

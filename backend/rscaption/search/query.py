"""Text search over a captioned GeoPackage.

Search needs only the text tower of the model that made the stored image embeddings, so the model
is taken from the file's metadata and its hash is checked: ranking embeddings from one model
against a query embedded by another gives confident nonsense, which is worse than an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ModelError, StoreError
from ..store.gpkg import TileStore

log = logging.getLogger("rscaption.search")


@dataclass
class SearchHit:
    tile_id: int
    row: int
    col: int
    score: float
    caption: str
    confidence: float | None = None
    # this query's "no good match" line (models/match_line.py): a score below it is no better than
    # the query's scores on images of unrelated scenes; None when the model has no reference images
    match_line: float | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["match_line"] is None:  # uncalibrated models keep the hit's former shape
            del data["match_line"]
        return data


def rank(query_embedding: np.ndarray, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine ranking; embeddings are stored L2-normalised so this is a dot product.
    Ties break by position (tile_id order) so rankings are reproducible across reopenings."""
    q = np.asarray(query_embedding, dtype=np.float32).reshape(-1)
    scores = embeddings.astype(np.float32) @ q
    order = np.lexsort((np.arange(len(scores)), -scores))[: max(0, k)]
    return order, scores[order]


def load_search_model(name, device=None):
    """The text tower alone when the checkpoint allows it (no image tower, decoders or transformers:
    seconds and ~0.5 GB less for a cold search), else the full model."""
    from ..models.registry import load_model
    from ..models.text_query import load_text_query_model

    return load_text_query_model(name) or load_model(name, device=device)


def model_for_store(store: TileStore, model=None, device=None, text_only: bool = False):
    """The model recorded in the store, or an explicit one whose hash matches. ``text_only``: for
    search, just the text tower where the checkpoint allows it (it cannot caption)."""
    from ..models.registry import load_model

    loader = load_search_model if text_only else load_model

    meta = store.metadata().get("model", {})
    want_hash = meta.get("hash")
    if model is not None and not isinstance(model, (str, os.PathLike)):
        cap = model
    else:
        candidates = [str(model)] if model is not None else [meta.get("id"), "default"]
        cap, errors = None, []
        for name in dict.fromkeys(c for c in candidates if c):  # a file made by 'default': tried once
            try:
                cap = loader(name, device=device)
            except ModelError as e:
                errors.append(str(e))
                continue
            if model is None and want_hash and cap.model_hash != want_hash:
                errors.append(f"model '{name}' has hash {cap.model_hash[:12]}")  # the needed one is said once
                cap = None
                continue
            break
        if cap is None:
            made_by = f"{meta.get('id')}, hash {want_hash[:12]}" if want_hash else f"{meta.get('id')}"
            raise ModelError(f"cannot load the model that made {store.path} ({made_by}): "
                             + "; ".join(errors) + ". Pass --model with that checkpoint")
    if want_hash and cap.model_hash != want_hash:
        raise StoreError(f"{store.path} was made by model {meta.get('id')} ({want_hash[:12]}), "
                         f"not {cap.model_id} ({cap.model_hash[:12]}); its embeddings are not comparable")
    return cap


# Bound on |float16 score - float32 score| for the unit vectors the store holds: rows and query
# rounded to float16 (2^-11 relative each: at most 2^-10 on a dot product of unit vectors), the
# float16 result (2^-11), float32 accumulation (~256 x 2^-24): about 0.0015 < 2^-9.
EXACT_MARGIN = 2.0 ** -9


def search_store(gpkg_path: str, query: str, k: int = 10, model=None, device=None,
                 min_confidence: float | None = None, *, bbox=None, where: str | None = None) -> list[SearchHit]:
    """Top ``k`` tiles for ``query``. ``min_confidence``, ``bbox`` (MINX, MINY, MAXX, MAXY in the
    layer's CRS: tiles whose box intersects it) and ``where`` (an SQLite expression over the layer's
    columns) keep tiles *before* ranking, so k qualifying tiles come back rather than fewer."""
    return search_queries(gpkg_path, [query], k, model, device, min_confidence, bbox=bbox, where=where)[0]


def search_queries(gpkg_path: str, queries: list[str], k: int = 10, model=None, device=None,
                   min_confidence: float | None = None, *, bbox=None, where: str | None = None,
                   should_cancel=None) -> list[list[SearchHit]]:
    """:func:`search_store` for several queries with one model load and one pass over the matrix;
    the i-th list answers ``queries[i]`` exactly as a single search would. ``should_cancel()`` true
    (the worker's cancel) stops a running ``where`` filter: Cancelled."""
    from .filter import check_bbox, check_min_confidence, check_where, filter_mask
    from .matrix import load_matrix

    queries = [q.strip() if isinstance(q, str) else q for q in (queries or [])]
    if not queries:
        raise StoreError("no search query given")
    for q in queries:
        if not isinstance(q, str) or not q:
            raise StoreError("the search query is empty")
    if not os.path.exists(gpkg_path):
        raise StoreError(f"{gpkg_path} does not exist")
    min_confidence = check_min_confidence(min_confidence)
    bbox, where = check_bbox(bbox), check_where(where)
    left = threading.Event()  # the caller is gone (Ctrl-C while the model loads): stop the filter too

    def rows():
        matrix = load_matrix(gpkg_path, store.embed_dim)
        return matrix, filter_mask(matrix, where, bbox, min_confidence,
                                   lambda: left.is_set() or bool(should_cancel and should_cancel()))

    with TileStore.open(gpkg_path, readonly=True) as store:
        if model is not None and not isinstance(model, (str, os.PathLike)):
            (matrix, mask), cap, model_error = rows(), model_for_store(store, model, device, True), None
        else:  # a cold call: read the matrix (sqlite, numpy: no GIL) while torch and the model load
            with ThreadPoolExecutor(1, thread_name_prefix="rscaption-matrix") as pool:
                pending = pool.submit(rows)
                try:
                    cap, model_error = model_for_store(store, model, device, text_only=True), None
                except (ModelError, StoreError) as exc:
                    cap, model_error = None, exc
                except BaseException:  # the pool waits for its thread on the way out: end it now
                    left.set()
                    raise
                try:
                    matrix, mask = _result(pending)
                except BaseException:
                    left.set()
                    raise
        mask = _without_damaged(matrix, mask, gpkg_path)
        if matrix.rows == 0 or (mask is not None and not mask.any()):
            return [[] for _ in queries]  # nothing to rank: no model needed
        if model_error is not None:
            raise model_error
        return _ranked(store, matrix, mask, cap, queries, k, gpkg_path)


def _result(pending):
    """The future's result, waited for in short steps: a Ctrl-C is often delivered to the thread that
    runs the query, and a main thread asleep in one long wait would never wake up to raise it."""
    while True:
        try:
            return pending.result(timeout=0.2)
        except FutureTimeout:
            continue


def _without_damaged(matrix, mask, path):
    """Leave out rows whose vector has a NaN or infinite value (one warning line): a single one
    would otherwise make the top-k threshold NaN and every search come back empty."""
    if matrix.damaged is None:
        return mask
    warn_damaged(path, int(np.count_nonzero(matrix.damaged)))
    return ~matrix.damaged if mask is None else mask & ~matrix.damaged


def warn_damaged(path, count: int) -> None:
    log.warning("warning: %s: %d tile(s) with NaN or infinite embedding values are skipped "
                "(run 'rscaption check %s --repair')", path, count, path)


def _ranked(store, matrix, mask, cap, queries, k, gpkg_path) -> list[list[SearchHit]]:
    dim = store.embed_dim
    # one text at a time: a batch pads the texts and moves the last float bits, and a query must
    # score the same alone or in a file of queries
    with search_threads():
        q = np.concatenate([np.asarray(cap.embed_texts([t]), dtype=np.float32) for t in queries])
    if q.shape[-1] != dim:  # another model's vectors: ranking them would be nonsense
        raise StoreError(f"{gpkg_path} holds {dim}-d embeddings but model {cap.model_id} "
                         f"makes {q.shape[-1]}-d ones; search it with the model that captioned it")
    approx = matrix.approx_scores(q)  # one pass over the float16 matrix for every query
    picks = [_candidates(row, mask, k) for row in approx]
    exact = _stored_vectors(store, matrix.tile_ids[np.unique(np.concatenate(picks))])
    ranked = [_rerank(matrix, cand, exact, qv, k) for cand, qv in zip(picks, q)]
    attrs = _attributes(store, sorted({t for hits in ranked for t, _ in hits}))
    lines = _match_lines(cap, q)
    return [[_hit(t, score, attrs.get(t, {}), line) for t, score in hits] for hits, line in zip(ranked, lines)]


def _match_lines(cap, q: np.ndarray) -> list[float | None]:
    """Each query's "no good match" line from the model's own reference images (None: no scene head)."""
    from ..models.match_line import match_line_for

    lines = match_line_for(cap)
    return [None if lines is None else lines.line(v) for v in q]


@contextlib.contextmanager
def search_threads():
    """One intra-op thread while embedding query texts (``RSCAPTION_SEARCH_THREADS`` to change): a
    query's tensors are tiny, so more threads buy nothing on an idle machine and, on a shared one,
    wait on each other at every one of the model's small ops (seen: a 30 ms text embedding taking
    0.9 s at load 7 on 2 cores). The one big matrix product keeps torch's threads: it has a
    single barrier and reads 0.5 GB at 10^6 tiles, where a second core helps. torch's OpenMP
    setting is per calling thread, and it is restored afterwards."""
    import torch

    want = max(1, int(os.environ.get("RSCAPTION_SEARCH_THREADS") or 1))
    old = torch.get_num_threads()
    if old != want:
        torch.set_num_threads(want)
    try:
        yield
    finally:
        if old != want:
            torch.set_num_threads(old)


def _candidates(scores: np.ndarray, mask, k: int) -> np.ndarray:
    """Rows that can be in the exact top ``k``: every row whose float16 score is within twice the
    error bound of the k-th best one (ascending row numbers)."""
    import torch

    if mask is not None:
        scores = np.where(mask, scores, np.float32(-np.inf))
        valid = int(np.count_nonzero(mask))
    else:
        valid = len(scores)
    kk = min(max(0, int(k)), valid)
    if kk == 0:
        return np.zeros(0, dtype=np.int64)
    # torch's top-k: a few ms on 10^6 scores where numpy's argpartition takes several times that
    kth = float(torch.topk(torch.from_numpy(scores), kk, sorted=False).values.min())
    return np.flatnonzero(scores >= np.float32(kth - 2 * EXACT_MARGIN))


def _stored_vectors(store: TileStore, tile_ids: np.ndarray) -> dict[int, np.ndarray]:
    """The float32 vectors of a few tiles, by primary key."""
    return store.embeddings_of([int(t) for t in tile_ids])


def _rerank(matrix, cand: np.ndarray, exact: dict, q: np.ndarray, k: int) -> list[tuple[int, float]]:
    ids = matrix.tile_ids[cand]
    have = np.array([int(t) in exact for t in ids], dtype=bool)
    ids = ids[have]
    if len(ids) == 0:
        return []
    # float64 sums of the float32 vectors: a row's score does not depend on which rows it is
    # scored with (BLAS blocking would change the last float32 bits and reorder near-ties)
    vecs = np.stack([exact[int(t)] for t in ids]).astype(np.float64)
    scores = vecs @ q.astype(np.float32).astype(np.float64)
    order = np.lexsort((np.arange(len(ids)), -scores))[: max(0, k)]  # ties: tile_id order, as rank()
    return [(int(ids[i]), float(scores[i])) for i in order]


def _attributes(store: TileStore, tile_ids: list[int]) -> dict[int, dict]:
    return store.tiles_by_id(tile_ids) if tile_ids else {}


def _hit(tile_id: int, score: float, t: dict, match_line: float | None = None) -> SearchHit:
    conf = t.get("confidence")
    return SearchHit(tile_id=int(tile_id), row=_int_or(t.get("row"), -1), col=_int_or(t.get("col"), -1),
                     score=float(score), caption=str(t.get("caption") or ""),
                     confidence=None if conf is None else float(conf), match_line=match_line)


def _int_or(value, default: int) -> int:
    """A tile's row/col as int; NULL or non-numeric (edited in QGIS, damaged) -> ``default``."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default

"""search/: rank a GeoPackage's tiles by text queries or by likeness to one of its tiles.

Modules:

- ``query.py``: rank stored tile embeddings against text queries with the model recorded in the
  file: ``search_store`` (one query), ``search_queries`` (several, one model load); float16
  candidates re-scored exactly from the stored float32 vectors; one intra-op thread
- ``matrix.py``: the embeddings as one float16 matrix per file: an in-memory LRU reused while the
  file's signature (stat, SQLite change counter, WAL) is unchanged, a copy inside the GeoPackage
  (``rscaption_search_matrix``, metadata ``search_matrix`` with the state it was built from) for
  cold starts, rebuilt when stale
- ``filter.py``: ``--where`` / ``--bbox`` / min confidence -> the tiles that may be ranked: SQLite
  on a read-only connection whose authorizer lets it read only the tiles layer and its R-tree;
  masks cached per matrix
- ``cli.py``: ``rscaption search`` arguments, ``--queries FILE`` reading, output grouped per query
- ``similar.py``: rank a file's tiles by likeness to one of its tiles (cosine of the stored image
  embeddings, the tile itself excluded; no model load)

Contract (search)::

    search_store(gpkg, query, k=10, model=None, device=None, min_confidence=None, *, bbox=None, where=None)
        -> list[SearchHit(tile_id, row, col, score, caption, confidence, match_line)]
    # match_line: the query's "no good match" line (models/match_line.py), None without a scene head
    search_queries(gpkg, [query, ...], k, ...) -> list[list[SearchHit]]   # one model load, same hits as one by one
    load_matrix(gpkg, embed_dim) -> SearchMatrix(tile_ids, vectors float16)   # cached; refresh_stored_matrix(gpkg, dim)
    # worker: {"cmd": "search", "gpkg", "query" | "queries": [...], "k", "min_confidence", "bbox", "where"}
    #   -> result {"hits": [...]} for "query", {"results": [{"query", "hits"}]} for "queries"

Ranking: float16 scores for every row (one pass for all queries), then every row within twice the
float16 error bound (2^-9 for unit vectors) of the k-th score is re-scored from the stored float32
vector, so the order and the scores are those of a float32 brute force.
"""

# The public names of the former module ``rscaption.search`` (README documents
# ``rscaption.search.search_queries``), imported on first use so that importing a
# submodule (matrix, filter) loads no more than it did before the regrouping.
_QUERY_NAMES = (
    "SearchHit", "rank", "load_search_model", "model_for_store", "EXACT_MARGIN", "search_store",
    "search_queries", "search_threads",
)
__all__ = list(_QUERY_NAMES)


def __getattr__(name):
    if name in _QUERY_NAMES:
        from . import query

        return getattr(query, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

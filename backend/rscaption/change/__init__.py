"""change/: what changed between two dates, tile by tile (``rscaption change BEFORE AFTER -o OUT``).

An engine-level room: it runs the caption pipeline (engine/) on both dates, reads and writes
GeoPackages (store/), scores with the model's embeddings and scene head (models/), searches
(search/) and builds its fitting pairs from the labelled sets (data/). Only the entry points and
bench import it.

Modules:

- ``align.py``: the after raster on the before raster's grid (rasterio ``WarpedVRT`` written as a
  small VRT), the overlap line, the resolution (> 2x) and band-meaning warnings
- ``run.py``: ``change_rasters``: caption both dates (reusing caption GeoPackages), score, write;
  resumable through ``OUT.gpkg.parts/``; ``ChangeSummary``
- ``scoring.py``: the two dates' caption files -> one ``changes`` row per tile (who is scored)
- ``score.py``: the change score: pair features (1 - cos, scene-posterior distances) and the
  fitted logistic ``ChangeScorer`` (``change.json`` beside the checkpoint; 1 - cos without it)
- ``summary.py``: scene names, the one-line sentence, why a tile is not scored
- ``store.py``: the change GeoPackage (``changes``, ``tiles_before``/``tiles_after`` and their
  embeddings, metadata); ``ChangeFile`` reader, ``is_change_file``
- ``search.py``: text search of a change file: the after date, the before date, or a transition
  ("farmland that became houses")
- ``cli.py``: ``rscaption change`` arguments and output (``cli.py`` only wires it)
- ``pairs.py``, ``fit.py``: labelled val/train pairs (swaps, half swaps, jitter) from the scene sets,
  the scorer's fit and its val report (``tools/fit_change_score.py``)

Contract (change)::

    change_rasters(before, after, out_gpkg, *, model="default", tile_size="auto", top_k=10, batch_size=8,
                   device=None, on_progress=None(phase, done, total), on_message=None(line),
                   should_cancel=None, resume=True, overwrite=False, confirm_large=False) -> ChangeSummary
    search_changes(gpkg, query, k=10, model=None, device=None, *, date=None, where=None) -> list[ChangeHit]
    is_change_file(path) -> bool
    # worker: {"cmd": "change", "before", "after", "out", ...} -> log / progress{phase} / result{top} / done
"""

_NAMES = {"change_rasters": "run", "ChangeSummary": "run", "search_changes": "search", "ChangeHit": "search",
          "is_change_file": "store", "ChangeFile": "store"}
__all__ = list(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

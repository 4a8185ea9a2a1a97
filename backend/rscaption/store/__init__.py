"""store/: the GeoPackage a run writes and search reads; its checks and its lock.

Modules:

- ``gpkg.py``: ``TileStore``: the GeoPackage written with sqlite3 (layer ``tiles``, table
  ``rscaption_embeddings``, table ``rscaption_metadata``); incremental, resumable writes
- ``layers.py``: GeoPackages with polygon layers of any name (core tables, SRS, R-tree and its
  triggers per layer) for files holding several layers: the change file (``change/store.py``)
- ``gpkg_sql.py``: the ST_* functions the GeoPackage R-tree triggers call (envelopes from the
  geometry blobs); and ``interrupts_deferred``, which holds a Ctrl-C until the transaction ends
  (SQLite would turn one raised inside these functions into a write error), so a cancel mid-write
  commits the batch and stays a cancel (a SIGTERM the CLI treats as Ctrl-C too); ``bounded``, a
  deadline and a cancel check for a statement that could run forever (a user's ``--where``)
- ``tile_style.py``: the tiles layer's default QGIS style (QML + SLD text, the plugin's look:
  outlines, low-confidence hatch, caption labels and map tips, two-decimal confidence) written
  into ``layer_styles`` after every run, and the embeddings/metadata tables registered under the
  format's own data type so layer lists show ``tiles`` alone
- ``integrity.py``: what ``TileStore.open`` validates (schema, metadata types, embedding size:
  ``StoreError`` naming the file) and the damaged tiles (no caption, missing or wrong-size
  embedding, NaN or infinite values) that resume redoes
- ``run_lock.py``: one writer per output: ``RunLock`` holds an OS lock on ``OUT.gpkg.lock`` of the
  resolved path (PID, host, start time inside for the refusal message; never opened through a
  symlink), released by the kernel when the holder dies, so a killed run's lock is taken over;
  ``check_output_path``, the output checks the CLI, the worker and ``caption_raster`` share

Contract (store)::

    store = TileStore.create(path, crs_wkt, epsg, embed_dim, metadata) / TileStore.open(path)
    store.done_keys() -> set[str]; store.add(records); store.metadata(); store.embeddings()
    store.embeddings_of(tile_ids) -> {tile_id: float32 [D]}; store.tiles_by_id(tile_ids) -> {tile_id: attrs}
"""

"""engine/: tiles -> batches -> embeddings + captions -> the store (local threads or Ray).

Modules:

- ``check.py``: ``rscaption check OUT.gpkg [--repair]``: report damaged tiles (exit 1), re-caption
  them with the file's model and source raster
- ``run_size.py``: the large-run guard: over ``LARGE_RUN_TILES`` planned tiles a run needs
  ``--yes`` / ``confirm_large``; the conservative tiles/s estimate
- ``oom.py``: out of accelerator memory in a batch: halve the batch (kept for the run), at one tile
  move the model to the CPU, a warning each step; called from the per-batch step every engine runs
- ``plan.py``: a run's tiles without lists: resume keys made on demand (``PlanKeys``), the tiles
  left after a resume as a lazy iterator over one bit per planned tile (``left_to_do``)
- ``pipeline.py``: ``caption_raster(...)``: tiles -> batches -> embed -> caption -> ``TileStore``,
  with progress, cancel, resume; ``workers=0`` is the earlier sequential loop (the benchmark's
  baseline)
- ``provenance.py``: what a resume must agree with (caption options: refused in one line when they
  differ), the compute dtypes that made the tiles (recorded before each run's first commit, both
  engines), and the stop when the raster changes on disk during a run
- ``ray.py``: ``caption --engine ray``: shards of whole batches on Ray actors (model loaded once
  per worker, a GPU each when the cluster has them), the driver the one writer through
  ``TileStore``; dead workers retried; Ray imported only here (optional extra)
- ``local.py``: the local engine's threads: a reader (bounded queue of tile batches), one single-
  threaded model worker per usable core (``sched_getaffinity``), the caller's thread as the one in-
  order writer; errors and cancel keep every finished batch
"""

"""core/: no widgets: backend modes and client, tasks, the result layer, settings.

Modules:

- ``wording.py``: backend messages in the dialog's words (no command-line options in the GUI)
- ``inprocess_guard.py``: before the in-process backend loads torch: triton marked absent and
  torch.compile off, so torch's optional compilers never load into QGIS's process (libtriton.so
  crashes the desktop)
- ``tasks.py``: ``QgsTask``s for caption and search (progress, cancel, never on the GUI thread)
- ``runner.py``: runs a job in-process or through the subprocess backend
- ``backend_client.py``: client of ``rscaption serve`` (NDJSON over stdin/stdout, heartbeat,
  cancel)
- ``ui/caption_run.py``, ``layers.py``: the result layer: opened on the output GeoPackage (an open
  layer of the same file is reused), styled, refreshed as tiles land; the default style (outlines,
  low-confidence rule, map tips, caption labels) stored in the file's ``layer_styles``
- ``hit_style.py``: how the dock's hits look on the map: four score bands in four colours, weak
  hits (below the query's match line) grey and dashed, the reference of a similarity search cyan
- ``similar.py``: find similar tiles off the GUI thread (SimilarTask): in QGIS's Python from the
  stored embeddings (no torch), else through the worker's ``similar`` request
- ``export.py``: export the tile layer + embeddings + metadata as a standalone GeoPackage
- ``footprint.py``: the dialog's auto tile size and footprint, from the layer's CRS and pixel size
  through the QGIS API and ``rscaption.raster.ground``/``tile_size``
- ``settings.py``, ``ui/settings_dialog.py``, ``paths.py``, ``model_card.py``,
  ``raster_source.py``: settings, locations, cheap card reads, raster-path resolution
- ``run_record.py``: what an output GeoPackage says about the run that made it (raster, tile size,
  overlap, bands, extent, ground resolution), so the caption dialog can resume it; whether its tiles
  have no CRS
- ``run_warnings.py``: the input warnings the caption dialog shows before a run (no CRS, one float
  band, a ground resolution far from the model's), in the backend's words
- ``setup_plan.py``: what "Set up backend" installs and its size, said before Start (the CPU build
  of torch on Linux without an NVIDIA GPU)
- ``qgis_compat.py``: The QGIS and Qt API differences the plugin meets between QGIS 3.22 and QGIS 4
  (Qt6), in one place.
- ``change_task.py``, ``change_layers.py``, ``change_inputs.py``, ``change_algorithm.py``: "what
  changed between two dates": the job and its QgsTask (in-process or the worker's ``change``), the
  change layer (graduated by ``change``, both captions in the map tip, most changed tiles), the
  inputs' warnings before a run (resolution > 2x apart, band meaning), and ``rscaption:change``
"""

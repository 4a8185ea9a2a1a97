"""ui/: the plugin's widgets and GUI-thread code: dialogs, dock, menus, questions.

Modules:

- ``dialog.py``: "Caption raster layer" dialog: collects a job, runs nothing
- ``dialog_state.py``: what the dialog may offer (In-process only with torch, Caption only with a
  backend), what it remembers (mode, output, path), its help text
- ``caption_run.py``, ``core/layers.py``: the result layer: opened on the output GeoPackage (an
  open layer of the same file is reused), styled, refreshed as tiles land; the default style
  (outlines, low-confidence rule, map tips, caption labels) stored in the file's ``layer_styles``
- ``dock.py``: search dock: query, top-k, threshold, ranked list, selection, zoom, next/previous,
  Similar to selected
- ``layer_actions.py``: "Find similar tiles" in the Layers panel menu of rscaption layers and in
  their feature menus (QgsMapLayerAction: attribute table, Identify)
- ``setup_backend.py``, ``diagnostics.py``: "Set up backend" (a venv in the user cache from the
  bundled backend) and "Copy diagnostics"
- ``large_run.py``: the Yes/No question before a run above the backend's tile threshold (GUI
  thread), rerun with ``confirm_large``
- ``core/settings.py``, ``settings_dialog.py``, ``core/paths.py``, ``core/model_card.py``,
  ``core/raster_source.py``: settings, locations, cheap card reads, raster-path resolution
"""

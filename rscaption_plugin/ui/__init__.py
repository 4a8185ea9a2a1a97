"""ui/: the plugin's widgets and GUI-thread code: dialogs, dock, menus, questions.

Modules:

- ``dialog.py``: "Caption raster layer" dialog: collects a job, runs nothing
- ``dialog_state.py``: what the dialog may offer (In-process only with torch, Caption only with a
  backend), what it remembers (mode, output, path), its help text
- ``caption_run.py``, ``core/layers.py``: the result layer: opened on the output GeoPackage (an
  open layer of the same file is reused), styled, refreshed as tiles land; the default style
  (outlines, low-confidence rule, map tips, caption labels) stored in the file's ``layer_styles``
- ``dock.py``: search dock: query, top-k, threshold, ranked list with the query's "no good match"
  line (weak hits greyed), the listed hit selected, zoom on request, next/previous, Similar to
  selected
- ``layer_actions.py``: "Find similar tiles" in the Layers panel menu of rscaption layers and in
  their feature menus (QgsMapLayerAction: attribute table, Identify)
- ``setup_backend.py``, ``diagnostics.py``: "Set up backend" (a venv in the user cache from the
  bundled backend) and "Copy diagnostics"
- ``large_run.py``: the Yes/No question before a run above the backend's tile threshold (GUI
  thread), rerun with ``confirm_large``
- ``resume_form.py``: the caption dialog and an output an earlier run wrote: its settings restored
  for Resume, another raster refused before anything starts
- ``wrap_label.py``: the wrapped label of the dialogs' notes, always as tall as its text
- ``core/settings.py``, ``settings_dialog.py``, ``core/paths.py``, ``core/model_card.py``,
  ``core/raster_source.py``: settings, locations, cheap card reads, raster-path resolution
- ``change_dialog.py``, ``change_run.py``, ``change_panel.py``: "Compare two dates": the dialog (two
  rasters or two captioned layers, warnings before the run), its run (the change layer added and
  styled when the task ends) and the dock's "most changed" list with each tile's before/after pair
"""

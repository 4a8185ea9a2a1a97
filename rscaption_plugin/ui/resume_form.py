"""The caption dialog and an output file that an earlier run wrote: restore, compare, say why.

Resume is ticked by default and the dialog remembers the last output, so "caption again into the
same file" is the obvious click. The backend resumes only with the raster, tile size, overlap,
bands and extent the file was made with. So when such a file is chosen its settings go back into
the form (:func:`apply_record`), and Caption checks the rest before anything starts
(:func:`resume_problem`): another raster is refused in the dialog, with nothing added to the
project and nothing written to the file; settings changed since are restored again, with the
advice to press Caption to resume (never "choose another file" when the person meant to resume).
"""

from __future__ import annotations

import os

from ..core.layers import same_file
from ..core.raster_source import raster_file_path
from ..core.run_record import RunRecord, other_raster, read_run_record

EXTENT_FILE = "file"
EXTENT_FILE_TEXT = "As recorded in the output file (resume)"


def apply_record(dlg, record: RunRecord | None) -> None:
    """Put ``record``'s settings into the dialog ``dlg`` (None: forget a previous record)."""
    combo = dlg.extent_combo
    index = combo.findData(EXTENT_FILE)
    if record is None:
        if index >= 0:
            if combo.currentIndex() == index:
                combo.setCurrentIndex(0)
            combo.removeItem(index)
        dlg.resume_note.setText("")
        dlg.resume_note.setVisible(False)
        return
    if record.model and (record.model == "default" or os.path.isdir(record.model)):
        dlg.model_combo.setCurrentText(record.model)  # first: a model change resets the tile size
    if record.language:
        found = dlg.language_combo.findData(record.language)
        if found >= 0:
            dlg.language_combo.setCurrentIndex(found)
    dlg.auto_tile_check.setChecked(False)
    dlg.tile_spin.setValue(int(record.tile_size))
    dlg.overlap_spin.setValue(int(record.overlap))
    dlg.bands_edit.setText(",".join(str(b) for b in record.bands) if record.bands else "")
    if record.ground_m:
        dlg.ground_spin.setValue(float(record.ground_m))
    if record.extent:
        if index < 0:
            combo.addItem(EXTENT_FILE_TEXT, EXTENT_FILE)
            index = combo.findData(EXTENT_FILE)
        combo.setCurrentIndex(index)
    elif index >= 0:
        combo.setCurrentIndex(0)
        combo.removeItem(index)
    show_note(dlg)
    dlg._update_footprint()


def show_note(dlg) -> None:
    """Under Resume: the settings the file keeps, or, for another raster, that Caption would be
    refused (said while the person chooses, not after the click)."""
    record = dlg.record
    if record is None:
        return
    source = os.path.basename(record.raster) if record.raster else "its raster"
    path = raster_file_path(dlg.layer_combo.currentLayer())
    if path and other_raster(record, path):
        text = (f"This file holds the captions of {source}, not of the chosen layer: choose another output "
                f"file for it (or choose {source} to resume this one).")
    else:
        text = f"Resume continues this file with the settings it was captioned with from {source}: " \
               f"{record.settings_text()}."
    dlg.resume_note.setText(text)
    dlg.resume_note.setVisible(True)


def _form_tiling(dlg) -> dict:
    return {"tile_size": int(dlg.tile_spin.value()), "overlap": int(dlg.overlap_spin.value()),
            "bands": dlg.bands_edit.text().replace(" ", ""),
            "extent": dlg.extent_combo.currentData() == EXTENT_FILE}


def _record_tiling(record: RunRecord) -> dict:
    return {"tile_size": int(record.tile_size), "overlap": int(record.overlap),
            "bands": ",".join(str(b) for b in record.bands) if record.bands else "",
            "extent": bool(record.extent)}


def resume_problem(dlg, layer, raster: str, out: str) -> str | None:
    """Why resuming ``out`` with this form would be refused, in the dialog's words (None: it can
    go ahead, or ``out`` is no rscaption file and the backend says what it is)."""
    record = read_run_record(out)
    if record is None:
        return None
    if other_raster(record, raster):
        return (f"{os.path.basename(out)} holds the captions of {os.path.basename(record.raster)}, not of "
                f"'{layer.name()}': choose another output file for this raster (or choose "
                f"{os.path.basename(record.raster)} to resume it). Nothing was started or written.")
    if dlg.record is None or not same_file(dlg.record.path, out):
        dlg.record = record
    if _form_tiling(dlg) != _record_tiling(record):
        dlg.record = record
        apply_record(dlg, record)
        return (f"to resume {os.path.basename(out)} the form needs the settings it was captioned with "
                f"({record.settings_text()}); they are back in the form: press Caption to resume.")
    return None

"""What the caption dialog may offer, what it remembers, and its help text.

Kept out of ``dialog.py`` so the widget code stays about layout. The availability rules are the
ones ``runner.resolve_mode`` enforces when a task starts; checking them while the dialog is open
means an impossible choice is never offered, instead of failing after the task has started.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..core.paths import default_backend_python, torch_importable
from ..core.settings import BACKEND_MODES, PluginSettings

NO_TORCH_TIP = ("QGIS's Python cannot import torch and rasterio, so the backend cannot run inside QGIS; "
                "use Automatic or Local subprocess")
OUTPUT_CHOICES = ("temp", "file")


@dataclass
class Availability:
    inprocess: bool  # torch and rasterio importable in QGIS's Python
    can_run: bool  # the chosen mode has a backend to run on
    reason: str = ""  # why not, in the dialog's words ("" when it can run)


def availability(mode: str, python: str | None, inprocess: bool | None = None) -> Availability:
    """Whether a caption run in ``mode`` with backend Python ``python`` can start."""
    inprocess = torch_importable() if inprocess is None else inprocess
    python = (python or "").strip()
    if mode == "inprocess":
        return Availability(inprocess, inprocess, "" if inprocess else NO_TORCH_TIP)
    if mode == "auto" and inprocess:
        return Availability(inprocess, True)
    if not python:
        return Availability(inprocess, False,
                            "no backend: QGIS's Python has no torch and no backend Python is set. Run "
                            "Raster > rscaption > Set up backend…, or enter the Python of an environment "
                            "with rscaption's requirements")
    if not os.path.isfile(python):
        return Availability(inprocess, False, f"backend Python not found: {python}")
    return Availability(inprocess, True)


def remembered_mode(settings: PluginSettings, inprocess: bool) -> str:
    """The mode chosen last time in the dialog (else the Settings one), never an unavailable one."""
    mode = settings.last_mode if settings.last_mode in BACKEND_MODES else settings.backend_mode
    if mode == "inprocess" and not inprocess:
        return "auto"
    return mode if mode in BACKEND_MODES else "auto"


def remember(settings: PluginSettings, mode: str, output: str, path: str, python: str | None = None) -> None:
    """Store the dialog's last mode, output choice and path (QgsSettings) for the next run, and
    the backend Python typed there as *the* backend Python: the search dock and Processing read
    the same setting, so a Python that captions also searches. The default one stays unstored,
    so it keeps following "Set up backend"."""
    settings.last_mode = mode if mode in BACKEND_MODES else ""
    settings.last_output = output if output in OUTPUT_CHOICES else "temp"
    if path:
        settings.last_output_path = path
    if python is not None:
        typed = python.strip()
        settings.backend_python = "" if typed == (default_backend_python() or "") else typed
    settings.save()


def backend_missing(settings: PluginSettings | None = None) -> str:
    """Why no caption or search can run with the saved settings ("" when one can)."""
    settings = settings or PluginSettings.load()
    return availability(settings.backend_mode, settings.python()).reason


HELP_TEXT = """<h3>Caption raster layer</h3>
<p>Each tile of the raster gets a one-sentence caption and an embedding, written into a
GeoPackage that opens as a polygon layer. The search dock (Raster &gt; rscaption &gt; Search
captioned tiles) then ranks the tiles by a free-text query.</p>
<ul>
<li><b>Raster layer</b>: a local file (GeoTIFF etc.). Layers that are not a file can be written to a
temporary GeoTIFF first; web layers (XYZ, WMS) are refused.</li>
<li><b>Extent</b>: the whole layer, the map canvas, or the bounding box of selected polygons.</li>
<li><b>Model</b>: <i>default</i> is the embedded model; or a checkpoint folder.</li>
<li><b>Tiles</b>: <i>Auto</i> keeps the ground footprint the model was trained on (the line below shows
it); a fixed pixel size otherwise. A raster without a CRS asks its <b>Ground resolution</b> (metres per
pixel): without it, tiles and confidences are guesses.</li>
<li><b>Backend</b>: <i>In-process</i> runs in QGIS's own Python (needs torch there); <i>Local
subprocess</i> runs a separate Python (made by Set up backend). <i>Automatic</i> picks one.</li>
<li><b>Output</b>: a temporary GeoPackage or a file you choose. If the file exists, tick
<i>Resume</i> to continue it (tiles already captioned are skipped; the tile settings it was made with
are put back in the form) or choose another file.</li>
</ul>
<p>The run is a background task: progress and Cancel are in the task manager; finished tiles stay
in the file after a cancel and appear on the map as they land.</p>"""

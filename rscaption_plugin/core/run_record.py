"""What an existing output GeoPackage says about the run that made it (``rscaption_metadata``).

Resuming a file needs the settings it was captioned with: the backend refuses a resume whose tile
size, overlap, bands or extent differ, because its tiles would not line up. The caption dialog
reads them here when a file is chosen as output, fills them in and compares the chosen raster
with the one recorded, so a resume works with the obvious click and a refusal is said before
anything starts. Plain sqlite3, read-only, no torch: the dialog stays instant.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, field

from .layers import META_TABLE


@dataclass
class RunRecord:
    path: str  # the GeoPackage
    raster: str = ""  # the source raster's path when it was captioned
    raster_size: int | None = None
    tile_size: int | None = None
    overlap: int = 0
    bands: list[int] | None = None
    extent: list[float] | None = None  # in the raster's CRS
    target_resolution: float | None = None
    auto_tile: bool = False  # the tile size was chosen from the ground resolution
    ground_m: float | None = None  # metres per pixel the tiles were cut at (measured or given)
    model: str = ""
    language: str = ""
    tiling: dict = field(default_factory=dict)

    def settings_text(self) -> str:
        """The settings a resume keeps, in the dialog's words."""
        bits = [f"tile size {self.tile_size} px", f"overlap {self.overlap} px"]
        if self.bands:
            bits.append("bands " + ",".join(str(b) for b in self.bands))
        if self.extent:
            bits.append("the extent recorded in the file")
        return ", ".join(bits)


def read_run_record(gpkg: str | None) -> RunRecord | None:
    """The recorded run of an rscaption GeoPackage; None when ``gpkg`` is not one (or unreadable)."""
    if not gpkg or not os.path.isfile(gpkg):
        return None
    try:
        con = sqlite3.connect(f"file:{gpkg}?mode=ro", uri=True, timeout=5)
        try:
            rows = dict(con.execute(f"SELECT key, value FROM {META_TABLE}").fetchall())
        finally:
            con.close()
    except sqlite3.Error:
        return None
    meta = {}
    for key, value in rows.items():
        try:
            meta[key] = json.loads(value) if value is not None else None
        except (TypeError, ValueError):
            meta[key] = value
    tiling = meta.get("tiling_params") if isinstance(meta.get("tiling_params"), dict) else {}
    if not tiling.get("tile_size"):
        return None
    source = meta.get("source_raster") if isinstance(meta.get("source_raster"), dict) else {}
    footprint = meta.get("tile_footprint") if isinstance(meta.get("tile_footprint"), dict) else {}
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    return RunRecord(
        path=gpkg, raster=str(source.get("path") or ""), raster_size=_int(source.get("size")),
        tile_size=_int(tiling.get("tile_size")), overlap=_int(tiling.get("overlap")) or 0,
        bands=[int(b) for b in tiling["bands"]] if tiling.get("bands") else None,
        extent=[float(v) for v in tiling["extent"]] if tiling.get("extent") else None,
        target_resolution=_float(tiling.get("target_resolution")), auto_tile=bool(footprint.get("auto")),
        ground_m=_float(footprint.get("ground_resolution_m")), model=str(model.get("id") or ""),
        language=str(meta.get("language") or ""), tiling=tiling,
    )


def other_raster(record: RunRecord, raster: str) -> bool:
    """Whether ``raster`` is surely not the raster the file was captioned from: another path and
    another size (a copy of the same file, or the same path rewritten, is left to the backend,
    which compares checksums)."""
    if not record.raster or not raster:
        return False
    try:
        if os.path.samefile(record.raster, raster):
            return False
    except OSError:
        if os.path.abspath(record.raster) == os.path.abspath(raster):
            return False
    try:
        size = os.path.getsize(raster)
    except OSError:
        return False
    return record.raster_size is None or size != record.raster_size


def _int(value) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _float(value) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def has_no_crs(gpkg: str | None) -> bool:
    """Whether the tiles of ``gpkg`` are in pixel coordinates (GeoPackage's undefined SRS, -1 or 0).
    GDAL reads -1 as a valid "Undefined Cartesian SRS", so QGIS would try, and fail, to transform it
    to the project's CRS at every draw and zoom; the plugin gives such a layer no CRS at all."""
    if not gpkg or not os.path.isfile(gpkg):
        return False
    try:
        con = sqlite3.connect(f"file:{gpkg}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT srs_id FROM gpkg_geometry_columns WHERE table_name = 'tiles'").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return row is not None and row[0] in (-1, 0)

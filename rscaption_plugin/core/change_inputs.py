"""What the "Compare two dates" dialog says about its two inputs before anything runs.

A change score compares two captions; captions of the same ground differ when the two images
differ in ways that are not land use: a much coarser pixel (a field becomes "a green area") or
bands that do not mean the same colours (a NIR-first false-colour image beside a true-colour
one). The user should hear that before waiting for a run, so the dialog measures both rasters
through the QGIS API (QGIS's Python may have no rasterio) and shows one line per problem. The
backend repeats its own checks in the run log; these are the dialog's early warning.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field

from qgis.core import QgsCoordinateTransform, QgsProject

from .footprint import layer_ground_resolution
from .layers import gpkg_path_of, is_tile_layer

#: Above this ratio of pixel sizes the two dates' captions describe different levels of detail.
RESOLUTION_RATIO = 2.0


@dataclass
class InputCheck:
    """``errors`` stop the run (nothing to compare); ``warnings`` are shown and the run may go on."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def text(self) -> str:
        return "\n".join(self.errors + [f"⚠ {w}" for w in self.warnings])


def _overlaps(before, after) -> bool:
    rect = after.extent()
    if before.crs().isValid() and after.crs().isValid() and before.crs() != after.crs():
        try:
            rect = QgsCoordinateTransform(after.crs(), before.crs(), QgsProject.instance()).transformBoundingBox(rect)
        except Exception:  # a transform QGIS cannot do: let the backend judge the overlap
            return True
    return before.extent().intersects(rect)


def resolution_warning(before, after, ratio: float = RESOLUTION_RATIO) -> str | None:
    """One sentence when the ground pixel sizes differ by more than ``ratio`` times."""
    a, b = layer_ground_resolution(before), layer_ground_resolution(after)
    unit = " m"
    if a is None or b is None:  # no CRS (or unknown units): compare map units when the CRSs agree
        if before.crs() != after.crs():
            return None
        a, b, unit = before.rasterUnitsPerPixelX(), after.rasterUnitsPerPixelX(), " map units"
    if not (a and b and a > 0 and b > 0):
        return None
    factor = max(a, b) / min(a, b)
    if factor <= ratio:
        return None
    coarse = "after" if b > a else "before"
    return (f"the two rasters differ {factor:.1f}x in resolution ({a:.3g}{unit} before, {b:.3g}{unit} after): "
            f"the {coarse} date's captions see less detail, so unchanged ground may score as changed")


def _band_meanings(layer) -> list[str]:
    provider = layer.dataProvider()
    out = []
    for band in range(1, layer.bandCount() + 1):
        name = (provider.generateBandName(band) if hasattr(provider, "generateBandName") else "")
        described = layer.bandName(band)
        description = described[len(name):].lstrip(": ").strip() if described.startswith(name) else described
        colour = provider.colorInterpretationName(band)
        out.append((description or colour or "").strip().lower())
    return out


def band_warnings(before, after) -> list[str]:
    """Sentences for bands that may not mean the same thing on both dates."""
    warnings = []
    nb, na = before.bandCount(), after.bandCount()
    if nb != na:
        warnings.append(f"the rasters have {nb} and {na} bands: check that bands 1-3 show the same colours on "
                        "both dates")
    pb, pa = before.dataProvider(), after.dataProvider()
    types_b = {pb.dataType(i) for i in range(1, nb + 1)}
    types_a = {pa.dataType(i) for i in range(1, na + 1)}
    if types_b != types_a:
        warnings.append("the rasters store different value types (e.g. 8-bit brightness and 16-bit or float "
                        "reflectance): their colours are stretched differently, which reads as change")
    mb, ma = _band_meanings(before), _band_meanings(after)
    unknown = {"", "undefined", "gray", "grey", "palette"}
    differ = [i + 1 for i, (x, y) in enumerate(zip(mb, ma)) if x != y and x not in unknown and y not in unknown]
    if differ:
        pairs = ", ".join(f"band {i}: {mb[i - 1]} / {ma[i - 1]}" for i in differ[:3])
        warnings.append(f"the bands mean different things ({pairs}): the same band numbers show different "
                        "colours on the two dates")
    return warnings


def check_rasters(before, after) -> InputCheck:
    check = InputCheck()
    if before is None or after is None:
        check.errors.append("choose a raster for each date")
        return check
    if before.id() == after.id() or before.source() == after.source():
        check.errors.append("choose two different rasters: the same image on both dates shows no change")
        return check
    if not _overlaps(before, after):
        check.errors.append("the two rasters do not overlap: there is no common ground to compare")
        return check
    res = resolution_warning(before, after)
    if res:
        check.warnings.append(res)
    check.warnings.extend(band_warnings(before, after))
    return check


def _model_id(gpkg: str | None) -> str | None:
    try:
        con = sqlite3.connect(f"file:{gpkg}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT value FROM rscaption_metadata WHERE key = 'model'").fetchone()
        finally:
            con.close()
        model = json.loads(row[0]) if row and row[0] else {}
    except (sqlite3.Error, ValueError, TypeError):
        return None
    return (model or {}).get("hash") or (model or {}).get("id")


def check_captioned(before, after) -> InputCheck:
    """Two captioned tile layers: rscaption files of one model over common ground (an after file
    tiled on another grid is read again from its raster on the before grid, by the backend)."""
    check = InputCheck()
    if before is None or after is None:
        check.errors.append("choose a captioned tile layer for each date")
        return check
    for layer, when in ((before, "before"), (after, "after")):
        if not is_tile_layer(layer):
            check.errors.append(f"'{layer.name()}' ({when}) is not a layer made by rscaption (a GeoPackage with "
                                "its embeddings)")
    if check.errors:
        return check
    if gpkg_path_of(before) == gpkg_path_of(after):
        check.errors.append("choose two different captioned files: the same file on both dates shows no change")
        return check
    if not _overlaps(before, after):
        check.errors.append("the two tile layers do not overlap: there is no common ground to compare")
    elif _model_id(gpkg_path_of(before)) != _model_id(gpkg_path_of(after)):
        check.errors.append("the two files were captioned by different models, whose embeddings are not "
                            "comparable: caption both dates with one model (or compare the two rasters)")
    return check

"""The change layer on the QGIS side: open, style by change score, rank the most changed tiles.

A change GeoPackage (``rscaption change``) holds a polygon layer ``changes`` (one row per tile of
the before date's grid, ``change`` 0-1, both captions and the "A -> B" summary) beside the two
dates' tile layers. The style is graduated on ``change`` so the eye goes to what changed while
the imagery stays visible under the low classes; the map tip puts the two captions side by side,
which is what a reader needs to judge a score. Like the caption layer, the style is written into
the file's ``layer_styles`` so a reopened or shared file looks the same.
"""

from __future__ import annotations

import os
import sqlite3

from qgis.core import (
    QgsFeatureRequest,
    QgsGraduatedSymbolRenderer,
    QgsProject,
    QgsProviderRegistry,
    QgsRendererRange,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtGui import QColor

from .layers import caption_label_settings, gpkg_path_of, label_scale, outline_symbol, same_file, save_style_row

CHANGE_LAYER = "changes"
BEFORE_LAYER, AFTER_LAYER = "tiles_before", "tiles_after"
STYLE_NAME = "rscaption change"

MAP_TIP = ('<b>[% "summary" %]</b><br/>'
           'change [% format_number("change", 2) %] · row [% "row" %], col [% "col" %]<br/>'
           '<b>before</b>: [% "caption_before" %]<br/>'
           '<b>after</b>: [% "caption_after" %]<br/>'
           '<i>how sure the names are: [% format_number("confidence", 2) %]</i>')

#: (lower, upper, colour, fill alpha, label): the classes below 0.5 are outlines only, so the
#: imagery of unchanged ground shows as it is; the changed ones fill warmer and denser.
CHANGE_CLASSES = (
    (0.0, 0.25, (255, 235, 120), 0, "little or no change"),
    (0.25, 0.5, (255, 170, 50), 0, "some change"),
    (0.5, 0.75, (245, 110, 30), 80, "changed"),
    (0.75, 1.0, (215, 25, 28), 130, "strongly changed"),
)


def change_uri(gpkg: str, layer: str = CHANGE_LAYER) -> str:
    return f"{gpkg}|layername={layer}"


def _tables(gpkg: str | None) -> set[str]:
    if not gpkg or not os.path.isfile(gpkg):
        return set()
    try:
        con = sqlite3.connect(f"file:{gpkg}?mode=ro", uri=True, timeout=5)
        try:
            return {r[0] for r in con.execute("SELECT table_name FROM gpkg_contents")}
        finally:
            con.close()
    except sqlite3.Error:
        return set()


def has_change_table(gpkg: str | None) -> bool:
    """The writer registers ``changes`` in gpkg_contents once it has scored rows to show."""
    return CHANGE_LAYER in _tables(gpkg)


def layer_name_of(layer) -> str | None:
    parts = QgsProviderRegistry.instance().decodeUri("ogr", layer.source())
    return parts.get("layerName") or None


def is_change_layer(layer) -> bool:
    """A layer showing the ``changes`` table of a change GeoPackage (not its two tile layers)."""
    if not isinstance(layer, QgsVectorLayer) or not layer.isValid():
        return False
    gpkg = gpkg_path_of(layer)
    return gpkg is not None and layer_name_of(layer) == CHANGE_LAYER and has_change_table(gpkg)


def find_change_layer(gpkg: str, project=None):
    """The project's layer already showing this file's changes: a rerun refreshes it."""
    project = project or QgsProject.instance()
    for layer in project.mapLayers().values():
        if isinstance(layer, QgsVectorLayer) and same_file(gpkg_path_of(layer), gpkg) \
                and layer_name_of(layer) == CHANGE_LAYER:
            return layer
    return None


def open_change_layer(gpkg: str, name: str | None = None) -> QgsVectorLayer:
    layer = QgsVectorLayer(change_uri(gpkg), name or os.path.splitext(os.path.basename(gpkg))[0], "ogr")
    if layer.isValid():
        apply_change_style(layer)
    return layer


def change_renderer() -> QgsGraduatedSymbolRenderer:
    ranges = []
    for lo, hi, (r, g, b), alpha, label in CHANGE_CLASSES:
        symbol = outline_symbol(QColor(r, g, b), 0.6 if alpha else 0.3, QColor(r, g, b, alpha))
        ranges.append(QgsRendererRange(lo, hi, symbol, f"{label} ({lo:.2f} – {hi:.2f})"))
    return QgsGraduatedSymbolRenderer("change", ranges)


def apply_change_style(layer: QgsVectorLayer) -> None:
    """Graduated on ``change`` (tiles not scored, NULL, are not drawn), the two captions in the
    map tip, and the "A -> B" summary as a label on changed tiles once zoomed in enough to read."""
    layer.setRenderer(change_renderer())
    layer.setMapTipTemplate(MAP_TIP)
    layer.setDisplayExpression('"summary"')
    settings = caption_label_settings(label_scale(layer))
    settings.fieldName = 'CASE WHEN "change" >= 0.5 THEN "summary" END'
    settings.isExpression = True
    layer.setLabeling(QgsVectorLayerSimpleLabeling(settings))
    layer.setLabelsEnabled(True)
    layer.triggerRepaint()


def most_changed(layer: QgsVectorLayer, k: int = 20, min_change: float = 0.0) -> list[dict]:
    """The ``k`` tiles with the highest change score (scored tiles only), most changed first."""
    request = QgsFeatureRequest().setFilterExpression(f'"change" IS NOT NULL AND "change" >= {float(min_change)!r}')
    request.addOrderBy('"change"', False)
    request.setLimit(int(k))
    keys = ("tile_id", "row", "col", "change", "summary", "caption_before", "caption_after",
            "scene_before", "scene_after", "confidence")
    names = set(layer.fields().names())
    out = []
    for feat in layer.getFeatures(request):
        row = {key: (feat[key] if key in names else None) for key in keys}
        row["fid"] = feat.id()
        out.append(row)
    return out


def store_change_style(gpkg: str) -> str | None:
    """Save the change style into the GeoPackage as the ``changes`` table's default; returns an
    error message, or None. Written with sqlite3 for the reason ``layers.store_default_style``
    gives (OGR's update-mode open waits behind a reader's connection)."""
    if not has_change_table(gpkg):
        return "no changes table yet"
    return save_style_row(gpkg, change_uri(gpkg), CHANGE_LAYER, STYLE_NAME, apply_change_style,
                          "rscaption: tiles coloured by change score, both dates' captions in the map tip")


def count_rows(gpkg: str, table: str) -> int:
    """Rows committed in ``table`` (0 when it does not exist yet): what a cancelled run kept."""
    if table not in _tables(gpkg):
        return 0
    try:
        con = sqlite3.connect(gpkg, timeout=5)
        try:
            return int(con.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def kept_counts(gpkg: str) -> dict:
    """What a comparison has finished so far: the tiles of each date and the scored ones. The
    backend captions each date into ``OUT.gpkg.parts/`` (``rscaption/change/run.py``) and writes
    OUT in one go once everything is scored, so a stopped run's work is in the parts."""
    if has_change_table(gpkg):
        return {"before": count_rows(gpkg, BEFORE_LAYER), "after": count_rows(gpkg, AFTER_LAYER),
                "scored": count_rows(gpkg, CHANGE_LAYER)}
    parts = gpkg + ".parts"
    return {"before": count_rows(os.path.join(parts, "before.gpkg"), "tiles"),
            "after": count_rows(os.path.join(parts, "after.gpkg"), "tiles"), "scored": 0}

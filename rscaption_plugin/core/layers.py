"""The captioned tile layer on the QGIS side: open, style, refresh, find its GeoPackage.

The layer is always the output GeoPackage itself (OGR provider), so "results appear as they
land" is a reload of the provider after each committed batch, and a cancelled or failed run
leaves a layer with exactly the tiles that were committed.
"""

from __future__ import annotations

import os
import sqlite3

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsEditorWidgetSetup,
    QgsFeatureRequest,
    QgsFillSymbol,
    QgsLinePatternFillSymbolLayer,
    QgsPalLayerSettings,
    QgsProject,
    QgsProviderRegistry,
    QgsRectangle,
    QgsRuleBasedRenderer,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsUnitTypes,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtGui import QColor
from qgis.PyQt.QtXml import QDomDocument

from .qgis_compat import DISTANCE_DEGREES, DISTANCE_METERS, DISTANCE_UNKNOWN, LABEL_OVER_POINT

TILE_LAYER = "tiles"
META_TABLE = "rscaption_metadata"
EMB_TABLE = "rscaption_embeddings"
MAP_TIP = ('<b>[% "caption" %]</b><br/>confidence [% format_number("confidence", 2) %] · '
           'row [% "row" %], col [% "col" %]<br/><i>[% "model" %]</i>')


def layer_uri(gpkg: str) -> str:
    return f"{gpkg}|layername={TILE_LAYER}"


def gpkg_path_of(layer) -> str | None:
    """The GeoPackage behind a layer (works for a layer just produced and a reopened export)."""
    if layer is None or not isinstance(layer, QgsVectorLayer) or layer.providerType() != "ogr":
        return None
    parts = QgsProviderRegistry.instance().decodeUri("ogr", layer.source())
    path = parts.get("path") or layer.source().split("|")[0]
    return path if path and os.path.isfile(path) else None


def same_file(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def find_tile_layer(gpkg: str, project=None):
    """The project's layer already showing this GeoPackage's tiles, if any: a resumed run on the
    same file must refresh that layer rather than add a second copy of it."""
    project = project or QgsProject.instance()
    for layer in project.mapLayers().values():
        if not isinstance(layer, QgsVectorLayer) or not same_file(gpkg_path_of(layer), gpkg):
            continue
        name = QgsProviderRegistry.instance().decodeUri("ogr", layer.source()).get("layerName")
        if name in (None, "", TILE_LAYER):
            return layer
    return None


def is_rscaption_gpkg(path: str | None) -> bool:
    if not path or not os.path.isfile(path):
        return False
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return META_TABLE in names and EMB_TABLE in names


def is_tile_layer(layer) -> bool:
    return is_rscaption_gpkg(gpkg_path_of(layer))


def has_tile_table(gpkg: str) -> bool:
    """The writer creates the file before its first commit; the layer is only loadable once the
    tiles table is registered in gpkg_contents."""
    if not os.path.isfile(gpkg):
        return False
    try:
        con = sqlite3.connect(f"file:{gpkg}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT 1 FROM gpkg_contents WHERE table_name=?", (TILE_LAYER,)).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return row is not None


def open_tile_layer(gpkg: str, name: str | None = None) -> QgsVectorLayer:
    layer = QgsVectorLayer(layer_uri(gpkg), name or os.path.splitext(os.path.basename(gpkg))[0], "ogr")
    if layer.isValid():
        apply_default_style(layer)
    return layer


def outline_symbol(color: QColor, width: float = 0.4, fill: QColor | None = None) -> QgsFillSymbol:
    fill = fill or QColor(0, 0, 0, 0)
    return QgsFillSymbol.createSimple({
        "color": f"{fill.red()},{fill.green()},{fill.blue()},{fill.alpha()}",
        "outline_color": f"{color.red()},{color.green()},{color.blue()},255",
        "outline_width": str(width),
        "outline_width_unit": "MM",
    })


#: Tiles below this confidence are drawn differently: the model is more likely wrong than right.
LOW_CONFIDENCE = 0.5


def low_confidence_symbol() -> QgsFillSymbol:
    """A dashed grey-violet outline with a sparse hatch: reads as "unsure" at a glance and still
    lets the imagery show through."""
    sym = QgsFillSymbol.createSimple({"color": "0,0,0,0", "outline_color": "170,120,255,255",
                                      "outline_width": "0.4", "outline_width_unit": "MM",
                                      "outline_style": "dash"})
    hatch = QgsLinePatternFillSymbolLayer()
    hatch.setLineAngle(45)
    hatch.setDistance(3.0)
    hatch.setColor(QColor(170, 120, 255, 110))
    hatch.setLineWidth(0.2)
    sym.appendSymbolLayer(hatch)
    return sym


def tile_rules(root) -> None:
    """Confident tiles: thin yellow outline; low-confidence ones: ``low_confidence_symbol``."""
    root.appendChild(QgsRuleBasedRenderer.Rule(
        low_confidence_symbol(), 0, 0, f'"confidence" < {LOW_CONFIDENCE}',
        f"low confidence (< {LOW_CONFIDENCE})"))
    root.appendChild(QgsRuleBasedRenderer.Rule(
        outline_symbol(QColor(255, 215, 0)), 0, 0, f'"confidence" >= {LOW_CONFIDENCE} OR "confidence" IS NULL',
        "tiles"))


def apply_default_style(layer: QgsVectorLayer) -> None:
    """Transparent fill and a thin bright outline: the imagery stays visible under the grid;
    low-confidence tiles are dashed and hatched so a reader knows which captions to doubt;
    captions as map tips, and as labels once a tile is large enough on screen to carry one."""
    root = QgsRuleBasedRenderer.Rule(None)
    tile_rules(root)
    layer.setRenderer(QgsRuleBasedRenderer(root))
    layer.setMapTipTemplate(MAP_TIP)
    layer.setDisplayExpression('"caption"')
    layer.setLabeling(QgsVectorLayerSimpleLabeling(caption_label_settings(label_scale(layer))))
    layer.setLabelsEnabled(True)
    two_decimals(layer)
    layer.triggerRepaint()


def two_decimals(layer: QgsVectorLayer) -> None:
    """Confidence and valid fraction with two decimals in the attribute table and forms (they
    are stored in full: 0.94475563... said nothing more than 0.94)."""
    for name in ("confidence", "valid_fraction"):
        index = layer.fields().indexOf(name)
        if index >= 0:
            layer.setEditorWidgetSetup(index, QgsEditorWidgetSetup("Range", {
                "AllowNull": True, "Max": 1.0, "Min": 0.0, "Precision": 2, "Step": 0.01, "Style": "SpinBox"}))


#: A caption label is shown once a tile is at least this wide on screen (metres of paper).
LABEL_TILE_WIDTH_M = 0.035


def label_scale(layer: QgsVectorLayer, fallback: float = 5000.0) -> float:
    """The most zoomed-out scale (denominator) at which captions are labelled: where one tile is
    about 35 mm wide on screen. Computed from a tile's width, so it fits any ground resolution."""
    feat = next(layer.getFeatures(QgsFeatureRequest().setLimit(1)), None) if layer.isValid() else None
    if feat is None or not feat.hasGeometry():
        return fallback
    width = feat.geometry().boundingBox().width()
    units = layer.crs().mapUnits() if layer.crs().isValid() else DISTANCE_UNKNOWN
    if units == DISTANCE_DEGREES:
        width *= 111_320.0  # at the equator; a label threshold needs no more precision
    elif units != DISTANCE_UNKNOWN:
        width *= QgsUnitTypes.fromUnitToUnitFactor(units, DISTANCE_METERS)
    return float(min(1_000_000.0, max(250.0, width / LABEL_TILE_WIDTH_M)))


def caption_label_settings(max_scale_denominator: float) -> QgsPalLayerSettings:
    """The caption over the tile centre, wrapped, with a white halo; hidden when zoomed out."""
    settings = QgsPalLayerSettings()
    settings.fieldName = "caption"
    settings.isExpression = False
    settings.placement = LABEL_OVER_POINT
    settings.autoWrapLength = 22
    settings.scaleVisibility = True
    settings.minimumScale = max_scale_denominator  # QGIS: "minimum" = most zoomed out
    settings.maximumScale = 0.0
    fmt = QgsTextFormat()
    fmt.setSize(8)
    fmt.setColor(QColor(20, 20, 20))
    buffer = QgsTextBufferSettings()
    buffer.setEnabled(True)
    buffer.setSize(1.0)
    buffer.setColor(QColor(255, 255, 255, 220))
    fmt.setBuffer(buffer)
    settings.setFormat(fmt)
    return settings


STYLE_NAME = "rscaption"


def store_default_style(gpkg: str) -> str | None:
    """Save the default style into the GeoPackage (``layer_styles``, marked default), so the file
    looks the same when reopened or shared: outlines, low-confidence marks, map tips, labels.
    Returns an error message, or None. Called once the writer is done with the file.

    The row is written with sqlite3 (the table and columns QGIS's OGR provider reads) rather than
    ``saveStyleToDatabase``: that opens the file in update mode through OGR's shared dataset, which
    waited forever behind the run layer's own connection to the same file."""
    if not has_tile_table(gpkg):
        return "no tiles table yet"
    return save_style_row(gpkg, layer_uri(gpkg), TILE_LAYER, STYLE_NAME, apply_default_style,
                          "rscaption: tile outlines, low-confidence tiles marked, captions as map tips and labels")


def save_style_row(gpkg: str, uri: str, table: str, style_name: str, apply, description: str) -> str | None:
    """Style a throwaway layer on ``uri`` with ``apply`` and store its QML as ``table``'s default
    style row (replacing an earlier row of ``style_name``; a user's own styles stay, no longer
    default). Returns an error message, or None."""
    layer = QgsVectorLayer(uri, style_name, "ogr")
    if not layer.isValid():
        return f"cannot open {gpkg}"
    apply(layer)
    doc = QDomDocument()
    error = layer.exportNamedStyle(doc)
    del layer
    if error:
        return error
    try:
        con = sqlite3.connect(gpkg, timeout=10)
        try:
            with con:
                _write_style_row(con, doc.toString(), table, style_name, description)
        finally:
            con.close()
    except sqlite3.Error as exc:
        return str(exc)
    return None


def _write_style_row(con, qml: str, table: str, style_name: str, description: str) -> None:
    con.execute("CREATE TABLE IF NOT EXISTS layer_styles (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "f_table_catalog TEXT(256), f_table_schema TEXT(256), f_table_name TEXT(256), "
                "f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT, styleSLD TEXT, "
                "useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30), "
                "update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))")
    con.execute("INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, last_change) "
                "VALUES ('layer_styles', 'attributes', 'layer_styles', strftime('%Y-%m-%dT%H:%M:%fZ','now'))")
    row = con.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?", (table,)).fetchone()
    geom = row[0] if row else "geom"
    con.execute("UPDATE layer_styles SET useAsDefault = 0 WHERE f_table_name = ?", (table,))
    con.execute("DELETE FROM layer_styles WHERE f_table_name = ? AND styleName = ?", (table, style_name))
    con.execute("INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, "
                "styleName, styleQML, styleSLD, useAsDefault, description, owner, ui) "
                "VALUES ('', '', ?, ?, ?, ?, '', 1, ?, '', '')",
                (table, geom, style_name, qml, description))


#: Alpha of the canvas selection colour while search hits are selected (0-255).
SELECTION_ALPHA = 90


def translucent_selection(canvas) -> None:
    """Keep the selection colour's hue but make it see-through: QGIS draws selected features in
    opaque yellow by default, so a zoomed-in hit would be a solid square over the imagery."""
    if canvas is None:
        return
    color = QColor(canvas.selectionColor())
    if color.alpha() > SELECTION_ALPHA:
        color.setAlpha(SELECTION_ALPHA)
        canvas.setSelectionColor(color)
        canvas.refresh()


def tile_filter(tile_ids) -> str:
    def lit(v):
        return str(int(v)) if isinstance(v, int) or (isinstance(v, str) and v.isdigit()) else "'" + str(v).replace("'", "''") + "'"

    return '"tile_id" IN (' + ",".join(lit(t) for t in tile_ids) + ")" if tile_ids else "FALSE"


def select_tiles(layer: QgsVectorLayer, tile_ids) -> int:
    layer.selectByExpression(tile_filter(list(tile_ids)), Qgis.SelectBehavior.SetSelection)
    return layer.selectedFeatureCount()


def tile_feature(layer: QgsVectorLayer, tile_id):
    req = QgsFeatureRequest().setFilterExpression(tile_filter([tile_id]))
    for feat in layer.getFeatures(req):
        return feat
    return None


def zoom_to_tile(canvas, layer: QgsVectorLayer, tile_id, margin: float = 1.5) -> bool:
    feat = tile_feature(layer, tile_id)
    if feat is None or canvas is None:
        return False
    rect = QgsRectangle(feat.geometry().boundingBox())
    dest = canvas.mapSettings().destinationCrs()
    if dest.isValid() and layer.crs().isValid() and dest != layer.crs():
        rect = QgsCoordinateTransform(layer.crs(), dest, QgsProject.instance()).transformBoundingBox(rect)
    rect.scale(margin)
    canvas.setExtent(rect)
    canvas.refresh()
    try:
        canvas.flashFeatureIds(layer, [feat.id()])
    except Exception:  # flashing is cosmetic
        pass
    return True


def settle_store(gpkg: str, timeout_s: float = 5.0) -> int | None:
    """Make a GeoPackage whose writer died (killed, crashed) readable again; returns the number of
    committed tiles, or None when the file cannot be read.

    A writer killed inside a transaction leaves a hot rollback journal. OGR reads the file through
    a read-only connection, which may not roll that journal back ("attempt to write a readonly
    database"), so the layer would report an unknown feature count and draw nothing. One
    read-write connection rolls the unfinished transaction back (waiting out the dying writer's
    lock), after which every reader sees exactly the committed tiles."""
    if not os.path.isfile(gpkg):
        return None
    try:
        con = sqlite3.connect(gpkg, timeout=timeout_s)
        try:
            return int(con.execute(f"SELECT COUNT(*) FROM {TILE_LAYER}").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return None


def refresh_layer(layer: QgsVectorLayer) -> None:
    """Pick up rows committed by the writer (another thread or process) since the last read."""
    provider = layer.dataProvider()
    if provider is not None:
        provider.reloadData()
    layer.updateExtents()
    layer.triggerRepaint()


def crs_of(wkt_or_authid: str) -> QgsCoordinateReferenceSystem:
    crs = QgsCoordinateReferenceSystem(wkt_or_authid)
    if not crs.isValid():
        crs = QgsCoordinateReferenceSystem.fromWkt(wkt_or_authid)
    return crs

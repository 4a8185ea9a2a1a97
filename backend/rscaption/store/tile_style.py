"""The tiles layer's default QGIS style, written into the GeoPackage by the backend itself.

Why: QGIS applies the default row of a GeoPackage's ``layer_styles`` table when it opens a layer.
Only the plugin used to write that row, so a file made by ``rscaption caption`` on a server opened
as plain filled squares hiding the imagery, with no labels and no map tips. The backend never
imports qgis, so the style is QML (what QGIS reads) and SLD (what other clients read) text written
with sqlite3 into the standard table. It is the style ``rscaption_plugin/core/layers.py`` builds
with PyQGIS (``apply_default_style``); tests/test_store_style.py renders both and compares them:

* a transparent fill and a thin gold outline, so the imagery stays visible under the grid;
* tiles below :data:`LOW_CONFIDENCE` drawn with a dashed violet outline and a sparse hatch;
* captions as map tips, and as labels once a tile is about 35 mm wide on screen;
* confidence and valid fraction shown with two decimals (the attribute table, forms).

The same call hides the file's own tables from QGIS's and GDAL's layer lists ("Add Vector Layer"
offered ``rscaption_embeddings`` and ``rscaption_metadata`` beside ``tiles``): they are registered
in ``gpkg_contents`` with an extension-defined data type (``rscaption``) instead of
``attributes``, which both list as layers.
"""

from __future__ import annotations

import json
import math
import sqlite3
from xml.sax.saxutils import escape

TABLE, GEOM = "tiles", "geom"
STYLE_NAME = "rscaption"
STYLE_DESCRIPTION = "rscaption: tile outlines, low-confidence tiles marked, captions as map tips and labels"
#: Tiles below this confidence are drawn differently: the model is more likely wrong than right.
LOW_CONFIDENCE = 0.5
#: A caption label is shown once a tile is at least this wide on screen (metres of paper).
LABEL_TILE_WIDTH_M = 0.035
INTERNAL_TABLES = ("rscaption_embeddings", "rscaption_metadata")
DATA_TYPE = "rscaption"
EXTENSION = ("rscaption_data", "rscaption: tile image embeddings and run metadata, read by rscaption "
             "(rscaption.store.gpkg); not layers", "read-write")
MAP_TIP = ('<b>[% "caption" %]</b><br/>confidence [% format_number("confidence", 2) %] · '
           'row [% "row" %], col [% "col" %]<br/><i>[% "model" %]</i>')
TWO_DECIMALS = ("confidence", "valid_fraction")


def label_scale(width: float | None, width_m: float | None = None) -> float:
    """The most zoomed-out scale (denominator) at which captions are labelled: one tile about
    35 mm wide on screen. ``width_m``: the tile's ground width in metres when known, else its
    width in map units (pixel coordinates); the plugin's ``label_scale`` computes the same."""
    size = width_m if width_m else width
    if not size or not math.isfinite(size) or size <= 0:
        return 5000.0
    return float(min(1_000_000.0, max(250.0, size / LABEL_TILE_WIDTH_M)))


def _attr(text) -> str:
    """``text`` as an XML attribute value."""
    return escape(str(text), {'"': "&quot;"})


def _options(values: dict) -> str:
    return "".join(f'<Option name="{k}" type="QString" value="{_attr(v)}"/>' for k, v in values.items())


def _fill(outline: str, style: str = "solid") -> str:
    return ('<layer class="SimpleFill" pass="0" locked="0" enabled="1"><Option type="Map">'
            + _options({"color": "0,0,0,0", "joinstyle": "bevel", "offset": "0,0", "offset_unit": "MM",
                        "outline_color": outline, "outline_style": style, "outline_width": "0.4",
                        "outline_width_unit": "MM", "style": "solid"}) + "</Option></layer>")


_HATCH_COLOUR = "170,120,255,110"
_HATCH = ('<layer class="LinePatternFill" pass="0" locked="0" enabled="1"><Option type="Map">'
          + _options({"angle": "45", "color": _HATCH_COLOUR, "distance": "3", "distance_unit": "MM",
                      "line_width": "0.2", "line_width_unit": "MM", "offset": "0", "offset_unit": "MM"})
          + '</Option><symbol name="@0@1" type="line" alpha="1" clip_to_extent="1" force_rhr="0">'
          + '<layer class="SimpleLine" pass="0" locked="0" enabled="1"><Option type="Map">'
          + _options({"capstyle": "square", "joinstyle": "bevel", "line_color": _HATCH_COLOUR,
                      "line_style": "solid", "line_width": "0.2", "line_width_unit": "MM", "offset": "0",
                      "offset_unit": "MM"}) + "</Option></layer></symbol></layer>")


def _field(name: str) -> str:
    if name not in TWO_DECIMALS:
        return ""
    return (f'<field name="{name}" configurationFlags="None"><editWidget type="Range"><config><Option type="Map">'
            '<Option name="AllowNull" type="bool" value="true"/><Option name="Max" type="double" value="1"/>'
            '<Option name="Min" type="double" value="0"/><Option name="Precision" type="int" value="2"/>'
            '<Option name="Step" type="double" value="0.01"/><Option name="Style" type="QString" value="SpinBox"/>'
            "</Option></config></editWidget></field>")


def style_qml(scale: float) -> str:
    """The QML document (QGIS 3.22 reads it, and every later 3.x / 4.x)."""
    low = _attr(f'"confidence" < {LOW_CONFIDENCE}')
    rest = _attr(f'"confidence" >= {LOW_CONFIDENCE} OR "confidence" IS NULL')
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>"
        '<qgis version="3.22.0" styleCategories="Symbology|Labeling|Fields|MapTips|LayerConfiguration" '
        'labelsEnabled="1">'
        '<renderer-v2 type="RuleRenderer" symbollevels="0" enableorderby="0" forceraster="0" referencescale="-1">'
        '<rules key="{5b0ad7f2-2a0e-4d61-9a55-3f2d9b0f7c01}">'
        f'<rule key="{{c1f1a7a4-4a57-4c1e-b0f4-8d2d0b1e7c02}}" symbol="0" filter="{low}" '
        f'label="low confidence (&lt; {LOW_CONFIDENCE})"/>'
        f'<rule key="{{0e4b9d3c-7d0b-4a3a-9a5e-2f6c1d8b7c03}}" symbol="1" filter="{rest}" label="tiles"/>'
        "</rules><symbols>"
        '<symbol name="0" type="fill" alpha="1" clip_to_extent="1" force_rhr="0">'
        + _fill("170,120,255,255", "dash") + _HATCH + "</symbol>"
        '<symbol name="1" type="fill" alpha="1" clip_to_extent="1" force_rhr="0">' + _fill("255,215,0,255")
        + "</symbol></symbols></renderer-v2>"
        '<labeling type="simple"><settings calloutType="simple">'
        '<text-style fieldName="caption" isExpression="0" fontSize="8" fontSizeUnit="Point" '
        'textColor="20,20,20,255" textOpacity="1" fontWeight="50" fontItalic="0" fontUnderline="0" '
        'fontStrikeout="0" fontLetterSpacing="0" fontWordSpacing="0" fontKerning="1" multilineHeight="1" '
        'blendMode="0" capitalization="0" allowHtml="0" textOrientation="horizontal" useSubstitutions="0" '
        'previewBkgrdColor="255,255,255,255" namedStyle="" legendString="Aa">'
        '<text-buffer bufferDraw="1" bufferSize="1" bufferSizeUnits="MM" bufferColor="255,255,255,220" '
        'bufferOpacity="1" bufferNoFill="1" bufferJoinStyle="128" bufferBlendMode="0"/>'
        '<background shapeDraw="0"/><shadow shadowDraw="0"/>'
        "</text-style>"
        '<text-format wrapChar="" autoWrapLength="22" useMaxLineLengthForAutoWrap="1" multilineAlign="3" '
        'formatNumbers="0" decimals="3" plussign="0" addDirectionSymbol="0" leftDirectionSymbol="&lt;" '
        'rightDirectionSymbol=">" reverseDirectionSymbol="0" placeDirectionSymbol="0"/>'
        '<placement placement="1" placementFlags="10" polygonPlacementFlags="2" priority="5" dist="0" '
        'distUnits="MM" offsetType="0" quadOffset="4" xOffset="0" yOffset="0" offsetUnits="MM" rotationAngle="0" '
        'centroidWhole="0" centroidInside="0" fitInPolygonOnly="0" repeatDistance="0" repeatDistanceUnits="MM" '
        'maxCurvedCharAngleIn="25" maxCurvedCharAngleOut="-25" preserveRotation="1" overrunDistance="0" '
        'overrunDistanceUnit="MM" geometryGeneratorEnabled="0" geometryGenerator="" '
        'geometryGeneratorType="PointGeometry" layerType="PolygonGeometry"/>'
        f'<rendering scaleVisibility="1" scaleMin="0" scaleMax="{scale!r}" drawLabels="1" obstacle="1" '
        'obstacleFactor="1" obstacleType="1" zIndex="0" displayAll="0" upsidedownLabels="0" labelPerPart="0" '
        'mergeLines="0" minFeatureSize="0" limitNumLabels="0" maxNumLabels="2000" fontLimitPixelSize="0" '
        'fontMinPixelSize="0" fontMaxPixelSize="10000" unplacedVisibility="0"/>'
        "</settings></labeling>"
        "<fieldConfiguration>" + "".join(_field(n) for n in TWO_DECIMALS) + "</fieldConfiguration>"
        f"<previewExpression>&quot;caption&quot;</previewExpression><mapTip>{escape(MAP_TIP)}</mapTip>"
        "<layerGeometryType>2</layerGeometryType></qgis>")


def style_sld(scale: float) -> str:
    """The same style as SLD 1.1 (outlines, hatch, labels), for clients other than QGIS."""
    def stroke(colour, dash=""):
        return (f'<se:Stroke><se:SvgParameter name="stroke">{colour}</se:SvgParameter>'
                '<se:SvgParameter name="stroke-width">1</se:SvgParameter>'
                '<se:SvgParameter name="stroke-linejoin">bevel</se:SvgParameter>'
                + (f'<se:SvgParameter name="stroke-dasharray">{dash}</se:SvgParameter>' if dash else "")
                + "</se:Stroke>")

    empty = ('<se:Fill><se:SvgParameter name="fill">#000000</se:SvgParameter>'
             '<se:SvgParameter name="fill-opacity">0</se:SvgParameter></se:Fill>')
    prop = "<ogc:PropertyName>confidence</ogc:PropertyName>"
    lit = f"<ogc:Literal>{LOW_CONFIDENCE}</ogc:Literal>"
    hatch = ('<se:PolygonSymbolizer><se:Fill><se:GraphicFill><se:Graphic><se:Mark>'
             '<se:WellKnownName>horline</se:WellKnownName><se:Stroke>'
             '<se:SvgParameter name="stroke">#aa78ff</se:SvgParameter>'
             '<se:SvgParameter name="stroke-opacity">0.43</se:SvgParameter>'
             '<se:SvgParameter name="stroke-width">1</se:SvgParameter></se:Stroke></se:Mark>'
             '<se:Size>11</se:Size><se:Rotation><ogc:Literal>45</ogc:Literal></se:Rotation>'
             "</se:Graphic></se:GraphicFill></se:Fill></se:PolygonSymbolizer>")
    return (
        '<?xml version="1.0" encoding="UTF-8"?><StyledLayerDescriptor xmlns="http://www.opengis.net/sld" '
        'xmlns:se="http://www.opengis.net/se" xmlns:ogc="http://www.opengis.net/ogc" '
        'xmlns:xlink="http://www.w3.org/1999/xlink" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xsi:schemaLocation="http://www.opengis.net/sld http://schemas.opengis.net/sld/1.1.0/StyledLayerDescriptor.xsd" '
        f'version="1.1.0"><NamedLayer><se:Name>{TABLE}</se:Name><UserStyle><se:Name>{STYLE_NAME}</se:Name>'
        "<se:FeatureTypeStyle>"
        f"<se:Rule><se:Name>low confidence (&lt; {LOW_CONFIDENCE})</se:Name>"
        f"<ogc:Filter><ogc:PropertyIsLessThan>{prop}{lit}</ogc:PropertyIsLessThan></ogc:Filter>"
        f"<se:PolygonSymbolizer>{empty}{stroke('#aa78ff', '4 2')}</se:PolygonSymbolizer>{hatch}</se:Rule>"
        "<se:Rule><se:Name>tiles</se:Name><ogc:Filter><ogc:Or>"
        f"<ogc:PropertyIsGreaterThanOrEqualTo>{prop}{lit}</ogc:PropertyIsGreaterThanOrEqualTo>"
        f"<ogc:PropertyIsNull>{prop}</ogc:PropertyIsNull></ogc:Or></ogc:Filter>"
        f"<se:PolygonSymbolizer>{empty}{stroke('#ffd700')}</se:PolygonSymbolizer></se:Rule>"
        f"<se:Rule><se:MinScaleDenominator>0</se:MinScaleDenominator><se:MaxScaleDenominator>{scale!r}"
        "</se:MaxScaleDenominator><se:TextSymbolizer><se:Label><ogc:PropertyName>caption</ogc:PropertyName>"
        '</se:Label><se:Font><se:SvgParameter name="font-size">10</se:SvgParameter></se:Font>'
        "<se:LabelPlacement><se:PointPlacement><se:AnchorPoint><se:AnchorPointX>0.5</se:AnchorPointX>"
        "<se:AnchorPointY>0.5</se:AnchorPointY></se:AnchorPoint></se:PointPlacement></se:LabelPlacement>"
        '<se:Halo><se:Radius>2</se:Radius><se:Fill><se:SvgParameter name="fill">#ffffff</se:SvgParameter>'
        '</se:Fill></se:Halo><se:Fill><se:SvgParameter name="fill">#141414</se:SvgParameter></se:Fill>'
        "</se:TextSymbolizer></se:Rule></se:FeatureTypeStyle></UserStyle></NamedLayer></StyledLayerDescriptor>")


def write_default_style(conn, qml: str | None = None) -> None:
    """Make ``rscaption`` the default style of the tiles layer (replacing an older row of that
    name; other users' styles stay but lose the default mark) and hide the internal tables. Runs
    inside the caller's transaction on an open sqlite3 connection. ``qml``: the plugin's own
    export, else :func:`style_qml` at the file's label scale."""
    scale = label_scale(*_tile_width(conn))
    conn.execute("CREATE TABLE IF NOT EXISTS layer_styles (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                 "f_table_catalog TEXT(256), f_table_schema TEXT(256), f_table_name TEXT(256), "
                 "f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT, styleSLD TEXT, "
                 "useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30), "
                 "update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))")
    conn.execute("INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, last_change) "
                 "VALUES ('layer_styles', 'attributes', 'layer_styles', strftime('%Y-%m-%dT%H:%M:%fZ','now'))")
    row = conn.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?", (TABLE,)).fetchone()
    conn.execute("UPDATE layer_styles SET useAsDefault = 0 WHERE f_table_name = ?", (TABLE,))
    conn.execute("DELETE FROM layer_styles WHERE f_table_name = ? AND styleName = ?", (TABLE, STYLE_NAME))
    conn.execute("INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, "
                 "styleName, styleQML, styleSLD, useAsDefault, description, owner, ui) "
                 "VALUES ('', '', ?, ?, ?, ?, ?, 1, ?, '', '')",
                 (TABLE, row[0] if row else GEOM, STYLE_NAME, qml or style_qml(scale), style_sld(scale),
                  STYLE_DESCRIPTION))
    hide_internal_tables(conn)


def hide_internal_tables(conn) -> None:
    """Register the embeddings and metadata tables under this format's own data type (and its
    extension), so layer lists show ``tiles`` alone; a file written before this is fixed too."""
    marks = ",".join("?" * len(INTERNAL_TABLES))
    conn.execute(f"UPDATE gpkg_contents SET data_type = ? WHERE table_name IN ({marks})",
                 (DATA_TYPE, *INTERNAL_TABLES))
    name, definition, scope = EXTENSION
    for table in INTERNAL_TABLES:  # (the table's UNIQUE does not hold for a NULL column_name)
        conn.execute("INSERT INTO gpkg_extensions (table_name, column_name, extension_name, definition, scope) "
                     "SELECT ?, NULL, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM gpkg_extensions WHERE table_name = ? "
                     "AND extension_name = ?)", (table, name, definition, scope, table, name))


def _tile_width(conn) -> tuple[float | None, float | None]:
    """(width in map units of the tiles layer's first tile, its ground width in metres or None)."""
    width = None
    try:
        box = conn.execute(f'SELECT minx, maxx FROM "rtree_{TABLE}_{GEOM}" LIMIT 1').fetchone()
        width = None if box is None else float(box[1] - box[0])
    except sqlite3.Error:  # no R-tree (a file edited elsewhere): the footprint alone, else the fallback
        width = None
    row = conn.execute("SELECT value FROM rscaption_metadata WHERE key = 'tile_footprint'").fetchone()
    try:
        footprint = (json.loads(row[0]) or {}).get("footprint_m") if row and row[0] else None
    except (TypeError, ValueError):
        footprint = None
    return width, float(footprint) if isinstance(footprint, (int, float)) and footprint > 0 else None

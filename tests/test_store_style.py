"""Issue 22, the backend's side: a GeoPackage made by the CLI opens in QGIS as the plugin shows it
(its default style written by the backend, the internal tables not offered as layers), edge
tiles do not stack on the map, and ``rscaption search`` says when nothing is a good match.

Real CLI runs in a subprocess, real GeoPackages read back with sqlite3 and with PyQGIS
(offscreen), the tiny model for plumbing and the shipped default model where a calibrated score
is the point."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from conftest import geotiff_path

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "rscaption.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def cli_made(tmp_path_factory, tiny_model_dir):
    """RGB.byte.tif (791 x 718 px) captioned by the CLI at 128 px: 7 x 6 windows, the last column
    pulled back from x=768 to x=663 and the last row from 640 to 590 (a server run, no plugin)."""
    out = tmp_path_factory.mktemp("cli") / "made by cli.gpkg"
    r = cli("caption", geotiff_path("RGB.byte.tif"), "-o", out, "--model", tiny_model_dir, "--tile-size", 128)
    assert r.returncode == 0, r.stderr
    return out


def _rows(path, sql, *args):
    con = sqlite3.connect(str(path))
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


# -- item 15: the default style, written by the backend ------------------------------------------
def test_a_cli_made_file_opens_styled_in_pyqgis(qgis_app, cli_made):
    """Only the plugin used to write ``layer_styles``: a CLI file opened as filled squares."""
    from qgis.core import QgsVectorLayer

    (row,) = _rows(cli_made, "SELECT styleName, useAsDefault, length(styleQML), length(styleSLD) FROM layer_styles "
                             "WHERE f_table_name = 'tiles'")
    assert row[0] == "rscaption" and row[1] == 1 and row[2] > 1000 and row[3] > 1000
    layer = QgsVectorLayer(f"{cli_made}|layername=tiles", "cli", "ogr")
    assert layer.isValid()
    renderer = layer.renderer()
    assert renderer.type() == "RuleRenderer"
    rules = {r.label(): r for r in renderer.rootRule().children()}
    assert set(rules) == {"low confidence (< 0.5)", "tiles"}
    low = rules["low confidence (< 0.5)"].symbol()
    assert [low.symbolLayer(i).layerType() for i in range(low.symbolLayerCount())] == ["SimpleFill", "LinePatternFill"]
    assert low.symbolLayer(0).fillColor().alpha() == 0  # the imagery shows through
    assert layer.labelsEnabled() and layer.labeling().settings().fieldName == "caption"
    # a 38 km tile (128 px of ~300 m) is labelled from 1:1,000,000 in (the most zoomed-out scale allowed)
    assert layer.labeling().settings().minimumScale == pytest.approx(1_000_000.0)
    assert '"caption"' in layer.mapTipTemplate() and layer.displayExpression() == '"caption"'
    widget = layer.editorWidgetSetup(layer.fields().indexOf("confidence"))
    assert widget.type() == "Range" and widget.config()["Precision"] == 2


def test_the_backend_style_draws_exactly_what_the_plugin_style_draws(qgis_app, cli_made, tmp_path):
    """The backend writes QML text without qgis; rendered next to the plugin's own PyQGIS style
    (``apply_default_style``) on the same tiles, zoomed out (outlines, hatch) and in (labels),
    every pixel is the same."""
    from qgis.core import QgsMapRendererSequentialJob, QgsMapSettings, QgsRectangle, QgsVectorLayer
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    from rscaption.store.gpkg_sql import register_functions
    from rscaption_plugin.core.layers import apply_default_style

    graded = tmp_path / "graded.gpkg"  # half the tiles below the confidence line (the tiny model's are ~0)
    shutil.copy(cli_made, graded)
    con = sqlite3.connect(graded)
    register_functions(con)
    con.execute("UPDATE tiles SET confidence = ((tile_id * 37) % 100) / 100.0")
    con.commit()
    con.close()
    backend = QgsVectorLayer(f"{graded}|layername=tiles", "backend", "ogr")
    plugin = QgsVectorLayer(f"{graded}|layername=tiles", "plugin", "ogr")
    apply_default_style(plugin)

    def render(layer, extent):
        settings = QgsMapSettings()
        settings.setLayers([layer])
        settings.setDestinationCrs(layer.crs())
        settings.setOutputSize(QSize(400, 400))
        settings.setExtent(extent)
        settings.setBackgroundColor(QColor(255, 255, 255))
        job = QgsMapRendererSequentialJob(settings)
        job.start()
        job.waitForFinished()
        return job.renderedImage(), settings.scale()

    whole = backend.extent()
    c = whole.center()
    tile = 128 * 300.0  # ~300 m pixels: a tile is 38 km, labelled below 1:1.1 million
    close = QgsRectangle(c.x() - tile, c.y() - tile, c.x() + tile, c.y() + tile)
    for extent in (whole, close):
        want, scale = render(plugin, extent)
        got, _ = render(backend, extent)
        inked = sum(1 for x in range(0, 400, 3) for y in range(0, 400, 3) if want.pixel(x, y) != 0xFFFFFFFF)
        assert inked > 100, f"nothing drawn at 1:{scale:.0f}"
        assert got == want, f"the backend's style draws differently at 1:{scale:.0f}"


def test_a_rerun_replaces_its_own_style_and_keeps_a_users(cli_made, tmp_path, tiny_model_dir):
    """A person's own saved style stays (no longer the default); one rscaption row, the default."""
    out = tmp_path / "again.gpkg"
    shutil.copy(cli_made, out)
    con = sqlite3.connect(out)
    con.execute("INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, "
                "styleName, styleQML, styleSLD, useAsDefault, description, owner, ui) "
                "VALUES ('', '', 'tiles', 'geom', 'mine', '<qgis/>', '', 1, '', '', '')")
    con.commit()
    con.close()
    r = cli("caption", geotiff_path("RGB.byte.tif"), "-o", out, "--model", tiny_model_dir, "--tile-size", 128)
    assert r.returncode == 0, r.stderr
    rows = sorted(_rows(out, "SELECT styleName, useAsDefault FROM layer_styles WHERE f_table_name = 'tiles'"))
    assert rows == [("mine", 0), ("rscaption", 1)]


def test_label_scale_follows_the_tile_footprint():
    from rscaption.store.tile_style import label_scale

    assert label_scale(84.0, 420.0) == pytest.approx(12_000)  # NAIP 5 m, 84 px tiles: labels from 1:12,000
    assert label_scale(256.0) == pytest.approx(256 / 0.035)  # pixel coordinates: map units
    assert label_scale(None) == 5000.0 and label_scale(1e9, 1e9) == 1_000_000.0


# -- item 14: the internal tables are not layers -------------------------------------------------
def test_only_the_tiles_layer_is_offered_to_add(qgis_app, cli_made):
    """QGIS's Add Vector Layer lists (and selected) every table GDAL reports as a layer: the
    embeddings and the metadata were two of them."""
    from osgeo import ogr
    from qgis.core import QgsProviderRegistry

    names = [s.name() for s in QgsProviderRegistry.instance().querySublayers(str(cli_made))]
    assert names == ["tiles"]
    ds = ogr.Open(str(cli_made))
    # GDAL also lists the standard style table, which QGIS itself never offers
    assert [ds.GetLayer(i).GetName() for i in range(ds.GetLayerCount())] == ["tiles", "layer_styles"]
    ds = None
    registered = dict(_rows(cli_made, "SELECT table_name, data_type FROM gpkg_contents"))
    assert registered["rscaption_embeddings"] == registered["rscaption_metadata"] == "rscaption"
    ext = _rows(cli_made, "SELECT table_name, extension_name FROM gpkg_extensions WHERE extension_name = 'rscaption_data'")
    assert sorted(t for t, _ in ext) == ["rscaption_embeddings", "rscaption_metadata"]
    from rscaption.store.gpkg import TileStore

    with TileStore.open(str(cli_made), readonly=True) as store:  # still an rscaption store to the backend
        assert store.count() == len(store.embeddings()[0]) == len(_rows(cli_made, "SELECT fid FROM tiles")) > 30


# -- item 12: edge tiles -------------------------------------------------------------------------
def test_edge_tiles_do_not_stack_on_their_neighbours(qgis_app, cli_made, tmp_path, tiny_model_dir):
    """The last column starts at pixel 663 and overlapped column 5 (640-768) by 105 of 128 px: two
    polygons under one click, doubled lines. Its polygon now starts at 768, where the regular grid
    would have put it; its pixel window, caption and id stay those of the whole 663-791 window."""
    from qgis.core import QgsGeometry, QgsVectorLayer

    from rscaption.raster.tiling import RasterTiler, TilingParams

    layer = QgsVectorLayer(f"{cli_made}|layername=tiles", "cli", "ogr")
    feats = list(layer.getFeatures())
    area = sum(f.geometry().area() for f in feats)
    union = QgsGeometry.unaryUnion([f.geometry() for f in feats]).area()
    assert area == pytest.approx(union, rel=1e-9)  # no two tiles cover the same ground
    with RasterTiler(geotiff_path("RGB.byte.tif"), TilingParams(tile_size=128)) as tiler:
        plan = {t.tile_id: t for t in tiler.plan()}
        px = tiler.res[0]
    by_id = {f["tile_id"]: f for f in feats}
    assert set(by_id) <= set(plan) and len(by_id) > 30  # ids unchanged (all-nodata corner tiles skipped)
    assert any(plan[t].col == 6 for t in by_id)
    for tile_id, f in by_id.items():
        t = plan[tile_id]
        assert (f["px_col_off"], f["px_row_off"], f["px_width"], f["px_height"]) == t.window  # the caption's window
        box = f.geometry().boundingBox()
        if t.col == 6:  # pulled back from 768 to 663: drawn from 768 on
            assert t.window[0] == 663 and box.xMinimum() == pytest.approx(t.bounds[0] + (768 - 663) * px)
            assert box.xMaximum() == pytest.approx(t.bounds[2])
        elif t.row < 5:
            assert (box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum()) == pytest.approx(t.bounds)
    # the resume keys are the pixel windows: a rerun on the file redoes nothing
    out = tmp_path / "resumed.gpkg"
    shutil.copy(cli_made, out)
    r = cli("caption", geotiff_path("RGB.byte.tif"), "-o", out, "--model", tiny_model_dir, "--tile-size", 128)
    assert r.returncode == 0 and f"done: 0 tiles captioned, {len(feats)} resumed" in r.stderr, r.stderr




# -- item 9: "no good match" -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """The NAIP prairie scene (farmland, pastures and ponds at 5 m; no town, no river) captioned
    by the shipped default model, which carries the reference images the line comes from."""
    from rscaption.models.registry import default_model_dir

    if default_model_dir() is None:
        pytest.skip("no default model in resources/default_model")
    out = tmp_path_factory.mktemp("farm") / "farm.gpkg"
    r = cli("caption", geotiff_path("m_4709963_se_14_1_20200831.tif"), "-o", out, "--bands", "1,2,3")
    assert r.returncode == 0, r.stderr
    return out


def test_search_says_no_good_match_for_houses_on_a_farm(farm, cli_made):
    """"houses" listed 10 "matches" at 0.21-0.33; "farmland" on the same file reaches its line. The
    tiny test models have no scene head, so no line: their hits keep their shape, no claim made."""
    r = cli("search", farm, "houses", "-k", 10)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("no good match: every hit scores below this query's match line")
    r = cli("search", farm, "farmland", "-k", 10)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"all 10 hits reach this query's match line 0\.\d{4}",
                        r.stdout.strip().splitlines()[-1])
    r = cli("search", farm, "houses", "-k", 3, "--json")
    hits = json.loads(r.stdout)
    assert len({h["match_line"] for h in hits}) == 1 and all(h["score"] < h["match_line"] for h in hits)
    r = cli("search", cli_made, "farmland", "-k", 2, "--json")
    assert r.returncode == 0 and all("match_line" not in h for h in json.loads(r.stdout)), r.stderr
    assert "match line" not in cli("search", cli_made, "farmland", "-k", 2).stdout


def test_the_line_is_the_models_own_null_distribution_per_query(farm):
    """Recomputed from the checkpoint's files alone (safetensors + the text tower): the 99th
    percentile of the query's scores on the class prototypes of every scene but the 3 whose
    prompts are nearest the query. Different queries get different lines: no fixed number."""
    from safetensors.numpy import load_file

    from rscaption.models.registry import default_model_dir
    from rscaption.search.query import load_search_model, search_store

    scene = load_file(str(default_model_dir() / "scene.safetensors"))
    prompts, refs = scene["prompts"].astype(np.float32), scene["class_prototypes"].astype(np.float32)
    owner = scene["class_owner"]
    model = load_search_model("default")
    lines = {}
    for query in ("houses", "farmland", "a river", "storage tanks"):
        q = model.embed_texts([query])[0]
        near = np.argsort(-(prompts @ q))[:3]
        want = float(np.percentile(refs[~np.isin(owner, near)] @ q, 99))
        hits = search_store(str(farm), query, k=3)
        assert hits[0].match_line == pytest.approx(want, abs=1e-5)
        lines[query] = want
    assert len({round(v, 3) for v in lines.values()}) == 4
    # the scene has ponds and no river: water queries split the way the imagery does
    assert search_store(str(farm), "a river", k=1)[0].score < lines["a river"]


def test_the_worker_sends_the_line_with_each_hit(farm):
    import io

    from rscaption.protocol import encode_request, parse_message
    from rscaption.worker import Worker, _Writer

    out = io.StringIO()
    Worker(io.StringIO(encode_request("search", gpkg=str(farm), query="houses", k=3)), _Writer(out),
           heartbeat_s=60).run()
    result = [m for m in map(parse_message, out.getvalue().splitlines()) if m["type"] == "result"][0]
    assert [h["match_line"] > h["score"] for h in result["hits"]] == [True] * 3

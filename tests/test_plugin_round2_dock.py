"""Issue 22, the plugin in a person's hands (round 2): the search dock, the map and the message bar
as a person met them in a QGIS 3.22 window. Real PyQGIS offscreen, QTest clicks on the real
dock, real tasks; the tiny model for plumbing, the shipped default model where a score's meaning
is the point. The message-log guard (conftest) fails any of these on a Python error."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest

from test_plugin_support import caption_request, wait_until

pytest.importorskip("qgis.core")

from qgis.core import (Qgis, QgsApplication, QgsFeature, QgsGeometry, QgsProject, QgsProviderRegistry,  # noqa: E402
                       QgsTask)
from qgis.PyQt.QtCore import QPoint, Qt  # noqa: E402
from qgis.PyQt.QtTest import QTest  # noqa: E402

from test_plugin import captioned, plugin, tiny  # noqa: E402,F401  (shared fixtures)
from test_plugin_clicks import answer_modal, click, main_window_shown, press_toolbar, tile_layer, type_into  # noqa: E402,F401

LEFT = Qt.MouseButton.LeftButton


def _search(dock, query, k=None):
    if k is not None:
        type_into(dock.k_spin.lineEdit(), str(k))
    type_into(dock.query_edit, query)
    click(dock.search_button)
    assert wait_until(lambda: not dock.searching, 180), "the search did not finish"


def _rules(layer):
    return [r.label() for r in layer.renderer().rootRule().children()]


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """The NAIP prairie scene (fields, pastures, ponds at 5 m; no town) captioned by the default
    model, whose scene head carries the reference images the match line comes from."""
    from rscaption.engine.pipeline import caption_raster
    from rscaption.models.registry import default_model_dir
    from rscaption.raster.tiling import TilingParams

    from conftest import geotiff_path

    if default_model_dir() is None:
        pytest.skip("no default model in resources/default_model")
    out = tmp_path_factory.mktemp("farm") / "farm.gpkg"
    caption_raster(str(geotiff_path("m_4709963_se_14_1_20200831.tif")), str(out), model="default",
                   tiling=TilingParams(tile_size=84, bands=(1, 2, 3)), batch_size=8)
    return out


# -- item 8 ------------------------------------------------------------------------------------------
def test_a_failed_search_leaves_no_old_hits_behind(plugin, captioned, tmp_path):  # noqa: F811
    """The next query fails (its file's model cannot be loaded): the last query's hits used to stay
    listed, selected and coloured under the new query and its error."""
    broken = tmp_path / "no model.gpkg"
    shutil.copy(captioned, broken)
    con = sqlite3.connect(broken)
    con.execute("UPDATE rscaption_metadata SET value = ? WHERE key = 'model'",
                (json.dumps({"id": str(tmp_path / "deleted model"), "hash": "0" * 64, "card": {}}),))
    con.commit()
    con.close()
    good, bad = tile_layer(captioned, "good"), tile_layer(broken, "bad")
    dock = plugin.dock
    dock.set_layer(good)
    plugin.show_dock()
    _search(dock, "a river with green fields", k=5)
    assert dock.error is None and dock.results.count() == 5 and good.selectedFeatureCount() > 0
    assert any(label.startswith("score ") for label in _rules(good))

    dock.set_layer(bad)
    _search(dock, "dense residential area")
    assert dock.error and "cannot load the model" in dock.error and dock.status.text() == dock.error
    assert dock.results.count() == 0 and dock.hits == []
    assert good.selectedFeatureCount() == 0 and _rules(good) == ["low confidence (< 0.5)", "tiles"]


# -- item 9 ------------------------------------------------------------------------------------------
def test_houses_on_a_farm_says_no_good_match(plugin, farm):
    """"houses" on the farm scene listed "10 match(es)" at 0.21-0.33; each is now marked weak, the
    dock says there is no good match, and the line is the one the backend computes for the query."""
    from rscaption.search.query import search_store

    layer = tile_layer(farm, "farm")
    dock = plugin.dock
    dock.set_layer(layer)
    plugin.show_dock()
    _search(dock, "houses", k=10)
    assert dock.error is None and len(dock.hits) == 10
    line = search_store(str(farm), "houses", k=1)[0].match_line
    assert dock.match_line == pytest.approx(line) and all(h["score"] < line for h in dock.hits)
    assert dock.match_label.text().startswith("<b>No good match</b>") and f"{line:.3f}" in dock.match_label.text()
    assert dock.status.text().startswith("0 match(es), 10 weak")
    items = [dock.results.item(i) for i in range(dock.results.count())]
    assert all("  weak  " in it.text() and "below this query's match line" in it.toolTip() for it in items)
    assert _rules(layer)[0] == f"weak: below the match line {line:.3f}"  # grey and dashed, no score colour

    _search(dock, "farmland", k=10)
    farm_line = dock.match_line
    assert farm_line != pytest.approx(line)  # each query its own line
    assert dock.match_label.text().startswith(f"Match line {farm_line:.3f}") and "10 of 10 hits reach it" in \
        dock.match_label.text()
    assert dock.status.text().startswith("10 match(es)") and "weak" not in dock.results.item(0).text()


# -- item 11 -----------------------------------------------------------------------------------------
def test_hits_keep_the_overview_their_colours_and_four_legend_swatches(plugin, captioned):  # noqa: F811
    layer = tile_layer(captioned)
    dock = plugin.dock
    dock.set_layer(layer)
    plugin.show_dock()
    canvas = plugin.iface.mapCanvas()
    canvas.setDestinationCrs(layer.crs())
    canvas.setExtent(layer.extent())
    overview = canvas.extent()
    _search(dock, "a river with green fields", k=12)
    assert dock.error is None and len(dock.hits) == 12
    # the map stays where the person was: no jump to hit 1 at 1:2,997
    assert canvas.extent() == overview
    # one tile selected, the one the list points at: QGIS paints selected features in its selection colour
    assert [f["tile_id"] for f in layer.selectedFeatures()] == [dock.hits[0]["tile_id"]]
    # one legend swatch per score band, each its own colour
    bands = [(i.label(), i.symbol().color().name()) for i in layer.renderer().legendSymbolItems()
             if i.label().startswith("score ")]
    assert len(bands) == 4 and len({colour for _, colour in bands}) == 4, bands
    # on request (Next), the map zooms to hit 2 and it becomes the selected tile
    click(dock.next_button)
    second = dock.hits[1]["tile_id"]
    assert [f["tile_id"] for f in layer.selectedFeatures()] == [second]
    from rscaption_plugin.core.layers import tile_feature

    box = tile_feature(layer, second).geometry().boundingBox()
    assert canvas.extent().contains(box) and canvas.extent().width() < overview.width() / 2
    assert canvas.extent().center().distance(box.center()) < 1e-6 * canvas.extent().width() + 1e-3


def test_similar_to_selected_keeps_the_reference_tile_marked(plugin, captioned):  # noqa: F811
    from qgis.core import QgsMapRendererSequentialJob, QgsMapSettings
    from qgis.PyQt.QtCore import QSize

    layer = tile_layer(captioned)
    dock = plugin.dock
    dock.set_layer(layer)
    plugin.show_dock()
    reference = sorted(f["tile_id"] for f in layer.getFeatures())[7]
    layer.selectByExpression(f'"tile_id" = {reference}')
    click(dock.similar_button)
    assert wait_until(lambda: not dock.searching, 60) and dock.error is None, dock.error
    assert reference not in [h["tile_id"] for h in dock.hits]
    assert _rules(layer)[0] == f"reference: tile {reference}" and "outlined in cyan" in dock.status.text()
    # drawn on the map: the reference tile's outline is cyan (rendered, as the canvas draws it)
    from rscaption_plugin.core.layers import tile_feature

    box = tile_feature(layer, reference).geometry().boundingBox()
    box.scale(1.3)
    settings = QgsMapSettings()
    settings.setLayers([layer])
    settings.setDestinationCrs(layer.crs())
    settings.setOutputSize(QSize(200, 200))
    settings.setExtent(box)
    job = QgsMapRendererSequentialJob(settings)
    job.start()
    job.waitForFinished()
    image = job.renderedImage()
    cyan = sum(1 for x in range(200) for y in range(200)
               if (lambda c: c.red() < 60 and c.green() > 170 and c.blue() > 220)(image.pixelColor(x, y)))
    assert cyan > 200, cyan


# -- item 12 -----------------------------------------------------------------------------------------
def test_a_click_beside_the_edge_picks_the_tile_under_it(plugin, captioned):  # noqa: F811
    """RGB.byte.tif at 128 px: the last column's window starts at pixel 663 and overlapped column 5
    (640-768). A click at pixel 700 identified both; the edge tile's polygon now starts at 768."""
    import rasterio
    from rasterio.transform import xy
    from qgis.core import QgsPointXY
    from qgis.gui import QgsMapToolIdentify, QgsMapToolIdentifyFeature

    from conftest import geotiff_path

    layer = tile_layer(captioned)
    by_cell = {(f["row"], f["col"]): f for f in layer.getFeatures()}
    row = next(r for r in range(6) if (r, 5) in by_cell and (r, 6) in by_cell)
    with rasterio.open(geotiff_path("RGB.byte.tif")) as ds:
        x, y = xy(ds.transform, row * 128 + 64, 700, offset="ul")
    canvas = plugin.iface.mapCanvas()
    canvas.setDestinationCrs(layer.crs())
    canvas.setExtent(layer.extent())
    canvas.refresh()
    QgsApplication.processEvents()
    point = canvas.getCoordinateTransform().transform(QgsPointXY(x, y))
    px, py = round(point.x()), round(point.y())
    identified = QgsMapToolIdentify(canvas).identify(px, py, [layer], QgsMapToolIdentify.IdentifyMode.TopDownAll)
    assert [r.mFeature["col"] for r in identified] == [5]
    tool = QgsMapToolIdentifyFeature(canvas, layer)
    picked = []
    # by id: QGIS 3.40 sends the feature without its attributes
    tool.featureIdentified[QgsFeature].connect(lambda feature: picked.append(feature.id()))
    canvas.setMapTool(tool)
    try:
        QTest.mouseClick(canvas.viewport(), LEFT, Qt.KeyboardModifier.NoModifier, QPoint(px, py))
    finally:
        canvas.unsetMapTool(tool)
    assert [(layer.getFeature(fid)["row"], layer.getFeature(fid)["col"]) for fid in picked] == [(row, 5)]
    # and no doubled edge lines: no two tiles cover the same ground
    geoms = [f.geometry() for f in layer.getFeatures()]
    assert sum(g.area() for g in geoms) == pytest.approx(QgsGeometry.unaryUnion(geoms).area(), rel=1e-9)


# -- item 13 -----------------------------------------------------------------------------------------
def test_a_cancel_is_reported_on_top_not_under_task_complete(plugin, geotiff, tiny, tmp_path):  # noqa: F811
    """QGIS (QgisApp::onTaskCompleteShowNotify) announces a finished task as "Task complete" with
    its description, in the message bar where no desktop notification service runs, right after
    the task's finished(): the run's "cancelled; N finished tiles kept" went under "1 more". The
    stand-in below does what QgisApp does; the pytest-qgis bar keeps messages in push order, and
    a QgsMessageBar shows the last one pushed."""
    from qgis.gui import QgsMessageBar

    shown = QgsMessageBar()  # the premise: the newest message is the one shown
    shown.pushInfo("rscaption", "older")
    shown.pushInfo("Task complete", "newer")
    assert shown.currentItem().text() == "newer"

    bar = plugin.iface.messageBar()
    bar.clear_messages()

    def announce(task_id, status):  # QgisApp, without a notification daemon
        task = QgsApplication.taskManager().task(task_id)
        if task is not None and status in (QgsTask.TaskStatus.Complete, QgsTask.TaskStatus.Terminated):
            title = "Task complete" if status == QgsTask.TaskStatus.Complete else "Task failed"
            bar.pushMessage(title, task.description(), Qgis.MessageLevel.Info)

    QgsApplication.taskManager().statusChanged.connect(announce)
    try:
        # 16 px tiles one per batch: ~2,000 commits, so the cancel lands mid-run even on a fast CPU
        run = plugin.start_caption(caption_request(geotiff("RGB.byte.tif"), tmp_path / "cancelled.gpkg", tiny,
                                                   tile_size=16, batch_size=1))
        assert wait_until(lambda: run.tiles_seen > 0 or run.done, 120)
        run.cancel()
        assert wait_until(lambda: run.done, 120)
        QgsApplication.processEvents()
    finally:
        QgsApplication.taskManager().statusChanged.disconnect(announce)
    info = bar.get_messages(Qgis.MessageLevel.Info)
    announced = [m for m in info if m.startswith("Task ")]
    assert len(announced) == 1 and announced[0].startswith("Task complete:rscaption: caption")
    assert ": cancelled; " in announced[0] and "finished tiles kept" in announced[0]
    assert info[-1].startswith("rscaption:cancelled; ") and "finished tiles kept in" in info[-1]


# -- item 14 -----------------------------------------------------------------------------------------
def test_reopening_an_export_offers_only_tiles_with_two_decimal_confidence(plugin, captioned, tmp_path):  # noqa: F811
    """An older file (its tables registered as plain attribute tables) exported through the menu:
    Add Vector Layer offered and selected ``rscaption_embeddings`` and ``rscaption_metadata`` beside
    ``tiles``; the reopened layer's attribute table showed confidence as 0.94475563..."""
    from qgis.core import QgsVectorLayer, QgsVectorLayerCache
    from qgis.gui import QgsAttributeTableModel
    from qgis.PyQt.QtWidgets import QFileDialog, QLineEdit

    from rscaption.store.gpkg_sql import register_functions

    old = tmp_path / "older file.gpkg"
    shutil.copy(captioned, old)
    con = sqlite3.connect(old)
    register_functions(con)
    con.execute("UPDATE gpkg_contents SET data_type = 'attributes' WHERE table_name LIKE 'rscaption_%'")
    con.execute("DELETE FROM gpkg_extensions WHERE extension_name = 'rscaption_data'")
    con.execute("UPDATE tiles SET confidence = 0.94475563 + tile_id / 1000.0")
    con.commit()
    con.close()
    assert len(QgsProviderRegistry.instance().querySublayers(str(old))) == 3  # as files made before
    layer = tile_layer(old)
    plugin.iface.setActiveLayer(layer)
    dst = tmp_path / "exported.gpkg"

    def answer(dialog):
        edit = dialog.findChild(QLineEdit, "fileNameEdit")
        type_into(edit, str(dst))
        QTest.keyClick(edit, Qt.Key.Key_Return)

    seen = answer_modal(QFileDialog, answer)
    press_toolbar(plugin, plugin.export_action)
    assert seen and dst.is_file()
    assert [s.name() for s in QgsProviderRegistry.instance().querySublayers(str(dst))] == ["tiles"]

    reopened = QgsVectorLayer(f"{dst}|layername=tiles", "reopened", "ogr")  # loads the file's default style
    QgsProject.instance().addMapLayer(reopened)
    cache = QgsVectorLayerCache(reopened, 100)
    model = QgsAttributeTableModel(cache)
    model.loadLayer()
    column = model.fieldCol(reopened.fields().indexOf("confidence"))
    shown = {model.data(model.index(r, column), Qt.ItemDataRole.DisplayRole) for r in range(model.rowCount())}
    assert shown and all(len(v.split(".")[-1]) == 2 for v in shown), sorted(shown)[:3]
    stored = sorted(f["confidence"] for f in reopened.getFeatures())
    assert any(round(v, 2) != v for v in stored)  # the values are kept in full; only the display rounds

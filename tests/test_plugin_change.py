""""Compare two dates" (issue #23) on the QGIS side, driven as a user drives it: the toolbar
button, the dialog's combos and buttons by clicks, the real backend with the tiny model on the two
NAIP dates (2009, 2020), the change layer's style and map tip, the dock's most changed tiles, a
cancel that keeps finished work, and ``rscaption:change`` through the real ``processing.run``."""

from __future__ import annotations

import json
import sqlite3
import sys
import warnings

import pytest

from test_plugin_support import wait_until

pytest.importorskip("qgis.core")

from qgis.core import (  # noqa: E402
    QgsCoordinateTransform,
    QgsExpression,
    QgsExpressionContext,
    QgsExpressionContextUtils,
    QgsGraduatedSymbolRenderer,
    QgsProject,
    QgsRasterLayer,
)
from qgis.PyQt.QtCore import Qt  # noqa: E402
from qgis.PyQt.QtTest import QTest  # noqa: E402
from qgis.PyQt.QtWidgets import QDialogButtonBox  # noqa: E402

from test_plugin import plugin, tiny  # noqa: E402,F401  (shared fixtures)
from test_plugin_clicks import answer_modal, click, main_window_shown, press_toolbar, type_into  # noqa: E402,F401
from test_plugin_usability import fresh_settings  # noqa: E402,F401

NAIP_2009 = "m_4709963_se_14_1_20090818.tif"
NAIP_2020 = "m_4709963_se_14_1_20200831.tif"


def add_raster(path, name) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(path), name)
    assert layer.isValid(), path
    QgsProject.instance().addMapLayer(layer)
    return layer


def choose(combo, layer) -> None:
    """Pick ``layer`` in a layer combo with the keyboard, as a user steps through its list."""
    combo.setFocus()
    for _ in range(combo.count() + 1):
        if combo.currentLayer() is layer:
            return
        QTest.keyClick(combo, Qt.Key.Key_Down)
    QTest.keyClick(combo, Qt.Key.Key_Home)
    for _ in range(combo.count()):
        if combo.currentLayer() is layer:
            return
        QTest.keyClick(combo, Qt.Key.Key_Down)
    assert combo.currentLayer() is layer, f"{layer.name()} is not offered"


def pick_data(combo, value) -> None:
    combo.setFocus()
    QTest.keyClick(combo, Qt.Key.Key_Home)
    while combo.currentData() != value:
        before = combo.currentIndex()
        QTest.keyClick(combo, Qt.Key.Key_Down)
        assert combo.currentIndex() != before, f"{value} is not offered"


def fill(dlg, model, out, tile_px=256):
    type_into(dlg.model_combo.lineEdit(), model)
    if dlg.auto_tile_check.isChecked():
        click(dlg.auto_tile_check)
    type_into(dlg.tile_spin.lineEdit(), str(tile_px))
    pick_data(dlg.mode_combo, "inprocess")
    pick_data(dlg.output_combo, "file")
    type_into(dlg.output_file.lineEdit(), str(out))


def coarser_copy(src, dst, metres: float, bands=None, float32=False) -> str:
    """The same place at a coarser pixel (optionally fewer bands, or as float), written with GDAL."""
    from osgeo import gdal

    with warnings.catch_warnings():  # GDAL >= 3.9: FutureWarning about UseExceptions (the test's GDAL call)
        warnings.simplefilter("ignore", FutureWarning)
        ds = gdal.Translate(str(dst), str(src), xRes=metres, yRes=metres, resampleAlg="average",
                            bandList=bands, outputType=gdal.GDT_Float32 if float32 else gdal.GDT_Unknown)
    ds = None  # noqa: F841  (closes and flushes the file)
    return str(dst)


def sql(path, query, *args):
    con = sqlite3.connect(str(path))
    try:
        return con.execute(query, args).fetchall()
    finally:
        con.close()


# -- the dialog's warnings, before any run -------------------------------------------------------------
def test_dialog_warns_before_the_run_when_resolutions_differ_more_than_2x_or_bands_differ(
        plugin, fresh_settings, geotiff, tmp_path):  # noqa: F811
    from rscaption_plugin.ui.change_dialog import ChangeDialog

    before = add_raster(geotiff(NAIP_2009), "NAIP 2009")
    after = add_raster(geotiff(NAIP_2020), "NAIP 2020")
    coarse = add_raster(coarser_copy(geotiff(NAIP_2020), tmp_path / "naip2020_15m.tif", 15.0), "NAIP 2020 15 m")
    three = add_raster(coarser_copy(geotiff(NAIP_2020), tmp_path / "naip2020_rgb.tif", 5.0, [1, 2, 3]),
                       "NAIP 2020 RGB")
    floats = add_raster(coarser_copy(geotiff(NAIP_2020), tmp_path / "naip2020_f32.tif", 5.0, float32=True),
                        "NAIP 2020 float")
    seen = {}

    def answer(dlg):
        assert dlg.before_combo.currentLayer() is before  # the earlier date is offered as "before"
        choose(dlg.after_combo, after)
        seen["same"] = dlg.warning_label.text()
        choose(dlg.after_combo, coarse)
        seen["coarse"] = dlg.warning_label.text()
        seen["enabled"] = dlg.compare_button.isEnabled()
        choose(dlg.after_combo, three)
        seen["bands"] = dlg.warning_label.text()
        choose(dlg.after_combo, floats)
        seen["types"] = dlg.warning_label.text()
        choose(dlg.after_combo, before)
        seen["itself"] = (dlg.message_label.text(), dlg.compare_button.isEnabled())
        click(dlg.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.Cancel))

    dialogs = answer_modal(ChangeDialog, answer)
    press_toolbar(plugin, plugin.change_action)
    assert dialogs and dialogs[0].request is None and plugin.runs == []
    assert seen["same"] == ""  # 5 m and 5 m, four bands each: nothing to say
    assert "3.0x in resolution" in seen["coarse"] and "5 m before, 15 m after" in seen["coarse"]
    assert seen["enabled"]  # a warning, not a refusal: the user may still compare
    assert "4 and 3 bands" in seen["bands"] and "resolution" not in seen["bands"]
    assert "different value types" in seen["types"] and "bands" not in seen["types"]
    assert "two different rasters" in seen["itself"][0] and not seen["itself"][1]


# -- a run from the dialog, the change layer, its map tip and the dock ------------------------------------
def test_compare_by_clicks_adds_a_styled_change_layer_and_the_dock_ranks_most_changed(
        plugin, fresh_settings, geotiff, tiny, tmp_path):  # noqa: F811
    from rscaption_plugin.ui.change_dialog import ChangeDialog

    add_raster(geotiff(NAIP_2020), "NAIP 2020")  # added first: the dialog still orders by date
    add_raster(geotiff(NAIP_2009), "NAIP 2009")
    out = tmp_path / "changes.gpkg"
    runs = []
    start = plugin.start_change
    plugin.start_change = lambda request: runs.append(start(request)) or runs[-1]

    def answer(dlg):
        assert dlg.before_combo.currentLayer().name() == "NAIP 2009"
        fill(dlg, tiny, out)
        click(dlg.dates_check)
        click(dlg.compare_button)

    assert answer_modal(ChangeDialog, answer) is not None
    press_toolbar(plugin, plugin.change_action)
    assert runs, "Compare did not start a run"
    run = runs[0]
    assert wait_until(lambda: run.done, 300) and run.outcome.ok, run.outcome.error
    assert run.phases_seen[:2] == ["before", "after"] and run.progress_seen[-1] == pytest.approx(100.0)

    layer = run.layer
    assert QgsProject.instance().mapLayer(layer.id()) is layer and layer.featureCount() > 0
    assert len(run.date_layers) == 2 and all(QgsProject.instance().mapLayer(d.id()) for d in run.date_layers)
    renderer = layer.renderer()
    assert isinstance(renderer, QgsGraduatedSymbolRenderer) and renderer.classAttribute() == "change"
    assert renderer.ranges()[0].lowerValue() == 0.0 and renderer.ranges()[-1].upperValue() == 1.0
    assert sql(out, "SELECT COUNT(*) FROM layer_styles WHERE f_table_name = 'changes' AND useAsDefault = 1") == [(1,)]

    feat = next(f for f in layer.getFeatures() if f["change"] is not None and f["caption_before"])
    context = QgsExpressionContext(QgsExpressionContextUtils.globalProjectLayerScopes(layer))
    context.setFeature(feat)
    tip = QgsExpression.replaceExpressionText(layer.mapTipTemplate(), context)
    assert feat["caption_before"] in tip and feat["caption_after"] in tip and feat["summary"] in tip
    assert f"{feat['change']:.2f}" in tip

    dock, panel = plugin.dock, plugin.dock.change_panel
    assert dock.isVisible() and panel.isVisible() and dock.layer_combo.currentLayer() is layer
    ranked = [c for (c,) in sql(out, "SELECT change FROM changes WHERE change IS NOT NULL ORDER BY change DESC")]
    assert [t["change"] for t in panel.tiles] == pytest.approx(ranked[:20])
    assert panel.list.count() == len(panel.tiles) >= 2

    item = panel.list.item(1)
    QTest.mouseClick(panel.list.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                     panel.list.visualItemRect(item).center())
    tile = panel.tiles[1]
    assert [f["tile_id"] for f in layer.selectedFeatures()] == [tile["tile_id"]]
    box = next(f for f in layer.selectedFeatures()).geometry().boundingBox()
    canvas = plugin.iface.mapCanvas()
    dest = canvas.mapSettings().destinationCrs()  # an earlier test may have left the canvas in another CRS
    if dest.isValid() and dest != layer.crs():
        box = QgsCoordinateTransform(layer.crs(), dest, QgsProject.instance()).transformBoundingBox(box)
    assert canvas.extent().contains(box) and canvas.extent().width() < 3 * box.width()
    assert tile["caption_before"] in panel.pair_label.text() and tile["caption_after"] in panel.pair_label.text()

    dock.set_layer(run.date_layers[0])  # a plain tile layer: the ranking is not for it
    assert not panel.isVisible() and panel.tiles == []


def test_two_captioned_layers_by_clicks_reuse_their_captions(plugin, fresh_settings, geotiff, tiny,
                                                              tmp_path):  # noqa: F811
    import subprocess

    from qgis.core import QgsVectorLayer

    from rscaption_plugin.ui.change_dialog import CAPTIONED, ChangeDialog

    layers = {}
    for name, date in (("2009", NAIP_2009), ("2020", NAIP_2020)):  # as a user captions them first
        gpkg = tmp_path / f"captions_{name}.gpkg"
        subprocess.run([sys.executable, "-m", "rscaption.cli", "caption", str(geotiff(date)), "-o", str(gpkg),
                        "--model", tiny, "--tile-size", "256", "--device", "cpu", "-q"], check=True, timeout=300)
        layers[name] = QgsVectorLayer(f"{gpkg}|layername=tiles", f"captions {name}", "ogr")
        QgsProject.instance().addMapLayer(layers[name])
    plain = QgsVectorLayer("Polygon?crs=EPSG:26914", "not rscaption", "memory")
    QgsProject.instance().addMapLayer(plain)
    out = tmp_path / "reused.gpkg"
    runs, seen = [], {}
    start = plugin.start_change
    plugin.start_change = lambda request: runs.append(start(request)) or runs[-1]

    def answer(dlg):
        pick_data(dlg.kind_combo, CAPTIONED)
        seen["tiles_enabled"] = dlg.tiles_row.isEnabled() or dlg.model_combo.isEnabled()
        choose(dlg.before_combo, layers["2009"])
        choose(dlg.after_combo, plain)
        seen["plain"] = (dlg.message_label.text(), dlg.compare_button.isEnabled())
        choose(dlg.after_combo, layers["2020"])
        pick_data(dlg.mode_combo, "inprocess")
        pick_data(dlg.output_combo, "file")
        type_into(dlg.output_file.lineEdit(), str(out))
        click(dlg.compare_button)

    answer_modal(ChangeDialog, answer)
    press_toolbar(plugin, plugin.change_action)
    assert not seen["tiles_enabled"]  # captioned inputs keep their own grid and model
    assert "not a layer made by rscaption" in seen["plain"][0] and not seen["plain"][1]
    assert runs, "Compare did not start a run"
    run = runs[0]
    assert wait_until(lambda: run.done, 300) and run.outcome.ok, run.outcome.error
    summary = run.outcome.summary
    assert summary["before_reused"] and summary["total"] == layers["2009"].featureCount()
    assert run.layer is not None and run.layer.featureCount() == summary["total"]


def test_cancel_keeps_finished_tiles_and_the_same_comparison_resumes(plugin, geotiff, tiny, tmp_path):  # noqa: F811
    from rscaption_plugin.core.change_layers import kept_counts
    from rscaption_plugin.core.change_task import ChangeJob
    from rscaption_plugin.ui.change_dialog import ChangeRequest

    out = tmp_path / "cancelled.gpkg"

    def request():
        job = ChangeJob(before=str(geotiff(NAIP_2009)), after=str(geotiff(NAIP_2020)), out=str(out), model=tiny,
                        tile_size=64, batch_size=2, device="cpu")
        return ChangeRequest(job, "inprocess", None, "changes", temporary=False)

    run = plugin.start_change(request())
    assert wait_until(lambda: kept_counts(str(out))["before"] > 0 or run.done, 180)
    run.cancel()
    assert wait_until(lambda: run.done, 180)
    assert run.outcome.cancelled and not run.outcome.ok and not run.outcome.error
    assert run.layer is None and not out.exists()  # nothing scored yet: no change layer, no half file
    # the backend keeps each date's finished tiles beside OUT until it writes OUT in one go
    kept = sql(f"{out}.parts/before.gpkg", "SELECT tile_id, created FROM tiles ORDER BY tile_id")
    assert 0 < len(kept) < 15 * 12  # 934x723 px at 64 px: most tiles never ran

    again = plugin.start_change(request())
    assert wait_until(lambda: again.done, 600) and again.outcome.ok, again.outcome.error
    summary = again.outcome.summary
    assert summary["scored"] + summary["not_scored"] == summary["total"] > len(kept)
    after = dict(sql(out, "SELECT tile_id, created FROM tiles_before"))
    assert all(after[tile_id] == created for tile_id, created in kept)  # resumed: not captioned again
    assert again.layer is not None and again.layer.featureCount() == summary["total"]


# -- Processing -------------------------------------------------------------------------------------
@pytest.fixture
def processing_provider(qgis_app):
    sys.path.append("/usr/share/qgis/python/plugins")  # Debian's Processing plugin
    processing_mod = pytest.importorskip("processing")
    from processing.core.Processing import Processing
    from qgis.core import QgsApplication

    from rscaption_plugin.processing_provider import RscaptionProvider

    Processing.initialize()
    registry = QgsApplication.processingRegistry()
    if registry.providerById("rscaption") is None:
        registry.addProvider(RscaptionProvider())
    yield processing_mod
    prov = registry.providerById("rscaption")
    if prov is not None:
        registry.removeProvider(prov)


def test_processing_change_algorithm_runs_through_the_worker(processing_provider, qgis_new_project, geotiff, tiny,
                                                             tmp_path):  # noqa: F811
    out = str(tmp_path / "proc_changes.gpkg")
    res = processing_provider.run("rscaption:change", {
        "BEFORE": str(geotiff(NAIP_2009)), "AFTER": str(geotiff(NAIP_2020)), "TILE_SIZE": 256, "MODEL": tiny,
        "K": 5, "BACKEND": 2, "PYTHON": sys.executable, "DEVICE": "cpu", "BATCH_SIZE": 4, "OUTPUT": out})
    assert res["OUTPUT"] == out
    summary, top = json.loads(res["SUMMARY"]), json.loads(res["TOP"])
    scored = sql(out, "SELECT COUNT(*) FROM changes WHERE change IS NOT NULL")[0][0]
    assert res["SCORED"] == summary["scored"] == scored > 0
    assert res["CHANGED"] == summary["changed"]
    assert len(top) == min(5, scored) and [t["change"] for t in top] == sorted((t["change"] for t in top),
                                                                                reverse=True)
    best = sql(out, "SELECT MAX(change) FROM changes")[0][0]
    assert top[0]["change"] == pytest.approx(best)
    assert sql(out, "SELECT COUNT(*) FROM layer_styles WHERE f_table_name = 'changes'") == [(1,)]

"""The QGIS plugin through real PyQGIS (offscreen): load/unload, caption tasks with cancel and a
killed backend, the search dock, export + reopen, the caption dialog, raster refusal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from test_plugin_support import ROOT, caption_request, gpkg_tile_count, tiny_model_dir, wait_until

pytest.importorskip("qgis.core")

from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsVectorLayer  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture
def plugin(qgis_iface, qgis_new_project):
    from rscaption_plugin import classFactory

    p = classFactory(qgis_iface)
    p.initGui()
    yield p
    p.unload()
    QgsProject.instance().removeAllMapLayers()


def test_loading_the_plugin_does_not_import_torch(tmp_path):
    """QGIS loads enabled plugins at start-up: that must not pay for torch (or the models)."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from unittest.mock import MagicMock
        from qgis.core import QgsApplication
        app = QgsApplication([], True)
        app.initQgis()
        from qgis.PyQt.QtWidgets import QMainWindow
        win = QMainWindow()
        iface = MagicMock()
        iface.mainWindow.return_value = win
        iface.addToolBar.side_effect = lambda name: win.addToolBar(name)
        iface.activeLayer.return_value = None
        import rscaption_plugin
        plugin = rscaption_plugin.classFactory(iface)
        plugin.initGui()
        heavy = [m for m in ("torch", "rasterio", "transformers", "open_clip", "rscaption.engine.pipeline",
                             "rscaption.models", "rscaption.search") if m in sys.modules]
        plugin.unload()
        print("HEAVY", heavy)
        sys.stdout.flush()
        app.exitQgis()
    """)
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr


def test_init_gui_and_unload(qgis_iface, qgis_new_project):
    from rscaption_plugin import classFactory

    p = classFactory(qgis_iface)
    p.initGui()
    names = [a.text() for a in p.actions]
    assert any("Caption" in n for n in names) and any("Search" in n for n in names)
    assert any("Export" in n for n in names) and any("Settings" in n for n in names)
    assert any("Set up backend" in n for n in names) and any("About" in n for n in names)
    assert all(not a.icon().isNull() for a in p.actions)
    assert QgsApplication.processingRegistry().providerById("rscaption") is not None
    assert p.dock is not None
    p.toggle_dock()
    p.unload()
    assert QgsApplication.processingRegistry().providerById("rscaption") is None
    assert p.actions == [] and p.dock is None


def _run_to_end(plugin, request, timeout=180):
    run = plugin.start_caption(request)
    assert wait_until(lambda: run.done, timeout), "caption task did not finish"
    return run


def test_caption_task_produces_layer(plugin, geotiff, tiny, tmp_path):
    raster = geotiff("RGB.byte.tif")
    out = tmp_path / "caps.gpkg"
    run = _run_to_end(plugin, caption_request(raster, out, tiny, tile_size=128))
    assert run.outcome.ok, run.outcome.error
    summary = run.outcome.summary
    assert summary["written"] > 0 and summary["written"] + summary["skipped_nodata"] == summary["total"]
    layer = run.layer
    assert layer is not None and layer.isValid()
    assert QgsProject.instance().mapLayer(layer.id()) is layer
    assert layer.crs().authid() == "EPSG:32618"
    assert layer.featureCount() == summary["written"] == gpkg_tile_count(out)
    captions = [f["caption"] for f in layer.getFeatures()]
    assert all(isinstance(c, str) and c.strip() for c in captions)
    assert "caption" in layer.mapTipTemplate()
    assert run.backend.get("device") == "cpu"
    assert run.progress_seen and run.progress_seen[-1] == pytest.approx(100.0)


def test_cancel_keeps_finished_tiles(plugin, geotiff, tiny, tmp_path):
    out = tmp_path / "cancelled.gpkg"
    # 16 px tiles one per batch: ~2,000 commits, so the cancel lands mid-run even on a fast, idle CPU
    run = plugin.start_caption(caption_request(geotiff("RGB.byte.tif"), out, tiny, tile_size=16, batch_size=1))
    assert wait_until(lambda: run.tiles_seen > 0 or run.done, 120)
    run.cancel()
    assert wait_until(lambda: run.done, 120)
    assert run.outcome.cancelled and not run.outcome.ok
    kept = gpkg_tile_count(out)
    assert 0 < kept < 45 * 50 // 2  # 791x718 px at 16 px -> 50x45 windows; most never ran
    assert run.layer is not None and run.layer.featureCount() == kept


@pytest.mark.qgis_log_expects(r"^captioning failed: the backend process stopped unexpectedly \(killed by signal 9\)")
def test_killed_backend_fails_clearly_and_keeps_tiles(plugin, geotiff, tiny, tmp_path):
    from rscaption_plugin.core.backend_client import POOL

    out = tmp_path / "killed.gpkg"
    # 16 px tiles one per batch (~2,000 commits): the backend is still busy when it is killed
    request = caption_request(geotiff("RGB.byte.tif"), out, tiny, mode="subprocess", python=sys.executable,
                              tile_size=16, batch_size=1)
    run = plugin.start_caption(request)
    assert wait_until(lambda: run.tiles_seen > 0 or run.done, 180)
    busy = [c for c in POOL.clients() if c.lock.locked() and c.alive()]
    assert busy, "no running backend subprocess found"
    os.kill(busy[0].pid, signal.SIGKILL)
    assert wait_until(lambda: run.done, 60)
    assert not run.outcome.ok and not run.outcome.cancelled
    assert "stopped unexpectedly" in run.outcome.error and "signal 9" in run.outcome.error
    kept = gpkg_tile_count(out)
    assert kept > 0
    assert run.layer is not None and run.layer.featureCount() == kept


def test_layer_recovers_when_its_writer_dies_inside_a_transaction(qgis_new_project, geotiff, tiny, tmp_path):
    """The deterministic form of the killed-backend case: the layer is open (read-only OGR
    connection) while a writer is SIGKILLed mid-transaction, leaving a hot journal. Settling the
    store rolls it back, and the layer then shows exactly the committed tiles."""
    from rscaption.engine.pipeline import caption_raster
    from rscaption.raster.tiling import TilingParams
    from rscaption_plugin.core.layers import open_tile_layer, refresh_layer, settle_store

    out = tmp_path / "dying.gpkg"
    caption_raster(str(geotiff("RGB.byte.tif")), str(out), model=tiny, tiling=TilingParams(tile_size=128),
                   batch_size=8)
    committed = gpkg_tile_count(out)
    layer = open_tile_layer(str(out), "dying")
    assert layer.featureCount() == committed
    writer = textwrap.dedent(f"""
        import os, signal, sqlite3
        con = sqlite3.connect({str(out)!r}, isolation_level=None)
        con.execute("PRAGMA cache_size = 1")  # spill changed pages into the file before commit
        con.execute("BEGIN IMMEDIATE")
        con.execute("CREATE TABLE scratch (x BLOB)")
        for _ in range(100):
            con.execute("INSERT INTO scratch VALUES (zeroblob(8192))")
        con.execute("DELETE FROM rscaption_embeddings")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    rc = subprocess.run([sys.executable, "-c", writer]).returncode
    assert rc == -signal.SIGKILL
    assert os.path.getsize(f"{out}-journal") > 0, "the killed writer left a hot journal"

    assert settle_store(str(out)) == committed
    assert not os.path.exists(f"{out}-journal") or os.path.getsize(f"{out}-journal") == 0
    refresh_layer(layer)
    assert layer.featureCount() == committed
    assert len(list(layer.getFeatures())) == committed
    assert settle_store(str(tmp_path / "missing.gpkg")) is None


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, tiny):
    """A captioned GeoPackage made by the backend directly (the dock tests only read it)."""
    from rscaption.engine.pipeline import caption_raster
    from rscaption.raster.tiling import TilingParams

    from conftest import geotiff_path

    raster = geotiff_path("RGB.byte.tif")
    out = tmp_path_factory.mktemp("captioned") / "tiles.gpkg"
    caption_raster(str(raster), str(out), model=tiny, tiling=TilingParams(tile_size=128), batch_size=8)
    return out


def _search_with_dock(dock, layer, query, k=5):
    dock.set_layer(layer)
    dock.k_spin.setValue(k)
    task = dock.search(query)
    assert task is not None, dock.status.text()
    assert wait_until(lambda: not dock.searching, 120)
    assert dock.error is None, dock.error
    return [(h["tile_id"], round(h["score"], 5)) for h in dock.hits]


def test_search_dock_ranks_selects_and_zooms(plugin, captioned):
    from rscaption.search.query import search_store

    layer = QgsVectorLayer(f"{captioned}|layername=tiles", "tiles", "ogr")
    QgsProject.instance().addMapLayer(layer)
    dock = plugin.dock
    ranked = _search_with_dock(dock, layer, "a river with green fields", k=5)
    assert len(ranked) == 5
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True)
    expected = [(h.tile_id, round(h.score, 5)) for h in search_store(str(captioned), "a river with green fields", k=5)]
    assert ranked == expected
    # only the hit the list points at is selected (issue 22: selecting all hid the score colours)
    assert [f["tile_id"] for f in layer.selectedFeatures()] == [ranked[0][0]]
    assert dock.results.count() == 5 and dock.results.item(0).text().split()[1].startswith("0.")
    assert layer.renderer().type() == "RuleRenderer"
    dock.step(1)
    assert dock.results.currentRow() == 1
    dock.step(-1)
    assert dock.results.currentRow() == 0
    assert dock.zoom_to_row(2)
    # the threshold hides weaker matches
    raw = [h.score for h in search_store(str(captioned), "a river with green fields", k=5)]
    dock.threshold_spin.setValue((raw[1] + raw[2]) / 2)
    cut = dock.threshold_spin.value()
    _search_with_dock(dock, layer, "a river with green fields", k=5)
    assert len(dock.hits) == sum(1 for s in raw if s >= cut) < 5
    assert layer.selectedFeatureCount() == 1


def test_export_reopen_search_same_ranking(plugin, captioned, tmp_path):
    from rscaption.search.query import search_store

    from rscaption_plugin.core.export import export_layer
    from rscaption_plugin.core.layers import is_tile_layer

    layer = QgsVectorLayer(f"{captioned}|layername=tiles", "tiles", "ogr")
    QgsProject.instance().addMapLayer(layer)
    before = _search_with_dock(plugin.dock, layer, "dense residential area", k=8)

    plugin.iface.setActiveLayer(layer)
    exported = plugin.export_active_layer(str(tmp_path / "exported.gpkg"))
    assert exported and os.path.isfile(exported)
    QgsProject.instance().removeAllMapLayers()

    reopened = QgsVectorLayer(f"{exported}|layername=tiles", "reopened", "ogr")
    assert reopened.isValid() and is_tile_layer(reopened)
    QgsProject.instance().addMapLayer(reopened)
    after = _search_with_dock(plugin.dock, reopened, "dense residential area", k=8)
    assert after == before
    cli = [(h.tile_id, round(h.score, 5)) for h in search_store(exported, "dense residential area", k=8)]
    assert cli == before


def test_caption_dialog_builds_request(qgis_iface, qgis_new_project, geotiff, tiny):
    from qgis.core import QgsFeature, QgsGeometry, QgsRectangle

    from rscaption_plugin.ui.dialog import EXTENT_CANVAS, EXTENT_SELECTION, CaptionDialog

    raster = QgsRasterLayer(str(geotiff("RGB.byte.tif")), "rgb")
    QgsProject.instance().addMapLayer(raster)
    qgis_iface.setActiveLayer(raster)
    dlg = CaptionDialog(qgis_iface)
    assert dlg.layer_combo.currentLayer() is raster
    dlg.model_combo.setCurrentText(tiny)
    assert dlg.tile_spin.value() == 256  # from the tiny model's card
    dlg.auto_tile_check.setChecked(False)
    dlg.tile_spin.setValue(64)
    dlg.bands_edit.setText("3,2,1")
    req = dlg.build_request()
    assert req.job.raster.endswith("RGB.byte.tif") and req.job.out.endswith(".gpkg")
    assert req.job.tile_size == 64 and req.job.bands == [3, 2, 1] and req.job.extent is None
    assert req.temporary
    # the tiny model captions in English only; the default also has a Chinese decoder
    assert [dlg.language_combo.itemData(i) for i in range(dlg.language_combo.count())] == ["en"]
    assert req.job.language == "en"

    # union bbox of selected polygons, given in another CRS (WGS84) -> raster CRS
    poly = QgsVectorLayer("Polygon?crs=EPSG:32618", "aoi", "memory")
    ext = raster.extent()
    feats = []
    for dx in (0.1, 0.5):
        f = QgsFeature()
        f.setGeometry(QgsGeometry.fromRect(QgsRectangle(ext.xMinimum() + ext.width() * dx, ext.yMinimum() + ext.height() * 0.2,
                                                        ext.xMinimum() + ext.width() * (dx + 0.2), ext.yMinimum() + ext.height() * 0.4)))
        feats.append(f)
    poly.dataProvider().addFeatures(feats)
    QgsProject.instance().addMapLayer(poly)
    poly.selectAll()
    dlg.extent_combo.setCurrentIndex(dlg.extent_combo.findData(EXTENT_SELECTION))
    dlg.mask_combo.setLayer(poly)
    xmin, ymin, xmax, ymax = dlg.build_request().job.extent
    assert xmin == pytest.approx(ext.xMinimum() + ext.width() * 0.1)
    assert xmax == pytest.approx(ext.xMinimum() + ext.width() * 0.7)
    assert ymin == pytest.approx(ext.yMinimum() + ext.height() * 0.2)

    poly.removeSelection()
    with pytest.raises(ValueError, match="no features are selected"):
        dlg.build_request()
    dlg.extent_combo.setCurrentIndex(dlg.extent_combo.findData(EXTENT_CANVAS))
    qgis_iface.mapCanvas().setDestinationCrs(raster.crs())
    qgis_iface.mapCanvas().setExtent(ext)
    assert dlg.build_request().job.extent is not None


def test_web_raster_is_refused_with_a_clear_message(qgis_new_project):
    from rscaption_plugin.core.raster_source import RasterSourceError, check_raster

    xyz = QgsRasterLayer("type=xyz&url=http://tile.example.invalid/{z}/{x}/{y}.png&zmax=19&zmin=0", "osm", "wms")
    with pytest.raises(RasterSourceError, match="web"):
        check_raster(xyz)


def test_settings_round_trip(qgis_app):
    from rscaption_plugin.core.settings import PluginSettings

    s = PluginSettings(backend_mode="subprocess", backend_python="/x/python", default_model="m", device="cpu",
                       tile_size=128, overlap=8, batch_size=4)
    s.save()
    again = PluginSettings.load()
    assert again == s
    PluginSettings().save()


def test_diagnostics_text(qgis_app):
    from rscaption_plugin.ui.diagnostics import AboutDialog, collect

    text = collect()
    for key in ("QGIS:", "QGIS Python:", "backend Python:", "default model:", "device setting:"):
        assert key in text
    dlg = AboutDialog()
    assert "rscaption diagnostics" in dlg.copy()


def test_non_file_raster_can_be_written_to_a_temporary_geotiff(qgis_new_project, geotiff, tmp_path):
    """The fallback for local layers rasterio cannot open: raw bands for the extent, same CRS."""
    from qgis.core import QgsRectangle

    from rscaption_plugin.core.raster_source import export_to_geotiff, raster_file_path

    layer = QgsRasterLayer(str(geotiff("RGB.byte.tif")), "rgb")
    ext = layer.extent()
    half = QgsRectangle(ext.xMinimum(), ext.yMinimum(), ext.center().x(), ext.center().y())
    path = export_to_geotiff(layer, half, str(tmp_path / "part.tif"))
    out = QgsRasterLayer(path, "part")
    assert out.isValid() and raster_file_path(out) == path
    assert out.crs() == layer.crs() and out.bandCount() == 3
    assert abs(out.width() - layer.width() / 2) <= 1 and abs(out.height() - layer.height() / 2) <= 1
    assert out.extent().xMaximum() == pytest.approx(ext.center().x(), abs=layer.rasterUnitsPerPixelX())


def test_caption_with_the_embedded_default_model(plugin, geotiff, tmp_path):
    """The shipped model through the plugin path ("default", tile size from its card)."""
    from rscaption_plugin.core.model_card import card_tile_size
    from rscaption_plugin.core.paths import default_model_dir

    if default_model_dir() is None:
        pytest.skip("no default model in resources/default_model yet")
    raster = QgsRasterLayer(str(geotiff("m_4709963_se_14_1_20200831.tif")), "naip")
    ext = raster.extent()
    size = card_tile_size("default")
    step = raster.rasterUnitsPerPixelX() * size
    extent = [ext.xMinimum(), ext.yMaximum() - 1.5 * step, ext.xMinimum() + 1.5 * step, ext.yMaximum()]
    out = tmp_path / "default.gpkg"
    request = caption_request(raster.source(), out, "default", tile_size=size, batch_size=4, extent=extent)
    request.job.bands = [1, 2, 3]
    run = _run_to_end(plugin, request, timeout=600)
    assert run.outcome.ok, run.outcome.error
    assert run.layer.featureCount() == run.outcome.summary["written"] == 4
    captions = [f["caption"] for f in run.layer.getFeatures()]
    assert all(len(c.split()) >= 3 for c in captions), captions
    assert {f["model"] for f in run.layer.getFeatures()} == {"default"}
    assert all(0.0 <= f["confidence"] <= 1.0 for f in run.layer.getFeatures())


def test_default_model_captions_in_chinese_from_the_dialog(plugin, qgis_iface, geotiff, tmp_path):
    """The dialog offers the default model's languages; a Chinese run writes Chinese captions."""
    from rscaption_plugin.ui.dialog import CaptionDialog
    from rscaption_plugin.core.paths import default_model_dir

    if default_model_dir() is None:
        pytest.skip("no default model in resources/default_model yet")
    raster = QgsRasterLayer(str(geotiff("m_4709963_se_14_1_20200831.tif")), "naip")
    QgsProject.instance().addMapLayer(raster)
    qgis_iface.setActiveLayer(raster)
    dlg = CaptionDialog(qgis_iface)
    dlg.model_combo.setCurrentText("default")
    codes = [dlg.language_combo.itemData(i) for i in range(dlg.language_combo.count())]
    assert codes == ["en", "zh"]
    dlg.language_combo.setCurrentIndex(codes.index("zh"))
    ext = raster.extent()
    step = raster.rasterUnitsPerPixelX() * 84
    request = caption_request(raster.source(), tmp_path / "zh.gpkg", "default", tile_size=84, batch_size=4,
                              extent=[ext.xMinimum(), ext.yMaximum() - 1.5 * step, ext.xMinimum() + 1.5 * step,
                                      ext.yMaximum()])
    request.job.language = dlg.build_request().job.language
    assert request.job.language == "zh"
    run = _run_to_end(plugin, request, timeout=600)
    assert run.outcome.ok, run.outcome.error
    captions = [f["caption"] for f in run.layer.getFeatures()]
    assert captions and all(any("\u4e00" <= ch <= "\u9fff" for ch in c) for c in captions), captions


@pytest.fixture
def graded(captioned, tmp_path):
    """A copy of ``captioned`` whose confidences spread over 0..1 (the tiny model's are all ~0.007),
    written into the file as the pipeline would have."""
    import shutil
    import sqlite3

    out = tmp_path / "graded.gpkg"
    shutil.copy(captioned, out)
    from rscaption.store.gpkg_sql import register_functions

    con = sqlite3.connect(out)
    register_functions(con)  # the GeoPackage's rtree triggers call ST_* functions
    con.execute("UPDATE tiles SET confidence = ((tile_id * 37) % 100) / 100.0")
    con.commit()
    con.close()
    return out


def test_search_button_click_searches_and_min_confidence_filters(plugin, graded):
    """A real click on Search (not a method call): ``clicked(bool)`` once passed ``checked`` as the
    query. Then the confidence filter ranks only tiles at or above it."""
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest

    from rscaption.search.query import search_store

    captioned = graded
    layer = QgsVectorLayer(f"{captioned}|layername=tiles", "tiles", "ogr")
    QgsProject.instance().addMapLayer(layer)
    dock = plugin.dock
    dock.set_layer(layer)
    dock.k_spin.setValue(50)
    dock.query_edit.clear()
    QTest.keyClicks(dock.query_edit, "a river with green fields")
    QTest.mouseClick(dock.search_button, Qt.MouseButton.LeftButton)
    assert dock.searching or dock.hits, dock.status.text()
    assert wait_until(lambda: not dock.searching, 120)
    assert dock.error is None, dock.error
    assert dock.query_edit.text() == "a river with green fields"
    every = search_store(str(captioned), "a river with green fields", k=50)
    assert [h["tile_id"] for h in dock.hits] == [h.tile_id for h in every]
    assert all(h["confidence"] is not None for h in dock.hits)
    assert dock.results.item(0).toolTip().startswith(every[0].caption)

    confs = sorted(h.confidence for h in every)
    cut = 0.5
    dock.confidence_spin.setValue(cut)
    QTest.mouseClick(dock.search_button, Qt.MouseButton.LeftButton)
    assert wait_until(lambda: not dock.searching, 120)
    assert dock.hits and all(h["confidence"] >= cut for h in dock.hits)
    assert len(dock.hits) == sum(1 for c in confs if c >= cut) < len(every)


def test_low_confidence_tiles_are_drawn_apart(qgis_new_project, graded):
    """The default style marks tiles below the confidence line (dashed, hatched) and keeps the
    others a thin outline; both leave the imagery visible (no opaque fill)."""
    from qgis.core import QgsRenderContext

    from rscaption_plugin.core.layers import LOW_CONFIDENCE, apply_default_style

    layer = QgsVectorLayer(f"{graded}|layername=tiles", "tiles", "ogr")
    QgsProject.instance().addMapLayer(layer)
    apply_default_style(layer)
    renderer = layer.renderer()
    assert renderer.type() == "RuleRenderer"
    ctx = QgsRenderContext()
    renderer.startRender(ctx, layer.fields())
    seen = {}
    try:
        for f in layer.getFeatures():
            syms = renderer.symbolsForFeature(f, ctx)
            assert len(syms) == 1
            low = f["confidence"] < LOW_CONFIDENCE
            seen.setdefault(low, set()).add(syms[0].symbolLayerCount())
            assert syms[0].color().alpha() == 0 or syms[0].symbolLayer(0).fillColor().alpha() == 0
    finally:
        renderer.stopRender(ctx)
    # low-confidence tiles carry the extra hatch layer; confident ones a single outline
    assert seen == {False: {1}, True: {2}}


def test_in_process_rasterio_recovers_from_another_proj_database(tmp_path):
    """QGIS 3.44 on Debian sid: QGIS's PROJ (9.9) answered rasterio's calls and refused the proj.db
    of rasterio's wheel (layout 1.6 < 1.7). Made here for real: rasterio pointed at a proj.db whose
    layout no PROJ in this process accepts; share_proj_database finds a folder that works."""
    bad = tmp_path / "proj"
    code = textwrap.dedent(f"""
        import shutil, sqlite3, sys
        sys.path.insert(0, {str(ROOT)!r})
        from rasterio.crs import CRS
        from rasterio.env import PROJDataFinder, set_proj_data_search_path
        from rscaption_plugin.core.inprocess_guard import share_proj_database
        shutil.copytree(PROJDataFinder().search_wheel(), {str(bad)!r})
        con = sqlite3.connect({str(bad / "proj.db")!r})
        con.execute("UPDATE metadata SET value = '0' WHERE key = 'DATABASE.LAYOUT.VERSION.MINOR'")
        con.commit(); con.close()
        set_proj_data_search_path({str(bad)!r})
        try:
            CRS.from_epsg(32614).to_epsg()
            raise SystemExit("the broken proj.db was accepted")
        except Exception as exc:
            assert "DATABASE.LAYOUT.VERSION" in str(exc), exc
        print("SWITCHED", share_proj_database())
        print("EPSG", CRS.from_epsg(32614).to_epsg())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, QT_QPA_PLATFORM="offscreen"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    switched = proc.stdout.split("SWITCHED ")[1].splitlines()[0]
    assert switched != "None" and os.path.isfile(os.path.join(switched, "proj.db"))
    assert "EPSG 32614" in proc.stdout

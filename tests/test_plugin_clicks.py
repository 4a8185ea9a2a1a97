"""Every plugin button and menu action driven as a user drives it: QTest mouse clicks and key
presses on the real toolbar buttons, dialogs and dock (real PyQGIS offscreen, real tasks, the
tiny real model). Modal dialogs (``exec``) are answered from a timer while they block, the way a
person answers them. The message-log guard (conftest) fails any of these on a Python error."""

from __future__ import annotations

import sys
import time

import pytest

from test_plugin_support import gpkg_tile_count, wait_until

pytest.importorskip("qgis.core")

from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsVectorLayer  # noqa: E402
from qgis.PyQt.QtCore import Qt, QTimer  # noqa: E402
from qgis.PyQt.QtTest import QTest  # noqa: E402
from qgis.PyQt.QtWidgets import QApplication  # noqa: E402

from test_plugin import captioned, plugin, tiny  # noqa: E402,F401  (shared fixtures)
from test_plugin_usability import fresh_settings  # noqa: E402,F401

LEFT = Qt.MouseButton.LeftButton


@pytest.fixture(autouse=True)
def main_window_shown(qgis_iface):
    """As in QGIS, the main window is on screen, so the dock's visibility is real."""
    window = qgis_iface.mainWindow()
    window.show()
    yield
    window.hide()


def click(widget):
    assert widget.isEnabled(), f"{widget.text() if hasattr(widget, 'text') else widget} is disabled"
    QTest.mouseClick(widget, LEFT)


def type_into(line_edit, text):
    line_edit.selectAll()
    QTest.keyClick(line_edit, Qt.Key.Key_Delete)
    QTest.keyClicks(line_edit, text)


def press_toolbar(plugin, action):
    """Click the action's button on the plugin toolbar, or (menu-only actions) trigger it as its
    Raster > rscaption menu entry does."""
    button = plugin.toolbar.widgetForAction(action)
    if button is not None:
        click(button)
    else:
        action.trigger()


def answer_modal(cls, answer, timeout=60.0):
    """Once a modal ``cls`` dialog is up (``exec`` blocks the caller), run ``answer(dialog)``."""
    seen = []
    deadline = time.monotonic() + timeout

    def poll():
        widget = QApplication.activeModalWidget()
        if isinstance(widget, cls):
            seen.append(widget)
            answer(widget)
        elif time.monotonic() < deadline:
            QTimer.singleShot(20, poll)

    QTimer.singleShot(0, poll)
    return seen


def tile_layer(path, name="tiles"):
    layer = QgsVectorLayer(f"{path}|layername=tiles", name, "ogr")
    QgsProject.instance().addMapLayer(layer)
    return layer


def shown_tiles(dock):
    return [dock.results.item(i).data(Qt.ItemDataRole.UserRole) for i in range(dock.results.count())]


# -- caption dialog ---------------------------------------------------------------------------------
def _fill_caption_dialog(dlg, model, out):
    type_into(dlg.model_combo.lineEdit(), model)
    if dlg.auto_tile_check.isChecked():
        click(dlg.auto_tile_check)
    type_into(dlg.tile_spin.lineEdit(), "256")
    while dlg.mode_combo.currentData() != "inprocess":
        QTest.keyClick(dlg.mode_combo, Qt.Key.Key_Down)
    while dlg.output_combo.currentData() != "file":
        QTest.keyClick(dlg.output_combo, Qt.Key.Key_Down)
    type_into(dlg.output_file.lineEdit(), str(out))


def test_caption_toolbar_button_dialog_caption_click_runs_and_adds_the_layer(plugin, fresh_settings, geotiff,
                                                                           tiny, tmp_path):  # noqa: F811
    from rscaption_plugin.ui.dialog import CaptionDialog

    raster = QgsRasterLayer(str(geotiff("RGB.byte.tif")), "rgb")
    QgsProject.instance().addMapLayer(raster)
    plugin.iface.setActiveLayer(raster)
    out = tmp_path / "clicked.gpkg"
    runs = []
    plugin_start = plugin.start_caption
    plugin.start_caption = lambda request: runs.append(plugin_start(request)) or runs[-1]

    def answer(dlg):
        assert dlg.layer_combo.currentLayer() is raster
        _fill_caption_dialog(dlg, tiny, out)
        click(dlg.caption_button)

    seen = answer_modal(CaptionDialog, answer)
    press_toolbar(plugin, plugin.caption_action)
    assert seen and runs, "the dialog did not open or Caption did not start a run"
    run = runs[0]
    assert wait_until(lambda: run.done, 180) and run.outcome.ok, run.outcome.error
    assert run.request.job.tile_size == 256 and run.request.job.out == str(out)
    assert run.layer is not None and run.layer.featureCount() == gpkg_tile_count(out) > 0
    assert QgsProject.instance().mapLayer(run.layer.id()) is run.layer
    assert plugin.dock.layer_combo.currentLayer() is run.layer  # the dock is ready to search it


def test_caption_dialog_cancel_button_and_escape_start_nothing(plugin, fresh_settings, geotiff, tiny):  # noqa: F811
    from rscaption_plugin.ui.dialog import CaptionDialog

    raster = QgsRasterLayer(str(geotiff("RGB.byte.tif")), "rgb")
    QgsProject.instance().addMapLayer(raster)
    plugin.iface.setActiveLayer(raster)
    before = QgsApplication.taskManager().count()
    from qgis.PyQt.QtWidgets import QDialogButtonBox

    cancelled = answer_modal(CaptionDialog, lambda dlg: click(
        dlg.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.Cancel)))
    plugin.caption_action.trigger()  # the Raster > rscaption menu entry
    escaped = answer_modal(CaptionDialog, lambda dlg: QTest.keyClick(dlg, Qt.Key.Key_Escape))
    press_toolbar(plugin, plugin.caption_action)
    seen = cancelled + escaped
    assert len(seen) == 2 and not any(dlg.isVisible() for dlg in seen)
    assert all(dlg.request is None for dlg in seen) and plugin.runs == []
    assert QgsApplication.taskManager().count() == before


# -- search dock ----------------------------------------------------------------------------------
def test_search_toolbar_button_toggles_the_dock_and_enter_and_button_search(plugin, captioned):  # noqa: F811
    layer = tile_layer(captioned)
    plugin.iface.setActiveLayer(layer)
    dock = plugin.dock
    press_toolbar(plugin, plugin.search_action)
    assert dock.isVisible() and plugin.search_action.isChecked()
    assert dock.layer_combo.currentLayer() is layer  # the active tile layer is preselected
    type_into(dock.k_spin.lineEdit(), "4")
    type_into(dock.query_edit, "a river with green fields")
    QTest.keyClick(dock.query_edit, Qt.Key.Key_Return)
    assert wait_until(lambda: not dock.searching, 120) and dock.error is None, dock.error
    by_enter = [h["tile_id"] for h in dock.hits]
    assert len(by_enter) == 4 and shown_tiles(dock) == by_enter
    type_into(dock.query_edit, "dense residential area")
    click(dock.search_button)
    # runs as a task; both buttons wait for it
    assert dock.searching and not dock.search_button.isEnabled() and not dock.similar_button.isEnabled()
    assert wait_until(lambda: not dock.searching, 120) and dock.error is None, dock.error
    assert dock.search_button.isEnabled() and dock.similar_button.isEnabled() and len(dock.hits) == 4
    from rscaption.search.query import search_store

    assert [h["tile_id"] for h in dock.hits] == [h.tile_id for h in search_store(str(captioned), "dense residential area", k=4)]
    press_toolbar(plugin, plugin.search_action)
    assert not dock.isVisible() and not plugin.search_action.isChecked()


def test_previous_next_and_clicking_a_result_zoom_to_that_tile(plugin, captioned):  # noqa: F811
    from rscaption_plugin.core.layers import tile_feature

    layer = tile_layer(captioned)
    dock = plugin.dock
    dock.set_layer(layer)
    plugin.show_dock()
    canvas = plugin.iface.mapCanvas()
    canvas.setDestinationCrs(layer.crs())
    type_into(dock.query_edit, "a river with green fields")
    click(dock.search_button)
    assert wait_until(lambda: not dock.searching, 120) and len(dock.hits) >= 3

    def centred_on(row):
        centre = tile_feature(layer, dock.hits[row]["tile_id"]).geometry().boundingBox().center()
        return canvas.extent().center().distance(centre) < 1e-6 * max(1.0, canvas.extent().width()) + 1e-3

    assert dock.results.currentRow() == 0 and not centred_on(0)  # the overview stays until asked (issue 22)
    click(dock.next_button)
    assert dock.results.currentRow() == 1 and centred_on(1)
    click(dock.next_button)
    click(dock.prev_button)
    assert dock.results.currentRow() == 1 and centred_on(1)
    click(dock.prev_button)
    click(dock.prev_button)  # wraps around to the last hit
    last = len(dock.hits) - 1
    assert dock.results.currentRow() == last and centred_on(last)
    canvas.setExtent(layer.extent())
    rect = dock.results.visualItemRect(dock.results.item(2))
    QTest.mouseClick(dock.results.viewport(), LEFT, Qt.KeyboardModifier.NoModifier, rect.center())
    assert dock.results.currentRow() == 2 and centred_on(2)
    tile = tile_feature(layer, dock.hits[2]["tile_id"]).geometry().boundingBox()
    extent = canvas.extent()
    assert extent.contains(tile) and min(extent.width() / tile.width(), extent.height() / tile.height()) < 2
    assert extent.width() * extent.height() < layer.extent().width() * layer.extent().height() / 4


def test_similar_button_ranks_by_the_selected_tile(plugin, captioned):  # noqa: F811
    from rscaption.search.similar import similar

    layer = tile_layer(captioned)
    dock = plugin.dock
    dock.set_layer(layer)
    plugin.show_dock()
    type_into(dock.k_spin.lineEdit(), "5")
    click(dock.similar_button)  # nothing selected yet
    assert not dock.searching and "select one tile" in dock.status.text()

    query = sorted(f["tile_id"] for f in layer.getFeatures())[7]
    layer.selectByExpression(f'"tile_id" = {query}')
    click(dock.similar_button)
    assert wait_until(lambda: not dock.searching, 60) and dock.error is None, dock.error
    want = [h.tile_id for h in similar(str(captioned), query, k=5)]
    assert [h["tile_id"] for h in dock.hits] == shown_tiles(dock) == want and query not in want
    assert f"like tile {query}" in dock.status.text()
    assert [f["tile_id"] for f in layer.selectedFeatures()] == want[:1]  # the current hit, as after a search
    assert dock.results.currentRow() == 0

    # with the dock's own hits selected, the highlighted result is the tile to match
    click(dock.next_button)
    second = dock.hits[1]["tile_id"]
    click(dock.similar_button)
    assert wait_until(lambda: not dock.searching, 60) and dock.error is None, dock.error
    assert [h["tile_id"] for h in dock.hits] == [h.tile_id for h in similar(str(captioned), second, k=5)]


def test_find_similar_from_the_layer_menu_and_the_feature_menu(plugin, captioned, tmp_path):  # noqa: F811
    """The Layers panel entry (added for rscaption layers only) and the attribute table / Identify
    entry (QgsMapLayerAction, the clicked feature) both fill the dock like the button."""
    from qgis.gui import QgsGui

    from rscaption.search.similar import similar
    from rscaption_plugin.core.qgis_compat import trigger_feature_action

    other = QgsVectorLayer("Polygon?crs=EPSG:4326", "not tiles", "memory")
    QgsProject.instance().addMapLayer(other)
    layer = tile_layer(captioned)
    actions = plugin.layer_actions
    added = [call.args for call in plugin.iface.addCustomActionForLayer.call_args_list]
    assert (actions.tree_action, layer) in added and all(lyr is not other for _, lyr in added)
    registry = QgsGui.mapLayerActionRegistry()
    assert [a.text() for a in registry.mapLayerActions(layer)] == ["Find similar tiles"]
    assert registry.mapLayerActions(other) == []

    dock = plugin.dock
    assert not dock.isVisible()
    query = sorted(f["tile_id"] for f in layer.getFeatures())[3]
    layer.selectByExpression(f'"tile_id" = {query}')
    plugin.iface.setActiveLayer(layer)
    actions.tree_action.trigger()
    assert dock.isVisible() and dock.layer_combo.currentLayer() is layer
    assert wait_until(lambda: not dock.searching, 60) and dock.error is None, dock.error
    assert [h["tile_id"] for h in dock.hits] == [h.tile_id for h in similar(str(captioned), query, k=dock.k_spin.value())]

    feature = next(f for f in layer.getFeatures() if f["tile_id"] != query)
    trigger_feature_action(registry.mapLayerActions(layer)[0], layer, feature)  # as the attribute table does
    assert wait_until(lambda: not dock.searching, 60) and dock.error is None, dock.error
    assert [h["tile_id"] for h in dock.hits] == [h.tile_id for h in
                                                 similar(str(captioned), feature["tile_id"], k=dock.k_spin.value())]
    layer_id = layer.id()
    QgsProject.instance().removeMapLayer(layer_id)
    assert layer_id not in actions.feature_actions  # its feature action went with it


# -- export, settings, setup, about -----------------------------------------------------------------
def test_export_menu_action_through_the_save_dialog(plugin, captioned, tmp_path):  # noqa: F811
    from qgis.PyQt.QtWidgets import QFileDialog, QLineEdit

    layer = tile_layer(captioned)
    plugin.iface.setActiveLayer(layer)
    dst = tmp_path / "exported.gpkg"

    def answer(dialog):
        edit = dialog.findChild(QLineEdit, "fileNameEdit")
        type_into(edit, str(dst))
        QTest.keyClick(edit, Qt.Key.Key_Return)

    seen = answer_modal(QFileDialog, answer)
    press_toolbar(plugin, plugin.export_action)
    assert seen, "no save dialog opened"
    assert dst.is_file() and gpkg_tile_count(dst) == gpkg_tile_count(captioned)
    assert any("exported to" in m for m in plugin.iface.messageBar().get_messages(3))  # Success


def test_settings_menu_action_saves_what_was_typed(plugin, fresh_settings):  # noqa: F811
    from qgis.PyQt.QtWidgets import QDialogButtonBox

    from rscaption_plugin.core.settings import PluginSettings
    from rscaption_plugin.ui.settings_dialog import SettingsDialog

    def answer(dlg):
        while dlg.mode_combo.currentData() != "subprocess":
            QTest.keyClick(dlg.mode_combo, Qt.Key.Key_Down)
        type_into(dlg.python_edit, sys.executable)
        type_into(dlg.batch_spin.lineEdit(), "3")
        click(dlg.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.Save))

    assert answer_modal(SettingsDialog, answer) is not None
    press_toolbar(plugin, plugin.settings_action)
    saved = PluginSettings.load()
    assert (saved.backend_mode, saved.backend_python, saved.batch_size) == ("subprocess", sys.executable, 3)

    def cancel(dlg):
        type_into(dlg.python_edit, "/somewhere/else/python")
        click(dlg.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.Cancel))

    answer_modal(SettingsDialog, cancel)
    press_toolbar(plugin, plugin.settings_action)
    assert PluginSettings.load().backend_python == sys.executable


def test_about_menu_action_copy_and_probe_buttons(plugin, fresh_settings):  # noqa: F811
    from qgis.PyQt.QtGui import QGuiApplication
    from qgis.PyQt.QtWidgets import QDialogButtonBox, QPushButton

    from rscaption_plugin.ui.diagnostics import AboutDialog
    from rscaption_plugin.core.settings import PluginSettings

    settings = PluginSettings.load()
    settings.backend_mode, settings.backend_python = "subprocess", sys.executable
    settings.save()
    shown = {}

    def answer(dlg):
        buttons = {b.text(): b for b in dlg.findChildren(QPushButton)}
        QGuiApplication.clipboard().clear()
        click(buttons["Copy diagnostics"])
        shown["clipboard"] = QGuiApplication.clipboard().text()
        click(buttons["Probe backend"])
        shown["probing"] = not buttons["Probe backend"].isEnabled()
        wait_until(lambda: buttons["Probe backend"].isEnabled(), 120)
        shown["text"] = dlg.text.toPlainText()
        click(dlg.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.Close))

    seen = answer_modal(AboutDialog, answer)
    press_toolbar(plugin, plugin.about_action)
    assert seen and not seen[0].isVisible()
    assert "rscaption diagnostics" in shown["clipboard"] and shown["probing"]
    assert "subprocess" in shown["text"] and sys.executable in shown["text"]


def test_set_up_backend_menu_action_start_and_stop_buttons(plugin, tmp_path):  # noqa: F811
    from qgis.PyQt.QtGui import QGuiApplication

    press_toolbar(plugin, plugin.setup_action)
    dlg = plugin._setup_dialog
    assert dlg.isVisible() and not dlg.isModal()  # QGIS stays usable while it runs
    target = tmp_path / "backend-env"
    type_into(dlg.target_edit, str(target))
    assert not dlg.cancel_button.isEnabled()
    click(dlg.start_button)  # the real first step: python -m venv
    assert not dlg.start_button.isEnabled() and dlg.cancel_button.isEnabled()
    assert "1/" in dlg.step_label.text() and str(target) in dlg.log.toPlainText()
    click(dlg.cancel_button)
    assert dlg.succeeded is False and "stopped" in dlg.log.toPlainText()
    assert dlg.start_button.isEnabled() and not dlg.cancel_button.isEnabled()
    QGuiApplication.clipboard().clear()
    click(dlg.copy_button)
    assert "stopped" in QGuiApplication.clipboard().text()
    click(dlg.diag_button)
    assert "rscaption diagnostics" in QGuiApplication.clipboard().text()
    dlg.close()


# -- Processing dialogs -----------------------------------------------------------------------------
@pytest.fixture
def processing_dialogs(plugin, qgis_iface):
    """The Processing plugin's own algorithm dialogs; pytest-qgis's iface has no browser model,
    which their parameter panel needs, nor a Layers panel, which Processing hands to
    ``QgsProcessingGuiUtils.addResultLayers`` after a run (QGIS >= 3.44 rejects a mock there), so
    it gets real ones, as QGIS would give: a view on the project's layer tree."""
    from qgis.core import QgsLayerTreeModel
    from qgis.gui import QgsBrowserGuiModel, QgsLayerTreeView

    sys.path.append("/usr/share/qgis/python/plugins")  # Debian's Processing plugin
    processing = pytest.importorskip("processing")
    from processing.core.Processing import Processing

    Processing.initialize()
    model = QgsBrowserGuiModel()
    qgis_iface.browserModel = lambda: model
    tree_view = QgsLayerTreeView()
    tree_view.setModel(QgsLayerTreeModel(QgsProject.instance().layerTreeRoot(), tree_view))  # the view owns it
    qgis_iface.layerTreeView = lambda: tree_view
    yield processing
    del qgis_iface.browserModel, qgis_iface.layerTreeView


def _run_dialog(processing, alg_id, params, timeout=180):
    from qgis.PyQt.QtWidgets import QTextEdit

    dlg = processing.createAlgorithmDialog(alg_id, params)
    dlg.show()
    click(dlg.runButton())
    log = dlg.findChild(QTextEdit, "txtLog")
    assert wait_until(lambda: dlg.wasExecuted() or "failed" in log.toPlainText().lower(), timeout), log.toPlainText()
    return dlg, log.toPlainText()


def test_processing_caption_and_search_dialogs_run_from_their_run_buttons(processing_dialogs, geotiff, tiny,
                                                                          tmp_path):  # noqa: F811
    import json

    raster = QgsRasterLayer(str(geotiff("RGB.byte.tif")), "rgb")
    QgsProject.instance().addMapLayer(raster)
    out = tmp_path / "dialog.gpkg"
    dlg, log = _run_dialog(processing_dialogs, "rscaption:caption", {
        "INPUT": raster, "TILE_SIZE": 256, "MODEL": tiny, "BACKEND": 1, "DEVICE": "cpu", "OUTPUT": str(out)})
    assert dlg.wasExecuted(), log
    assert "backend: inprocess on cpu" in log
    results = dlg.results()
    assert results["OUTPUT"] == str(out) and results["WRITTEN"] == gpkg_tile_count(out) > 0
    assert json.loads(results["SUMMARY"])["written"] == results["WRITTEN"]
    dlg.close()

    layer = tile_layer(out, "dialog tiles")
    search, log = _run_dialog(processing_dialogs, "rscaption:search", {
        "INPUT": layer, "QUERY": "a river", "K": 3, "BACKEND": 1, "DEVICE": "cpu", "OUTPUT": "memory:"})
    assert search.wasExecuted(), log
    from rscaption.search.query import search_store

    hits = json.loads(search.results()["HITS"])
    assert [h["tile_id"] for h in hits] == [h.tile_id for h in search_store(str(out), "a river", k=3)]
    search.close()

"""Issue 22, the plugin in a person's hands, round 2 (items 1-7 and 10): what a person hit in a
real QGIS 3.22 window, driven the way they drove it: QTest clicks and key presses on the real
dialogs, real tasks and the tiny real model, real PyQGIS offscreen. The parts that need a QGIS
Python without torch (a packaged plugin's first start, Settings, a typed backend Python that the
dock and Processing must use) run in QGIS's own system Python in a subprocess, as in
test_plugin_usability. The message-log guard (conftest) stays on for everything here."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest

from test_plugin_support import ROOT, caption_request, gpkg_tile_count, wait_until

pytest.importorskip("qgis.core")

from qgis.core import Qgis, QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer  # noqa: E402
from qgis.PyQt.QtCore import Qt  # noqa: E402
from qgis.PyQt.QtTest import QTest  # noqa: E402
from qgis.PyQt.QtWidgets import QCheckBox, QDialogButtonBox, QLabel  # noqa: E402

from test_plugin import plugin, tiny  # noqa: E402,F401  (shared fixtures)
from test_plugin_clicks import answer_modal, click, main_window_shown, press_toolbar, type_into  # noqa: E402,F401
from test_plugin_usability import fresh_settings  # noqa: E402,F401
from test_tile_size import model_with_anchors  # noqa: E402


@pytest.fixture(scope="module")
def anchored(tmp_path_factory) -> str:
    """A tiny real model whose card was trained at 0.3-10 m/px (tile size by resolution)."""
    return model_with_anchors(tmp_path_factory.mktemp("round2_anchored"))


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def tmp_raster(geotiff, tmp_path, name: str):
    """A copy of a shared raster (QGIS may write beside what it opens)."""
    dst = tmp_path / name
    shutil.copy(geotiff(name), dst)
    return dst


def no_crs_naip(geotiff, tmp_path):
    """The real 5 m NAIP tile with its CRS and geotransform stripped: RGB pixels only."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with rasterio.open(geotiff("m_4709963_se_14_1_20090818.tif")) as src:
        data = src.read([1, 2, 3])
    path = tmp_path / "naip_no_crs.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=3,
                           dtype="uint8") as dst:
            dst.write(data)
    return path


def add_raster(plugin, path, name):
    layer = QgsRasterLayer(str(path), name)
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    plugin.iface.setActiveLayer(layer)
    return layer


def choose(combo, data):
    """Walk a combo box with the arrow keys to the item holding ``data``, as a person would."""
    for key in (Qt.Key.Key_Up, Qt.Key.Key_Down):
        for _ in range(combo.count()):
            if combo.currentData() == data:
                return
            QTest.keyClick(combo, key)
    assert combo.currentData() == data, f"{data!r} not reachable in the combo box"


def through_dialog(plugin, fill, timeout=180):
    """Press Caption raster layer on the toolbar, let ``fill(dlg)`` click through the dialog, close
    it when Caption left it open (or ``fill`` failed: a modal dialog left open would hang the
    test), and return (dialog, runs started)."""
    from rscaption_plugin.ui.dialog import CaptionDialog

    runs, failed = [], []
    start = plugin.start_caption
    plugin.start_caption = lambda request: runs.append(start(request)) or runs[-1]

    def answer(dlg):
        try:
            fill(dlg)
        except BaseException as exc:  # re-raised once exec() has returned
            failed.append(exc)
        if dlg.isVisible():
            cancel(dlg)

    try:
        seen = answer_modal(CaptionDialog, answer)
        press_toolbar(plugin, plugin.caption_action)
    finally:
        plugin.start_caption = start
    assert all(wait_until(lambda r=r: r.done, timeout) for r in runs)
    if failed:
        raise failed[0]
    assert seen, "the caption dialog did not open"
    return seen[0], runs


def cancel(dlg):
    click(dlg.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.Cancel))


def tile_layers(path) -> list:
    from rscaption_plugin.core.layers import gpkg_path_of, same_file

    return [lyr for lyr in QgsProject.instance().mapLayers().values() if same_file(gpkg_path_of(lyr), str(path))]


def first_run(plugin, raster_layer, model, out, tile_px):
    """Caption ``raster_layer`` into ``out`` through the dialog at a fixed tile size; returns the run."""
    def fill(dlg):
        dlg.layer_combo.setLayer(raster_layer)
        type_into(dlg.model_combo.lineEdit(), model)
        if dlg.auto_tile_check.isChecked():
            click(dlg.auto_tile_check)
        type_into(dlg.tile_spin.lineEdit(), str(tile_px))
        choose(dlg.output_combo, "file")
        type_into(dlg.output_file.lineEdit(), str(out))
        click(dlg.caption_button)

    _, runs = through_dialog(plugin, fill)
    assert runs and runs[0].outcome.ok, runs[0].outcome.error if runs else "no run"
    return runs[0]


# -- item 2: a refused run adds nothing and writes nothing ------------------------------------------
# NAD27 byte.tif drawn in a project whose CRS an earlier layer set: QGIS notes the missing datum grid
@pytest.mark.qgis_log_expects(r"Using non-preferred coordinate operation between EPSG:26711")
def test_captioning_another_raster_into_the_remembered_output_is_refused_in_the_dialog(
        plugin, fresh_settings, geotiff, tiny, tmp_path):  # noqa: F811
    """The dialog remembers the last output with Resume ticked; choosing another raster and
    pressing Caption is refused in the dialog, naming both rasters: no layer appears, the file's
    bytes (its style included) are untouched, the map does not move."""
    rgb = add_raster(plugin, tmp_raster(geotiff, tmp_path, "RGB.byte.tif"), "rgb")
    out = tmp_path / "kept.gpkg"
    first_run(plugin, rgb, tiny, out, 256)
    QgsProject.instance().removeMapLayers([lyr.id() for lyr in tile_layers(out)])
    before = sha256(out)
    byte = add_raster(plugin, tmp_raster(geotiff, tmp_path, "byte.tif"), "byte")
    canvas = plugin.iface.mapCanvas()
    extent = canvas.extent()
    shown = {}

    def fill(dlg):
        assert dlg.output_combo.currentData() == "file" and dlg.output_file.filePath() == str(out)
        assert dlg.resume_check.isChecked() and dlg.layer_combo.currentLayer() is byte
        note = getattr(dlg, "resume_note", None)  # said while choosing, before any click
        shown["note"] = note.text() if note else ""
        click(dlg.caption_button)
        shown.update(request=dlg.request, message=dlg.message_label.text(), open=dlg.isVisible())

    _, runs = through_dialog(plugin, fill)
    assert shown["request"] is None and shown["open"] and runs == []
    assert "RGB.byte.tif" in shown["message"] and "'byte'" in shown["message"]
    assert "holds the captions of RGB.byte.tif, not of the chosen layer" in shown["note"]
    assert tile_layers(out) == [] and not any(lyr.name() == "byte captions"
                                              for lyr in QgsProject.instance().mapLayers().values())
    assert sha256(out) == before and canvas.extent() == extent


@pytest.mark.qgis_log_expects(r"^captioning failed: .*different raster")
def test_a_run_the_backend_refuses_adds_no_layer_and_leaves_the_file_alone(plugin, geotiff, tiny, tmp_path):  # noqa: F811
    """The same refusal coming from the backend (Processing-style requests, a raster rewritten
    under the same name): the run ends failed, and no layer, no style write, no zoom follow."""
    from rscaption_plugin.core.layers import store_default_style

    out = tmp_path / "other.gpkg"
    first = plugin.start_caption(caption_request(tmp_raster(geotiff, tmp_path, "RGB.byte.tif"), out, tiny,
                                                 tile_size=256))
    assert wait_until(lambda: first.done, 180) and first.outcome.ok, first.outcome.error
    assert store_default_style(str(out)) is None
    QgsProject.instance().removeAllMapLayers()
    before = sha256(out)
    plugin.iface.messageBar().clear_messages()
    refused = plugin.start_caption(caption_request(tmp_raster(geotiff, tmp_path, "byte.tif"), out, tiny,
                                                   tile_size=256, name="byte captions"))
    assert wait_until(lambda: refused.done, 180)
    assert not refused.outcome.ok and "different raster" in refused.outcome.error
    assert refused.layer is None and QgsProject.instance().mapLayers() == {}
    assert sha256(out) == before
    failed = plugin.iface.messageBar().get_messages(Qgis.MessageLevel.Critical)
    assert failed and all("kept" not in m for m in failed)


# -- item 3: resume with the obvious click --------------------------------------------------------
def test_reopening_the_dialog_on_a_run_restores_its_tile_size_and_resumes(plugin, fresh_settings, geotiff, tiny,
                                                                          tmp_path):  # noqa: F811
    """A 64 px run, then the dialog again: it shows 64 px (not Auto) from the file's metadata and
    says so; Caption resumes (every tile resumed, none redone). A tile size changed by hand is put
    back, with the advice to press Caption, never to choose another file."""
    rgb = add_raster(plugin, tmp_raster(geotiff, tmp_path, "RGB.byte.tif"), "rgb")
    out = tmp_path / "resume.gpkg"
    done = first_run(plugin, rgb, tiny, out, 64)
    total = gpkg_tile_count(out)
    assert done.outcome.summary["written"] == total > 0
    shown = {}

    def fill(dlg):
        note = getattr(dlg, "resume_note", None)  # read leniently: the run below shows what the person met
        shown.update(auto=dlg.auto_tile_check.isChecked(), tile=dlg.tile_spin.value(), note=note.text() if note else "")
        click(dlg.auto_tile_check)  # a person fiddles: back to Auto (would cut other tiles)
        click(dlg.caption_button)
        shown.update(request=dlg.request, message=dlg.message_label.text(), again=dlg.tile_spin.value(),
                     again_auto=dlg.auto_tile_check.isChecked())
        if dlg.request is None:
            click(dlg.caption_button)  # the settings are back: the obvious click resumes

    _, runs = through_dialog(plugin, fill)
    assert shown["auto"] is False and shown["tile"] == 64 and "64 px" in shown["note"]
    assert shown["request"] is None and "press Caption to resume" in shown["message"]
    assert "another output" not in shown["message"] and "another file" not in shown["message"]
    assert shown["again"] == 64 and shown["again_auto"] is False
    assert runs and runs[0].outcome.ok, runs[0].outcome.error
    summary = runs[0].outcome.summary
    assert runs[0].request.job.tile_size == 64 and summary["resumed"] == total and summary["written"] == 0
    assert gpkg_tile_count(out) == total and len(tile_layers(out)) == 1


def test_a_tiling_refusal_from_the_backend_tells_how_to_resume_not_to_choose_another_file():
    from rscaption_plugin.core.wording import gui_wording

    text = gui_wording("/x/a.gpkg was written from different tiling parameters; choose another output or "
                       "pass --overwrite")
    assert "to resume it" in text and "another" not in text and "--" not in text
    other = gui_wording("/x/a.gpkg was written from a different raster; choose another output or pass --overwrite")
    assert other.endswith("choose another output file")


# -- item 4: a raster without a CRS -----------------------------------------------------------------
@pytest.fixture
def wgs84_canvas(plugin):  # noqa: F811
    """The map in EPSG:4326, as in the person's project; the shared test canvas is put back after."""
    canvas = plugin.iface.mapCanvas()
    before = canvas.mapSettings().destinationCrs()
    QgsProject.instance().setCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
    yield canvas
    canvas.setDestinationCrs(before)


# pytest-qgis's profile has no user CRS database: QGIS looks the GeoPackage's undefined SRS up there
@pytest.mark.qgis_log_expects(r"no such table: tbl_srs")
def test_a_raster_without_crs_asks_its_ground_resolution_and_sets_no_bogus_transform(
        plugin, fresh_settings, wgs84_canvas, geotiff, anchored, tmp_path):
    """The NAIP tile without its CRS: the dialog says "no CRS" (not an empty CRS), asks for the
    ground resolution and warns until it is given; 5 m/px gives the trained footprint's tile size,
    recorded in the file and used for the captions; the result layer has no CRS, so showing it,
    searching it and zooming to a hit in an EPSG:4326 project log no transform error."""
    from rscaption.raster.tile_size import auto_tile_size
    from rscaption_plugin.core.run_record import read_run_record
    from rscaption_plugin.core.run_warnings import NO_CRS

    raster = add_raster(plugin, no_crs_naip(geotiff, tmp_path), "naip")
    assert not raster.crs().isValid()
    out = tmp_path / "naip.gpkg"
    shown = {}

    def fill(dlg):
        type_into(dlg.model_combo.lineEdit(), anchored)
        shown.update(note=dlg.source_note.text(), asked=dlg.ground_spin.isVisible(),
                     warned=dlg.warning_label.text())
        type_into(dlg.ground_spin.lineEdit(), "5")
        QTest.keyClick(dlg.ground_spin, Qt.Key.Key_Tab)
        shown.update(footprint=dlg.footprint_label.text(), warned_after=dlg.warning_label.text(),
                     tile=dlg.tile_spin.value())
        choose(dlg.output_combo, "file")
        type_into(dlg.output_file.lineEdit(), str(out))
        click(dlg.caption_button)

    _, runs = through_dialog(plugin, fill)
    assert shown["note"].endswith("no CRS") and shown["asked"]
    assert NO_CRS[len("warning: "):] in shown["warned"]
    want = auto_tile_size({"tile_size_by_resolution": [[0.3, 256], [10.0, 64]]}, 5.0)
    assert shown["tile"] == want and "at 5.00 m/px" in shown["footprint"] and "no CRS" not in shown["warned_after"]
    run = runs[0]
    assert run.outcome.ok, run.outcome.error
    assert run.request.job.ground_resolution == 5.0
    record = read_run_record(str(out))
    assert record.ground_m == 5.0 and record.tile_size == want and record.auto_tile
    assert not run.layer.crs().isValid()  # pixel coordinates: nothing to transform
    dock = plugin.dock
    dock.set_layer(run.layer)
    plugin.show_dock()
    type_into(dock.query_edit, "a field")
    click(dock.search_button)
    assert wait_until(lambda: not dock.searching, 120) and dock.error is None, dock.error
    before = wgs84_canvas.extent()
    click(dock.next_button)  # zooms to the second hit: no transform asked for, none failing
    assert wgs84_canvas.extent() != before
    wgs84_canvas.refresh()
    wait_until(lambda: False, 0.5)


def test_the_subprocess_backend_uses_a_given_ground_resolution(geotiff, anchored, tmp_path):
    """The worker takes the ground resolution from the request (protocol key) like in-process."""
    from rscaption.raster.tile_size import auto_tile_size
    from rscaption_plugin.core.run_record import read_run_record
    from rscaption_plugin.core.runner import CaptionJob, run_caption

    out = tmp_path / "worker.gpkg"
    job = CaptionJob(raster=str(no_crs_naip(geotiff, tmp_path)), out=str(out), model=anchored, device="cpu",
                     ground_resolution=5.0)
    assert run_caption(job, "subprocess", sys.executable)["written"] > 0
    record = read_run_record(str(out))
    assert record.ground_m == 5.0 and record.tile_size == auto_tile_size(
        {"tile_size_by_resolution": [[0.3, 256], [10.0, 64]]}, 5.0)


# -- item 5: warnings where the person looks --------------------------------------------------------
# NAD27 byte.tif drawn in a project whose CRS an earlier layer set: QGIS notes the missing datum grid
@pytest.mark.qgis_log_expects(r"Using non-preferred coordinate operation between EPSG:26711")
def test_resolution_warning_shows_in_the_dialog_before_and_the_message_bar_after(
        plugin, fresh_settings, geotiff, anchored, tmp_path):
    byte = add_raster(plugin, tmp_raster(geotiff, tmp_path, "byte.tif"), "byte")
    plugin.iface.messageBar().clear_messages()
    shown = {}

    def fill(dlg):
        assert dlg.layer_combo.currentLayer() is byte
        type_into(dlg.model_combo.lineEdit(), anchored)
        shown["warned"] = dlg.warning_label.text() if dlg.warning_label.isVisible() else ""
        click(dlg.caption_button)

    _, runs = through_dialog(plugin, fill)
    far = "60.00 m/px is far from the 0.30-10.00 m/px this model was trained on"
    assert far in shown["warned"]
    assert runs and runs[0].outcome.ok, runs[0].outcome.error
    bar = plugin.iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert any(far in m for m in bar), bar
    assert sum(m.count(far) for m in bar) == 1  # the dialog's and the backend's warning said once


# -- item 6: Set up backend -------------------------------------------------------------------------
def test_set_up_backend_says_what_it_installs_and_its_size_before_start(plugin):  # noqa: F811
    from rscaption_plugin.core.paths import requirements_file
    from rscaption_plugin.core.setup_plan import CPU_TORCH_INDEX, has_nvidia_gpu, install_plan, package_names
    from rscaption_plugin.ui.setup_backend import setup_steps

    press_toolbar(plugin, plugin.setup_action)
    dlg = plugin._setup_dialog
    text = dlg.plan_label.text()
    names = package_names(requirements_file())
    assert {"torch", "rasterio"} <= set(names) and not {"ray", "hypothesis", "pytest"} & set(names)
    assert "GB to download" in text and "no Ray" in text and all(n in text for n in names)
    if sys.platform.startswith("linux") and not has_nvidia_gpu():  # this machine: CPU-only
        assert dlg.cpu_check.isVisible() and dlg.cpu_check.isChecked() and "CPU build of torch" in text
        steps = setup_steps(dlg.target, python="/usr/bin/python3", cpu_torch=True)
        cpu = [argv for label, argv in steps if "CPU build" in label]
        assert cpu and CPU_TORCH_INDEX in cpu[0] and any(a.startswith("torch==") for a in cpu[0])
        assert [label for label, _ in steps].index("Install torch, CPU build (no CUDA libraries)") < \
            [label for label, _ in steps].index("Install pinned requirements (torch is large: minutes)")
        click(dlg.cpu_check)  # unticked: the CUDA build, and its size, said before Start
        assert "3.2 GB of NVIDIA CUDA libraries" in dlg.plan_label.text()
        assert install_plan(requirements_file(), cpu_torch=False).disk_gb > 5 > \
            install_plan(requirements_file(), cpu_torch=True).disk_gb
    dlg.close()


def test_closing_set_up_backend_mid_install_and_reopening_shows_the_running_install(plugin, tmp_path):  # noqa: F811
    press_toolbar(plugin, plugin.setup_action)
    dlg = plugin._setup_dialog
    type_into(dlg.target_edit, str(tmp_path / "env"))
    click(dlg.start_button)  # the real first step: python -m venv
    assert dlg.running
    click(dlg.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.Close))
    assert not dlg.isVisible() and dlg.running  # closing the window does not stop the install
    press_toolbar(plugin, plugin.setup_action)
    again = plugin._setup_dialog
    assert again is dlg and again.isVisible()
    assert not again.start_button.isEnabled() and again.cancel_button.isEnabled()
    assert "1/" in again.step_label.text() and str(tmp_path / "env") in again.log.toPlainText()
    click(again.cancel_button)
    assert again.succeeded is False and not again.running and again.start_button.isEnabled()
    again.close()


def test_the_end_of_set_up_backend_is_announced_in_the_message_bar(plugin, fresh_settings, tmp_path):  # noqa: F811
    bar = plugin.iface.messageBar()
    bar.clear_messages()
    press_toolbar(plugin, plugin.setup_action)
    dlg = plugin._setup_dialog
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    type_into(dlg.target_edit, str(blocker / "env"))  # its parent cannot be created
    click(dlg.start_button)
    assert dlg.succeeded is False and dlg.start_button.isEnabled()
    failed = bar.get_messages(Qgis.MessageLevel.Critical)
    assert any("Set up backend failed" in m and "cannot create" in m for m in failed), failed

    dlg._steps = [("one", [sys.executable, "-c", "print('step one')"])]  # a short install that succeeds
    type_into(dlg.target_edit, str(tmp_path / "env"))
    click(dlg.start_button)
    dlg.close()  # the window is closed: the message bar still says when it ends
    assert wait_until(lambda: dlg.succeeded is not None, 60) and dlg.succeeded
    done = bar.get_messages(Qgis.MessageLevel.Success)
    assert any("Set up backend finished" in m and str(tmp_path / "env") in m for m in done), done


# -- item 10: nothing in the caption dialog is cut ----------------------------------------------------
def test_caption_dialog_shows_the_whole_path_and_model_card(qgis_iface, qgis_new_project, fresh_settings, geotiff,
                                                            tmp_path):
    from rscaption_plugin.core.model_card import read_card
    from rscaption_plugin.core.paths import default_model_dir
    from rscaption_plugin.ui.dialog import CaptionDialog

    if default_model_dir() is None:
        pytest.skip("needs the embedded default model (its card has the long description)")
    deep = tmp_path / "a_rather_long_folder_name_for_imagery" / "another_level_of_folders_2024"
    deep.mkdir(parents=True)
    path = deep / "byte_with_a_rather_long_file_name_2009.tif"
    shutil.copy(geotiff("byte.tif"), path)
    layer = QgsRasterLayer(str(path), "byte")
    QgsProject.instance().addMapLayer(layer)
    qgis_iface.setActiveLayer(layer)
    dlg = CaptionDialog(qgis_iface)
    dlg.show()
    wait_until(lambda: False, 0.5)  # let the wrapped notes settle at their widths
    description = read_card("default")["description"]
    assert description in dlg.card_label.text() and not dlg.card_label.text().endswith("…")
    assert str(path) in dlg.source_note.text().replace("\u200b", "")
    for label in dlg.findChildren(QLabel):
        if not label.isVisible() or not label.text():
            continue
        if label.wordWrap():
            assert label.height() >= label.heightForWidth(label.width()), f"cut: {label.text()[:60]!r}"
        else:
            assert label.width() >= label.sizeHint().width(), f"cut: {label.text()[:60]!r}"
    for box in dlg.findChildren(QCheckBox):
        if box.isVisible():
            assert box.width() >= box.sizeHint().width(), f"cut: {box.text()!r}"
    assert dlg.height() <= 1000  # fits a 1080-pixel screen
    dlg.close()


# -- items 1 and 7: a QGIS Python without torch ----------------------------------------------------
NO_TORCH_SESSION = r'''
import json, sys, time, traceback
plugins, raster, model, venv_python, out_dir = sys.argv[1:6]
sys.path[:0] = [plugins]
from qgis.core import Qgis, QgsApplication, QgsProject, QgsRasterLayer
app = QgsApplication([], True)
app.initQgis()
from qgis.gui import QgsMapCanvas, QgsMessageBar, QgsMessageBarItem
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtTest import QTest
from qgis.PyQt.QtWidgets import QLabel, QMainWindow, QPushButton, QToolBar


class Iface:
    """QGIS's iface as the plugin uses it, from real widgets (pytest-qgis's lives in the venv)."""

    def __init__(self):
        self.window, self.canvas, self.bar, self.active = QMainWindow(), QgsMapCanvas(), QgsMessageBar(), None

    def mainWindow(self): return self.window
    def mapCanvas(self): return self.canvas
    def messageBar(self): return self.bar
    def activeLayer(self): return self.active
    def setActiveLayer(self, layer): self.active = layer
    def addDockWidget(self, area, dock): self.window.addDockWidget(area, dock)
    def removeDockWidget(self, dock): self.window.removeDockWidget(dock)

    def addToolBar(self, name):
        toolbar = QToolBar(name)
        self.window.addToolBar(toolbar)
        return toolbar

    def __getattr__(self, name):  # menus and layer-menu entries: not what this session checks
        return lambda *args, **kwargs: None

result, problems = {}, []
QgsApplication.messageLog().messageReceived.connect(
    lambda msg, tag, level: problems.append(f"[{tag}] {msg}") if level in (Qgis.MessageLevel.Warning,
                                                                           Qgis.MessageLevel.Critical) else None)
sys.excepthook = lambda *exc: problems.append("".join(traceback.format_exception(*exc)))

def wait(pred, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end and not pred():
        app.processEvents(); time.sleep(0.02)
    app.processEvents()
    return pred()

def part(name, fn):
    try:
        fn()
    except Exception:
        result[name + "_error"] = traceback.format_exc()

iface = Iface()
from rscaption_plugin import classFactory
from rscaption_plugin.core.paths import torch_importable
result["torch"] = torch_importable()
plugin = classFactory(iface)
plugin.initGui()

def first_start():
    items = [w for w in iface.messageBar().findChildren(QgsMessageBarItem) if "no backend yet" in w.text()]
    result["notice"] = items[0].text() if items else ""
    buttons = [b for w in items for b in w.findChildren(QPushButton) if b.text().startswith("Set up backend")]
    result["notice_button"] = bool(buttons)
    if buttons:
        QTest.mouseClick(buttons[0], Qt.MouseButton.LeftButton)
        result["setup_opened"] = plugin._setup_dialog is not None and plugin._setup_dialog.isVisible()
        plugin._setup_dialog.close()

def settings_dialog():
    from rscaption_plugin.ui.settings_dialog import SettingsDialog
    dlg = SettingsDialog(None)
    combo = dlg.mode_combo
    result["mode_texts"] = [combo.itemText(i) for i in range(combo.count())]
    index = combo.findData("inprocess")
    result["settings_inprocess_enabled"] = combo.model().item(index).isEnabled()
    result["settings_note"] = " ".join(w.text() for w in dlg.findChildren(QLabel))

def typed_python():
    from rscaption_plugin.ui.dialog import CaptionDialog
    layer = QgsRasterLayer(raster, "rgb")
    QgsProject.instance().addMapLayer(layer)
    iface.setActiveLayer(layer)
    dlg = CaptionDialog(iface)
    dlg.show()
    result["browse_button"] = getattr(dlg, "python_browse", QLabel("")).text()
    result["caption_enabled_before"] = dlg.caption_button.isEnabled()
    dlg.model_combo.lineEdit().selectAll()
    QTest.keyClicks(dlg.model_combo.lineEdit(), model)
    dlg.python_edit.clear()
    QTest.keyClicks(dlg.python_edit, venv_python)
    QTest.mouseClick(dlg.auto_tile_check, Qt.MouseButton.LeftButton)
    dlg.tile_spin.lineEdit().selectAll()
    QTest.keyClicks(dlg.tile_spin.lineEdit(), "256")
    dlg.output_combo.setCurrentIndex(dlg.output_combo.findData("file"))
    QTest.keyClicks(dlg.output_file.lineEdit(), out_dir + "/typed.gpkg")
    QTest.mouseClick(dlg.caption_button, Qt.MouseButton.LeftButton)
    result["accepted"] = dlg.request is not None
    run = plugin.start_caption(dlg.request)
    wait(lambda: run.done, 300)
    result["caption_ok"], result["caption_error"] = run.outcome.ok, run.outcome.error
    result["caption_mode"] = run.backend.get("mode")
    dock = plugin.dock
    dock.set_layer(run.layer)
    dock.query_edit.setText("a river")
    QTest.mouseClick(dock.search_button, Qt.MouseButton.LeftButton)
    wait(lambda: not dock.searching, 300)
    result["dock_error"], result["dock_hits"] = dock.error, len(dock.hits)
    again = CaptionDialog(iface)
    result["reopened_python"] = again.python_edit.text()
    result["reopened_enabled"] = again.caption_button.isEnabled()
    from rscaption_plugin.core.settings import PluginSettings
    result["saved_python"] = PluginSettings.load().python()
    sys.path.append("/usr/share/qgis/python/plugins")
    from processing.core.Processing import Processing
    Processing.initialize()
    import processing
    found = processing.run("rscaption:search", {"INPUT": run.layer, "QUERY": "a river", "K": 3,
                                                "OUTPUT": "memory:"})
    result["processing_hits"] = len(json.loads(found["HITS"]))
    from rscaption_plugin.core.backend_client import POOL
    POOL.shutdown()

part("first_start", first_start)
part("settings", settings_dialog)
part("typed", typed_python)
result["problems"] = problems
print("RESULT " + json.dumps(result))
sys.stdout.flush()
plugin.unload()
app.exitQgis()
'''


@pytest.fixture(scope="module")
def no_torch_session(tmp_path_factory, tiny):  # noqa: F811
    """One session of the packaged plugin in QGIS's system Python (no torch, no project .venv):
    its first start, Settings, and a backend Python typed into the caption dialog."""
    probe = subprocess.run(["/usr/bin/python3", "-c", "import qgis.core, importlib.util as u; "
                            "print(u.find_spec('torch') is None)"], capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "True":
        pytest.skip("needs a system Python with qgis and without torch")
    from conftest import geotiff_path

    tmp = tmp_path_factory.mktemp("no_torch_round2")
    plugins = tmp / "plugins"
    shutil.copytree(ROOT / "rscaption_plugin", plugins / "rscaption_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "backend" / "rscaption", plugins / "rscaption_plugin" / "backend" / "rscaption",
                    ignore=shutil.ignore_patterns("__pycache__", "training"))
    shutil.copy(ROOT / "requirements.txt", plugins / "rscaption_plugin" / "requirements.txt")  # as in the zip
    raster = tmp / "RGB.byte.tif"
    shutil.copy(geotiff_path("RGB.byte.tif"), raster)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "QGIS_"))}
    env.update(QT_QPA_PLATFORM="offscreen", HOME=str(tmp), XDG_CACHE_HOME=str(tmp / "cache"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(["/usr/bin/python3", "-c", NO_TORCH_SESSION, str(plugins), str(raster), tiny, sys.executable,
                           str(tmp)], capture_output=True, text=True, timeout=900, env=env, cwd=str(tmp))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["torch"] is False
    return out


def test_first_start_without_a_backend_says_so_with_a_set_up_button(no_torch_session):
    from rscaption_plugin.core.setup_plan import has_nvidia_gpu

    out = no_torch_session
    assert "first_start_error" not in out, out.get("first_start_error")
    assert "no backend yet" in out["notice"] and "GB to download" in out["notice"]
    if sys.platform.startswith("linux") and not has_nvidia_gpu():
        assert "about 0.5 GB to download" in out["notice"]  # the CPU build: no CUDA libraries
    assert out["notice_button"] and out["setup_opened"]


def test_settings_names_the_modes_in_words_and_offers_no_in_process_without_torch(no_torch_session):
    out = no_torch_session
    assert "settings_error" not in out, out.get("settings_error")
    assert "inprocess" not in out["mode_texts"] and "subprocess" not in out["mode_texts"]
    assert "Automatic" in out["mode_texts"] and out["settings_inprocess_enabled"] is False
    assert ".venv" not in out["settings_note"] and "Set up backend" in out["settings_note"]


def test_a_backend_python_typed_in_the_caption_dialog_serves_the_dock_and_processing(no_torch_session):
    out = no_torch_session
    assert "typed_error" not in out, out.get("typed_error")
    assert out["browse_button"].startswith("Browse") and out["caption_enabled_before"] is False
    assert out["accepted"] and out["caption_ok"], out["caption_error"]
    assert out["caption_mode"] == "subprocess"
    assert out["dock_error"] is None and out["dock_hits"] > 0
    assert out["reopened_python"] == sys.executable and out["reopened_enabled"]
    assert out["saved_python"] == sys.executable and out["processing_hits"] == 3
    # Processing's own providers complain about GRASS, OTB and SAGA here, not the plugin
    assert [p for p in out["problems"] if not p.startswith("[Processing] Problem with")] == []

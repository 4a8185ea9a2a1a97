"""Issue 10, the plugin in a person's hands: in-process safety, one layer per GeoPackage, dialog
wording and choices, remembered settings, styles stored in the file, pipes closed after runs.

Real PyQGIS offscreen; widgets are driven with QTest clicks and key presses, never mocked."""

from __future__ import annotations

import gc
import os
import signal
import sys
import warnings

import pytest

from test_plugin_support import caption_request, gpkg_tile_count, wait_until

pytest.importorskip("qgis.core")

from qgis.core import QgsProject  # noqa: E402

from test_plugin import captioned, plugin, tiny  # noqa: E402,F401  (shared fixtures)


def test_subprocess_runs_and_kills_leave_no_unclosed_pipes(qgis_new_project, geotiff, tiny, tmp_path):  # noqa: F811
    """A finished subprocess run, a killed one and the pool shutdown close every pipe they opened:
    ``ResourceWarning: unclosed file`` used to follow each of them."""
    from rscaption_plugin.core.backend_client import POOL
    from rscaption_plugin.core.runner import Callbacks, CaptionJob, RunError, run_caption

    raster = str(geotiff("RGB.byte.tif"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        job = CaptionJob(raster=raster, out=str(tmp_path / "a.gpkg"), model=tiny, tile_size=256, device="cpu")
        assert run_caption(job, "subprocess", sys.executable)["written"] > 0

        def kill_busy(_ids):
            for client in POOL.clients():
                if client.lock.locked() and client.alive():
                    os.kill(client.pid, signal.SIGKILL)

        job = CaptionJob(raster=raster, out=str(tmp_path / "b.gpkg"), model=tiny, tile_size=64, batch_size=2,
                         device="cpu")
        with pytest.raises(RunError, match="stopped unexpectedly"):
            run_caption(job, "subprocess", sys.executable, Callbacks(on_tiles=kill_busy))
        POOL.shutdown()
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []


def _tile_layers_for(path) -> list:
    from rscaption_plugin.core.layers import find_tile_layer, gpkg_path_of, same_file

    assert find_tile_layer(str(path)) is not None
    return [lyr for lyr in QgsProject.instance().mapLayers().values() if same_file(gpkg_path_of(lyr), str(path))]


def test_resumed_run_on_the_same_file_reuses_its_layer(plugin, geotiff, tiny, tmp_path):  # noqa: F811
    """Cancel a run, resume it on the same GeoPackage, then run it once more: one layer for that
    file in the project throughout, showing every committed tile."""
    out = tmp_path / "resumed.gpkg"
    request = caption_request(geotiff("RGB.byte.tif"), out, tiny, tile_size=128, batch_size=4)
    first = plugin.start_caption(request)
    assert wait_until(lambda: first.tiles_seen > 0 or first.done, 120)
    first.cancel()
    assert wait_until(lambda: first.done, 120)
    assert len(_tile_layers_for(out)) == 1
    for _ in range(2):
        run = plugin.start_caption(caption_request(geotiff("RGB.byte.tif"), out, tiny, tile_size=128, batch_size=4))
        assert wait_until(lambda: run.done, 180)
        assert run.outcome.ok, run.outcome.error
        layers = _tile_layers_for(out)
        assert len(layers) == 1 and run.layer is layers[0] is first.layer
        assert run.layer.featureCount() == gpkg_tile_count(out)


@pytest.fixture
def fresh_settings(qgis_app):
    """The dialog remembers its choices in QgsSettings: start and end every test on the defaults."""
    from rscaption_plugin.core.settings import PluginSettings

    PluginSettings().save()
    yield
    PluginSettings().save()


def _click(widget):
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest

    QTest.mouseClick(widget, Qt.MouseButton.LeftButton)


def _key(widget, key):
    from qgis.PyQt.QtTest import QTest

    QTest.keyClick(widget, key)


def _type(line_edit, text):
    from qgis.PyQt.QtTest import QTest

    line_edit.clear()
    QTest.keyClicks(line_edit, text)


def _dialog(iface, geotiff, model):
    from qgis.core import QgsRasterLayer

    from rscaption_plugin.ui.dialog import CaptionDialog

    raster = QgsRasterLayer(str(geotiff("RGB.byte.tif")), "rgb")
    QgsProject.instance().addMapLayer(raster)
    iface.setActiveLayer(raster)
    dlg = CaptionDialog(iface)
    dlg.show()
    _type(dlg.model_combo.lineEdit(), model)
    return dlg


def test_existing_output_without_resume_is_refused_in_dialog_words(qgis_iface, qgis_new_project, fresh_settings,
                                                                   geotiff, tiny, tmp_path):  # noqa: F811
    from qgis.PyQt.QtCore import Qt

    from rscaption.engine.pipeline import caption_raster
    from rscaption.raster.tiling import TilingParams

    out = tmp_path / "exists.gpkg"
    caption_raster(str(geotiff("RGB.byte.tif")), str(out), model=tiny, tiling=TilingParams(tile_size=256))
    dlg = _dialog(qgis_iface, geotiff, tiny)
    _key(dlg.output_combo, Qt.Key.Key_Down)  # "GeoPackage file"
    assert dlg.output_combo.currentData() == "file" and dlg.output_file.isEnabled()
    _type(dlg.output_file.lineEdit(), str(out))
    _key(dlg.resume_check, Qt.Key.Key_Space)
    assert not dlg.resume_check.isChecked()
    _click(dlg.caption_button)
    assert dlg.request is None and dlg.isVisible()
    assert "tick Resume to continue it or choose another file" in dlg.message_label.text()
    assert "--" not in dlg.message_label.text()
    _key(dlg.resume_check, Qt.Key.Key_Space)
    _click(dlg.caption_button)
    assert dlg.request is not None and dlg.request.job.resume and dlg.request.job.out == str(out)


@pytest.mark.qgis_log_expects(r"^captioning failed: .*first\.gpkg exists: tick Resume")
def test_run_messages_use_dialog_words_and_a_cancel_is_no_failure(plugin, geotiff, tiny, tmp_path):  # noqa: F811
    """A refused start says what to do in the dialog's words and claims no "kept" tiles; a user
    cancel is an info message and the task manager sees a completed task, not a failed one."""
    from qgis.core import Qgis, QgsApplication, QgsTask

    from rscaption_plugin.ui.caption_run import CaptionRun

    bar = plugin.iface.messageBar()
    raster = geotiff("RGB.byte.tif")
    out = tmp_path / "first.gpkg"
    first = plugin.start_caption(caption_request(raster, out, tiny, tile_size=256))
    assert wait_until(lambda: first.done, 120) and first.outcome.ok

    bar.clear_messages()
    request = caption_request(raster, out, tiny, tile_size=256)
    request.job.resume = False
    refused = plugin.start_caption(request)
    assert wait_until(lambda: refused.done, 120)
    assert not refused.outcome.ok and "tick Resume to continue it or choose another file" in refused.outcome.error
    failed = bar.get_messages(Qgis.MessageLevel.Critical)
    assert failed and all("--" not in m and "kept" not in m for m in failed), failed

    bar.clear_messages()
    statuses = []
    manager = QgsApplication.taskManager()
    run = CaptionRun(caption_request(raster, tmp_path / "cancel.gpkg", tiny, tile_size=64, batch_size=2),
                     plugin.iface)
    manager.statusChanged.connect(lambda tid, status: statuses.append(status))
    run.start()
    assert wait_until(lambda: run.tiles_seen > 0 or run.done, 120)
    run.cancel()
    assert wait_until(lambda: run.done, 120)
    assert run.outcome.cancelled and not run.outcome.ok and not run.outcome.error
    assert QgsTask.TaskStatus.Terminated not in statuses and QgsTask.TaskStatus.Complete in statuses
    infos = bar.get_messages(Qgis.MessageLevel.Info)
    assert any("cancelled" in m for m in infos), infos
    assert not bar.get_messages(Qgis.MessageLevel.Critical) and not bar.get_messages(Qgis.MessageLevel.Warning)


def test_gui_wording_rewrites_command_line_options():
    from rscaption_plugin.core.wording import gui_wording, has_cli_wording

    text = gui_wording("/x/out.gpkg exists; pass --overwrite to replace it or --resume to continue it")
    assert text == "/x/out.gpkg exists: tick Resume to continue it or choose another file"
    assert gui_wording("/x was written from a different model; choose another output or pass --overwrite") == \
        "/x was written from a different model; choose another output file"
    assert not has_cli_wording(gui_wording("bad value for --tile-size")) and has_cli_wording("use --resume")


NO_TORCH_DIALOG = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
from qgis.core import QgsApplication
app = QgsApplication([], True)
app.initQgis()
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtTest import QTest
from rscaption_plugin.ui.dialog import CaptionDialog
from rscaption_plugin.core.paths import torch_importable

def run():
    out = {"torch": torch_importable()}
    dlg = CaptionDialog(None)
    dlg.show()
    index = dlg.mode_combo.findData("inprocess")
    out["inprocess_enabled"] = dlg.mode_combo.model().item(index).isEnabled()
    out["inprocess_tip"] = dlg.mode_combo.itemData(index, Qt.ItemDataRole.ToolTipRole)
    modes = [dlg.mode_combo.currentData()]
    for _ in range(3):
        QTest.keyClick(dlg.mode_combo, Qt.Key.Key_Down)
        modes.append(dlg.mode_combo.currentData())
    out["modes_reached"] = modes
    out["caption_enabled"] = dlg.caption_button.isEnabled()
    out["reason"] = dlg.message_label.text()
    out["button_tip"] = dlg.caption_button.toolTip()
    QTest.mouseClick(dlg.caption_button, Qt.MouseButton.LeftButton)
    out["accepted"] = dlg.request is not None
    QTest.keyClicks(dlg.python_edit, "/nowhere/bin/python")
    out["missing_enabled"] = dlg.caption_button.isEnabled()
    out["missing_reason"] = dlg.message_label.text()
    dlg.python_edit.clear()
    QTest.keyClicks(dlg.python_edit, sys.executable)
    out["python_enabled"] = dlg.caption_button.isEnabled()
    out["python_reason"] = dlg.message_label.text()
    dlg.close()
    print("RESULT " + json.dumps(out))

run()
sys.stdout.flush()
app.exitQgis()
'''


def test_dialog_offers_only_what_can_run_in_a_qgis_python_without_torch(tmp_path):
    """QGIS's own Python (/usr/bin/python3 here) has no torch, and a packaged plugin has no project
    .venv beside it: In-process is disabled with its reason as tooltip (keyboard navigation skips
    it), Caption is disabled with the reason shown until a backend Python that exists is entered."""
    import json
    import shutil
    import subprocess

    from test_plugin_support import ROOT

    qgis_python = "/usr/bin/python3"
    probe = subprocess.run([qgis_python, "-c", "import qgis.core, importlib.util as u; "
                            "print(u.find_spec('torch') is None)"], capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "True":
        pytest.skip("needs a system Python with qgis and without torch")
    plugins = tmp_path / "plugins"
    shutil.copytree(ROOT / "rscaption_plugin", plugins / "rscaption_plugin",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "backend" / "rscaption", plugins / "rscaption_plugin" / "backend" / "rscaption",
                    ignore=shutil.ignore_patterns("__pycache__", "training"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(QT_QPA_PLATFORM="offscreen", HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run([qgis_python, "-c", NO_TORCH_DIALOG, str(plugins)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=str(tmp_path))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout + proc.stderr
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["torch"] is False
    assert out["inprocess_enabled"] is False and "cannot import torch" in out["inprocess_tip"]
    assert "inprocess" not in out["modes_reached"] and "subprocess" in out["modes_reached"]
    assert out["caption_enabled"] is False and out["accepted"] is False
    assert "Set up backend" in out["reason"] and out["button_tip"] == out["reason"]
    assert out["missing_enabled"] is False and "not found" in out["missing_reason"]
    assert out["python_enabled"] is True and out["python_reason"] == ""


INPROCESS_RUN = r'''
import json, sys
root, raster, out, model = sys.argv[1:5]
sys.path[:0] = [root, root + "/tests"]
from qgis.core import QgsApplication
app = QgsApplication([], False)
app.initQgis()

def run():
    from rscaption_plugin.ui.caption_run import CaptionRun
    from rscaption_plugin.core.inprocess_guard import compilers_loaded
    from rscaption_plugin.core.runner import run_search
    from test_plugin_support import caption_request, wait_until

    before = "torch" in sys.modules
    job = CaptionRun(caption_request(raster, out, model, mode="inprocess", tile_size=256), None).start()
    wait_until(lambda: job.done, 300)
    hits = run_search(out, "a river", 3, "inprocess", None)
    print("RESULT " + json.dumps({
        "torch_before": before, "torch_after": "torch" in sys.modules, "ok": job.outcome.ok,
        "error": job.outcome.error, "mode": job.backend.get("mode"), "hits": len(hits),
        "triton": repr(sys.modules.get("triton")), "compilers": compilers_loaded()}))
    job.layer = None

run()
sys.stdout.flush()
app.exitQgis()
'''


def test_inprocess_run_keeps_torch_compilers_out_of_the_process(geotiff, tiny, tmp_path):  # noqa: F811
    """An in-process caption and search, in a fresh QGIS process whose Python has torch *and*
    triton installed (this venv): triton (whose libtriton.so crashes the QGIS desktop) and
    inductor's compiler modules are never loaded. A fresh process because this pytest process
    has long imported torch, and with it triton, through other tests."""
    import importlib.util
    import json
    import subprocess

    from test_plugin_support import ROOT

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: nothing to keep out")
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    for key in ("TORCH_COMPILE_DISABLE", "TORCHDYNAMO_DISABLE"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", INPROCESS_RUN, str(ROOT), str(geotiff("RGB.byte.tif")),
                           str(tmp_path / "inproc.gpkg"), tiny], capture_output=True, text=True, timeout=600,
                          env=env, cwd=str(tmp_path))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["torch_before"] is False and out["torch_after"] is True
    assert out["ok"], out["error"]
    assert out["mode"] == "inprocess" and out["hits"] == 3
    assert out["triton"] == "None" and out["compilers"] == []


def test_output_carries_its_style_through_export_and_reopen(plugin, geotiff, tiny, tmp_path):  # noqa: F811
    """Caption -> export -> reopen in a fresh project: the file's default style (``layer_styles``)
    gives the rule renderer with the low-confidence rule, the caption map tip and scale-limited
    caption labels, with no fill that hides the imagery."""
    import sqlite3

    from qgis.core import QgsVectorLayer

    from rscaption_plugin.core.layers import LOW_CONFIDENCE, MAP_TIP

    run = plugin.start_caption(caption_request(geotiff("RGB.byte.tif"), tmp_path / "styled.gpkg", tiny,
                                               tile_size=256))
    assert wait_until(lambda: run.done, 180) and run.outcome.ok, run.outcome.error
    plugin.iface.setActiveLayer(run.layer)
    exported = plugin.export_active_layer(str(tmp_path / "shared.gpkg"))
    assert exported
    con = sqlite3.connect(exported)
    try:
        assert con.execute("SELECT COUNT(*) FROM layer_styles WHERE useAsDefault").fetchone()[0] == 1
    finally:
        con.close()
    QgsProject.instance().clear()

    reopened = QgsVectorLayer(f"{exported}|layername=tiles", "reopened", "ogr")
    assert reopened.isValid()
    QgsProject.instance().addMapLayer(reopened)
    renderer = reopened.renderer()
    assert renderer.type() == "RuleRenderer"
    rules = renderer.rootRule().children()
    assert any(r.filterExpression() == f'"confidence" < {LOW_CONFIDENCE}' for r in rules)
    for rule in rules:
        fill = rule.symbol().symbolLayer(0)
        assert fill.fillColor().alpha() == 0 and fill.strokeWidth() <= 0.5
    assert reopened.mapTipTemplate() == MAP_TIP
    assert reopened.labelsEnabled()
    labels = reopened.labeling().settings()
    assert labels.fieldName == "caption" and labels.scaleVisibility and labels.minimumScale > 0


def test_dock_highlight_leaves_the_imagery_visible(plugin, captioned):  # noqa: F811
    """After a search the hits are selected in a see-through colour and filled at most half
    opaque; when the dock's layer is removed its old hits are cleared."""
    from qgis.core import QgsRenderContext, QgsVectorLayer
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtGui import QColor
    from qgis.PyQt.QtTest import QTest

    canvas = plugin.iface.mapCanvas()
    canvas.setSelectionColor(QColor(255, 255, 0, 255))  # QGIS's default: opaque yellow
    layer = QgsVectorLayer(f"{captioned}|layername=tiles", "tiles", "ogr")
    QgsProject.instance().addMapLayer(layer)
    dock = plugin.dock
    dock.set_layer(layer)
    _type(dock.query_edit, "a river with green fields")
    QTest.keyClick(dock.query_edit, Qt.Key.Key_Return)
    assert wait_until(lambda: not dock.searching, 120) and dock.error is None, dock.error
    assert dock.hits and layer.selectedFeatureCount() == 1  # the listed hit (issue 22: all hid the colours)
    assert canvas.selectionColor().alpha() < 128
    assert dock.results.wordWrap()  # long captions wrap at words; the tooltip has the whole caption
    assert dock.results.item(0).toolTip().startswith(dock.hits[0]["caption"])
    ctx = QgsRenderContext()
    renderer = layer.renderer()
    renderer.startRender(ctx, layer.fields())
    try:
        for feat in layer.getFeatures():
            for sym in renderer.symbolsForFeature(feat, ctx):
                assert sym.symbolLayer(0).fillColor().alpha() <= 127
    finally:
        renderer.stopRender(ctx)

    QgsProject.instance().removeMapLayer(layer.id())
    assert dock.hits == [] and dock.results.count() == 0
    assert "hits cleared" in dock.status.text()


def test_dialog_remembers_choices_and_has_help(qgis_iface, qgis_new_project, fresh_settings, geotiff, tiny,
                                              tmp_path):  # noqa: F811
    """Mode, output choice and path chosen with the keyboard and mouse come back in the next
    dialog; Help opens a help window beside the dialog."""
    from qgis.PyQt.QtCore import Qt

    dlg = _dialog(qgis_iface, geotiff, tiny)
    while dlg.mode_combo.currentData() != "subprocess":
        _key(dlg.mode_combo, Qt.Key.Key_Down)
    _type(dlg.python_edit, sys.executable)
    _key(dlg.output_combo, Qt.Key.Key_Down)
    path = str(tmp_path / "kept.gpkg")
    _type(dlg.output_file.lineEdit(), path)
    _click(dlg.caption_button)
    assert dlg.request is not None and dlg.request.mode == "subprocess" and dlg.request.job.out == path

    again = _dialog(qgis_iface, geotiff, tiny)
    assert again.mode_combo.currentData() == "subprocess"
    assert again.output_combo.currentData() == "file" and again.output_file.isEnabled()
    assert again.output_file.filePath() == path

    _click(again.help_button)
    assert again.help_box is not None and again.help_box.isVisible() and not again.help_box.isModal()
    assert "Resume" in again.help_box.text() and "In-process" in again.help_box.text()
    again.help_box.close()


def test_model_card_text_is_cut_at_a_word_with_the_whole_text_as_tooltip(qgis_iface, qgis_new_project,
                                                                        fresh_settings, geotiff, tiny, tmp_path):  # noqa: F811
    import json
    import shutil

    model = tmp_path / "described"
    shutil.copytree(tiny, model)
    config = json.loads((model / "config.json").read_text())
    words = ["captions"] + [f"remote{i:02d}sensing" for i in range(30)]
    config.setdefault("card", {})["description"] = " ".join(words)
    (model / "config.json").write_text(json.dumps(config))
    dlg = _dialog(qgis_iface, geotiff, str(model))
    shown = dlg.card_label.text()
    assert dlg.card_label.wordWrap()
    assert shown.endswith("…")
    tail = shown.rstrip("…").split()[-1]
    assert tail in words  # a whole word before the ellipsis, never half of one
    assert config["card"]["description"] in dlg.card_label.toolTip()

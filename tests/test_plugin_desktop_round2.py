"""Issue 22 in the real QGIS desktop (``qgis`` under Xvfb, a fresh profile, the plugin installed from
its zip, in-process backend): the three paths a person hit in QGIS 3.22, in the style of
test_plugin_desktop.py. A script inside QGIS drives the caption dialog and the plugin and writes
what it saw as JSON; QGIS's own message log is recorded throughout.

- no CRS: the dialog asks the ground resolution, the run uses it, the result layer has no CRS,
  and showing it, searching it and zooming to a hit in an EPSG:4326 project log no transform error;
- refused run: the remembered output with Resume ticked and another raster: refused in the
  dialog, and a refusal from the backend adds no layer, leaves the file's bytes and the map scale;
- resume: a 64 px run, then the dialog again restores 64 px from the file and Caption resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from test_plugin_desktop import _qgis_desktop
from test_plugin_support import ROOT, gpkg_tile_count

SCRIPT = textwrap.dedent(r"""
    import hashlib, json, sys, time, traceback
    from qgis.core import (Qgis, QgsApplication, QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer,
                           QgsSettings)
    from qgis.PyQt.QtCore import QTimer
    from qgis.PyQt.QtWidgets import QApplication
    import qgis.utils
    from qgis.utils import iface

    CFG = json.loads(__CFG__)
    result = {"stage": "started", "log": []}
    QgsApplication.messageLog().messageReceived.connect(
        lambda msg, tag, level: result["log"].append([tag, int(level), msg]))

    def sha(path):
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()

    def finish(stage):
        result["stage"] = stage
        with open(CFG["result"], "w") as fh:
            json.dump(result, fh)
        QgsProject.instance().clear()  # as File > Exit does (test_plugin_desktop says why)
        QApplication.instance().quit()

    def dialog(layer):
        from rscaption_plugin.ui.dialog import CaptionDialog
        iface.setActiveLayer(layer)
        return CaptionDialog(iface)

    def steps():
        s = QgsSettings()
        s.setValue("rscaption/backend_mode", "inprocess")
        s.setValue("rscaption/device", "cpu")
        assert qgis.utils.loadPlugin("rscaption_plugin") and qgis.utils.startPlugin("rscaption_plugin")
        plugin = qgis.utils.plugins["rscaption_plugin"]
        canvas = iface.mapCanvas()
        QgsProject.instance().setCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
        canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:4326"))

        # -- no CRS -----------------------------------------------------------------------------
        naip = QgsRasterLayer(CFG["no_crs"], "naip")
        QgsProject.instance().addMapLayer(naip)
        dlg = dialog(naip)
        dlg.model_combo.setCurrentText(CFG["model"])
        r = result["no_crs"] = {"note": dlg.source_note.text(), "asked": not dlg.ground_spin.isHidden(),
                                "warned": dlg.warning_label.text()}
        dlg.ground_spin.setValue(5.0)
        r["footprint"] = dlg.footprint_label.text()
        dlg.output_combo.setCurrentIndex(dlg.output_combo.findData("file"))
        dlg.output_file.setFilePath(CFG["naip_gpkg"])
        dlg.accept()
        run = plugin.start_caption(dlg.request)
        yield lambda: run.done
        r.update(ok=run.outcome.ok, error=run.outcome.error, ground=run.request.job.ground_resolution,
                 layer_crs_valid=run.layer.crs().isValid() if run.layer else None,
                 features=run.layer.featureCount() if run.layer else None)
        dock = plugin.dock
        dock.set_layer(run.layer)
        plugin.show_dock()
        dock.search("a field")
        yield lambda: not dock.searching
        r["dock_error"], r["hits"] = dock.error, len(dock.hits)
        before = canvas.extent().toString()
        dock.next_button.click()
        canvas.refresh()
        t0 = time.time()
        yield lambda: time.time() - t0 > 2 and not canvas.isDrawing()
        r["zoomed"] = canvas.extent().toString() != before

        # -- refused run ------------------------------------------------------------------------
        QgsProject.instance().removeMapLayer(run.layer.id())
        QgsProject.instance().removeMapLayer(naip.id())
        rgb = QgsRasterLayer(CFG["rgb"], "rgb")
        QgsProject.instance().addMapLayer(rgb)
        canvas.setExtent(rgb.extent() if not rgb.crs().isValid() else canvas.fullExtent())
        canvas.refresh()
        t0 = time.time()
        yield lambda: time.time() - t0 > 1 and not canvas.isDrawing()
        r = result["refused"] = {"sha_before": sha(CFG["naip_gpkg"]), "scale_before": canvas.scale(),
                                 "layers_before": sorted(l.name() for l in QgsProject.instance().mapLayers().values())}
        dlg = dialog(rgb)  # remembers the NAIP output, Resume ticked
        r["remembered"] = dlg.output_file.filePath()
        r["resume"] = dlg.resume_check.isChecked()
        dlg.accept()
        r["dialog_request"] = dlg.request is not None
        r["dialog_message"] = dlg.message_label.text()
        from rscaption_plugin.core.runner import CaptionJob
        from rscaption_plugin.ui.dialog import CaptionRequest
        job = CaptionJob(raster=CFG["rgb"], out=CFG["naip_gpkg"], model=CFG["model"], tile_size=64, device="cpu")
        refused = plugin.start_caption(CaptionRequest(job, "inprocess", None, "rgb captions", False))
        yield lambda: refused.done
        t0 = time.time()
        yield lambda: time.time() - t0 > 1 and not canvas.isDrawing()
        r.update(ok=refused.outcome.ok, error=refused.outcome.error, sha_after=sha(CFG["naip_gpkg"]),
                 scale_after=canvas.scale(),
                 layers_after=sorted(l.name() for l in QgsProject.instance().mapLayers().values()))

        # -- resume -----------------------------------------------------------------------------
        dlg = dialog(rgb)
        dlg.model_combo.setCurrentText(CFG["model"])
        dlg.auto_tile_check.setChecked(False)
        dlg.tile_spin.setValue(64)
        dlg.output_file.setFilePath(CFG["rgb_gpkg"])
        dlg.accept()
        first = plugin.start_caption(dlg.request)
        yield lambda: first.done
        r = result["resume"] = {"first_ok": first.outcome.ok, "first_error": first.outcome.error,
                                "first": first.outcome.summary}
        dlg = dialog(rgb)
        r.update(auto=dlg.auto_tile_check.isChecked(), tile=dlg.tile_spin.value(), note=dlg.resume_note.text())
        dlg.accept()
        r["accepted"] = dlg.request is not None
        again = plugin.start_caption(dlg.request) if dlg.request is not None else None
        if again is not None:
            yield lambda: again.done
            r.update(ok=again.outcome.ok, error=again.outcome.error, summary=again.outcome.summary)
        finish("done")

    gen = steps()
    state = {"wait": lambda: True, "t0": time.time()}

    def tick():
        try:
            if time.time() - state["t0"] > CFG["timeout"]:
                return finish("timeout")
            if state["wait"]():
                state["wait"] = next(gen)
        except StopIteration:
            return
        except Exception:
            result["exception"] = traceback.format_exc()
            return finish("exception")
        QTimer.singleShot(200, tick)

    QTimer.singleShot(500, tick)
""")


def _no_crs_naip(src, dst):
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with rasterio.open(src) as ds:
        data = ds.read([1, 2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(dst, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=3,
                           dtype="uint8") as out:
            out.write(data)


@pytest.mark.slow
def test_real_qgis_desktop_no_crs_refused_run_and_resume(geotiff, tmp_path):
    _qgis_desktop()
    sys.path.insert(0, str(ROOT / "tools"))
    import package_plugin
    from test_tile_size import model_with_anchors

    home = tmp_path / "home"
    plugins = home / ".local/share/QGIS/QGIS3/profiles/default/python/plugins"
    package_plugin.install(package_plugin.build(tmp_path / "dist"), plugins)
    model = model_with_anchors(tmp_path / "anchored")
    rgb = tmp_path / "RGB.byte.tif"
    shutil.copy(geotiff("RGB.byte.tif"), rgb)
    no_crs = tmp_path / "naip_no_crs.tif"
    _no_crs_naip(geotiff("m_4709963_se_14_1_20090818.tif"), no_crs)
    cfg = {"no_crs": str(no_crs), "rgb": str(rgb), "model": model, "naip_gpkg": str(tmp_path / "naip.gpkg"),
           "rgb_gpkg": str(tmp_path / "rgb.gpkg"), "result": str(tmp_path / "result.json"), "timeout": 420}
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.replace("__CFG__", repr(json.dumps(cfg))), encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if k not in ("QT_QPA_PLATFORM", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("QGIS_")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(tmp_path / "cache"), HF_HUB_OFFLINE="1",
               PYTHONPATH=sysconfig.get_paths()["purelib"])
    cmd = ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24", "qgis", "--nologo", "--noversioncheck",
           "--code", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    tail = f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, "QGIS did not exit cleanly (a crash?)\n" + tail
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["stage"] == "done", json.dumps({k: v for k, v in result.items() if k != "log"}, indent=1) + tail

    no = result["no_crs"]
    assert no["note"].endswith("no CRS") and no["asked"] and "no CRS" in no["warned"]
    assert "at 5.00 m/px" in no["footprint"]
    assert no["ok"], no["error"]
    assert no["ground"] == 5.0 and no["layer_crs_valid"] is False and no["features"] == gpkg_tile_count(cfg["naip_gpkg"])
    assert no["dock_error"] is None and no["hits"] > 0 and no["zoomed"]
    transform = [m for m in result["log"] if "transform" in m[2].lower() or "Undefined" in m[2]]
    assert transform == [], transform  # no CRS on the output: no transform attempted, none failing

    ref = result["refused"]
    assert ref["remembered"] == cfg["naip_gpkg"] and ref["resume"]
    assert ref["dialog_request"] is False and "naip_no_crs.tif" in ref["dialog_message"]
    assert not ref["ok"] and "different raster" in ref["error"]
    assert ref["sha_after"] == ref["sha_before"] == hashlib.sha256((tmp_path / "naip.gpkg").read_bytes()).hexdigest()
    assert ref["layers_after"] == ref["layers_before"] and ref["scale_after"] == pytest.approx(ref["scale_before"])

    res = result["resume"]
    assert res["first_ok"], res["first_error"]
    assert res["auto"] is False and res["tile"] == 64 and "64 px" in res["note"]
    assert res["accepted"] and res["ok"], res.get("error")
    total = gpkg_tile_count(cfg["rgb_gpkg"])
    assert res["summary"]["resumed"] == total == res["first"]["written"] and res["summary"]["written"] == 0

    warning, critical = 1, 2  # Qgis.MessageLevel
    problems = [m for m in result["log"] if m[1] in (warning, critical) and not m[2].startswith("captioning failed:")
                and m[0] not in ("Messages", "Network")]  # the bar repeats its messages under "Messages";
    # "Network": QGIS 3.44 fetches its plugin repository/news at start and a machine without network says so
    assert problems == [], problems

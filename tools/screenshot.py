#!/usr/bin/env python3
"""Make docs/screenshot.png: the real QGIS desktop (under Xvfb) with the installed plugin, a
captioned tile layer over a shared GeoTIFF and the search dock showing ranked results.

    .venv/bin/python tools/screenshot.py [--raster PATH] [--query TEXT] [--model default|DIR]

Steps: package + install the plugin into a throw-away QGIS profile, start ``qgis --code`` under
``xvfb-run``, where a script loads the raster, starts the plugin, captions the raster through the
plugin's caption dialog + task (subprocess backend, since QGIS's Python has no torch), runs a
search through the dock and grabs the main window.
Needs the ``qgis`` and ``xvfb`` Debian packages and ../shared/data.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
DEFAULT_RASTER = ROOT.parent / "shared" / "data" / "geotiff" / "m_4709963_se_14_1_20200831.tif"

SHOT = textwrap.dedent(r"""
    import json, sys, time
    from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer, QgsSettings
    from qgis.PyQt.QtCore import QTimer, Qt
    from qgis.PyQt.QtWidgets import QApplication
    import qgis.utils
    from qgis.utils import iface

    CFG = json.loads(__CFG__)
    s = QgsSettings()
    s.setValue("rscaption/backend_mode", "subprocess")
    s.setValue("rscaption/backend_python", CFG["python"])
    s.setValue("rscaption/device", "cpu")

    raster = QgsRasterLayer(CFG["raster"], "NAIP 2020 (shared GeoTIFF)")
    r = raster.renderer()
    if raster.bandCount() >= 3 and hasattr(r, "setRedBand"):
        r.setRedBand(1); r.setGreenBand(2); r.setBlueBand(3)
    QgsProject.instance().addMapLayer(raster)
    qgis.utils.loadPlugin("rscaption_plugin")
    qgis.utils.startPlugin("rscaption_plugin")
    plugin = qgis.utils.plugins["rscaption_plugin"]
    iface.setActiveLayer(raster)
    # Caption through the plugin itself: the dialog builds the request, a QgsTask runs it with
    # the subprocess backend (QGIS's Python has no torch) and the layer fills in as batches land.
    from rscaption_plugin.ui.dialog import CaptionDialog
    dlg = CaptionDialog(iface)
    dlg.model_combo.setCurrentText(CFG["model"])
    if CFG["tile_size"]:
        dlg.auto_tile_check.setChecked(False)
        dlg.tile_spin.setValue(CFG["tile_size"])
    dlg.bands_edit.setText("1,2,3")
    dlg.output_combo.setCurrentIndex(dlg.output_combo.findData("file"))
    dlg.output_file.setFilePath(CFG["gpkg"])
    dlg.mode_combo.setCurrentIndex(dlg.mode_combo.findData("subprocess"))
    request = dlg.build_request()
    request.layer_name = "captions"
    run = plugin.start_caption(request)
    # no restyling here: the layer, the selection and the highlights are drawn as users see them
    from qgis.PyQt.QtWidgets import QDockWidget
    for d in iface.mainWindow().findChildren(QDockWidget):
        if d.objectName() in ("Browser", "Browser2", "AdvancedDigitizingTools", "ProcessingToolbox"):
            d.hide()
    iface.mainWindow().showNormal()
    iface.mainWindow().setGeometry(0, 0, CFG["width"], CFG["height"])
    canvas = iface.mapCanvas()
    canvas.setExtent(raster.extent())
    canvas.refresh()
    dock = plugin.dock
    plugin.toggle_dock()
    dock.k_spin.setValue(CFG["k"])
    dock.setMinimumWidth(430)
    state = {"t0": time.time(), "searched": False}

    def shoot():
        iface.mainWindow().grab().save(CFG["out"], "PNG")
        print("SHOT", CFG["out"], "hits", len(dock.hits), "status", dock.status.text(), flush=True)
        from rscaption_plugin.core.backend_client import POOL
        POOL.shutdown()
        QgsProject.instance().clear()  # as File > Exit does; see tests/test_plugin_desktop.py
        QApplication.instance().quit()

    def poll():
        if not run.done:
            QTimer.singleShot(500, poll)
            return
        if not state["searched"]:
            print("CAPTION", run.outcome, flush=True)
            tiles = run.layer
            iface.setActiveLayer(tiles)
            dock.set_layer(tiles)
            state["searched"] = True
            dock.search(CFG["query"])
        elif not dock.searching:
            if dock.hits:
                dock.results.setCurrentRow(0)
                canvas.setExtent(raster.extent())
                canvas.refresh()
            QTimer.singleShot(2500, shoot)
            return
        if time.time() - state["t0"] > 420:
            shoot(); return
        QTimer.singleShot(500, poll)

    QTimer.singleShot(3000, poll)
""")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raster", default=str(DEFAULT_RASTER))
    p.add_argument("--query", default="green farmland")
    p.add_argument("--model", default=None, help="default (when installed) or a checkpoint dir; else a tiny model")
    p.add_argument("--tile-size", type=int, default=0, help="0: auto, from the ground resolution and the model card")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "docs" / "screenshot.png"))
    p.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    args = p.parse_args(argv)
    if not Path(args.raster).is_file():
        print(f"raster not found: {args.raster} (needs ../shared/data)")
        return 2
    if shutil.which("qgis") is None or shutil.which("xvfb-run") is None:
        print("needs the Debian packages qgis and xvfb: apt-get install -y --no-install-recommends qgis xvfb")
        return 2

    import package_plugin

    work = Path(tempfile.mkdtemp(prefix="rscaption-shot-"))
    home = work / "home"
    plugins = home / ".local/share/QGIS/QGIS3/profiles/default/python/plugins"
    package_plugin.install(package_plugin.build(work / "dist"), plugins)

    model = args.model
    if model is None:
        model = "default" if (ROOT / "resources" / "default_model" / "config.json").is_file() else None
    if model is None:
        model = str(work / "tiny-model")
        subprocess.run([args.python, "-c", f"from rscaption.models.tiny import build_tiny_captioner as b; "
                                           f"b().save({model!r})"], check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT / "backend")))
        print("no default model yet: using a tiny random model (captions are meaningless)")
    gpkg = str(work / "captions.gpkg")
    raw = work / "raw.png"
    import json

    cfg = {"raster": args.raster, "gpkg": gpkg, "python": args.python, "query": args.query, "k": args.k,
           "out": str(raw), "width": 1600, "height": 1000,
           "model": model, "tile_size": args.tile_size}
    shot = work / "shot.py"
    shot.write_text(SHOT.replace("__CFG__", repr(json.dumps(cfg))), encoding="utf-8")
    # GDAL_PAM_ENABLED=NO: QGIS computes the raster layer's statistics for its renderer and would
    # save them as RASTER.aux.xml beside the shared input
    env = dict(os.environ, HOME=str(home), HF_HUB_OFFLINE="1", GDAL_PAM_ENABLED="NO")
    env.pop("QT_QPA_PLATFORM", None)
    cmd = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", "qgis", "--nologo", "--noversioncheck", "--code", str(shot)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith(("SHOT", "CAPTION"))))
    if not raw.is_file():
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return 1
    shrink(raw, Path(args.out))
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e3:.0f} kB)")
    return 0


def shrink(src: Path, dst: Path, limit: int = 500_000) -> None:
    """Keep the PNG under ``limit`` bytes: palette-quantise, then downscale if still too big."""
    from PIL import Image

    img = Image.open(src).convert("RGB")
    dst.parent.mkdir(parents=True, exist_ok=True)
    for width in (img.width, 1400, 1200, 1000):
        im = img if width == img.width else img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
        im.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)
        if dst.stat().st_size <= limit:
            return


if __name__ == "__main__":
    sys.exit(main())

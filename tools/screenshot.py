#!/usr/bin/env python3
"""Make docs/screenshot.png: the real QGIS desktop (under Xvfb) with the installed plugin, a
captioned tile layer over a shared GeoTIFF and the search dock showing ranked results.

    .venv/bin/python tools/screenshot.py [--raster PATH] [--query TEXT] [--model default|DIR]
    .venv/bin/python tools/screenshot.py --change CHANGES.gpkg [--before PATH] [--raster PATH]
    .venv/bin/python tools/screenshot.py --no-match     # docs/screenshot_no_match.png ("houses" on farmland)
    .venv/bin/python tools/screenshot.py --cli-file     # docs/screenshot_cli_file.png (a CLI file, no plugin)

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
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
DEFAULT_RASTER = ROOT.parent / "shared" / "data" / "geotiff" / "m_4709963_se_14_1_20200831.tif"
DEFAULT_BEFORE = ROOT.parent / "shared" / "data" / "geotiff" / "m_4709963_se_14_1_20090818.tif"

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

# --change GPKG: the two dates under a change layer (styled by the plugin) and the dock's "most
# changed" list with the first tile's before/after pair; the whole raster stays in view.
SHOT_CHANGE = textwrap.dedent(r"""
    import json, time
    from qgis.core import QgsProject, QgsRasterLayer, QgsSettings
    from qgis.PyQt.QtCore import QTimer
    from qgis.PyQt.QtWidgets import QApplication, QDockWidget
    import qgis.utils
    from qgis.utils import iface

    CFG = json.loads(__CFG__)
    s = QgsSettings()  # a backend is set up, as on a user's machine (no "set up backend" prompt)
    s.setValue("rscaption/backend_mode", "subprocess")
    s.setValue("rscaption/backend_python", CFG["python"])
    layers = []
    for path, name in ((CFG["before"], CFG["before_name"]), (CFG["raster"], CFG["after_name"])):
        raster = QgsRasterLayer(path, name)
        r = raster.renderer()
        if raster.bandCount() >= 3 and hasattr(r, "setRedBand"):
            r.setRedBand(1); r.setGreenBand(2); r.setBlueBand(3)
        QgsProject.instance().addMapLayer(raster)
        layers.append(raster)
    QgsProject.instance().layerTreeRoot().findLayer(layers[0].id()).setItemVisibilityChecked(False)
    qgis.utils.loadPlugin("rscaption_plugin")
    qgis.utils.startPlugin("rscaption_plugin")
    plugin = qgis.utils.plugins["rscaption_plugin"]
    from rscaption_plugin.core.change_layers import open_change_layer
    changes = open_change_layer(CFG["change"], CFG["change_name"])
    QgsProject.instance().addMapLayer(changes)
    iface.setActiveLayer(changes)
    for d in iface.mainWindow().findChildren(QDockWidget):
        if d.objectName() in ("Browser", "Browser2", "AdvancedDigitizingTools", "ProcessingToolbox"):
            d.hide()
    iface.mainWindow().showNormal()
    iface.mainWindow().setGeometry(0, 0, CFG["width"], CFG["height"])
    dock = plugin.dock
    plugin.toggle_dock()
    dock.set_layer(changes)
    dock.setMinimumWidth(430)
    canvas = iface.mapCanvas()

    def shoot():
        iface.mainWindow().grab().save(CFG["out"], "PNG")
        panel = dock.change_panel
        print("SHOT", CFG["out"], "listed", len(panel.tiles), "pair", panel.pair_label.text(), flush=True)
        QgsProject.instance().clear()
        QApplication.instance().quit()

    def show():
        panel = dock.change_panel
        if panel.tiles:
            panel.list.setCurrentRow(0)  # selects the most changed tile and shows its pair
        canvas.setExtent(layers[1].extent())
        canvas.refresh()
        QTimer.singleShot(3000, shoot)

    QTimer.singleShot(2500, show)
""")

# --cli-file: a GeoPackage made by ``rscaption caption`` (no plugin anywhere near it) opened with
# Add Vector Layer in a plain QGIS: the style, labels and two-decimal confidence come from the
# file's own layer_styles row, written by the backend. The plugin is installed but never started.
SHOT_CLI = textwrap.dedent(r"""
    import json
    from qgis.core import QgsProject, QgsRasterLayer, QgsRectangle, QgsSettings
    from qgis.PyQt.QtCore import QTimer
    from qgis.PyQt.QtWidgets import QApplication, QDockWidget
    from qgis.utils import iface

    CFG = json.loads(__CFG__)
    raster = QgsRasterLayer(CFG["raster"], "NAIP 2020 (shared GeoTIFF)")
    r = raster.renderer()
    if raster.bandCount() >= 3 and hasattr(r, "setRedBand"):
        r.setRedBand(1); r.setGreenBand(2); r.setBlueBand(3)
    QgsProject.instance().addMapLayer(raster)
    QgsProject.instance().setCrs(raster.crs())  # a fresh profile's EPSG:4326 would ask for a datum transform
    tiles = iface.addVectorLayer(CFG["gpkg"] + "|layername=tiles", "made by the CLI", "ogr")  # Add Vector Layer
    for d in iface.mainWindow().findChildren(QDockWidget):
        if d.objectName() in ("Browser", "Browser2", "AdvancedDigitizingTools", "ProcessingToolbox"):
            d.hide()
    iface.mainWindow().showNormal()
    iface.mainWindow().setGeometry(0, 0, CFG["width"], CFG["height"])
    QgsSettings().setValue("qgis/dockAttributeTable", True)  # the table beside the map, in the shot
    canvas = iface.mapCanvas()

    def show():
        # the east edge, a few tiles down: outlines, labels, the hatched low-confidence tiles and the
        # narrow last column (the part of its window the column before it does not cover)
        e, step = tiles.extent(), CFG["tile_m"]
        canvas.setExtent(QgsRectangle(e.xMaximum() - 4.6 * step, e.yMaximum() - 5.3 * step, e.xMaximum() + 0.05 * step,
                                      e.yMaximum() - 2.75 * step))
        canvas.refresh()
        iface.showAttributeTable(tiles)
        QTimer.singleShot(3500, shoot)

    def shoot():
        iface.mainWindow().grab().save(CFG["out"], "PNG")
        print("SHOT", CFG["out"], "renderer", tiles.renderer().type(), "labels", tiles.labelsEnabled(),
              "scale", round(canvas.scale()), flush=True)
        QgsProject.instance().clear()
        QApplication.instance().quit()

    QTimer.singleShot(2500, show)
""")


def make_captions(raster: str, out: str, model: str, python: str) -> None:
    """``rscaption caption`` through the CLI, as a server makes the file (--cli-file)."""
    cmd = [python, "-m", "rscaption.cli", "caption", raster, "-o", out, "--model", model, "--bands", "1,2,3", "-q"]
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "backend"), HF_HUB_OFFLINE="1"))


def _year(path: str) -> str:
    import re

    found = re.findall(r"(?<!\d)((?:19|20)\d{2})(?:\d{4})?(?!\d)", Path(path).stem)
    return found[-1] if found else Path(path).stem


def make_change(before: str, after: str, out: str, model: str, python: str) -> None:
    """``rscaption change`` through the CLI, as a user makes the file the screenshot shows."""
    cmd = [python, "-m", "rscaption.cli", "change", before, after, "-o", out, "--model", model, "-q"]
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "backend"), HF_HUB_OFFLINE="1"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raster", default=str(DEFAULT_RASTER))
    p.add_argument("--query", default="green farmland")
    p.add_argument("--model", default=None, help="default (when installed) or a checkpoint dir; else a tiny model")
    p.add_argument("--tile-size", type=int, default=0, help="0: auto, from the ground resolution and the model card")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "docs" / "screenshot.png"))
    p.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    p.add_argument("--change", default=None, metavar="GPKG",
                   help="show this change GeoPackage (rscaption change) over --before and --raster (the after "
                        "date) with the dock's most changed tiles; made first with the CLI when it does not exist")
    p.add_argument("--before", default=str(DEFAULT_BEFORE), help="the before date's raster (with --change)")
    p.add_argument("--no-match", action="store_true",
                   help="search 'houses' on the farm scene: the dock's \"no good match\" line "
                        "(docs/screenshot_no_match.png)")
    p.add_argument("--cli-file", action="store_true",
                   help="caption with the CLI, then open the file in a QGIS without the plugin: the style "
                        "the backend wrote (docs/screenshot_cli_file.png)")
    args = p.parse_args(argv)
    if args.no_match:
        args.query = "houses" if args.query == "green farmland" else args.query
        args.k = max(args.k, 10)
        if args.out == str(ROOT / "docs" / "screenshot.png"):
            args.out = str(ROOT / "docs" / "screenshot_no_match.png")
    if args.cli_file and args.out == str(ROOT / "docs" / "screenshot.png"):
        args.out = str(ROOT / "docs" / "screenshot_cli_file.png")
    if args.change and args.out == str(ROOT / "docs" / "screenshot.png"):
        args.out = str(ROOT / "docs" / "screenshot_change.png")
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
    script = SHOT
    if args.change:
        if not Path(args.change).is_file():
            make_change(args.before, args.raster, args.change, model, args.python)
        cfg.update(change=str(Path(args.change).resolve()), before=args.before, change_name="changes",
                   before_name=f"before ({_year(args.before)})", after_name=f"after ({_year(args.raster)})")
        script = SHOT_CHANGE
    if args.cli_file:
        make_captions(args.raster, gpkg, model, args.python)
        con = sqlite3.connect(gpkg)
        cfg["tile_m"] = json.loads(con.execute("SELECT value FROM rscaption_metadata WHERE key = 'tile_footprint'")
                                   .fetchone()[0])["footprint_m"]
        con.close()
        script = SHOT_CLI
    shot = work / "shot.py"
    shot.write_text(script.replace("__CFG__", repr(json.dumps(cfg))), encoding="utf-8")
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

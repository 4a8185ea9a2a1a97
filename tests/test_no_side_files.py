"""Tests leave nothing beside the shared rasters (issue 11: QGIS wrote .aux.xml statistics there)."""

from __future__ import annotations

import os

import pytest

from conftest import GEOTIFF_DIR, require_shared
from test_plugin_support import caption_request, tiny_model_dir, wait_until

pytest.importorskip("qgis.core")


def test_pam_is_off_for_the_test_session():
    assert os.environ.get("GDAL_PAM_ENABLED") == "NO"


def test_plugin_run_leaves_no_file_beside_the_shared_rasters(qgis_new_project, tmp_path_factory, tmp_path):
    from qgis.core import QgsProject, QgsRasterLayer

    from rscaption_plugin.ui.caption_run import CaptionRun

    require_shared("geotiff", "RGB.byte.tif")
    before = sorted(os.listdir(GEOTIFF_DIR))

    def open_every_raster():  # what the plugin tests and the dialog do with the shared rasters
        layers = [QgsRasterLayer(str(GEOTIFF_DIR / name), name) for name in before if name.endswith(".tif")]
        assert layers and all(layer.isValid() for layer in layers)
        QgsProject.instance().addMapLayers(layers)

    open_every_raster()
    request = caption_request(GEOTIFF_DIR / "RGB.byte.tif", tmp_path / "o.gpkg", tiny_model_dir(tmp_path_factory),
                              tile_size=256)
    run = CaptionRun(request, None).start()
    assert wait_until(lambda: run.done, 180) and run.outcome.ok, run.outcome.error
    QgsProject.instance().removeAllMapLayers()
    assert sorted(os.listdir(GEOTIFF_DIR)) == before

"""The caption dialog's auto tile size through real PyQGIS (offscreen): on by default, the footprint
in metres for georeferenced layers, the "no CRS" note otherwise, and the same number as the CLI."""

from __future__ import annotations

import math

import pytest
from affine import Affine

from test_plugin_support import tiny_model_dir  # noqa: F401  (puts the plugin on sys.path)
from test_tile_size import model_with_anchors, utm_raster, write_raster

pytest.importorskip("qgis.core")

from qgis.core import QgsProject, QgsRasterLayer  # noqa: E402


@pytest.fixture(scope="module")
def anchored_model(tmp_path_factory) -> str:
    return model_with_anchors(tmp_path_factory.mktemp("anchored_model_plugin"))


def _dialog(qgis_iface, path, model):
    from rscaption_plugin.ui.dialog import CaptionDialog

    layer = QgsRasterLayer(str(path), path.stem)
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    qgis_iface.setActiveLayer(layer)
    dlg = CaptionDialog(qgis_iface)
    dlg.model_combo.setCurrentText(model)
    assert dlg.layer_combo.currentLayer() is layer
    return dlg


def test_dialog_auto_tile_size_shows_the_footprint_in_metres(qgis_iface, qgis_new_project, tmp_path,
                                                             anchored_model):
    dlg = _dialog(qgis_iface, utm_raster(tmp_path / "utm10.tif", 10.0), anchored_model)
    try:
        assert dlg.auto_tile_check.isChecked() and not dlg.tile_spin.isEnabled()
        assert dlg.tile_spin.value() == 64
        assert dlg.footprint_label.text() == "64 px at 10.00 m/px = 640 m footprint (auto from the model card)"
        assert dlg.build_request().job.tile_size is None  # the backend picks, from the same rule

        dlg.auto_tile_check.setChecked(False)
        assert dlg.tile_spin.isEnabled()
        dlg.tile_spin.setValue(100)
        assert dlg.footprint_label.text() == "100 px at 10.00 m/px = 1,000 m footprint (as given)"
        assert dlg.build_request().job.tile_size == 100
    finally:
        QgsProject.instance().removeAllMapLayers()


def test_dialog_measures_a_geographic_layer_at_its_centre(qgis_iface, qgis_new_project, tmp_path,
                                                          anchored_model):
    from rscaption.raster.ground import ground_resolution
    from rscaption_plugin.core.footprint import layer_ground_resolution

    step = 0.0001
    path = write_raster(tmp_path / "wgs84.tif", "EPSG:4326", Affine(step, 0, 10.0, 0, -step, 45.0 + 64 * step))
    dlg = _dialog(qgis_iface, path, anchored_model)
    try:
        m = layer_ground_resolution(dlg.layer_combo.currentLayer())
        assert m == pytest.approx(ground_resolution(path).m_per_px, rel=1e-6)
        assert m == pytest.approx(math.sqrt(7.885 * 11.113), rel=1e-3)
        assert "m/px" in dlg.footprint_label.text() and "auto" in dlg.footprint_label.text()
    finally:
        QgsProject.instance().removeAllMapLayers()


def test_dialog_says_a_raster_without_crs_keeps_a_pixel_tile_size(qgis_iface, qgis_new_project, tmp_path,
                                                                  anchored_model):
    dlg = _dialog(qgis_iface, write_raster(tmp_path / "plain.tif"), anchored_model)
    try:
        assert dlg.auto_tile_check.isChecked()
        assert dlg.tile_spin.value() == 256  # the card's pixel tile size
        assert dlg.footprint_label.text() == "256 px (raster has no CRS: pixel tile size; footprint unknown)"
    finally:
        QgsProject.instance().removeAllMapLayers()

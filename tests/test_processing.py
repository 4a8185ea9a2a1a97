"""The Processing provider through ``processing.run`` (as scripts, the modeler and qgis_process use it)."""

from __future__ import annotations

import json
import sys

import pytest

from test_plugin_support import gpkg_tile_count, tiny_model_dir

pytest.importorskip("qgis.core")
sys.path.append("/usr/share/qgis/python/plugins")  # Debian's Processing plugin

from qgis.core import QgsApplication, QgsProject, QgsVectorLayer  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def provider(qgis_app):
    processing_mod = pytest.importorskip("processing")
    from processing.core.Processing import Processing

    from rscaption_plugin.processing_provider import RscaptionProvider

    Processing.initialize()
    registry = QgsApplication.processingRegistry()
    if registry.providerById("rscaption") is None:
        prov = RscaptionProvider()
        registry.addProvider(prov)
    yield processing_mod
    prov = registry.providerById("rscaption")
    if prov is not None:
        registry.removeProvider(prov)


@pytest.mark.parametrize("backend", [1, 2], ids=["inprocess", "subprocess"])
def test_caption_then_search_algorithms(provider, tiny, geotiff, tmp_path, backend, qgis_new_project):
    processing = provider
    raster = str(geotiff("RGB.byte.tif"))
    out = str(tmp_path / "proc.gpkg")
    res = processing.run("rscaption:caption", {
        "INPUT": raster, "TILE_SIZE": 256, "MODEL": tiny, "BACKEND": backend, "PYTHON": sys.executable,
        "DEVICE": "cpu", "BATCH_SIZE": 4, "OUTPUT": out,
    })
    assert res["OUTPUT"] == out
    summary = json.loads(res["SUMMARY"])
    assert res["WRITTEN"] == summary["written"] == gpkg_tile_count(out) > 0

    layer = QgsVectorLayer(f"{out}|layername=tiles", "tiles", "ogr")
    assert layer.isValid() and layer.crs().authid() == "EPSG:32618"
    QgsProject.instance().addMapLayer(layer)
    res = processing.run("rscaption:search", {
        "INPUT": layer, "QUERY": "a river", "K": 3, "BACKEND": backend, "PYTHON": sys.executable,
        "DEVICE": "cpu", "OUTPUT": "memory:",
    })
    hits = json.loads(res["HITS"])
    assert len(hits) == 3
    matches = res["OUTPUT"] if not isinstance(res["OUTPUT"], str) else QgsProject.instance().mapLayer(res["OUTPUT"])
    feats = sorted(matches.getFeatures(), key=lambda f: f["rank"])
    assert [f["tile_id"] for f in feats] == [h["tile_id"] for h in hits]
    assert [f["score"] for f in feats] == pytest.approx([h["score"] for h in hits])
    QgsProject.instance().removeAllMapLayers()


def _extent_of(path):
    """Read the extent without keeping a layer object alive (a layer still referenced at
    interpreter exit, e.g. from a stored traceback, makes QGIS segfault on the way out)."""
    from qgis.core import QgsRasterLayer, QgsRectangle

    return QgsRectangle(QgsRasterLayer(path, "tmp").extent())


def test_caption_algorithm_extent_and_errors(provider, tiny, geotiff, tmp_path, qgis_new_project):
    from qgis.core import QgsProcessingException

    processing = provider
    raster = str(geotiff("RGB.byte.tif"))
    ext = _extent_of(raster)
    sub = f"{ext.xMinimum()},{ext.xMinimum() + ext.width() / 3},{ext.yMinimum()},{ext.yMinimum() + ext.height() / 3} [EPSG:32618]"
    out = str(tmp_path / "ext.gpkg")
    res = processing.run("rscaption:caption", {"INPUT": raster, "EXTENT": sub, "TILE_SIZE": 128, "MODEL": tiny,
                                               "BACKEND": 1, "OUTPUT": out})
    summary = json.loads(res["SUMMARY"])
    assert 0 < summary["total"] <= 9  # a third of 791x718 px in 128 px tiles
    with pytest.raises(QgsProcessingException, match="not found|checkpoint"):
        processing.run("rscaption:caption", {"INPUT": raster, "MODEL": str(tmp_path / "nope"), "BACKEND": 1,
                                             "OUTPUT": str(tmp_path / "x.gpkg")})


def test_caption_algorithm_refuses_a_large_run_unless_confirmed(provider, tiny, tmp_path, qgis_new_project):
    """Above the backend's tile threshold the algorithm stops with the tile count and the time, and
    names the parameter that starts it; with that parameter ticked the run gets past the guard (to
    the first pixel read, which fails here because the VRT's source file does not exist)."""
    from qgis.core import QgsProcessingException

    from rscaption.engine.run_size import LARGE_RUN_TILES
    from test_large_run import HUGE_TILES, vrt

    processing = provider
    out = tmp_path / "huge.gpkg"
    params = {"INPUT": str(vrt(tmp_path, 1_000_000, 1_000_000)), "TILE_SIZE": 256, "MODEL": tiny, "BACKEND": 1,
              "DEVICE": "cpu", "OUTPUT": str(out)}
    with pytest.raises(QgsProcessingException) as refused:
        processing.run("rscaption:caption", params)
    message = str(refused.value)
    assert f"plans {HUGE_TILES:,} tiles, about 35.3 days" in message
    assert f'tick "Run even if it plans more than {LARGE_RUN_TILES:,} tiles"' in message
    assert not out.exists()
    alg = QgsApplication.processingRegistry().algorithmById("rscaption:caption")
    confirm = alg.parameterDefinition("CONFIRM_LARGE")
    assert confirm.defaultValue() is False and str(LARGE_RUN_TILES) in confirm.description().replace(",", "")

    over = dict(params, INPUT=str(vrt(tmp_path, 12_800, 8_032, "over.vrt")), TILE_SIZE=32, OUTPUT=str(tmp_path / "o.gpkg"))
    with pytest.raises(QgsProcessingException, match="plans 100,400 tiles"):
        processing.run("rscaption:caption", over)
    with pytest.raises(QgsProcessingException, match=r"^cannot read .*over\.vrt"):
        processing.run("rscaption:caption", dict(over, CONFIRM_LARGE=True))

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
    from rscaption_plugin.backend_client import POOL
    from rscaption_plugin.runner import Callbacks, CaptionJob, RunError, run_caption

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
    from rscaption_plugin.layers import find_tile_layer, gpkg_path_of, same_file

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

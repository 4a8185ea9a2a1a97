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

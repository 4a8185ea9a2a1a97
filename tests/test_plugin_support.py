"""Helpers shared by the plugin, worker and Processing tests (no tests here).

A tiny real model is saved once per session; the plugin is exercised through its real tasks,
which need the Qt event loop turning for ``finished()`` and queued signals to run.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # rscaption_plugin is imported from the source tree

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny real captioner saved to disk (shared by all tests of the session)."""
    target = tmp_path_factory.getbasetemp() / "rscaption-tiny-model"
    if not (target / "config.json").is_file():
        from rscaption.models.tiny import build_tiny_captioner

        build_tiny_captioner().save(str(target))
    return str(target)


def wait_until(predicate, timeout: float = 120.0, step: float = 0.02) -> bool:
    """Turn the Qt event loop until ``predicate()`` (tasks finish through queued signals)."""
    from qgis.core import QgsApplication

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        QgsApplication.processEvents()
        if predicate():
            return True
        time.sleep(step)
    QgsApplication.processEvents()
    return predicate()


def gpkg_tile_count(path) -> int:
    con = sqlite3.connect(str(path))
    try:
        return con.execute("SELECT COUNT(*) FROM tiles").fetchone()[0]
    finally:
        con.close()


def caption_request(raster, out, model, mode="inprocess", python=None, tile_size=128, batch_size=8,
                    extent=None, name="test captions"):
    from rscaption_plugin.ui.dialog import CaptionRequest
    from rscaption_plugin.core.runner import CaptionJob

    job = CaptionJob(raster=str(raster), out=str(out), model=model, tile_size=tile_size, batch_size=batch_size,
                     extent=extent, device="cpu")
    return CaptionRequest(job, mode, python, name, temporary=False)

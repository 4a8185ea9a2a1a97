"""Shared fixtures. Real data lives outside the repository (../shared/data, never committed):
tests that need it skip with a clear message on a machine without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests must not write beside their inputs: opening a raster in QGIS (layer creation computes band
# statistics for the default contrast stretch) or GDAL statistics otherwise leave `<name>.aux.xml`
# next to the shared rasters. GDAL reads this option at each use, so setting it here is enough even
# though pytest-qgis started QGIS before this file was imported. (test_no_side_files checks it.)
os.environ["GDAL_PAM_ENABLED"] = "NO"

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RSCAPTION_SHARED_DATA", ROOT.parent / "shared" / "data"))
GEOTIFF_DIR = SHARED_DATA / "geotiff"


def require_shared(*parts: str) -> Path:
    """Path under the shared data folder, or skip the calling test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (set RSCAPTION_SHARED_DATA or fetch ../shared/data)")
    return path


def geotiff_path(name: str) -> Path:
    """One of the real GeoTIFFs in ../shared/data/geotiff (skips when absent)."""
    return require_shared("geotiff", name)


@pytest.fixture
def shared_data() -> Path:
    return require_shared()


@pytest.fixture
def geotiff():
    """``geotiff("RGB.byte.tif")`` -> Path, skipping the test when the shared data is absent."""
    return geotiff_path


@pytest.fixture
def tmp_gpkg(tmp_path) -> Path:
    """A not-yet-existing .gpkg path in a fresh temporary folder."""
    return tmp_path / "out.gpkg"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random captioner saved as a checkpoint directory, one per session (plumbing tests;
    its captions are noise)."""
    from test_plugin_support import tiny_model_dir as saved_tiny_model

    return saved_tiny_model(tmp_path_factory)


def pytest_configure(config):
    config.addinivalue_line("markers", "qgis_log_expects(*regexes): warnings the test provokes on purpose")
    config.addinivalue_line("markers", "needs_bf16: runs bf16 kernels; skipped, with the CPU's reason, where "
                                       "rscaption.device.bf16_support() says they cannot run")


def pytest_runtest_setup(item):
    """``@pytest.mark.needs_bf16``: asks the bf16 probe only for tests that carry the marker (it
    imports torch, which the plugin tests keep out of QGIS's process)."""
    if item.get_closest_marker("needs_bf16"):
        from rscaption.device import bf16_support

        support = bf16_support()
        if not support.ok:
            pytest.skip(f"needs bf16 kernels: {support.reason}")


@pytest.fixture
def no_bf16_cpu(monkeypatch):
    """This machine as a CPU without bf16 support (an AVX2-only AMD EPYC, say), whatever it has:
    the probe's low-level query says no; the probe's cached answer is dropped before and after."""
    from rscaption import device

    device.bf16_support.cache_clear()
    monkeypatch.setattr(device, "mkldnn_bf16_supported", lambda: False)
    yield device.bf16_support()
    device.bf16_support.cache_clear()


@pytest.fixture(autouse=True)
def qgis_message_log_stays_clean(request):
    """Plugin tests (test_plugin*, test_processing*) fail when QGIS's message log receives a Python
    error or a warning while they run (tests/qgis_log_guard.py says what counts)."""
    if not request.module.__name__.startswith(("test_plugin", "test_processing")):
        yield
        return
    from qgis_log_guard import LogGuard

    marker = request.node.get_closest_marker("qgis_log_expects")
    with LogGuard(marker.args if marker else ()) as guard:
        yield
    if guard.problems:
        pytest.fail(guard.report(), pytrace=False)

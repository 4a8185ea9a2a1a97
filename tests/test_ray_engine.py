"""`--engine ray` on a real local Ray cluster (two worker slots, started once for the module): the
output equals the local engine's, a worker process that dies is retried with nothing lost or
written twice, cancel and resume behave like the local engine, and a killed driver's run resumes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray", reason="the Ray extra is part of make setup (requirements.txt)")

from mosaic_data import assert_same_tiles, pid_alive, stored, write_geotiff, write_mosaic  # noqa: E402
from rscaption.engine.pipeline import caption_raster  # noqa: E402
from rscaption.engine.ray import KILL_ENV, caption_raster_ray  # noqa: E402
from rscaption.raster.tiling import TilingParams  # noqa: E402

pytestmark = pytest.mark.slow

W, H = 192, 160  # 6 x 5 tiles of 32 px, some of them nodata
PARAMS = TilingParams(tile_size=32)
BATCH = 2


def env() -> dict:
    """The environment now (after ray.init set its authentication mode), offline."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for every test here: Ray's start-up is the slow part on two cores."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def scene_and_local_result(root, model, w, h, seed):
    """A GeoTIFF scene and its tiles as the local engine writes them (the reference)."""
    tif = write_geotiff(root / f"scene{seed}.tif", w, h, seed=seed)
    caption_raster(str(tif), str(root / f"local{seed}.gpkg"), model=model, tiling=PARAMS, batch_size=BATCH)
    return str(tif), stored(root / f"local{seed}.gpkg")


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ray")
    tif, local = scene_and_local_result(root, tiny_model_dir, W, H, seed=3)
    vrt = write_mosaic(root / "pieces", W, H, cols=3, rows=2, seed=3)
    return {"tif": tif, "vrt": str(vrt), "local": local}


def count_rows(path) -> int:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM tiles").fetchone()[0]
    except sqlite3.Error:  # not created yet, or its tables not yet committed
        return 0


def test_ray_output_equals_local_engine(cluster, data, tiny_model_dir, tmp_path):
    out = tmp_path / "ray.gpkg"
    seen = []
    summary = caption_raster_ray(data["tif"], str(out), model=tiny_model_dir, tiling=PARAMS, batch_size=BATCH,
                                 on_progress=lambda done, total, recs: seen.append((done, total, len(recs))))
    assert not summary.cancelled and summary.device.startswith("ray: 2 x cpu")
    assert summary.written == len(data["local"]) and summary.skipped_nodata == summary.total - summary.written > 0
    assert_same_tiles(stored(out), data["local"])
    dones = [d for d, _, _ in seen]
    assert dones == sorted(dones) and dones[-1] == summary.total and seen[0] == (0, summary.total, 0)
    assert sum(n for _, _, n in seen) == summary.written  # each tile reported once, as it landed


def test_worker_killed_mid_run_is_retried_nothing_lost_or_duplicated(cluster, data, tiny_model_dir, tmp_path,
                                                                     monkeypatch):
    marker = tmp_path / "killed.pid"
    monkeypatch.setenv(KILL_ENV, f"2:{marker}")  # the worker given shard 2 kills its own process once
    out = tmp_path / "ray.gpkg"
    summary = caption_raster_ray(data["vrt"], str(out), model=tiny_model_dir, tiling=PARAMS, batch_size=BATCH,
                                 shard_batches=1, max_retries=2)
    dead = int(marker.read_text())
    assert dead != os.getpid() and not pid_alive(dead)  # a worker process really died ...
    assert summary.written == len(data["local"]) and not summary.cancelled  # ... and its shard was redone
    with sqlite3.connect(out) as conn:
        ids = [r[0] for r in conn.execute("SELECT tile_id FROM tiles")]
        emb = conn.execute("SELECT count(*) FROM rscaption_embeddings").fetchone()[0]
    assert len(ids) == len(set(ids)) == emb == len(data["local"])
    assert_same_tiles(stored(out), data["local"])  # the VRT mosaic on the workers = the GeoTIFF locally


def test_cancel_keeps_finished_shards_and_resume_completes(cluster, data, tiny_model_dir, tmp_path):
    out = tmp_path / "ray.gpkg"
    landed = []
    first = caption_raster_ray(data["tif"], str(out), model=tiny_model_dir, tiling=PARAMS, batch_size=BATCH,
                               shard_batches=1, on_progress=lambda d, t, recs: landed.extend(recs),
                               should_cancel=lambda: len(landed) > 0)
    assert first.cancelled and 0 < first.written == len(landed) == count_rows(out) < len(data["local"])
    second = caption_raster_ray(data["tif"], str(out), model=tiny_model_dir, tiling=PARAMS, batch_size=BATCH)
    assert not second.cancelled and second.resumed >= sum(1 for r in landed if r.caption.strip())
    assert_same_tiles(stored(out), data["local"])


def _start_and_stop(cmd, out, sig, more_than: int) -> tuple[int, str]:
    """Start the CLI, send ``sig`` as soon as the file holds more than ``more_than`` tiles."""
    # SIGINT back to its default in the child: under a shell's background job it starts ignored
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and count_rows(out) <= more_than:
        time.sleep(0.05)
    assert proc.poll() is None, f"the driver ended before it could be stopped: {proc.stderr.read()}"
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc.returncode, proc.stderr.read()


def test_ctrl_c_then_killed_driver_resume_to_the_uninterrupted_result(cluster, tiny_model_dir, tmp_path):
    # a scene of 15 x 12 tiles: the CLI's shards are 8 tiles and commits land a few shards at a
    # time, so on the module's 29-tile scene the Ctrl-C could leave a single shard, which the
    # killed run then finished before the kill (seen: 1 run in 6)
    tif, local = scene_and_local_result(tmp_path, tiny_model_dir, 480, 384, seed=5)
    out = tmp_path / "ray.gpkg"
    cmd = [sys.executable, "-m", "rscaption.cli", "caption", tif, "-o", str(out), "--model", tiny_model_dir,
           "--tile-size", "32", "--batch-size", str(BATCH), "--engine", "ray", "--address", cluster, "-q"]
    rc, err = _start_and_stop(cmd, out, signal.SIGINT, 0)  # Ctrl-C: as the local engine
    assert rc == 130 and "cancelled; finished tiles are kept" in err, err
    after_cancel = count_rows(out)
    assert 0 < after_cancel < len(local) - 16, "more than two shards left for the killed run"
    _start_and_stop(cmd, out, signal.SIGKILL, after_cancel)  # kill -9: no clean-up at all
    after_kill = count_rows(out)
    assert after_cancel < after_kill < len(local)  # killed mid-run, with more tiles on disk
    rerun = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed" in rerun.stderr and "done:" in rerun.stderr
    assert_same_tiles(stored(out), local)


def test_missing_ray_is_one_line_and_the_local_engine_never_imports_it(data, tiny_model_dir, tmp_path):
    block = "import sys; sys.modules['ray'] = None; from rscaption.cli import main; "
    args = [data["tif"], "-o", str(tmp_path / "x.gpkg"), "--model", tiny_model_dir, "--tile-size", "32", "-q"]
    proc = subprocess.run([sys.executable, "-c", block + f"sys.exit(main(['caption', *{args!r}, '--engine', 'ray']))"],
                          env=env(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines == ["rscaption: error: --engine ray needs Ray: pip install "
                                              "'rscaption[ray]' (or pip install ray)"], proc.stderr
    assert not (tmp_path / "x.gpkg").exists()
    local = ("from rscaption.cli import main; rc = main(['caption', *%r]); "
             "print('ray' in sys.modules, rc)" % (args,))
    proc = subprocess.run([sys.executable, "-c", "import sys; " + local], env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.stdout.split() == ["False", "0"], proc.stderr

"""Faults a run survives (issue 11): kill -9 at seeded points then resume, Ctrl-C, a second writer on
the same output, a full disk, an unwritable folder, out of accelerator memory.

Real `rscaption caption` processes on a real raster with a tiny model (the harness is
tools/kill_soak.py, which also runs the long soak); the final file of every interrupted run must
equal the uninterrupted one tile for tile, and SQLite must find it intact after every fault.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT
from rscaption.cli import main
from rscaption.errors import StoreError
from rscaption.store.gpkg import TileStore
from rscaption.store.run_lock import RunLock, lock_path
from test_bad_inputs import one_error_line, run_main

sys.path.insert(0, str(ROOT / "tools"))
import kill_soak as ks  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """The raster, the model and the uninterrupted run's tiles (made in this process: same code)."""
    d = tmp_path_factory.mktemp("faults")
    raster = ks.write_raster(d / "noise.tif")
    ref = d / "reference.gpkg"
    assert main(["caption", str(raster), "-o", str(ref), "--model", tiny_model_dir, *ks.RUN_ARGS]) == 0
    want = ks.snapshot(ref)
    assert len(want) == ks.TILES
    return SimpleNamespace(raster=raster, model=tiny_model_dir, want=want)


def finish(run, out) -> None:
    """Resume ``out`` to the end in this process and check it equals the uninterrupted run."""
    assert main(["caption", str(run.raster), "-o", str(out), "--model", run.model, *ks.RUN_ARGS]) == 0
    assert ks.differences(ks.snapshot(out), run.want) == []
    assert ks.integrity(out) == "ok"
    assert not os.path.exists(lock_path(out))


@pytest.mark.slow
def test_kill_9_at_three_seeded_points_then_resume(run, tmp_path):
    out = tmp_path / "killed.gpkg"
    chain = ks.kill_chain(run.raster, out, run.model, ks.kill_points(3, seed=11))
    for rec in chain:
        assert rec["reached"] and rec["killed"] and rec["tiles_at_kill"] < ks.TILES, rec  # killed mid-run
        assert rec["integrity"] == "ok", rec
        assert rec["stale_lock_pid"] == rec["pid"], rec  # the dead writer's lock file stays; the next run takes it
    assert [r["tiles_at_kill"] for r in chain] == sorted(r["tiles_at_kill"] for r in chain)
    finish(run, out)


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_resumes(run, tmp_path):
    out = tmp_path / "interrupted.gpkg"
    proc = ks.start(run.raster, out, run.model)
    assert ks.wait_for_tiles(proc, out, 10)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if line.strip()] == [
        "tiles: 32 px at 1.00 m/px = 32 m footprint (as given)",
        f"rscaption: cancelled; finished tiles are kept in {out} (run again to resume)"]
    assert 10 <= ks.tile_count(out) < ks.TILES and ks.integrity(out) == "ok"
    assert not os.path.exists(lock_path(out))
    finish(run, out)


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_runs(run, tmp_path, capsys):
    """The first run is paused (SIGSTOP) while it holds the output, so the collision is certain."""
    out = tmp_path / "shared.gpkg"
    first = ks.start(run.raster, out, run.model)
    try:
        assert ks.wait_for_tiles(first, out, 4)
        first.send_signal(signal.SIGSTOP)
        for extra in ([], ["--overwrite"]):
            rc, err = run_main(capsys, "caption", run.raster, "-o", out, "--model", run.model, *ks.RUN_ARGS, *extra)
            assert rc == 2
            assert re.fullmatch(rf"rscaption: error: {re.escape(str(out))} is being written by another rscaption "
                                rf"run \(pid {first.pid} since \S+\); wait for it to finish or choose another output",
                                one_error_line(err))
        assert 4 <= ks.tile_count(out) < ks.TILES and ks.integrity(out) == "ok"
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
    assert ks.differences(ks.snapshot(out), run.want) == [] and ks.integrity(out) == "ok"
    assert not os.path.exists(lock_path(out))


def test_lock_semantics_in_one_process(tmp_path):
    """A live holder (even this process, through another handle) refuses; a dead one's file is
    taken over; the lock file goes when the run ends."""
    out = tmp_path / "o.gpkg"
    with RunLock(out):
        with pytest.raises(StoreError, match=rf"^{re.escape(str(out))} is being written by another rscaption run "
                                             rf"\(pid {os.getpid()} since "):
            RunLock(out).acquire()
    assert not os.path.exists(lock_path(out))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Path(lock_path(out)).write_text('{"pid": %d, "started": "then"}' % dead.pid)  # what kill -9 leaves
    with RunLock(out) as lock:  # nobody holds the OS lock on it: stale, taken over
        assert lock.previous == {"pid": dead.pid, "started": "then"}
    assert not os.path.exists(lock_path(out))


@pytest.mark.slow
def test_full_disk_is_one_line_keeps_the_file_and_resumes(run, tmp_path):
    """RLIMIT_FSIZE in the child stands in for a full disk (unprivileged, no loop device): writes
    past it fail with EFBIG, which SQLite reports as a write error like ENOSPC's SQLITE_FULL."""
    out = tmp_path / "full.gpkg"
    limit = 110_000  # above a new store (about 90 KB), below the finished one

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run(ks.command(run.raster, out, run.model), preexec_fn=small_disk, capture_output=True,
                       text=True, env=ks.env(), timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 2, r.stderr
    assert lines[1] == (f"rscaption: error: cannot write to {out}: disk I/O error (is the disk full?); the tiles "
                        "written so far are kept: free some space and run the same command again to resume")
    kept = ks.tile_count(out)
    assert 0 < kept < ks.TILES and os.path.getsize(out) <= limit
    assert ks.integrity(out) == "ok"
    with TileStore.open(out) as store:
        assert store.count() == kept
    finish(run, out)  # "space freed": the same command without the limit


@pytest.mark.slow
def _without_file_permission_override() -> None:
    """Child pre-exec for root: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set,
    so the exec'd run obeys file modes as any user would while still reading the interpreter and
    the code wherever the checkout lies (running as user nobody failed under a /root checkout)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_output_folder(run):
    """An unwritable output folder is one error line and nothing written. Root writes anywhere, so as
    root the run is made without the capability that overrides file modes."""
    base = Path(tempfile.mkdtemp(prefix="rscaption-ro-"))
    try:
        ro = base / "ro"
        ro.mkdir(mode=0o555)
        ro.chmod(0o555)
        pre = _without_file_permission_override if os.geteuid() == 0 else None
        r = subprocess.run(ks.command(run.raster, ro / "o.gpkg", run.model), preexec_fn=pre, capture_output=True,
                           text=True, env=dict(ks.env(), HOME=str(base)), timeout=300)
        assert r.returncode == 2, r.stderr[-2000:]
        assert one_error_line(r.stderr) == f"rscaption: error: cannot write {ro}/o.gpkg: Permission denied (in {ro})"
        assert os.listdir(ro) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- out of accelerator memory ------------------------------------------------------------------------
class SmallAccelerator:
    """Test double for hardware this machine lacks (a GPU with little free memory): the real tiny
    captioner, except that while it "is on the accelerator" a call with more than ``room`` tiles
    raises ``torch.OutOfMemoryError`` as CUDA does; ``to_device("cpu")`` (the pipeline's fallback)
    moves it to the CPU, where it has room for anything. Every computation is the real model's."""

    def __init__(self, cap, room: int):
        import torch

        self._cap, self.room, self.calls = cap, room, []
        self.device = torch.device("cuda", 0)

    def __getattr__(self, name):
        return getattr(self._cap, name)

    def embed_images(self, images, *args, **kwargs):
        import torch

        self.calls.append((self.device.type, len(images)))
        if self.device.type != "cpu" and len(images) > self.room:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(images) * 64} MiB")
        return self._cap.embed_images(images, *args, **kwargs)

    def to_device(self, device=None, dtype=None):
        import torch

        self.device = torch.device(device)
        return self


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_model_dir):
    from rscaption.models.registry import load_model
    from rscaption.engine.pipeline import caption_raster
    from rscaption.raster.tiling import TilingParams
    from test_bad_rasters import write_raster

    d = tmp_path_factory.mktemp("oom")
    raster = write_raster(d / "r.tif", width=128, height=128)
    cap = load_model(tiny_model_dir, device="cpu")
    ref = d / "ref.gpkg"
    caption_raster(str(raster), str(ref), model=cap, tiling=TilingParams(tile_size=32), batch_size=8)
    return SimpleNamespace(raster=raster, cap=cap, want=ks.snapshot(ref), TilingParams=TilingParams,
                           caption_raster=caption_raster)


@pytest.mark.parametrize("room, said, sizes_after", [
    (3, ["out of memory on cuda:0 with 8 tiles per batch; continuing with 4",
         "out of memory on cuda:0 with 4 tiles per batch; continuing with 2"], {("cuda", 2)}),
    (0, ["out of memory on cuda:0 with 8 tiles per batch; continuing with 4",
         "out of memory on cuda:0 with 4 tiles per batch; continuing with 2",
         "out of memory on cuda:0 with 2 tiles per batch; continuing with 1",
         "out of memory on cuda:0 even for one tile; continuing on the CPU (slower)"], {("cpu", 8)}),
])
def test_out_of_memory_halves_the_batch_then_falls_back_to_cpu(small_run, tmp_path, caplog, room, said,
                                                               sizes_after):
    model = SmallAccelerator(small_run.cap, room)
    out = tmp_path / "o.gpkg"
    with caplog.at_level(logging.WARNING, logger="rscaption"):
        summary = small_run.caption_raster(str(small_run.raster), str(out), model=model,
                                           tiling=small_run.TilingParams(tile_size=32), batch_size=8)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("rscaption")] == [f"warning: {s}" for s in said]
    assert summary.written == 16 and summary.device == ("cpu" if room == 0 else "cuda:0")
    first_ok = next(i for i, (dev, n) in enumerate(model.calls) if dev == "cpu" or n <= room)
    assert set(model.calls[first_ok + 1:]) <= sizes_after  # the smaller size (or the CPU) sticks
    assert ks.differences(ks.snapshot(out), small_run.want) == []


class CpuWithoutRoom(SmallAccelerator):
    """The same double on the CPU, failing as torch's CPU allocator does."""

    def embed_images(self, images, *args, **kwargs):
        self.calls.append((self.device.type, len(images)))
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 3221225472 bytes. "
                           "Error code 12 (Cannot allocate memory)")


def test_out_of_memory_on_the_cpu_is_one_line(small_run, tmp_path):
    import torch

    from rscaption.errors import RscaptionError

    model = CpuWithoutRoom(small_run.cap, 0)
    model.device = torch.device("cpu")
    # one model worker: with two, the second may start its batch at the size the first has just
    # halved to before the first one's error stops the run, and the calls below would race
    with pytest.raises(RscaptionError, match=r"^out of memory on the CPU even for one tile; choose a smaller"):
        small_run.caption_raster(str(small_run.raster), str(tmp_path / "o.gpkg"), model=model,
                                 tiling=small_run.TilingParams(tile_size=32), batch_size=8, workers=1)
    assert model.calls == [("cpu", 8), ("cpu", 4), ("cpu", 2), ("cpu", 1)]

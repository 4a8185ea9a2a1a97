"""Reliability issue, second round: bounded time, signals and messages. A --where that never ends
stops at its deadline and on Ctrl-C, cancel, shutdown or SIGTERM; SIGTERM is a clean cancel of
`caption` and of the worker; a GeoPackage locked by another writer is busy, not damaged, and said
so in seconds; a hub model that is not cached offline is one line at once; the model-hash message
says each thing once; train and evaluate errors carry the CLI's prefix. Real files, real SQLite,
the real CLI and worker in subprocesses, the tiny model."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, geotiff_path
from rscaption.errors import StoreError
from rscaption.store.gpkg import TileStore
from rscaption.store.run_lock import RunLock, lock_path
from test_bad_inputs import copy_of, good_gpkg, one_error_line, run_main  # noqa: F401 (fixture)
from test_search_scale import store, tiny  # noqa: F401 (fixtures: 600 synthetic tiles, the tiny model)
from test_worker import Worker

sys.path.insert(0, str(ROOT / "tools"))
import kill_soak as ks  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "backend"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
RUNAWAY = "tile_id IN (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c)"


def start_cli(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rscaption.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or ENV, preexec_fn=ks.default_sigint)


def finished(proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    """Exit status, stderr and seconds taken; a process still running after ``timeout`` is killed
    and fails the test (the unbounded cases ran forever)."""
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"still running after {timeout} s")
    return proc.returncode, err, time.monotonic() - t0


def answer(w: Worker, within: float) -> dict:
    """The worker's ``done`` or ``error``, failing after ``within`` seconds in all (``Worker.until``
    waits per message, and heartbeats keep coming while a search spins)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        msg, _ = w.until(lambda m: True, timeout=max(0.1, end - time.monotonic()))
        if msg["type"] in ("done", "error"):
            return msg
    pytest.fail(f"no answer within {within} s")


# -- 10. a --where that never ends: a deadline, and Ctrl-C / cancel / shutdown / SIGTERM reach it ------------
def test_a_runaway_where_stops_at_its_deadline_in_one_line(store, tiny_model_dir):  # noqa: F811
    proc = start_cli("search", store, "a river", "--model", tiny_model_dir, "--where", RUNAWAY,
                     env={**ENV, "RSCAPTION_WHERE_TIMEOUT_S": "2"})
    rc, err, _ = finished(proc, 90)
    assert rc == 2
    assert one_error_line(err) == (
        "rscaption: error: --where took longer than 2 s; simplify the expression (a WITH RECURSIVE without "
        "an end never finishes) or raise RSCAPTION_WHERE_TIMEOUT_S")


def test_ctrl_c_stops_a_runaway_where(store, tiny_model_dir):  # noqa: F811
    proc = start_cli("search", store, "a river", "--model", tiny_model_dir, "--where", RUNAWAY,
                     env={**ENV, "RSCAPTION_WHERE_TIMEOUT_S": "600"})
    time.sleep(4)  # the filter runs beside the model load, in its own thread
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    rc, err, took = finished(proc, 60)
    # -2: a Ctrl-C that lands in code an extension runs through PyRun_String while torch imports marks
    # the interpreter, which then ends by SIGINT after our clean exit; a shell reports 130 for both
    assert rc in (130, -signal.SIGINT) and one_error_line(err) == "rscaption: interrupted", (rc, err)
    assert took < 30


def test_ctrl_c_in_the_main_thread_stops_a_runaway_where(store, tiny, monkeypatch):  # noqa: F811
    """A warm search (model given) filters in the caller's thread, where a Ctrl-C is held until the
    query ends (so it never lands inside SQLite's Python callbacks): the progress handler sees it."""
    from rscaption.search.query import search_store

    monkeypatch.setenv("RSCAPTION_WHERE_TIMEOUT_S", "600")
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            search_store(str(store), "a river", model=tiny, where=RUNAWAY)
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < 30
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_the_worker_cancels_a_runaway_where_on_cancel_shutdown_and_sigterm(store, tiny_model_dir):  # noqa: F811
    os.environ["RSCAPTION_WHERE_TIMEOUT_S"] = "600"  # so only the cancel can end it (the Worker copies the env)
    try:
        ends = {}
        for how in ("cancel", "shutdown", "sigterm"):
            w = Worker()
            try:
                w.until(lambda m: m["type"] == "hello")
                w.send("search", gpkg=str(store), query="a river", model=tiny_model_dir, where=RUNAWAY)
                time.sleep(3)
                t0 = time.monotonic()
                if how == "sigterm":
                    w.proc.send_signal(signal.SIGTERM)
                else:
                    w.send(how)
                got = answer(w, 30)
                assert (got["type"], got.get("kind"), got.get("message")) == ("error", "cancelled", "search cancelled")
                if how == "cancel":  # the worker stays: it answers the next request
                    w.send("shutdown")
                ends[how] = w.proc.wait(30)
                assert time.monotonic() - t0 < 30
            finally:
                if w.proc.poll() is None:
                    w.proc.kill()
        assert ends == {"cancel": 0, "shutdown": 0, "sigterm": 143}
    finally:
        del os.environ["RSCAPTION_WHERE_TIMEOUT_S"]


# -- SIGTERM is a cancel: message, lock removed, finished tiles kept, resume works ---------------------------
def private_raster(tmp_path):
    dst = tmp_path / "RGB.byte.tif"
    shutil.copy(geotiff_path("RGB.byte.tif"), dst)
    return dst


@pytest.mark.slow
def test_sigterm_cancels_caption_cleanly_and_it_resumes(tmp_path, tiny_model_dir):
    raster, out = private_raster(tmp_path), tmp_path / "out.gpkg"
    args = ["caption", raster, "-o", out, "--model", tiny_model_dir, "--tile-size", "16", "--batch-size", "2", "-q"]
    proc = start_cli(*args)
    assert ks.wait_for_tiles(proc, out, 10), proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    rc, err, _ = finished(proc, 120)
    assert rc == 143, err
    assert err.splitlines()[-1] == f"rscaption: cancelled; finished tiles are kept in {out} (run again to resume)"
    assert "Traceback" not in err
    kept = ks.tile_count(out)
    assert kept >= 10 and ks.integrity(out) == "ok"
    assert not os.path.exists(lock_path(out)) and not os.path.exists(f"{out}-journal")
    rc, err, _ = finished(start_cli(*args), 300)
    assert rc == 0, err
    done = err.splitlines()[-1]
    assert re.match(rf"done: (\d+) tiles captioned, {kept} resumed, ", done), done
    assert ks.tile_count(out) > kept and ks.integrity(out) == "ok"


def test_sigterm_cancels_the_workers_caption_and_ends_it(tmp_path, tiny_model_dir):
    raster, out = private_raster(tmp_path), tmp_path / "w.gpkg"
    w = Worker()
    try:
        w.until(lambda m: m["type"] == "hello")
        w.send("caption", raster=str(raster), out=str(out), model=tiny_model_dir, tile_size=16, batch_size=2)
        w.until(lambda m: m["type"] == "tiles")
        w.proc.send_signal(signal.SIGTERM)
        done = answer(w, 60)
        assert done["type"] == "done" and done["summary"]["cancelled"], done
        assert w.proc.wait(30) == 143
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
    assert 0 < ks.tile_count(out) == done["summary"]["written"] < done["summary"]["total"]
    assert not os.path.exists(lock_path(out)) and ks.integrity(out) == "ok"


# -- 18. a GeoPackage another process keeps locked is busy, not damaged, and said so in seconds ---------------
def test_a_locked_geopackage_is_busy_and_names_the_rscaption_run(tmp_path, good_gpkg):  # noqa: F811
    g = copy_of(good_gpkg, tmp_path)
    with RunLock(g):  # this process plays the writer: its lock file names it
        holder = sqlite3.connect(g, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            rc, err, took = finished(start_cli("search", g, "a river"), 60)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    assert rc == 2 and took < 20
    line = one_error_line(err)
    assert re.fullmatch(rf"rscaption: error: {re.escape(g)} is busy: another process is writing it \(rscaption "
                        rf"run pid {os.getpid()} since \S+, .+\); try again when it has finished", line), line
    assert "damaged" not in line


def test_a_geopackage_locked_by_another_program_is_busy_within_seconds(tmp_path, good_gpkg):  # noqa: F811
    g = copy_of(good_gpkg, tmp_path)
    holder = sqlite3.connect(g, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    t0 = time.monotonic()
    try:
        with pytest.raises(StoreError) as info:
            TileStore.open(g)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert time.monotonic() - t0 < 10
    assert str(info.value) == (f"{g} is busy: another process is writing it (not an rscaption run: QGIS saving "
                               "edits to the layer, a sqlite client, another tool); try again when it has finished")
    with TileStore.open(g) as s:  # free again: opens as before
        assert s.count() > 0


# -- 19. a hub model offline: one line at once, saying it is not cached and how to get it -------------------
@pytest.mark.parametrize("offline, said", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "127.0.0.1:9 cannot be reached (Connection refused)"),  # no network
])
def test_an_uncached_hub_model_offline_fails_fast_in_one_line(tmp_path, offline, said):
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")}
    env.update(offline, HF_HOME=str(tmp_path / "hf"))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "rscaption.cli", "info", "someorg/somemodel"], capture_output=True,
                          text=True, env=env, timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.strip() == (
        f"rscaption: error: model 'someorg/somemodel' is not available offline: it is not in the local Hugging "
        f"Face cache ({tmp_path / 'hf' / 'hub'}) and {said}; run `hf download someorg/somemodel` on a machine "
        "with a network and copy that cache here (or point HF_HOME at it), or pass a checkpoint directory")
    assert took < 10, took


# -- the model-hash mismatch says the needed hash once, and each model tried once -----------------------------
def test_the_model_hash_mismatch_says_each_thing_once(tmp_path, capsys, good_gpkg):  # noqa: F811
    from rscaption.models.registry import load_model

    g = copy_of(good_gpkg, tmp_path)
    con = sqlite3.connect(g)
    with con:
        con.execute("UPDATE rscaption_metadata SET value = ? WHERE key = 'model'",
                    (json.dumps({"id": "default", "hash": "f" * 64}),))
    con.close()
    rc, err = run_main(capsys, "search", g, "a river")
    default_hash = load_model("default", device="cpu").model_hash
    assert rc == 2
    assert one_error_line(err) == (
        f"rscaption: error: cannot load the model that made {g} (default, hash ffffffffffff): model 'default' "
        f"has hash {default_hash[:12]}. Pass --model with that checkpoint")


# -- every subcommand's user error is one line with the CLI's prefix -------------------------------------------
def test_train_and_evaluate_errors_carry_the_prefix(tmp_path, capsys):
    data = tmp_path / "captions.json"
    data.write_text(json.dumps({"images": []}))
    empty = tmp_path / "empty.yaml"
    empty.write_text("name: nothing\n")
    cases = [
        (["train", tmp_path / "missing.yaml"], f"training config not found: {tmp_path / 'missing.yaml'}"),
        (["train", empty], f"{empty}: no 'data' section (the caption sets to train on; see configs/default.yaml)"),
        (["evaluate", "--data", tmp_path / "missing.json"], f"dataset file not found: {tmp_path / 'missing.json'}"),
        (["evaluate", "--model", tmp_path / "no-checkpoint", "--data", data],
         f"checkpoint directory not found: {tmp_path / 'no-checkpoint'}"),
    ]
    for argv, said in cases:
        rc, err = run_main(capsys, *argv)
        assert (rc, one_error_line(err)) == (2, f"rscaption: error: {said}"), argv

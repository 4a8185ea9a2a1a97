"""Kill -9 soak: interrupt a real `rscaption caption` process at seeded points, resume, and check the
result equals an uninterrupted run (same tile ids, captions, embeddings) with `PRAGMA
integrity_check` ok after every kill. tests/test_faults.py runs the same harness over 3 points;
this script runs many and writes the figures docs/reliability.md quotes.

    .venv/bin/python tools/kill_soak.py [--points 20] [--seed 7] [--json out/kill_soak.json]

Each point costs one process start (torch import, model load) plus the tiles up to the kill.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUN_ARGS = ["--tile-size", "32", "--batch-size", "2", "-q"]
TILES = 512  # the raster below: 1024 x 512 px in 32 px tiles


def write_raster(path) -> Path:
    """1024 x 512 px of seeded noise, 64 px blocks: 512 tiles, several seconds with a tiny model (long
    enough that a signal sent after the first tiles lands mid-run)."""
    import rasterio
    from affine import Affine

    with rasterio.open(path, "w", driver="GTiff", width=1024, height=512, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=Affine(1, 0, 500000, 0, -1, 4000000), tiled=True, blockxsize=64,
                       blockysize=64) as ds:
        ds.write((np.random.default_rng(0).random((3, 512, 1024)) * 200 + 20).astype("uint8"))
    return Path(path)


def command(raster, out, model, *extra) -> list[str]:
    return [sys.executable, "-m", "rscaption.cli", "caption", str(raster), "-o", str(out), "--model", str(model),
            *RUN_ARGS, *extra]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT / "backend"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def default_sigint() -> None:
    """Child pre-exec: SIGINT back to its default. A shell's background job starts with SIGINT
    ignored, Python then installs no KeyboardInterrupt handler, and a Ctrl-C test would see the
    run finish instead of stop."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(raster, out, model, *extra, **popen) -> subprocess.Popen:
    return subprocess.Popen(command(raster, out, model, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(), preexec_fn=default_sigint, **popen)


def tile_count(out) -> int:
    """Committed tiles as another reader sees them; -1 while the file or its tables do not exist."""
    if not os.path.exists(out):
        return -1
    try:
        con = sqlite3.connect(f"file:{out}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT count(*) FROM tiles").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return -1


def wait_for_tiles(proc, out, n: int, timeout: float = 300.0) -> bool:
    """True once ``out`` holds at least ``n`` committed tiles; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tile_count(out) >= n:
            return True
        if proc.poll() is not None:
            return tile_count(out) >= n
        time.sleep(0.005)
    raise TimeoutError(f"{out}: {n} tiles not reached in {timeout} s")


def integrity(out) -> str:
    con = sqlite3.connect(out)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


# One tile's embedding computed in another batching (a resumed run's batches, a batch halved after
# an out-of-memory) agrees with the uninterrupted run's to this, not bit for bit: oneDNN's AVX2
# kernels (CPUs without AVX-512) change the last float bits with the batch size. Captions must match.
EMBEDDING_ATOL = 1e-5
CONFIDENCE_ATOL = 1e-5  # a float sum whose order depends on how tiles were grouped into batches


def snapshot(out) -> dict:
    """tile_id -> (caption, embedding bytes, confidence) through the store's own reader."""
    from rscaption.store.gpkg import TileStore

    with TileStore.open(out) as store:
        ids, emb = store.embeddings()
        tiles = store.tiles()
    vectors = {int(i): e.tobytes() for i, e in zip(ids, emb)}
    return {t["tile_id"]: (t["caption"], vectors.get(t["tile_id"]), t["confidence"]) for t in tiles}


def differences(got: dict, want: dict) -> list[str]:
    """What differs from the uninterrupted run: captions exactly, embeddings to ``EMBEDDING_ATOL``
    and confidences to ``CONFIDENCE_ATOL`` (both depend on how tiles were grouped into batches)."""
    problems = []
    if sorted(got) != sorted(want):
        problems.append(f"tile ids differ: {len(got)} vs {len(want)}")
    for tid in sorted(set(got) & set(want)):
        (cap, vec, conf), (cap0, vec0, conf0) = got[tid], want[tid]
        if cap != cap0:
            problems.append(f"tile {tid}: caption {cap!r} != {cap0!r}")
        if vec is None or vec0 is None or len(vec) != len(vec0):
            if vec != vec0:
                problems.append(f"tile {tid}: embedding missing or of another size")
        else:
            gap = float(np.abs(np.frombuffer(vec, np.float32) - np.frombuffer(vec0, np.float32)).max(initial=0.0))
            if not gap <= EMBEDDING_ATOL:  # NaN fails too
                problems.append(f"tile {tid}: embedding differs by {gap:.2e}")
        if abs(conf - conf0) > CONFIDENCE_ATOL:
            problems.append(f"tile {tid}: confidence {conf} != {conf0}")
    return problems


def kill_points(n: int, seed: int, total: int = TILES) -> list[int]:
    """Committed-tile counts after which to kill, increasing (each resume goes further)."""
    return sorted(random.Random(seed).sample(range(2, total - 8), n))


def kill_chain(raster, out, model, points: list[int], log=None) -> list[dict]:
    """Start, kill -9 once ``out`` holds ``p`` tiles, check the file, start again (a resume) ...
    for each point; returns one record per kill. The caller finishes the run and compares."""
    records = []
    for target in points:
        t0 = time.monotonic()
        target = max(target, tile_count(out) + 2)  # the last kill may have landed past this point
        proc = start(raster, out, model)
        reached = wait_for_tiles(proc, out, target)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        rec = {"target": target, "tiles_at_kill": tile_count(out), "killed": proc.returncode == -signal.SIGKILL,
               "reached": reached, "integrity": integrity(out), "seconds": round(time.monotonic() - t0, 2)}
        lock = Path(f"{out}.lock")
        rec["stale_lock_pid"] = json.loads(lock.read_text() or "{}").get("pid") if lock.exists() else None
        rec["pid"] = proc.pid
        records.append(rec)
        if log:
            log(rec)
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", default=str(ROOT / "out" / "kill_soak.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "backend"))
    from rscaption.models.tiny import build_tiny_captioner

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "tiny"
        build_tiny_captioner().save(str(model))
        raster = write_raster(tmp / "noise.tif")
        t0 = time.monotonic()
        subprocess.run(command(raster, tmp / "reference.gpkg", model), check=True, env=env(), capture_output=True)
        reference_s = time.monotonic() - t0
        want = snapshot(tmp / "reference.gpkg")
        out = tmp / "killed.gpkg"
        points = kill_points(args.points, args.seed)
        chain = kill_chain(raster, out, model, points, log=lambda r: print(json.dumps(r), file=sys.stderr))
        final = subprocess.run(command(raster, out, model), env=env(), capture_output=True, text=True)
        problems = differences(snapshot(out), want) if final.returncode == 0 else [final.stderr.strip()]
        report = {
            "points": len(points), "seed": args.seed, "tiles": TILES,
            "killed": sum(r["killed"] for r in chain),
            "killed_mid_run": sum(r["killed"] and r["tiles_at_kill"] < TILES for r in chain),
            "integrity_ok_after_every_kill": all(r["integrity"] == "ok" for r in chain),
            "final_integrity": integrity(out), "final_equals_uninterrupted": not problems,
            "problems": problems[:10], "lock_left": Path(f"{out}.lock").exists(),
            "uninterrupted_run_s": round(reference_s, 1),
            "soak_s": round(time.monotonic() - t0 - reference_s, 1), "kills": chain,
        }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "kills"}, indent=1))
    return 0 if report["final_equals_uninterrupted"] and report["integrity_ok_after_every_kill"] else 1


if __name__ == "__main__":
    sys.exit(main())

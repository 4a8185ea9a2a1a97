"""Tiles per second per CPU core of the local and the Ray engine, measured back to back on one
raster, for docs/scaling.md's extrapolation to 10^6- and 10^7-tile mosaics.

    .venv/bin/python tools/scaling_bench.py [--tiles 64] [--model default] [--tile-size 256]

The raster is the shared NAIP GeoTIFF's RGB repeated to the asked number of tiles (a synthetic
texture when ../shared is absent): the model's cost per tile does not depend on what it sees.
Both engines run with the same batch size on all this machine's cores (the local engine with one
torch thread per core, Ray with one single-threaded worker per core). "steady" rates count from
the first committed batch or shard to the last, leaving out start-up (model loads, Ray workers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NAIP = ROOT.parent / "shared" / "data" / "geotiff" / "m_4709963_se_14_1_20200831.tif"


def make_raster(path: Path, tiles: int, tile: int) -> Path:
    import rasterio
    from rasterio.transform import from_origin

    side = int(math.ceil(math.sqrt(tiles)))
    width, height = side * tile, int(math.ceil(tiles / side)) * tile
    if NAIP.exists():
        with rasterio.open(NAIP) as src:
            rgb = src.read([1, 2, 3])
        reps = (1, math.ceil(height / rgb.shape[1]), math.ceil(width / rgb.shape[2]))
        data = np.tile(rgb, reps)[:, :height, :width]
    else:
        rng = np.random.default_rng(0)
        data = rng.integers(0, 256, size=(3, height, width), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       crs="EPSG:26914", transform=from_origin(485899.0, 5209246.0, 1.0, 1.0),
                       tiled=True, blockxsize=256, blockysize=256) as dst:
        dst.write(data)
    return path


class Clock:
    """First and last time a batch landed, and how many tiles landed after the first."""

    def __init__(self):
        self.first = self.last = None
        self.after_first = 0

    def __call__(self, done, total, records):
        if not records:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.after_first += len(records)
        self.last = now

    def steady(self) -> float | None:
        span = (self.last or 0) - (self.first or 0)
        return self.after_first / span if span > 0 else None


def run(args) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="rscaption-scaling-"))
    try:
        return _measure(args, cores, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(args, cores: int, tmp: Path) -> dict:
    from rscaption.models.registry import load_model
    from rscaption.engine.pipeline import caption_raster
    from rscaption.engine.ray import caption_raster_ray, import_ray
    from rscaption.raster.tiling import TilingParams

    raster = make_raster(tmp / "mosaic.tif", args.tiles, args.tile_size)
    tiling = TilingParams(tile_size=args.tile_size)
    out = {"machine": {"cores": cores, "load_before": os.getloadavg()}, "tiles": args.tiles,
           "tile_size": args.tile_size, "batch_size": args.batch_size, "model": args.model}

    t = time.perf_counter()
    cap = load_model(args.model, device="cpu")
    out["model_load_s"] = time.perf_counter() - t
    clock = Clock()
    s = caption_raster(str(raster), str(tmp / "local.gpkg"), model=cap, tiling=tiling,
                       batch_size=args.batch_size, on_progress=clock)
    out["local"] = _figures(s, clock, cores)

    ray = import_ray()
    t = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    out["ray_init_s"] = time.perf_counter() - t
    try:
        clock = Clock()
        s = caption_raster_ray(str(raster), str(tmp / "ray.gpkg"), model=cap, model_spec=args.model,
                               tiling=tiling, batch_size=args.batch_size, on_progress=clock)
        out["ray"] = _figures(s, clock, cores)
    finally:
        ray.shutdown()
    out["machine"]["load_after"] = os.getloadavg()
    return out


def _figures(summary, clock, cores) -> dict:
    rate = summary.written / summary.seconds
    steady = clock.steady()
    return {"seconds": round(summary.seconds, 2), "tiles_per_s": round(rate, 2),
            "steady_tiles_per_s": round(steady, 2) if steady else None,
            "steady_tiles_per_s_per_core": round(steady / cores, 2) if steady else None,
            "device": summary.device}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=64)
    ap.add_argument("--tile-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default=str(ROOT / "out" / "scaling.json"))
    args = ap.parse_args(argv)
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Example captions for a model card: a few val images and a few tiles of real rasters.

Text only: the model card may quote captions of shared data but never carries images derived
from it. ``python -m rscaption.evaluation.examples --model M --raster a.tif`` (val examples: the
``examples`` of an ``rscaption evaluate --json`` report)
"""

from __future__ import annotations

import argparse
import json
import sys


def raster_examples(cap, path, tile_size: int = 256, n: int = 3, beam_size: int = 3,
                    target_resolution: float | None = None) -> list[dict]:
    """Captions of the ``n`` most complete tiles of a raster, tiled exactly as the pipeline does."""
    from ..raster.tiling import RasterTiler, TilingParams

    params = TilingParams(tile_size=tile_size, target_resolution=target_resolution)
    out = []
    with RasterTiler(path, params) as tiler:
        tiles = []
        for t in tiler.plan():
            img = tiler.read(t)
            if img is not None:
                tiles.append((img.valid_fraction, t, img.array))
        tiles.sort(key=lambda x: (-x[0], x[1].tile_id))
        chosen = sorted(tiles[:n], key=lambda x: x[1].tile_id)
        if not chosen:
            return out
        emb = cap.embed_images([a for _, _, a in chosen])
        caps = cap.caption(emb, beam_size=beam_size)
        for (frac, t, _), (c, conf) in zip(chosen, caps):
            out.append({"raster": str(path), "tile_id": t.tile_id, "row": t.row, "col": t.col,
                        "window": list(t.window), "valid_fraction": round(frac, 3), "caption": c,
                        "confidence": round(conf, 3)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--raster", nargs="*", default=[])
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--target-resolution", type=float)
    p.add_argument("-n", type=int, default=3)
    p.add_argument("--beam-size", type=int, default=3)
    args = p.parse_args(argv)
    from ..models.registry import load_model

    cap = load_model(args.model)
    res = []
    for r in args.raster:
        res += raster_examples(cap, r, args.tile_size, args.n, args.beam_size, args.target_resolution)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

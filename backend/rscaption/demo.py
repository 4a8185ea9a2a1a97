"""`make demo`: the main job end to end on the embedded default model, no network.

Captions a real GeoTIFF into `out/demo.gpkg` and runs a few text searches on it.  The raster is
`$RASTER` if set, else an aerial image from `../shared/data/geotiff` when that folder is beside
the checkout.  If no default model has been trained yet, a tiny random one is built so the
plumbing still runs (its captions are noise, and it says so).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
CANDIDATES = ["m_4709963_se_14_1_20200831.tif", "alpha.tif", "RGB.byte.tif"]
QUERIES = ["green farmland", "a lake", "a river", "a meadow of grass"]


def _pick_raster() -> str:
    if os.environ.get("RASTER"):
        return os.environ["RASTER"]
    shared = ROOT.parent / "shared" / "data" / "geotiff"
    for name in CANDIDATES:
        if (shared / name).exists():
            return str(shared / name)
    sys.exit("demo: no raster found; run `make demo RASTER=/path/to/image.tif`")


def _pick_model() -> str:
    from .models.registry import load_model
    from .errors import ModelError

    try:
        load_model("default", device="cpu")
        return "default"
    except ModelError as e:
        tiny = ROOT / ".cache" / "tiny_model"
        if not (tiny / "config.json").exists():
            from .models.tiny import build_tiny_captioner
            build_tiny_captioner().save(str(tiny))
        print(f"demo: {e}\ndemo: using a tiny random model instead ({tiny}); captions are noise",
              file=sys.stderr)
        return str(tiny)


def summarize(gpkg: Path, top: int = 8) -> None:
    """What the model said about the raster: the most frequent captions with their tile counts and
    mean confidence, and how many tiles it was unsure about."""
    from collections import defaultdict

    from .store.gpkg import TileStore

    with TileStore.open(str(gpkg)) as store:
        tiles = store.tiles()
    by_caption = defaultdict(list)
    for t in tiles:
        by_caption[t.get("caption") or ""].append(float(t.get("confidence") or 0.0))
    ranked = sorted(by_caption.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    print(f"\n== {len(tiles)} tiles, {len(by_caption)} distinct captions; most frequent:")
    for text, confs in ranked[:top]:
        print(f"{len(confs):>5} tiles  conf {sum(confs) / len(confs):.2f}  {text}")
    low = sum(1 for t in tiles if float(t.get("confidence") or 0.0) < 0.5)
    print(f"{low} of {len(tiles)} tiles have confidence < 0.5 (drawn dashed and hatched in QGIS)")


def main() -> int:
    raster = _pick_raster()
    model = _pick_model()
    out = ROOT / "out" / "demo.gpkg"
    out.parent.mkdir(exist_ok=True)
    print(f"demo: captioning {raster} with model '{model}' -> {out}", file=sys.stderr)
    rc = cli_main(["caption", raster, "-o", str(out), "--model", model, "--overwrite"])
    if rc:
        return rc
    summarize(out)
    for q in QUERIES:
        print(f"\n== rscaption search {out.name} \"{q}\" -k 3")
        rc = cli_main(["search", str(out), q, "-k", "3"] + ([] if model == "default" else ["--model", model]))
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())

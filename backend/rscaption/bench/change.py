"""`make bench`, section "change": ``rscaption change`` on the NAIP 2009 and 2020 scenes.

Tiles/s of the whole run (both dates captioned, the later one read on the earlier grid, scored,
written) and of the scoring step alone (from the phase timings: the embeddings of both dates to
the written change file), so a slower change run tells whether captioning or scoring moved.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
NAIP = ROOT.parent / "shared" / "data" / "geotiff"
PAIR = ("m_4709963_se_14_1_20090818.tif", "m_4709963_se_14_1_20200831.tif")


def bench_change(cap) -> dict | None:
    from ..change.run import change_rasters

    before, after = (str(NAIP / name) for name in PAIR)
    if not (os.path.exists(before) and os.path.exists(after)):
        return {"skipped": f"the NAIP pair is not in {NAIP}"}
    marks: dict[str, float] = {}

    def progress(phase, done, total):
        marks.setdefault(f"{phase}_start", time.perf_counter())
        marks[f"{phase}_end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as d:
        s = change_rasters(before, after, os.path.join(d, "change.gpkg"), model=cap, on_progress=progress)
    score_s = marks["score_end"] - marks["score_start"]
    return {"pair": "NAIP 2009 -> 2020 (5 m)", "tiles": s.total, "scored": s.scored, "changed": s.changed,
            "seconds": round(s.seconds, 2), "tiles_per_s": round(s.total / s.seconds, 2),
            "score_seconds": round(score_s, 3), "score_tiles_per_s": round(s.total / max(score_s, 1e-9), 1),
            "scorer": s.scorer, "model": s.model_id}


def show_change(c: dict) -> None:
    from .sections import say

    if "skipped" in c:
        say(f"change    skipped: {c['skipped']}")
        return
    say(f"change    {c['tiles']} tiles of the {c['pair']} pair in {c['seconds']} s: {c['tiles_per_s']} tiles/s "
        f"end to end (two dates captioned); scoring alone {c['score_tiles_per_s']} tiles/s "
        f"({c['changed']} changed, scorer {c['scorer']})")

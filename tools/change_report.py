"""The NAIP 2009 -> 2020 change result for docs/change.md: a table of the most changed tiles and a
map of the change score per tile (derived numbers only: no imagery is copied into the project).

    nice -n 10 .venv/bin/python tools/change_report.py [--gpkg runs/change_naip/naip.gpkg] [-k 12]

Runs ``rscaption change`` on the two shared NAIP scenes with the default model (unless --gpkg
already holds the result), then rewrites the block between ``<!-- naip-table:start -->`` and
``<!-- naip-table:end -->`` in docs/change.md and writes docs/change_naip_map.png.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backend"))
GEOTIFF = ROOT.parent / "shared" / "data" / "geotiff"
PAIR = ("m_4709963_se_14_1_20090818.tif", "m_4709963_se_14_1_20200831.tif")
START, END = "<!-- naip-table:start -->", "<!-- naip-table:end -->"


def _rows(gpkg: str) -> list[dict]:
    con = sqlite3.connect(gpkg)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute('SELECT tile_id, "row", "col", change, cosine_change, scene_before, '
                                             "scene_after, confidence, caption_before, caption_after, summary, status "
                                             "FROM changes ORDER BY tile_id")]
    finally:
        con.close()


def table(rows: list[dict], k: int) -> str:
    scored = [r for r in rows if r["change"] is not None]
    by_cos = {r["tile_id"]: i for i, r in enumerate(sorted(scored, key=lambda r: (-r["cosine_change"], r["tile_id"])), 1)}
    top = sorted(scored, key=lambda r: (-r["change"], r["tile_id"]))[:k]
    out = ["| rank | tile (row, col) | change | rank by 1 - cos | summary | confidence | caption 2009 | caption 2020 |",
           "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(top, 1):
        conf = "" if r["confidence"] is None else f"{r['confidence']:.2f}"
        out.append(f"| {i} | {r['tile_id']} ({r['row']}, {r['col']}) | {r['change']:.3f} | {by_cos[r['tile_id']]} "
                   f"| {r['summary']} | {conf} | {r['caption_before']} | {r['caption_after']} |")
    cos_top = sorted(scored, key=lambda r: (-r["cosine_change"], r["tile_id"]))[:k]
    changed = sum(r["change"] >= 0.5 for r in scored)
    out.append("")
    out.append(f"{len(rows)} tiles, {len(scored)} compared, {changed} at change >= 0.5. The baseline's own top {k} "
               f"(1 - cos) holds {sum(r['tile_id'] in {t['tile_id'] for t in top} for r in cos_top)} of these; its "
               "other picks: " + "; ".join(f"{r['tile_id']} ({r['summary']}, change {r['change']:.2f})"
                                            for r in cos_top if r["tile_id"] not in {t["tile_id"] for t in top}) + ".")
    return "\n".join(out)


def change_map(rows: list[dict], path: Path, k: int, cell: int = 28) -> None:
    """One cell per tile: white (no change) to dark red (change 1), grey when not compared; the
    top ``k`` tiles carry their rank."""
    from PIL import Image, ImageDraw

    n_rows = max(r["row"] for r in rows) + 1
    n_cols = max(r["col"] for r in rows) + 1
    img = Image.new("RGB", (n_cols * cell + 1, n_rows * cell + 1), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    rank = {r["tile_id"]: i for i, r in enumerate(sorted((r for r in rows if r["change"] is not None),
                                                        key=lambda r: (-r["change"], r["tile_id"]))[:k], 1)}
    for r in rows:
        x, y = r["col"] * cell, r["row"] * cell
        if r["change"] is None:
            color = (170, 170, 170)
        else:
            c = float(r["change"])
            color = (255 - int(90 * c), int(255 * (1 - c)), int(255 * (1 - c)))
        draw.rectangle([x, y, x + cell, y + cell], fill=color, outline=(120, 120, 120))
        if r["tile_id"] in rank:
            draw.text((x + 4, y + 7), str(rank[r["tile_id"]]), fill=(0, 0, 0) if r["change"] < 0.6 else (255, 255, 255))
    img.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpkg", default=str(ROOT / "runs" / "change_naip" / "naip.gpkg"))
    ap.add_argument("-k", type=int, default=12)
    args = ap.parse_args(argv)
    gpkg = Path(args.gpkg)
    if not gpkg.exists():
        from rscaption.change import change_rasters

        gpkg.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        s = change_rasters(str(GEOTIFF / PAIR[0]), str(GEOTIFF / PAIR[1]), str(gpkg), on_message=print)
        print(s.one_line(), f"({time.time() - t0:.0f} s)")
    rows = _rows(str(gpkg))
    md = table(rows, args.k)
    change_map(rows, ROOT / "docs" / "change_naip_map.png", args.k)
    doc = ROOT / "docs" / "change.md"
    text = doc.read_text()
    block = f"{START}\n{md}\n{END}"
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    doc.write_text(text)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

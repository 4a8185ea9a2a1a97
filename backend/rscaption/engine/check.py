"""`rscaption check OUT.gpkg [--repair]`: find, and optionally redo, damaged tiles of an output.

Why: a copy interrupted half-way, a user editing captions to NULL in QGIS or a disk fault can
leave tiles without a caption or with an unusable embedding; search then ranks garbage or fails.
``check`` says how many and which (exit 1 when any); ``--repair`` re-captions exactly those tiles
with the model recorded in the file, from the source raster recorded in the file, through the
normal resumable pipeline (which drops damaged tiles and captions them again).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass

from ..store import integrity as store_check
from ..errors import StoreError
from ..store.gpkg import TileStore


@dataclass
class CheckReport:
    path: str
    total: int
    damage: list
    integrity: str  # "ok" or sqlite's first complaint

    @property
    def ok(self) -> bool:
        return not self.damage and self.integrity == "ok"

    def one_line(self) -> str:
        text = store_check.describe(self.damage, self.total)
        if self.integrity != "ok":
            text += f"; sqlite integrity check: {self.integrity}"
        return f"{self.path}: {text}"


def check_store(path: str) -> CheckReport:
    with TileStore.open(path, readonly=True) as store:
        damage = store.damaged()
        total = store.count()
    conn = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True)
    try:
        integrity = str(conn.execute("PRAGMA quick_check").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        integrity = str(exc)
    finally:
        conn.close()
    return CheckReport(str(path), total, damage, integrity)


def repair_store(path: str, model=None, device=None, batch_size: int = 8, on_progress=None):
    """Re-caption the damaged tiles; returns the pipeline's RunSummary. Needs the source raster."""
    from .pipeline import caption_raster
    from ..raster.paths import is_gdal_path
    from ..search.query import model_for_store
    from ..raster.tiling import TilingParams

    with TileStore.open(path) as store:
        meta = store.metadata()
        source = (meta.get("source_raster") or {}).get("path")
        if not source or not (is_gdal_path(source) or os.path.isfile(str(source))):  # /vsi...: GDAL's to open
            raise StoreError(f"cannot repair {path}: its source raster {source or '(not recorded)'} is gone; "
                             "put it back at that path, or caption the raster again with --overwrite")
        if not isinstance(meta.get("tiling_params"), dict):
            raise StoreError(f"cannot repair {path}: its tiling parameters are not recorded")
        cap = model_for_store(store, model, device)
    tiling = TilingParams.from_dict(meta["tiling_params"])
    return caption_raster(str(source), path, model=cap, tiling=tiling, batch_size=batch_size,
                          language=meta.get("language") or "en", on_progress=on_progress,
                          resume=True, confirm_large=True)


def add_check_args(p) -> None:
    p.add_argument("gpkg", help="a GeoPackage written by rscaption caption")
    p.add_argument("--repair", action="store_true",
                   help="re-caption damaged tiles (needs the source raster at its recorded path)")
    p.add_argument("--model", default=None, help="override the model recorded in the file (hash must match)")
    p.add_argument("--device", default=None)


def run_check(args) -> int:
    """Exit 0: no damage (or all repaired); 1: damage found and not repaired."""
    import sys

    report = check_store(args.gpkg)
    print(report.one_line(), file=sys.stdout)
    if report.ok:
        return 0
    if not args.repair:
        return 1
    if report.integrity != "ok":
        raise StoreError(f"{args.gpkg} fails sqlite's integrity check ({report.integrity}); "
                         "it cannot be repaired in place: caption the raster again with --overwrite")
    summary = repair_store(args.gpkg, model=args.model, device=args.device)
    print(f"repaired: {summary.written} tile(s) captioned again", file=sys.stdout)
    after = check_store(args.gpkg)
    print(after.one_line(), file=sys.stdout)
    return 0 if after.ok else 1

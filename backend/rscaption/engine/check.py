"""`rscaption check OUT.gpkg [--repair]`: find, and optionally redo, damaged tiles of an output.

Why: a copy interrupted half-way, a user editing captions to NULL in QGIS or a disk fault can
leave tiles without a caption or with an unusable embedding; search then ranks garbage or fails.
``check`` says how many and which (exit 1 when any); ``--repair`` re-captions exactly those tiles
with the model recorded in the file, from the source raster recorded in the file, through the
normal resumable pipeline (which drops damaged tiles and captions them again). Damage includes a
tile id on several rows, an embedding whose row was deleted and a file whose every embedding was
truncated (opened with ``any_embedding_size``, so it is repaired rather than only overwritten). Where
a repair cannot run in place, the advice is a ``rscaption caption ... --overwrite`` command built
from the file's metadata (``check`` itself has no ``--overwrite``).
"""

from __future__ import annotations

import os
import shlex
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
    with TileStore.open(path, readonly=True, any_embedding_size=True) as store:  # truncated ones are damage
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
    from .pipeline import caption_raster, raster_fingerprint
    from ..raster.paths import is_gdal_path
    from ..search.query import model_for_store
    from ..raster.tiling import TilingParams

    with TileStore.open(path, any_embedding_size=True) as store:  # every embedding truncated: redo them all
        meta = store.metadata()
        source = (meta.get("source_raster") or {}).get("path")
        if not source or not (is_gdal_path(source) or os.path.isfile(str(source))):  # /vsi...: GDAL's to open
            raise StoreError(f"cannot repair {path}: its source raster {source or '(not recorded)'} is gone; "
                             "put it back at that path, or caption the raster again with --overwrite")
        if not isinstance(meta.get("tiling_params"), dict):
            raise StoreError(f"cannot repair {path}: its tiling parameters are not recorded")
        if raster_fingerprint(str(source)).get("checksum") != (meta.get("source_raster") or {}).get("checksum"):
            raise StoreError(f"cannot repair {path}: its source raster {source} changed since the file was "
                             "written; put the original back there and repair again, or caption the raster "
                             f"anew: {caption_command(path, meta, model)}")
        cap = model_for_store(store, model, device)
    tiling = TilingParams.from_dict(meta["tiling_params"])
    stored = meta.get("caption_options") or {}  # the file's, so repaired tiles match the others
    options = {k: stored[k] for k in ("beam_size", "max_new_tokens") if k in stored}
    return caption_raster(str(source), path, model=cap, tiling=tiling, batch_size=batch_size,
                          language=meta.get("language") or "en", on_progress=on_progress,
                          resume=True, confirm_large=True, **options)


def caption_command(path: str, meta: dict, model=None) -> str:
    """The ``rscaption caption ... --overwrite`` that makes ``path`` again from its metadata (source,
    model, tiling, language, beam width): advice a user can paste, since ``check`` has no
    ``--overwrite``."""
    t = meta.get("tiling_params") or {}
    name = model if isinstance(model, (str, os.PathLike)) else (meta.get("model") or {}).get("id") or "default"
    argv = ["rscaption", "caption", str((meta.get("source_raster") or {}).get("path")), "-o", str(path),
            "--overwrite", "--model", str(name), "--tile-size", str(t.get("tile_size", "auto"))]
    if t.get("overlap"):
        argv += ["--overlap", str(t["overlap"])]
    if t.get("bands"):
        argv += ["--bands", ",".join(str(b) for b in t["bands"])]
    if t.get("extent"):
        argv += ["--extent", *(repr(float(v)) for v in t["extent"])]
    if t.get("target_resolution"):
        argv += ["--resolution", repr(float(t["target_resolution"]))]
    if t.get("nodata_threshold") not in (None, 0.95):
        argv += ["--nodata-threshold", repr(float(t["nodata_threshold"]))]
    if (meta.get("language") or "en") != "en":
        argv += ["--language", meta["language"]]
    beam = (meta.get("caption_options") or {}).get("beam_size")
    if beam:
        argv += ["--beam-size", str(beam)]
    return shlex.join(argv)


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
                         f"it cannot be repaired in place: caption the raster again: {_remake(args.gpkg, args.model)}")
    summary = repair_store(args.gpkg, model=args.model, device=args.device)
    print(f"repaired: {summary.written} tile(s) captioned again", file=sys.stdout)
    after = check_store(args.gpkg)
    print(after.one_line(), file=sys.stdout)
    return 0 if after.ok else 1


def _remake(path: str, model=None) -> str:
    """The command that makes ``path`` again, or the flag to use where its metadata cannot be read."""
    try:
        with TileStore.open(path, readonly=True, any_embedding_size=True) as store:
            return caption_command(path, store.metadata(), model)
    except (StoreError, sqlite3.DatabaseError, ValueError):
        return f"rscaption caption RASTER -o {shlex.quote(str(path))} --overwrite"

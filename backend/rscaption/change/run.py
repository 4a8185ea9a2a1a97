"""``change_rasters``: caption both dates on one grid, score every tile, write the change file.

The steps, each resumable:

1. **before**: a raster is captioned by the ordinary pipeline into ``OUT.gpkg.parts/before.gpkg``;
   a caption GeoPackage is used as it is (nothing recomputed) and its grid becomes the grid.
2. **after**: a raster is read on the before grid (``align.py``) and captioned the same way into
   ``parts/after.gpkg``; a caption GeoPackage is used as it is when it was tiled on the same grid,
   else its raster (when still there) is read on the before grid.
3. **score**: the two dates' embeddings, tile by tile (``score.py``), the scene names and the
   sentence (``summary.py``), written with both dates' layers into OUT (``store.py``) in one go.

A cancel or a crash during 1-2 keeps every finished batch in the parts files, and the same call
resumes them; OUT itself only appears once complete, and the parts are removed then. A finished
OUT asked for again with the same inputs is reported, not recomputed.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from .. import __version__
from ..engine.pipeline import caption_raster, raster_fingerprint, tile_choice_for
from ..errors import RasterError, StoreError
from ..raster.paths import check_raster_path
from ..raster.tile_size import TileChoice
from ..raster.tiling import TilingParams
from ..store.gpkg import TileStore
from ..store.run_lock import RunLock, check_output_path
from . import align
from .score import scorer_for
from .scoring import score_tiles
from .store import ChangeFile, is_change_file, write_change_file

PHASES = ("before", "after", "score")


@dataclass
class ChangeSummary:
    total: int = 0
    scored: int = 0
    changed: int = 0
    not_scored: int = 0
    threshold: float = 0.5
    cancelled: bool = False
    seconds: float = 0.0
    out_path: str = ""
    model_id: str = ""
    before_reused: bool = False
    after_reused: bool = False
    overlap: str = ""
    warnings: list = field(default_factory=list)
    scorer: str = ""
    top: list = field(default_factory=list)
    up_to_date: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def one_line(self) -> str:
        if self.cancelled:
            return ("cancelled: finished tiles are kept; run the same command again to resume "
                    f"(nothing written to {self.out_path} yet)")
        state = "up to date" if self.up_to_date else "done"
        return (f"{state}: {self.scored} tiles compared, {self.changed} changed (change >= {self.threshold:.2f}), "
                f"{self.not_scored} not compared (no data on a date), of {self.total}, in {self.seconds:.1f} s "
                f"-> {self.out_path}")


@dataclass
class _Date:
    label: str
    path: str
    store: str = ""          # the caption GeoPackage holding this date's tiles
    reused: bool = False
    meta: dict = field(default_factory=dict)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _is_gpkg(path: str) -> bool:
    return str(path).lower().endswith(".gpkg")


def _store_meta(path: str) -> dict:
    if is_change_file(path):
        raise StoreError(f"{path} is a change file; give a raster or a caption GeoPackage for each date")
    with TileStore.open(path, readonly=True) as store:
        meta = store.metadata()
        meta["_tiles"] = store.count()
    return meta


def change_rasters(before: str, after: str, out_gpkg: str, *, model="default", tile_size="auto",
                   top_k: int = 10, batch_size: int = 8, device: str | None = None,
                   on_progress: Callable[[str, int, int], None] | None = None,
                   on_message: Callable[[str], None] | None = None,
                   should_cancel: Callable[[], bool] | None = None, resume: bool = True,
                   overwrite: bool = False, confirm_large: bool = False,
                   workers: int | None = None) -> ChangeSummary:
    """What changed between ``before`` and ``after`` (rasters or caption GeoPackages), tile by
    tile, into ``out_gpkg``. See the module docstring and docs/change.md."""
    t0 = time.perf_counter()
    out = check_output_path(out_gpkg)
    b, a = _Date("before", str(before)), _Date("after", str(after))
    for d in (b, a):
        check_output_path(out, d.path)  # the output is never an input
        if _is_gpkg(d.path):
            if not os.path.isfile(d.path):
                raise StoreError(f"{d.label} GeoPackage not found: {d.path}")
            d.meta = _store_meta(d.path)
        else:
            check_raster_path(d.path)
    if os.path.exists(b.path) and os.path.exists(a.path) and os.path.samefile(b.path, a.path):
        raise RasterError("the before and after inputs are the same file: nothing can have changed")
    if not a.meta:  # no overlap is one line before a model loads or a tile is captioned
        align.overlap(align.store_grid(b.meta, b.path) if b.meta else align.raster_grid(b.path), a.path)
    summary = ChangeSummary(out_path=os.path.abspath(out), warnings=[])

    def say(line: str) -> None:
        if line.startswith("warning"):
            summary.warnings.append(line)
        if on_message:
            on_message(line)

    parts = out + ".parts"
    with RunLock(out):
        if os.path.exists(out) and not overwrite and not resume:
            raise StoreError(f"{out} exists; pass --overwrite to replace it")
        cap = _model(model, device, [d for d in (b, a) if d.meta])
        summary.model_id = cap.model_id
        fingerprints = {d.label: _fingerprint(d) for d in (b, a)}
        scorer = scorer_for(cap)
        if os.path.exists(out) and not overwrite:
            done = _up_to_date(out, fingerprints, cap, scorer, top_k)
            if done is not None:
                done.seconds = time.perf_counter() - t0
                return done
        if overwrite and os.path.isdir(parts):
            shutil.rmtree(parts)
        if scorer.note:
            say(scorer.note)
        summary.scorer = scorer.name
        summary.threshold = scorer.threshold

        def progress(phase):
            return (lambda done, total, _records=None: on_progress(phase, int(done), int(total))) if on_progress else None

        run = dict(model=cap, batch_size=batch_size, device=device, should_cancel=should_cancel,
                   resume=True, overwrite=False, confirm_large=confirm_large, workers=workers)
        grid, tiling, choice, before_raster = _before(b, cap, tile_size, parts, run, progress("before"), say)
        if b.store == "":  # cancelled
            return _cancelled(summary, t0)
        summary.before_reused = b.reused
        if should_cancel and should_cancel():
            return _cancelled(summary, t0)
        summary.overlap = _after(a, grid, tiling, choice, before_raster, parts, run, progress("after"), say)
        if a.store == "":
            return _cancelled(summary, t0)
        summary.after_reused = a.reused
        if should_cancel and should_cancel():
            return _cancelled(summary, t0)
        if on_progress:
            on_progress("score", 0, 1)
        rows, crs = score_tiles(b.store, a.store, cap, scorer, choice.m_per_px)
        summary.total = len(rows)
        summary.scored = sum(r["status"] == "scored" for r in rows)
        summary.changed = sum(bool(r["changed"]) for r in rows)
        summary.not_scored = summary.total - summary.scored
        summary.top = _top(rows, top_k)
        summary.seconds = time.perf_counter() - t0
        meta = _metadata(cap, b, a, fingerprints, scorer, grid, tiling, choice, summary)
        os.makedirs(parts, exist_ok=True)
        write_change_file(os.path.join(parts, "change.gpkg"), crs[0], crs[1], int(cap.embed_dim), meta,
                          {"before": b.store, "after": a.store}, rows)
        os.replace(os.path.join(parts, "change.gpkg"), out)
        shutil.rmtree(parts, ignore_errors=True)
        if on_progress:
            on_progress("score", 1, 1)
    summary.seconds = time.perf_counter() - t0
    return summary


def _cancelled(summary: ChangeSummary, t0: float) -> ChangeSummary:
    summary.cancelled = True
    summary.seconds = time.perf_counter() - t0
    return summary


def _model(model, device, stores: list[_Date]):
    """The model: the one that captioned a reused GeoPackage (its hash must match; both dates'
    must be the same), else ``model``."""
    from ..models.registry import load_model

    hashes = {(d.meta.get("model") or {}).get("hash") for d in stores}
    if len(hashes) > 1:
        raise StoreError("the before and after GeoPackages were captioned by different models; their embeddings "
                         "are not comparable (caption both with one model)")
    if stores:
        from ..search.query import model_for_store

        class _Meta:  # model_for_store reads .metadata() and .path
            path, metadata = stores[0].path, staticmethod(lambda: stores[0].meta)

        return model_for_store(_Meta(), None if model in (None, "default") else model, device)
    return load_model(model, device=device) if isinstance(model, (str, os.PathLike)) else model


def _fingerprint(d: _Date) -> dict:
    if d.meta:
        src = d.meta.get("source_raster") or {}
        return {"gpkg": os.path.abspath(d.path), "checksum": src.get("checksum"), "tiles": d.meta.get("_tiles")}
    fp = raster_fingerprint(d.path)
    return {"raster": fp["path"], "checksum": fp["checksum"]}


def _before(b: _Date, cap, tile_size, parts, run, progress, say):
    """Returns (grid, tiling, tile choice, the before raster's path or None); sets ``b.store``."""
    if b.meta:
        grid = align.store_grid(b.meta, b.path)
        tiling = TilingParams.from_dict(b.meta.get("tiling_params") or {})
        foot = b.meta.get("tile_footprint") or {}
        choice = TileChoice(tiling.tile_size, foot.get("ground_resolution_m"), bool(foot.get("auto")))
        if not b.meta.get("finished"):
            say(f"warning: {b.path} is an unfinished caption run: the tiles it lacks are not compared "
                "(finish it with rscaption caption first)")
        say(f"before: reusing the {b.meta['_tiles']} captioned tiles of {b.path}")
        b.store, b.reused = b.path, True
        if progress:
            progress(b.meta["_tiles"], b.meta["_tiles"])
        src = (b.meta.get("source_raster") or {}).get("path")
        return grid, tiling, choice, src if src and os.path.isfile(src) else None
    grid = align.raster_grid(b.path)
    choice = tile_choice_for(cap, b.path, tile_size)
    tiling = TilingParams(tile_size=choice.tile_px)
    say(choice.describe())
    store = os.path.join(parts, "before.gpkg")
    os.makedirs(parts, exist_ok=True)
    res = caption_raster(b.path, store, tiling=tiling, tile_choice=choice, on_progress=progress, **run)
    b.store = "" if res.cancelled else store
    return grid, tiling, choice, b.path


def _after(a: _Date, grid, tiling, choice, before_raster, parts, run, progress, say) -> str:
    """Sets ``a.store`` (empty when cancelled); returns the overlap line."""
    if a.meta:
        same = align.store_grid(a.meta, a.path).same_as(grid) and _same_tiling(a.meta, tiling)
        if same:
            say(f"after: reusing the {a.meta['_tiles']} captioned tiles of {a.path} (same grid as the before date)")
            a.store, a.reused = a.path, True
            if progress:
                progress(a.meta["_tiles"], a.meta["_tiles"])
            return "overlap: both dates were captioned on the same grid"
        src = (a.meta.get("source_raster") or {}).get("path")
        if not src or not os.path.isfile(src):
            raise StoreError(f"{a.path} was tiled on another grid than the before date and its raster is gone; "
                             "give the after raster instead")
        say(f"after: {a.path} was tiled on another grid; its raster {src} is read on the before grid instead")
        a.path, a.meta = src, {}
    frac, line = align.overlap(grid, a.path)
    say(line)
    for w in align.input_warnings(before_raster, a.path, choice.m_per_px):
        say(w)
    path, warped = align.aligned_after(a.path, grid, parts, choice.m_per_px)
    if warped:
        say("after: read on the before raster's grid (reprojected and resampled with GDAL's warper)")
    store = os.path.join(parts, "after.gpkg")
    try:
        res = caption_raster(path, store, tiling=replace(tiling, bands=None), tile_choice=choice,
                             on_progress=progress, **run)
    except RasterError as exc:
        if "every tile" in str(exc) and "is nodata" in str(exc):
            raise RasterError(f"no tile of the before grid has data on the after date {a.path} "
                              f"({100 * frac:.0f} % overlap): nothing to compare") from None
        raise
    a.store = "" if res.cancelled else store
    return line


def _same_tiling(meta: dict, tiling: TilingParams) -> bool:
    other = TilingParams.from_dict(meta.get("tiling_params") or {})
    keys = ("tile_size", "overlap", "extent", "target_resolution")
    return all(getattr(other, k) == getattr(tiling, k) for k in keys)


def _top(rows: list[dict], k: int) -> list[dict]:
    scored = sorted((r for r in rows if r["change"] is not None), key=lambda r: (-r["change"], r["tile_id"]))
    keys = ("tile_id", "row", "col", "change", "summary", "caption_before", "caption_after", "confidence")
    return [{key: r.get(key) for key in keys} for r in scored[: max(0, int(k))]]


def _metadata(cap, b, a, fingerprints, scorer, grid, tiling, choice, summary) -> dict:
    return {
        "model": {"id": cap.model_id, "hash": cap.model_hash, "card": cap.card},
        "software": {"name": "rscaption", "version": __version__},
        "change": {
            "before": {"input": os.path.abspath(b.path), "reused": b.reused, **fingerprints["before"]},
            "after": {"input": os.path.abspath(a.path), "reused": a.reused, **fingerprints["after"]},
            "scorer": scorer.describe(), "grid": grid.to_dict(), "tiling_params": tiling.to_dict(),
            "tile_footprint": choice.to_dict(), "overlap": summary.overlap, "warnings": summary.warnings,
            "summary": {k: v for k, v in summary.to_dict().items() if k != "top"}, "finished": _now(),
        },
    }


def _up_to_date(out, fingerprints, cap, scorer, top_k) -> ChangeSummary | None:
    """The finished OUT of the very same inputs, model and scorer: its summary (nothing redone).
    Anything else in OUT's place is refused in one line rather than overwritten."""
    if not is_change_file(out):
        raise StoreError(f"{out} exists and is not an rscaption change file; choose another output or pass --overwrite")
    with ChangeFile(out) as cf:
        meta = cf.metadata()
        ch = meta.get("change") or {}
        diffs = []
        for date in ("before", "after"):
            if (ch.get(date) or {}).get("checksum") != fingerprints[date].get("checksum"):
                diffs.append(f"another {date} input")
        if (meta.get("model") or {}).get("hash") != cap.model_hash:
            diffs.append("another model")
        if (ch.get("scorer") or {}).get("sha256") != scorer.sha256:
            diffs.append("another change scorer")
        if diffs:
            raise StoreError(f"{out} was made from {' and '.join(diffs)}; choose another output or pass --overwrite")
        saved = dict(ch.get("summary") or {})
        top = [{k: r.get(k) for k in ("tile_id", "row", "col", "change", "summary", "caption_before",
                                      "caption_after", "confidence")} for r in cf.top(top_k)]
    known = ChangeSummary.__dataclass_fields__
    return ChangeSummary(**{k: v for k, v in saved.items() if k in known and k not in ("top", "up_to_date")},
                         top=top, up_to_date=True)

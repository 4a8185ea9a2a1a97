"""The tile pipeline: raster -> tiles -> batches -> embeddings + captions -> GeoPackage.

Every finished batch is committed to the output before the next one starts, so a cancel, a crash
or a killed process keeps everything finished so far, and a second run with the same raster,
tiling and model resumes where the first stopped (tiles are keyed by raster fingerprint, source
window, output size and model hash).  The in-process plugin task, the subprocess worker and the
CLI all run this one function.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from .. import __version__
from ..errors import Cancelled, RasterError, StoreError
from ..store.gpkg import TileRecord, TileStore
from .oom import oom_guard
from .local import FlowStats, run_local
from ..raster.ground import ground_resolution
from ..store.run_lock import RunLock, check_output_path
from .run_size import check_run_size
from . import provenance
from ..raster.watch import RasterWatch
from .plan import PlanKeys, left_to_do, tile_key
from ..raster.paths import is_gdal_path, virtual_fingerprint
from ..raster.tiling import RasterTiler, Tile, TilingParams
from ..raster.tile_size import TileChoice, choose_tile_size

ProgressFn = Callable[[int, int, list], None]
CancelFn = Callable[[], bool]

# Files above this size are fingerprinted by size + mtime + sampled blocks rather than a full hash,
# so opening a multi-GB mosaic does not cost a full read before the first tile.
_FULL_HASH_LIMIT = 256 * 1024 * 1024


@dataclass
class RunSummary:
    total: int
    written: int
    skipped_nodata: int
    resumed: int
    cancelled: bool
    seconds: float
    out_path: str
    model_id: str
    device: str
    stages: dict | None = None  # local engine: seconds per stage (local_engine.FlowStats)

    def to_dict(self) -> dict:
        return asdict(self)

    def one_line(self) -> str:
        state = "cancelled" if self.cancelled else "done"
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        return (f"{state}: {self.written} tiles captioned, {self.resumed} resumed, "
                f"{self.skipped_nodata} skipped as nodata, of {self.total} "
                f"in {self.seconds:.1f} s ({rate:.2f} tiles/s, {self.device}) -> {self.out_path}")


def raster_fingerprint(path: str) -> dict:
    """Identify the source raster cheaply but reliably enough to refuse resuming on a changed file."""
    if is_gdal_path(path):  # /vsicurl/, /vsis3/ ...: no local file to stat or hash
        return virtual_fingerprint(path)
    if os.path.isdir(path):
        raise RasterError(f"{path} is a directory, not a raster file")
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            method = "sha256"
        else:
            for i in range(16):
                f.seek(st.st_size * i // 16)
                h.update(f.read(1 << 16))
            h.update(str(st.st_size).encode())
            method = "sha256-sampled+size"
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime,
            "checksum": h.hexdigest(), "checksum_method": method}


def _resolve_model(model, device):
    if isinstance(model, (str, os.PathLike)):
        from ..models.registry import load_model
        return load_model(str(model), device=device)
    return model


def run_setup(model, device, raster_path: str, tiling: TilingParams | None, tile_choice, language: str,
              beam_size: int | None):
    """What every engine settles before it opens the output: the model (an unknown language fails
    here, before anything is written), what it computes in (a bf16 this CPU cannot run fails here
    too), the beam width (the card's by default: the confidence was calibrated on those captions),
    the tiling and tile-size choice, and the raster's fingerprint."""
    cap = _resolve_model(model, device)
    cap.decoder(language)
    _compute_dtype_name(cap)  # bf16 where this CPU cannot run it: a ModelError now, not a oneDNN error mid-run
    beam_size = int(beam_size or (getattr(cap, "card", {}) or {}).get("beam_size") or 1)
    if tiling is None:
        tile_choice = tile_choice_for(cap, raster_path)
        tiling = TilingParams(tile_size=tile_choice.tile_px)
    elif tile_choice is None or tile_choice.tile_px != tiling.tile_size:
        tile_choice = tile_choice_for(cap, raster_path, tiling.tile_size, tiling.target_resolution)
    return cap, beam_size, tiling, tile_choice, raster_fingerprint(raster_path)


def tile_choice_for(cap, raster=None, requested: int | str | None = None,
                    target_resolution: float | None = None, declared_m: float | None = None) -> TileChoice:
    """The tile size for ``raster`` (a path, or its output metres per pixel) and how it was chosen:
    the CLI, the worker and the in-process plugin all call this so they agree and say the same.
    ``declared_m``: metres per pixel a person gave for a raster without a CRS (the plugin asks),
    so its tiles get the trained footprint and its captions the scene checks; a raster's own
    measure always wins."""
    card = getattr(cap, "card", {}) or {}
    if isinstance(raster, (str, os.PathLike)):
        ground = ground_resolution(raster, target_resolution)
        m_per_px = ground.m_per_px if ground else (float(declared_m) if declared_m else None)
    else:
        m_per_px = float(raster) if raster else None
    return choose_tile_size(card, m_per_px, requested)


def default_tiling_for(cap, raster=None) -> TilingParams:
    """Tiles of the ground footprint the model was trained on (``--tile-size auto``), so a new user
    gets sensible tiles with no flags; the model's pixel tile size when the raster has no CRS."""
    return TilingParams(tile_size=tile_choice_for(cap, raster).tile_px)


def _batches(tiler: RasterTiler, tiles: Iterable[Tile], batch_size: int,
             counts: dict) -> Iterator[list[tuple[Tile, np.ndarray, float]]]:
    """Read tiles in a background thread one batch ahead: rasterio releases the GIL while decoding,
    so reading overlaps with the model instead of adding to it."""

    def read_batch(chunk):
        out = []
        for t in chunk:
            img = tiler.read(t)
            if img is None:
                counts["skipped"] += 1
            else:
                out.append((t, img.array, img.valid_fraction))
        return out

    it = iter(tiles)
    chunks = iter(lambda: list(itertools.islice(it, batch_size)), [])  # lazily: no list of the plan
    first = next(chunks, None)
    if first is None:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(read_batch, first)
        for nxt in itertools.chain(chunks, [None]):
            batch = fut.result()
            if nxt is not None:
                fut = pool.submit(read_batch, nxt)
            yield batch


def caption_raster(raster_path: str, out_gpkg: str, model="default", tiling: TilingParams | None = None,
                   batch_size: int = 8, device: str | None = None, beam_size: int | None = None,
                   on_progress: ProgressFn | None = None, should_cancel: CancelFn | None = None,
                   resume: bool = True, overwrite: bool = False, language: str = "en",
                   max_new_tokens: int = 30, tile_choice: TileChoice | None = None,
                   confirm_large: bool = False, workers: int | None = None) -> RunSummary:
    """Caption every (non-nodata) tile of a raster into a searchable GeoPackage.

    ``workers``: model threads of the local engine (None: one per usable core on the CPU, up to 8; see
    local_engine.py); 0 runs the sequential loop of earlier versions, the benchmark's baseline.

    ``tiling=None`` picks the tile size from the raster's ground resolution (auto); ``tile_choice``
    only tells the metadata how a caller chose ``tiling.tile_size`` (see :func:`tile_choice_for`).
    A run planning more than ``run_size.LARGE_RUN_TILES`` tiles raises ``LargeRunError`` before
    reading any pixel unless ``confirm_large``."""
    t0 = time.perf_counter()
    if os.path.isdir(raster_path):  # say so, rather than GDAL's "not recognized" or IsADirectoryError
        raise RasterError(f"{raster_path} is a directory, not a raster file")
    check_output_path(out_gpkg, raster_path)  # the same checks as the CLI's and the worker's
    watch = RasterWatch(raster_path)  # before the fingerprint: a change from here on stops the run
    cap, beam_size, tiling, tile_choice, fp = run_setup(model, device, raster_path, tiling, tile_choice,
                                                        language, beam_size)
    model_hash = cap.model_hash
    model_id = cap.model_id

    with RasterTiler(raster_path, tiling) as tiler, RunLock(out_gpkg):  # one writer per output
        check_run_size(tiler.count_tiles(), confirm_large, upsample=tiler.upsample, source_px=tiler.source_px)
        tiles = tiler.tiles()  # lazy: memory does not grow with the raster
        store = _open_store(out_gpkg, tiler, cap, fp, tiling, resume, overwrite, device_name=str(cap.device),
                            tile_choice=tile_choice)
        try:
            _claim_language(store, language)
            provenance.claim_caption_options(store, {"beam_size": beam_size, "max_new_tokens": max_new_tokens})
            store.drop_damaged()  # a tile without caption or with a bad embedding is redone, not resumed
            keys = PlanKeys(tiles, fp["checksum"], tiling.tile_size, model_hash)
            resumed, todo = left_to_do(keys, store.done_keys())
            counts = {"skipped": 0}
            written = 0
            cancelled = False
            total = len(tiles)
            if on_progress:
                on_progress(resumed, total, [])
            step = functools.partial(caption_batch, cap, keys=keys, beam_size=beam_size,
                                     max_new_tokens=max_new_tokens, language=language,
                                     ground_m=tile_choice.m_per_px if tile_choice else None)

            dtypes = set()

            def write(records, skipped=0):
                nonlocal written
                counts["skipped"] += skipped
                provenance.check_raster_unchanged(watch, raster_path, store)  # no batch of a changed raster
                if records:
                    provenance.record_compute_dtype(store, _compute_dtype_name(cap), dtypes)
                    store.add(records)
                    written += len(records)
                if on_progress:
                    on_progress(resumed + written + counts["skipped"], total, records)

            stats = None
            try:
                if workers == 0:
                    for batch in _batches(tiler, todo, batch_size, counts):
                        if should_cancel and should_cancel():
                            cancelled = True
                            break
                        write(step(batch))
                else:
                    stats = FlowStats()
                    cancelled = run_local(cap.device, workers, functools.partial(_read_item, tiler), todo,
                                          batch_size, step, write, should_cancel, stats)
            except Exception:  # a read error of a raster rewritten under the reader: say what happened
                if watch.changed():
                    raise provenance.raster_changed(raster_path, store) from None
                raise
            summary = RunSummary(total=total, written=written, skipped_nodata=counts["skipped"],
                                 resumed=resumed, cancelled=cancelled,
                                 seconds=time.perf_counter() - t0, out_path=os.path.abspath(out_gpkg),
                                 model_id=model_id, device=str(cap.device),
                                 stages=stats.to_dict() if stats else None)
            store.set_metadata({"last_run": summary.to_dict(),
                                "finished": None if cancelled else _now()})
            store.write_default_style()  # QGIS opens the file styled, whoever made it (store/tile_style.py)
        finally:
            store.close()
    if summary.total and summary.skipped_nodata == summary.total:
        _refuse_all_nodata(raster_path, out_gpkg, summary.total, tiling)
    return summary


def _refuse_all_nodata(raster_path, out_gpkg, total: int, tiling: TilingParams) -> None:
    """Every tile was nodata: say so rather than report "done" over an empty layer (and leave no
    empty GeoPackage behind)."""
    with TileStore.open(out_gpkg) as store:
        empty = store.count() == 0
    if empty:
        os.remove(out_gpkg)
    raise RasterError(f"every tile of {raster_path} is nodata ({total} of {total} at --nodata-threshold "
                      f"{tiling.nodata_threshold:g}): nothing to caption; check the raster's nodata value, "
                      "--bands or --extent")


def _read_item(tiler: RasterTiler, tile: Tile):
    img = tiler.read(tile)
    return None if img is None else (tile, img.array, img.valid_fraction)


def caption_batch(cap, batch: list[tuple[Tile, np.ndarray, float]], keys: dict, *, beam_size: int,
                  max_new_tokens: int, language: str, ground_m: float | None = None) -> list[TileRecord]:
    """Read tiles -> records ready for the store: the one step every engine runs (this loop, each
    Ray worker in ``ray_engine``), so their outputs are the same tile for tile. ``ground_m`` is the
    tiles' metres per pixel (None: unknown), so captions never name a scene the model has not seen
    at that resolution (``SceneHead.unseen_at``)."""
    if not batch:
        return []
    # out of accelerator memory: smaller chunks, then the CPU (oom.py); the model's guard keeps the size
    return oom_guard(cap).run(lambda chunk: _caption_chunk(cap, chunk, keys, beam_size=beam_size,
                                                           max_new_tokens=max_new_tokens, language=language,
                                                           ground_m=ground_m), batch)


def _caption_chunk(cap, batch, keys: dict, *, beam_size: int, max_new_tokens: int, language: str,
                   ground_m: float | None) -> list[TileRecord]:
    emb = cap.embed_images([a for _, a, _ in batch])
    caps = cap.caption(emb, beam_size=beam_size, max_new_tokens=max_new_tokens, language=language,
                       ground_m=ground_m)
    now = _now()
    # the map polygon of an edge tile is the part its neighbour does not cover (raster/tiling.py)
    return [TileRecord(tile_id=t.tile_id, row=t.row, col=t.col, polygon=t.map_polygon or t.polygon,
                       caption=text, confidence=float(conf), embedding=np.asarray(e, dtype=np.float32),
                       key=keys[t.tile_id], model=cap.model_id, created=now, window=t.window,
                       valid_fraction=float(vf))
            for (t, _, vf), e, (text, conf) in zip(batch, emb, caps)]


def _claim_language(store, language: str) -> None:
    """One file holds captions in one language: resuming it in another would mix them."""
    old = store.metadata().get("language") or ("en" if store.done_keys() else None)
    if old is not None and old != language:
        raise StoreError(f"{store.path} has captions in '{old}', not '{language}'; "
                         "choose another output or pass --overwrite")
    store.set_metadata({"language": language})


def _embed_dim(cap) -> int:
    dim = getattr(cap, "embed_dim", None) or (cap.card or {}).get("embed_dim")
    return int(dim)


def _compute_dtype_name(cap) -> str:
    """Provenance: bf16 and fp32 runs of one model differ in the last digits (and rarely a word).
    What this process computes in: ``auto`` is fp32 on a CPU without AMX-BF16 or where bf16 does
    not run (``device.bf16_support``); an explicit bf16 there raises ModelError."""
    from ..models.inference import compute_dtype

    return str(compute_dtype(cap)).replace("torch.", "")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _open_store(out_gpkg, tiler, cap, fp, tiling, resume, overwrite, device_name, tile_choice=None) -> TileStore:
    meta = {
        "source_raster": fp,
        "model": {"id": cap.model_id, "hash": cap.model_hash, "card": cap.card},
        "tiling": tiler.describe(),
        "tiling_params": tiling.to_dict(),
        "tile_footprint": tile_choice.to_dict() if tile_choice else None,
        "software": {"name": "rscaption", "version": __version__},
        "started": _now(),
        "device": device_name,
        "compute_dtype": None, "compute_dtypes": [],  # set before the first tile (provenance.py)
    }
    if os.path.exists(out_gpkg) and not overwrite:
        if not resume:
            raise StoreError(f"{out_gpkg} exists; pass --overwrite to replace it or --resume to continue it")
        store = TileStore.open(out_gpkg, any_embedding_size=True)  # wrong-size embeddings: redone as damage
        old = store.metadata()
        problems = []
        if store.embed_dim != _embed_dim(cap):
            problems.append(f"a model of {store.embed_dim}-value embeddings (this one makes {_embed_dim(cap)})")
        if old.get("model", {}).get("hash") != cap.model_hash:
            problems.append("a different model")
        if old.get("source_raster", {}).get("checksum") != fp["checksum"]:
            problems.append("a different raster")
        if old.get("tiling_params") and old["tiling_params"] != tiling.to_dict():
            problems.append("different tiling parameters")
        if problems:
            store.close()
            raise StoreError(f"{out_gpkg} was written from {' and '.join(problems)}; "
                             "choose another output or pass --overwrite")
        store.set_metadata({"resumed": _now()})
        return store
    if os.path.exists(out_gpkg):
        os.remove(out_gpkg)
    return TileStore.create(out_gpkg, tiler.crs_wkt, tiler.epsg, embed_dim=_embed_dim(cap), metadata=meta)


__all__ = ["caption_raster", "caption_batch", "RunSummary", "raster_fingerprint", "tile_key", "default_tiling_for", "tile_choice_for",
           "Cancelled"]

"""`rscaption caption --engine ray`: the tile pipeline over a Ray cluster.

The driver (this process) plans the tiles, opens the GeoPackage and drops the tiles it already
holds, exactly as the local engine does; the rest are cut into shards of whole batches (so every
batch holds the same tiles as in a local run, and the outputs match tile for tile). One actor per
worker slot loads the model once, opens the raster itself (a local path, a VRT or a GDAL
``/vsi...`` path every node can reach) and returns each shard's records; only the driver writes,
one transaction per shard, through the same ``TileStore``. So:

- a worker that dies is restarted and its shards are retried (``max_retries``); a shard's records
  reach the file only after the whole shard came back, and the store ignores keys it already has,
  so nothing is lost or written twice;
- a driver that dies loses at most the shards in flight: the next run resumes by ``tile_key``.

Ray is an optional extra (``pip install 'rscaption[ray]'``): it is imported only here, only when
this engine runs. ``RSCAPTION_RAY_KILL_ONCE=SHARD:MARKER`` makes the worker that receives shard
SHARD kill its own process the first time (while MARKER does not exist yet): the fault the retry
path exists for, used by the tests on a real local cluster.
"""

from __future__ import annotations

import itertools
import logging
import os
import time

from ..errors import RscaptionError
from .pipeline import (RunSummary, _claim_language, _compute_dtype_name, _open_store, _refuse_all_nodata,
                       caption_batch, run_setup)
from . import provenance
from ..raster.watch import RasterWatch
from .plan import PlanKeys, left_to_do
from ..raster.paths import check_raster_path, worker_path
from ..store.run_lock import RunLock, check_output_path
from .run_size import check_run_size
from ..raster.tiling import RasterTiler, TilingParams

KILL_ENV = "RSCAPTION_RAY_KILL_ONCE"
IN_FLIGHT_PER_WORKER = 2  # one shard computing, one queued behind it: no idle gap between shards
_POLL_S = 0.5  # how often a waiting driver looks at the cancel flag


def import_ray():
    """Ray, or a one-line error saying how to get it."""
    try:
        import ray
    except ImportError:
        raise RscaptionError("--engine ray needs Ray: pip install 'rscaption[ray]' (or pip install ray)") from None
    return ray


class ShardWorker:
    """One per worker slot: the model and the open raster live here between shards."""

    def __init__(self, spec: dict):
        from ..models.registry import load_model

        threads = spec.get("threads")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        self.spec = spec
        self.cap = load_model(spec["model"], device=spec["device"], precision=spec.get("precision"))
        if self.cap.model_hash != spec["model_hash"]:
            raise RscaptionError(f"this worker's model {spec['model']!r} differs from the driver's "
                                 f"(hash {self.cap.model_hash[:12]} != {spec['model_hash'][:12]})")
        self.tiler = RasterTiler(spec["raster"], spec["tiling"])

    def run(self, index: int, tiles: list, keys: dict) -> dict:
        """Caption one shard in the local engine's batches; nothing is written here."""
        self._maybe_die(index)
        s, records, skipped = self.spec, [], 0
        for i in range(0, len(tiles), s["batch_size"]):
            batch = []
            for t in tiles[i:i + s["batch_size"]]:
                img = self.tiler.read(t)
                if img is None:
                    skipped += 1
                else:
                    batch.append((t, img.array, img.valid_fraction))
            records += caption_batch(self.cap, batch, keys, beam_size=s["beam_size"],
                                     max_new_tokens=s["max_new_tokens"], language=s["language"],
                                     ground_m=s.get("ground_m"))
        return {"index": index, "records": records, "skipped": skipped, "pid": os.getpid(),
                "compute_dtype": _compute_dtype_name(self.cap)}  # this worker's, not the driver's

    def _maybe_die(self, index: int) -> None:
        shard, _, marker = (self.spec.get("kill_once") or "::").partition(":")
        if shard and int(shard) == index and marker and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)  # the whole worker process goes, as on an OOM kill or a lost node


def caption_raster_ray(raster_path: str, out_gpkg: str, model="default", model_spec: str | None = None,
                       tiling: TilingParams | None = None, batch_size: int = 8, device: str | None = None,
                       beam_size: int | None = None, on_progress=None, should_cancel=None, resume: bool = True,
                       overwrite: bool = False, language: str = "en", max_new_tokens: int = 30,
                       tile_choice=None, confirm_large: bool = False, address: str | None = None,
                       shard_batches: int = 4, max_retries: int = 3, cpus_per_worker: int = 1,
                       workers: int | None = None) -> RunSummary:
    """Same arguments and result as ``pipeline.caption_raster``, plus where and how wide to run.

    ``model`` may be a loaded captioner (the driver reads its hash and card); workers load
    ``model_spec`` (default: ``model`` when it is a name or folder), which must name the same
    weights on every node. ``address`` is a Ray address (``auto``, ``HOST:PORT``, ``ray://...``);
    without it an already initialised Ray is used, else a local one is started for this run."""
    ray = import_ray()
    t0 = time.perf_counter()
    check_raster_path(raster_path)
    check_output_path(out_gpkg, raster_path)  # the same checks as the CLI's and the worker's
    if model_spec is None:
        if not isinstance(model, (str, os.PathLike)):
            raise RscaptionError("the Ray engine needs the model's name or folder (model_spec) for its workers")
        model_spec = str(model)
    if os.path.isdir(model_spec):
        model_spec = os.path.abspath(model_spec)
    watch = RasterWatch(raster_path)  # before the fingerprint: a change from here on stops the run
    # the driver only needs the model's hash, card and embedding size: its copy stays on the CPU
    cap, beam_size, tiling, tile_choice, fp = run_setup(model, "cpu", raster_path, tiling, tile_choice,
                                                        language, beam_size)

    owns_ray = _connect(ray, address)
    try:
        with RasterTiler(raster_path, tiling) as tiler, RunLock(out_gpkg):  # one writer per output
            check_run_size(tiler.count_tiles(), confirm_large, upsample=tiler.upsample, source_px=tiler.source_px)
            tiles = tiler.tiles()  # lazy, like the local engine: shards are cut as workers take them
            slots, options, worker_device = _slots(ray, device, cpus_per_worker, workers)
            store = _open_store(out_gpkg, tiler, cap, fp, tiling, resume, overwrite,
                                device_name=f"ray ({slots} x {worker_device})", tile_choice=tile_choice)
            try:
                _claim_language(store, language)
                provenance.claim_caption_options(store, {"beam_size": beam_size, "max_new_tokens": max_new_tokens})
                store.drop_damaged()
                keys = PlanKeys(tiles, fp["checksum"], tiling.tile_size, cap.model_hash)
                resumed, todo = left_to_do(keys, store.done_keys())
                size = batch_size * max(1, int(shard_batches))
                shards = iter(lambda: list(itertools.islice(todo, size)), [])
                spec = {"model": model_spec, "model_hash": cap.model_hash, "device": worker_device,
                        "precision": getattr(cap, "precision", None),
                        "ground_m": tile_choice.m_per_px if tile_choice else None,
                        "raster": worker_path(raster_path), "tiling": tiling, "batch_size": batch_size,
                        "beam_size": beam_size, "max_new_tokens": max_new_tokens, "language": language,
                        "threads": options.get("num_cpus"), "kill_once": os.environ.get(KILL_ENV)}
                total = len(tiles)
                counts = {"written": 0, "skipped": 0}
                if on_progress:
                    on_progress(resumed, total, [])

                dtypes = set()

                def commit(result):
                    records = result["records"]
                    provenance.check_raster_unchanged(watch, raster_path, store)  # no shard of a changed raster
                    if records:
                        provenance.record_compute_dtype(store, result["compute_dtype"], dtypes)
                    counts["written"] += store.add(records)
                    counts["skipped"] += result["skipped"]
                    if on_progress:
                        on_progress(resumed + counts["written"] + counts["skipped"], total, records)

                try:
                    cancelled = _run_shards(ray, shards, keys, spec, slots, options, max_retries, commit,
                                            should_cancel)
                except Exception:  # a worker's read error on a raster rewritten under it: say what happened
                    if watch.changed():
                        raise provenance.raster_changed(raster_path, store) from None
                    raise
                summary = RunSummary(total=total, written=counts["written"], skipped_nodata=counts["skipped"],
                                     resumed=resumed, cancelled=cancelled, seconds=time.perf_counter() - t0,
                                     out_path=os.path.abspath(out_gpkg), model_id=cap.model_id,
                                     device=f"ray: {slots} x {worker_device}")
                store.set_metadata({"last_run": summary.to_dict(),
                                    "finished": None if cancelled else _utc_now()})
                store.write_default_style()  # QGIS opens the file styled, whoever made it
            finally:
                store.close()
    finally:
        if owns_ray:
            ray.shutdown()
    if summary.total and summary.skipped_nodata == summary.total:
        _refuse_all_nodata(raster_path, out_gpkg, summary.total, tiling)
    return summary


def _connect(ray, address: str | None) -> bool:
    """Join the cluster at ``address`` (or start a local one); True when this run must shut it down."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    except Exception as exc:  # ConnectionError, ValueError ... from an unreachable or bad address
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise RscaptionError(f"cannot connect to {where}: {' '.join(str(exc).split())[:300]}") from None
    return True


def _slots(ray, device, cpus_per_worker, workers):
    """How many workers, what each asks Ray for, and their torch device: one GPU each when the
    cluster has GPUs (unless ``device`` says cpu), else ``cpus_per_worker`` cores each."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus and not (device or "").startswith("cpu"):
        options, worker_device, n = {"num_cpus": 1, "num_gpus": 1}, "cuda", gpus
    else:
        cpus = max(1, int(cpus_per_worker))
        options, worker_device = {"num_cpus": cpus}, (device or "cpu")
        n = max(1, int(res.get("CPU", 1)) // cpus)
    return (int(workers) if workers else n), options, worker_device


def _run_shards(ray, shards, keys, spec, n_workers, options, max_retries, commit, should_cancel) -> bool:
    """Keep every worker busy with shards (an iterator, cut as workers take them), commit each
    result as it arrives; True if cancelled."""
    ahead = list(itertools.islice(shards, n_workers))  # no more actors (model loads) than shards
    if not ahead:
        return False
    n_workers = len(ahead)
    queue = enumerate(itertools.chain(ahead, shards))
    nxt = next(queue, None)
    from ray.exceptions import RayActorError, RayTaskError

    remote = ray.remote(ShardWorker).options(max_restarts=max_retries, max_task_retries=max_retries,
                                             **options)
    actors = [remote.remote(spec) for _ in range(n_workers)]
    pending = {}  # object ref -> (actor index, shard index)
    load = [0] * n_workers
    try:
        while nxt is not None or pending:
            if should_cancel and should_cancel():
                return True
            for a in range(n_workers):
                while nxt is not None and load[a] < IN_FLIGHT_PER_WORKER:
                    (i, shard), nxt = nxt, next(queue, None)
                    shard_keys = {t.tile_id: keys[t.tile_id] for t in shard}
                    pending[actors[a].run.remote(i, shard, shard_keys)] = (a, i)
                    load[a] += 1
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=_POLL_S)
            for ref in ready:
                a, i = pending.pop(ref)
                load[a] -= 1
                try:
                    result = ray.get(ref)
                except RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, RscaptionError):
                        raise type(cause)(str(cause)) from None
                    raise RscaptionError(f"shard {i} failed on a Ray worker: {_first_line(exc)}") from None
                except RayActorError as exc:
                    if getattr(exc, "actor_init_failed", False):  # the model or raster failed to load there
                        raise RscaptionError(f"a Ray worker could not start: {_first_line(exc)}") from None
                    raise RscaptionError(f"shard {i}: its Ray worker died {max_retries + 1} times "
                                         f"({_first_line(exc)}); finished shards are kept, run again to resume") from None
                commit(result)
        return False
    finally:
        for actor in actors:
            ray.kill(actor)


def _first_line(exc) -> str:
    """The worker's own reason out of Ray's multi-line report ("...ModelError: <reason>")."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = next((ln for ln in reversed(lines) if "Error" in ln), lines[0] if lines else type(exc).__name__)
    head, sep, reason = text.partition(": ")
    if sep and head.replace(".", "").replace("_", "").isalnum() and head.endswith("Error"):
        text = reason
    return text[:300]


def _utc_now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


__all__ = ["caption_raster_ray", "import_ray", "ShardWorker", "KILL_ENV"]

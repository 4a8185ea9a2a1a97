"""Run a caption or search job with the chosen backend mode, from a worker thread.

The QgsTasks and the Processing algorithms both call these functions, so "in-process" and
"subprocess" behave the same everywhere: the same progress/tiles/device callbacks, the same
cancel semantics (finished batches stay committed) and one exception type with a user message.
Nothing here imports torch at module import time; in-process mode imports the pipeline inside
the call, on the task's thread.
"""

from __future__ import annotations

import threading
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable

from .inprocess_guard import guard_inprocess, share_proj_database
from .paths import ensure_backend_on_path, resolve_model, torch_importable
from .wording import gui_wording


class RunError(RuntimeError):
    """A job failed in a way the user can act on; str() is the message to show."""


class LargeRunRefused(RunError):
    """The run plans more tiles than the backend starts unasked; the GUI asks the user, then
    reruns the job with ``confirm_large`` set."""

    def __init__(self, message: str, tiles: int, seconds: float):
        super().__init__(message)
        self.tiles = int(tiles)
        self.seconds = float(seconds)


@dataclass
class CaptionJob:
    raster: str
    out: str
    model: str = "default"
    tile_size: int | None = None  # None: auto, from the raster's ground resolution and the model card
    overlap: int = 0
    bands: list[int] | None = None
    extent: list[float] | None = None  # [xmin, ymin, xmax, ymax] in the raster's CRS
    batch_size: int = 8
    device: str | None = None
    beam_size: int | None = None  # None: the model card's
    language: str = "en"  # caption language: one of the model's (``Captioner.languages``)
    resume: bool = True
    overwrite: bool = False
    confirm_large: bool = False  # the user agreed to a run above rscaption.engine.run_size.LARGE_RUN_TILES
    ground_resolution: float | None = None  # m/px the user gave for a raster without a CRS
    target_resolution: float | None = None  # resampling (CRS units/px): kept when resuming a CLI run

    def request_fields(self) -> dict:
        data = asdict(self)
        data["model"] = resolve_model(self.model)
        data["device"] = None if self.device in (None, "", "auto") else self.device
        data["tile_size"] = self.tile_size or None
        return data


@dataclass
class Callbacks:
    on_progress: Callable[[int, int], None] | None = None
    on_tiles: Callable[[list], None] | None = None
    on_backend: Callable[[dict], None] | None = None  # {"mode", "device", "torch", "python"}
    on_log: Callable[[str], None] | None = None
    should_cancel: Callable[[], bool] = field(default=lambda: False)


def resolve_mode(mode: str | None, python: str | None) -> str:
    mode = (mode or "auto").lower()
    if mode == "inprocess":
        if not torch_importable():
            raise RunError("in-process mode needs torch and rasterio in QGIS's Python, which has neither; "
                           "choose the subprocess mode (Settings) or run \"Set up backend\"")
        return mode
    if mode == "subprocess":
        return mode
    if mode != "auto":
        raise RunError(f"unknown backend mode {mode!r}; use auto, inprocess or subprocess")
    if torch_importable():
        return "inprocess"
    if python:
        return "subprocess"
    raise RunError("no backend available: QGIS's Python has no torch and no backend environment is "
                   "configured. Use rscaption > Set up backend, or point Settings to a Python with rscaption")


# -- in-process ------------------------------------------------------------------------------------
_MODEL_CACHE: dict = {}
_MODEL_LOCK = threading.Lock()


def _inprocess_model(name: str, device):
    """Keep one loaded model across tasks so the dock's second query does not reload it."""
    guard_inprocess()
    from rscaption.models.registry import load_model

    key = (name, device)
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE.clear()
            _MODEL_CACHE[key] = load_model(name, device=device)
        return _MODEL_CACHE[key]


def _inprocess_caption(job: CaptionJob, cb: Callbacks) -> dict:
    guard_inprocess()  # before torch: its optional compilers crash the QGIS desktop process
    ensure_backend_on_path()
    import torch  # noqa: F401  (here, on the task thread; never at plugin load)

    share_proj_database()
    from rscaption.errors import RscaptionError
    from rscaption.engine.pipeline import caption_raster, tile_choice_for
    from rscaption.raster.tiling import TilingParams

    fields = job.request_fields()
    try:
        model = _inprocess_model(fields["model"], fields["device"])
        if cb.on_backend:
            cb.on_backend({"mode": "inprocess", "device": str(model.device), "torch": torch.__version__})
        tiling_kwargs = {k: fields[k] for k in ("overlap", "bands", "extent", "target_resolution")
                         if fields.get(k) is not None}
        choice = tile_choice_for(model, job.raster, fields["tile_size"], fields.get("target_resolution"),
                                 fields.get("ground_resolution"))
        tiling_kwargs["tile_size"] = choice.tile_px
        tiling = TilingParams(**tiling_kwargs)
        if cb.on_log:
            from rscaption.raster.input_check import input_warnings

            cb.on_log(choice.describe())
            for warning in input_warnings(job.raster, getattr(model, "card", {}) or {}, choice.m_per_px,
                                          fields.get("bands"), tiling):
                cb.on_log(warning)

        def on_progress(done, total, records):
            if records and cb.on_tiles:
                cb.on_tiles([r.tile_id for r in records])
            if cb.on_progress:
                cb.on_progress(done, total)

        summary = caption_raster(
            job.raster, job.out, model=model, tiling=tiling, batch_size=job.batch_size,
            device=fields["device"], beam_size=job.beam_size, language=job.language or "en",
            on_progress=on_progress,
            should_cancel=cb.should_cancel, resume=job.resume, overwrite=job.overwrite, tile_choice=choice,
            confirm_large=job.confirm_large,
        )
    except RscaptionError as exc:
        if getattr(exc, "kind", None) == "large_run":
            raise LargeRunRefused(str(exc), exc.tiles, exc.seconds) from None
        raise RunError(str(exc)) from None
    return summary.to_dict()


def _inprocess_search(gpkg: str, query: str, k: int, model: str | None, device,
                      min_confidence: float | None = None) -> list[dict]:
    guard_inprocess()
    ensure_backend_on_path()
    from rscaption.errors import RscaptionError
    from rscaption.store.gpkg import TileStore
    from rscaption.search.query import model_for_store, search_store

    try:
        if model:
            cap = _inprocess_model(resolve_model(model), device)
        else:
            with TileStore.open(gpkg) as store:
                meta = store.metadata().get("model", {}) or {}
                key = ("store", meta.get("id"), meta.get("hash"), device)
                with _MODEL_LOCK:
                    if key not in _MODEL_CACHE:
                        found = model_for_store(store, None, device, text_only=True)  # search needs the text tower only
                        _MODEL_CACHE.clear()
                        _MODEL_CACHE[key] = found
                    cap = _MODEL_CACHE[key]
        hits = search_store(gpkg, query, k=k, model=cap, device=device, min_confidence=min_confidence)
    except RscaptionError as exc:
        raise RunError(str(exc)) from None
    return [h.to_dict() for h in hits]


# -- subprocess ------------------------------------------------------------------------------------
@contextmanager
def gui_errors(what: str):
    """Every failure of a backend call as one RunError sentence in the GUI's words: backend
    messages reworded (no command-line options), a bug as "WHAT failed: ..." with the traceback
    in the log. A large-run refusal passes as is: the GUI asks with its own words (large_run.py)."""
    try:
        yield
    except LargeRunRefused:
        raise
    except RunError as exc:
        raise RunError(gui_wording(str(exc))) from None
    except Exception as exc:
        traceback.print_exc()
        raise RunError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


def hits_of(results: list[dict], cmd: str) -> list[dict]:
    """The hits of the worker's ``cmd`` result among the messages a subprocess run returned."""
    for res in results:
        if res.get("cmd") == cmd:
            return list(res.get("hits") or [])
    return []


def _subprocess_run(python: str, device, cmd: str, fields: dict, cb: Callbacks) -> tuple[dict, list]:
    from .backend_client import POOL, BackendError

    results: list = []

    def on_message(msg):
        kind = msg["type"]
        if kind == "progress" and cb.on_progress:
            cb.on_progress(msg["done"], msg["total"])
        elif kind == "tiles" and cb.on_tiles:
            cb.on_tiles(msg["tile_ids"])
        elif kind == "result":
            results.append(msg)
        elif kind == "log" and cb.on_log:
            cb.on_log(msg["message"])

    try:
        client = POOL.acquire(python, device, on_log=cb.on_log)
    except BackendError as exc:
        raise RunError(str(exc)) from None
    try:
        hello = client.hello or {}
        if cb.on_backend:
            cb.on_backend({"mode": "subprocess", "device": hello.get("device"), "torch": hello.get("torch"),
                           "python": client.python, "pid": client.pid})
        summary = client.request(cmd, fields, on_message=on_message, should_cancel=cb.should_cancel)
    except BackendError as exc:
        if exc.kind == "large_run":
            raise LargeRunRefused(str(exc), exc.details.get("tiles") or 0, exc.details.get("seconds") or 0) from None
        raise RunError(str(exc)) from None
    finally:
        POOL.release(client)
    return summary, results


# -- entry points ------------------------------------------------------------------------------------
def run_caption(job: CaptionJob, mode: str, python: str | None, cb: Callbacks | None = None) -> dict:
    """Returns the run summary (dict of RunSummary); raises RunError."""
    cb = cb or Callbacks()
    mode = resolve_mode(mode, python)
    with gui_errors("captioning"):
        if mode == "inprocess":
            return _inprocess_caption(job, cb)
        summary, _ = _subprocess_run(python, job.request_fields()["device"], "caption", job.request_fields(), cb)
        return summary


def run_search(gpkg: str, query: str, k: int, mode: str, python: str | None, model: str | None = None,
               device: str | None = None, cb: Callbacks | None = None,
               min_confidence: float | None = None) -> list[dict]:
    """Returns hits as dicts (tile_id, row, col, score, caption, confidence), best first, among
    tiles whose confidence reaches ``min_confidence`` (when given); raises RunError."""
    cb = cb or Callbacks()
    mode = resolve_mode(mode, python)
    device = None if device in (None, "", "auto") else device
    with gui_errors("search"):
        if mode == "inprocess":
            if cb.on_backend:
                cb.on_backend({"mode": "inprocess"})
            return _inprocess_search(gpkg, query, k, model, device, min_confidence)
        fields = {"gpkg": gpkg, "query": query, "k": int(k), "model": resolve_model(model) if model else None,
                  "device": device, "min_confidence": float(min_confidence) if min_confidence else None}
        _, results = _subprocess_run(python, device, "search", fields, cb)
        return hits_of(results, "search")

"""Run a change job ("what changed between two dates") in-process or through the worker.

Same modes, callbacks and error wording as ``runner.run_caption`` (the caption path), so the
dialog's task and the Processing algorithm behave alike; the one addition is the phase of the
progress (the before date is captioned, then the after date, then the tiles are scored), which
the task turns into one 0-100 % bar. A cancel is not a failure: finished tiles stay in the file
and the same job run again resumes.
"""

from __future__ import annotations

import traceback
from dataclasses import asdict, dataclass

from qgis.core import Qgis, QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from .inprocess_guard import guard_inprocess, share_proj_database
from .paths import ensure_backend_on_path, resolve_model
from .runner import Callbacks, LargeRunRefused, RunError, _inprocess_model, gui_errors, resolve_mode
from .tasks import Outcome, log

#: Share of the progress bar each phase fills (captioning dominates; scoring is quick).
PHASES = {"before": (0.0, 45.0), "after": (45.0, 90.0), "score": (90.0, 100.0)}


@dataclass
class ChangeJob:
    before: str  # raster path, or a captioned rscaption GeoPackage
    after: str  # raster path, or a captioned GeoPackage on the before date's grid
    out: str
    model: str = "default"
    tile_size: int | None = None  # None: auto (ignored when BEFORE is a GeoPackage: its grid wins)
    k: int = 20  # most changed tiles listed in the summary
    batch_size: int = 8
    device: str | None = None
    resume: bool = True
    overwrite: bool = False
    confirm_large: bool = False

    def request_fields(self) -> dict:
        data = asdict(self)
        data["model"] = resolve_model(self.model)
        data["device"] = None if self.device in (None, "", "auto") else self.device
        data["tile_size"] = self.tile_size or None
        return data


def overall_percent(phase: str | None, done: int, total: int) -> float:
    lo, hi = PHASES.get(phase or "", (0.0, 100.0))
    return lo + (hi - lo) * (done / total if total else 0.0)


def _inprocess_change(job: ChangeJob, cb: Callbacks, on_phase) -> dict:
    guard_inprocess()  # before torch: its optional compilers crash the QGIS desktop process
    ensure_backend_on_path()
    import torch  # noqa: F401  (here, on the task thread; never at plugin load)

    share_proj_database()
    from rscaption.change import change_rasters
    from rscaption.errors import Cancelled, RscaptionError

    fields = job.request_fields()
    try:
        if job.before.lower().endswith(".gpkg") or job.after.lower().endswith(".gpkg"):
            # a captioned input brings its own model (the backend loads the one recorded in it):
            # a model loaded here would be another one, whose embeddings are not comparable
            model, device = fields["model"], fields["device"] or "auto"
        else:
            model = _inprocess_model(fields["model"], fields["device"])
            device = str(model.device)
        if cb.on_backend:
            cb.on_backend({"mode": "inprocess", "device": device, "torch": torch.__version__})
        summary = change_rasters(
            job.before, job.after, job.out, model=model, tile_size=fields["tile_size"] or "auto", top_k=job.k,
            batch_size=job.batch_size, device=fields["device"],
            on_progress=lambda phase, done, total: on_phase(phase, done, total),
            on_message=cb.on_log, should_cancel=cb.should_cancel, resume=job.resume, overwrite=job.overwrite,
            confirm_large=job.confirm_large)
    except Cancelled:
        return {"cancelled": True, "out_path": job.out}
    except RscaptionError as exc:
        if getattr(exc, "kind", None) == "large_run":
            raise LargeRunRefused(str(exc), exc.tiles, exc.seconds) from None
        raise RunError(str(exc)) from None
    return summary.to_dict()


def _subprocess_change(job: ChangeJob, python: str, cb: Callbacks, on_phase) -> dict:
    from .backend_client import POOL, BackendError

    fields = job.request_fields()
    try:
        client = POOL.acquire(python, fields["device"], on_log=cb.on_log)
    except BackendError as exc:
        raise RunError(str(exc)) from None

    def on_message(msg):
        if msg["type"] == "progress":
            on_phase(msg.get("phase"), msg["done"], msg["total"])
        elif msg["type"] == "log" and cb.on_log:
            cb.on_log(msg["message"])

    try:
        hello = client.hello or {}
        if cb.on_backend:
            cb.on_backend({"mode": "subprocess", "device": hello.get("device"), "torch": hello.get("torch"),
                           "python": client.python, "pid": client.pid})
        return client.request("change", fields, on_message=on_message, should_cancel=cb.should_cancel)
    except BackendError as exc:
        if exc.kind == "large_run":
            raise LargeRunRefused(str(exc), exc.details.get("tiles") or 0, exc.details.get("seconds") or 0) from None
        if exc.kind == "cancelled":
            return {"cancelled": True, "out_path": job.out}
        raise RunError(str(exc)) from None
    finally:
        POOL.release(client)


def run_change(job: ChangeJob, mode: str, python: str | None, cb: Callbacks | None = None, on_phase=None) -> dict:
    """Returns the ChangeSummary as a dict (``cancelled`` set when the user stopped it); raises
    RunError (LargeRunRefused above the tile threshold until ``confirm_large``)."""
    cb = cb or Callbacks()

    def phase(name, done, total):
        if on_phase is not None:
            on_phase(name, done, total)
        if cb.on_progress:
            cb.on_progress(overall_percent(name, done, total), 100.0)

    mode = resolve_mode(mode, python)
    with gui_errors("change detection"):
        if mode == "inprocess":
            return _inprocess_change(job, cb, phase)
        return _subprocess_change(job, python, cb, phase)


class ChangeTask(QgsTask):
    """Captions both dates and scores every tile's change; the outcome goes to ``on_finished``
    on the GUI thread. ``phaseChanged`` tells the GUI which date is being captioned."""

    phaseChanged = pyqtSignal(str, int, int)  # phase, done, total
    backendReady = pyqtSignal(dict)

    def __init__(self, job: ChangeJob, mode: str, python: str | None, on_finished=None, description=None):
        super().__init__(description or f"rscaption: changes {job.before} -> {job.after}", QgsTask.Flag.CanCancel)
        self.job, self.mode, self.python = job, mode, python
        self._on_finished = on_finished
        self.outcome = Outcome(ok=False)
        self.log_lines: list[str] = []

    def run(self) -> bool:
        def on_backend(info):
            self.outcome.backend = dict(info)
            self.backendReady.emit(dict(info))

        def on_log(line):
            self.log_lines.append(line)
            log(line)

        cb = Callbacks(on_progress=lambda done, total: self.setProgress(100.0 * done / total if total else 0.0),
                       on_backend=on_backend, on_log=on_log, should_cancel=self.isCanceled)
        try:
            summary = run_change(self.job, self.mode, self.python, cb,
                                 on_phase=lambda p, d, t: self.phaseChanged.emit(str(p or ""), int(d), int(t)))
        except RunError as exc:
            self.outcome.error = str(exc)
            self.outcome.cancelled = self.isCanceled()
            if isinstance(exc, LargeRunRefused):  # the GUI thread asks the user (change_run)
                self.outcome.large_run = {"tiles": exc.tiles, "seconds": exc.seconds, "message": str(exc)}
            return False
        except Exception as exc:  # never let an exception escape into QGIS's thread pool
            self.outcome.error = f"{type(exc).__name__}: {exc}"
            log(traceback.format_exc(), Qgis.MessageLevel.Critical)
            return False
        self.outcome.summary = summary
        self.outcome.hits = list(summary.get("top") or [])
        self.outcome.cancelled = bool(summary.get("cancelled")) or self.isCanceled()
        return True  # a cancel ended cleanly (finished tiles kept): not a "Task failed"

    def finished(self, result: bool) -> None:
        if self.isCanceled():
            self.outcome.cancelled = True
        self.outcome.ok = bool(result) and not self.outcome.cancelled
        if self._on_finished is not None:
            self._on_finished(self.outcome)

"""QgsTasks that run caption and search jobs off the GUI thread.

QGIS deletes a finished task's C++ object, so results leave through plain Python objects
(:class:`Outcome`) handed to a callback from ``finished()``, which runs on the GUI thread. Progress
and "new tiles committed" notifications are Qt signals emitted from the task thread; Qt queues
them to the GUI thread, where the layer is reloaded.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

from qgis.core import QgsMessageLog, QgsTask, Qgis
from qgis.PyQt.QtCore import QTimer, pyqtSignal

from .runner import Callbacks, CaptionJob, LargeRunRefused, RunError, run_caption, run_search

LOG_TAG = "rscaption"


def log(message: str, level=Qgis.MessageLevel.Info) -> None:
    QgsMessageLog.logMessage(message, LOG_TAG, level)


@dataclass
class Outcome:
    ok: bool
    cancelled: bool = False
    error: str | None = None
    summary: dict = field(default_factory=dict)
    hits: list = field(default_factory=list)
    backend: dict = field(default_factory=dict)
    large_run: dict | None = None  # {"tiles", "seconds", "message"}: refused until the user confirms
    warnings: list = field(default_factory=list)  # the backend's "warning: ..." lines about the input


class CaptionTask(QgsTask):
    """Captions a raster into a GeoPackage; every batch is committed as it finishes."""

    tilesAdded = pyqtSignal(int)  # tiles committed so far in this run
    backendReady = pyqtSignal(dict)  # {"mode", "device", ...}

    def __init__(self, job: CaptionJob, mode: str, python: str | None, on_finished=None, description=None):
        super().__init__(description or f"rscaption: caption {job.raster}", QgsTask.Flag.CanCancel)
        self.job = job
        self.mode = mode
        self.python = python
        self._on_finished = on_finished
        self.outcome = Outcome(ok=False)
        self._committed = 0

    def run(self) -> bool:
        def on_progress(done, total):
            if total:
                self.setProgress(100.0 * done / total)

        def on_tiles(ids):
            self._committed += len(ids)
            self.tilesAdded.emit(self._committed)

        def on_backend(info):
            self.outcome.backend = dict(info)
            self.backendReady.emit(dict(info))
            log(f"backend: {info}")

        def on_log(line):
            log(line)
            if str(line).startswith("warning:"):  # shown in the message bar after the run (caption_run)
                self.outcome.warnings.append(str(line))

        cb = Callbacks(on_progress=on_progress, on_tiles=on_tiles, on_backend=on_backend,
                       on_log=on_log, should_cancel=self.isCanceled)
        try:
            summary = run_caption(self.job, self.mode, self.python, cb)
        except RunError as exc:
            self.outcome.error = str(exc)
            self.outcome.cancelled = self.isCanceled()
            if isinstance(exc, LargeRunRefused):  # the GUI thread asks the user (caption_run)
                self.outcome.large_run = {"tiles": exc.tiles, "seconds": exc.seconds, "message": str(exc)}
            return False
        except Exception as exc:  # never let an exception escape into QGIS's thread pool
            self.outcome.error = f"{type(exc).__name__}: {exc}"
            log(traceback.format_exc(), Qgis.MessageLevel.Critical)
            return False
        self.outcome.summary = summary
        self.outcome.cancelled = bool(summary.get("cancelled")) or self.isCanceled()
        # A cancel the user asked for ended cleanly (finished batches are committed): report it as
        # complete to the task manager, which would otherwise announce "Task failed".
        return True

    def finished(self, result: bool) -> None:
        if self.isCanceled():
            self.outcome.cancelled = True
        self.outcome.ok = bool(result) and not self.outcome.cancelled
        if self.outcome.cancelled:  # QGIS announces this description as "Task complete": say what happened
            summary = self.outcome.summary or {}
            kept = int(summary.get("written", self._committed) or 0) + int(summary.get("resumed", 0) or 0)
            self.setDescription(f"{self.description()}: cancelled" + (f"; {kept} finished tiles kept" if kept else ""))
        if self._on_finished is not None:
            # QGIS announces a long task's end in its message bar (where no desktop notifications
            # run) right after finished() returns; the run's own message goes up after that one, so
            # it is the one shown rather than one hidden under "1 more"
            callback, outcome = self._on_finished, self.outcome
            QTimer.singleShot(0, lambda: callback(outcome))


class RankTask(QgsTask):
    """A ranking of the layer's tiles off the GUI thread (search, similar tiles): ``hits`` and any
    error go into ``outcome``, which ``on_finished`` gets on the GUI thread."""

    def __init__(self, title: str, on_finished=None):
        super().__init__(title, QgsTask.Flag.CanCancel)
        self._on_finished = on_finished
        self.outcome = Outcome(ok=False)

    def rank(self, cb: Callbacks) -> list:
        raise NotImplementedError

    def run(self) -> bool:
        def on_backend(info):
            self.outcome.backend = dict(info)

        try:
            self.outcome.hits = self.rank(Callbacks(on_backend=on_backend, should_cancel=self.isCanceled))
        except RunError as exc:
            self.outcome.error = str(exc)
            return False
        except Exception as exc:  # never let an exception escape into QGIS's thread pool
            self.outcome.error = f"{type(exc).__name__}: {exc}"
            log(traceback.format_exc(), Qgis.MessageLevel.Critical)
            return False
        return True

    def finished(self, result: bool) -> None:
        self.outcome.ok = bool(result)
        self.outcome.cancelled = self.isCanceled()
        if self._on_finished is not None:
            self._on_finished(self.outcome)


class SearchTask(RankTask):
    """Embeds the query with the model's text tower and ranks the stored tile embeddings."""

    def __init__(self, gpkg: str, query: str, k: int, mode: str, python: str | None, model=None,
                 device=None, on_finished=None, min_confidence: float | None = None):
        super().__init__(f"rscaption: search '{query}'", on_finished)
        self.min_confidence = min_confidence
        self.gpkg, self.query, self.k = gpkg, query, k
        self.mode, self.python, self.model, self.device = mode, python, model, device

    def rank(self, cb: Callbacks) -> list:
        return run_search(self.gpkg, self.query, self.k, self.mode, self.python, model=self.model,
                          device=self.device, cb=cb, min_confidence=self.min_confidence)

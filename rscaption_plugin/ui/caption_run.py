"""GUI-thread side of one caption run: owns the result layer while the task fills it.

The first committed batch creates the layer (the writer registers the ``tiles`` table only then),
later batches reload it at most every ``refresh_s`` seconds, and the end of the run — done,
cancelled or failed — reloads it once more so every committed tile is shown.
"""

from __future__ import annotations

import time

from qgis.core import Qgis, QgsApplication, QgsCoordinateReferenceSystem, QgsProject

from ..core.layers import (find_tile_layer, has_tile_table, open_tile_layer, refresh_layer, settle_store,
                     store_default_style)
from .large_run import ask_large_run, declined_text
from ..core.run_record import has_no_crs
from ..core.run_warnings import unique
from ..core.tasks import CaptionTask, Outcome, log


class CaptionRun:
    def __init__(self, request, iface=None, on_done=None, refresh_s: float = 0.5, add_to_project: bool = True,
                 confirm_large=None):
        self.request = request
        # (info) -> bool on the GUI thread for a run above the backend's tile threshold; default: ask
        self.confirm_large = confirm_large or (lambda info: ask_large_run(info, iface))
        self.iface = iface
        self.on_done = on_done
        self.refresh_s = refresh_s
        self.add_to_project = add_to_project
        self.layer = None
        self.layer_id: str | None = None
        self.outcome: Outcome | None = None
        self.backend: dict = {}
        self.tiles_seen = 0
        self.progress_seen: list[float] = []
        self._last_refresh = 0.0
        self._committed: int | None = None  # tiles in the file after a failed or cancelled run
        self.task = self._new_task()

    def _new_task(self) -> CaptionTask:
        request = self.request
        task = CaptionTask(request.job, request.mode, request.python, on_finished=self._finished,
                           description=f"rscaption: caption {request.layer_name}")
        task.tilesAdded.connect(self._tiles_added)
        task.backendReady.connect(self._backend_ready)
        task.progressChanged.connect(self.progress_seen.append)
        return task

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def start(self) -> "CaptionRun":
        QgsApplication.taskManager().addTask(self.task)
        return self

    def cancel(self) -> None:
        if not self.done:
            try:
                self.task.cancel()
            except RuntimeError:  # the C++ task is already gone: it finished
                pass

    # -- slots (GUI thread) ------------------------------------------------------------------------
    def _backend_ready(self, info: dict) -> None:
        self.backend = dict(info)
        device = info.get("device") or "?"
        self._message(f"captioning on {device} ({info.get('mode')})", Qgis.MessageLevel.Info, 4)

    def _tiles_added(self, count: int) -> None:
        self.tiles_seen = count
        now = time.monotonic()
        if self.layer is None:
            self._ensure_layer()
        elif now - self._last_refresh >= self.refresh_s:
            refresh_layer(self.layer)
            self._last_refresh = now

    def _ensure_layer(self) -> None:
        if self.layer is not None:
            return
        out = self.request.job.out
        if not has_tile_table(out):
            return
        existing = find_tile_layer(out) if self.add_to_project else None
        if existing is not None:  # a resumed run on a file already in the project: reuse its layer
            self.layer, self.layer_id = existing, existing.id()
            refresh_layer(existing)
            self._last_refresh = time.monotonic()
            return
        layer = open_tile_layer(out, self.request.layer_name)
        if not layer.isValid():
            log(f"cannot open {out} as a layer yet")
            return
        if has_no_crs(out):  # pixel coordinates: no CRS, so no transform is ever attempted
            layer.setCrs(QgsCoordinateReferenceSystem())
        self.layer = layer
        self.layer_id = layer.id()
        if self.add_to_project:
            QgsProject.instance().addMapLayer(layer)
        self._last_refresh = time.monotonic()

    def _finished(self, outcome: Outcome) -> None:
        if outcome.large_run and not self.request.job.confirm_large:
            if self.confirm_large(outcome.large_run):  # asked here, on the GUI thread
                self.request.job.confirm_large = True
                self.task = self._new_task()  # the refused task read no pixel: start it again, confirmed
                self.start()
                return
            outcome.error = declined_text(outcome.large_run)
        self.outcome = outcome
        if not outcome.ok and not self.tiles_seen:
            # refused, failed or cancelled before its first tile: this run wrote nothing, so it adds
            # no layer and rewrites no style (the file may hold another raster's captions)
            self._report(outcome)
            return
        if not outcome.ok:  # the writer may have died mid-transaction: roll that back first
            self._committed = settle_store(self.request.job.out)
            if self._committed is None and has_tile_table(self.request.job.out):
                log(f"cannot read {self.request.job.out} after the run")
        self._ensure_layer()
        if self.layer is not None:
            # the writer is done with the file: store its style, then reload the layer (the style
            # write checkpoints the WAL, which a reader opened during the run must notice)
            problem = store_default_style(self.request.job.out)
            if problem:
                log(f"style not saved into {self.request.job.out}: {problem}")
            refresh_layer(self.layer)
        self._report(outcome)

    def _report(self, outcome: Outcome) -> None:
        summary = outcome.summary or {}
        if outcome.ok:
            self._message(f"{summary.get('written', 0)} tiles captioned ({summary.get('resumed', 0)} resumed, "
                          f"{summary.get('skipped_nodata', 0)} nodata) on {summary.get('device') or '?'} "
                          f"in {summary.get('seconds', 0):.1f} s", Qgis.MessageLevel.Success, 8)
        elif outcome.cancelled and not outcome.error:
            kept = self._kept() if self.tiles_seen else 0
            self._message(f"cancelled; {kept} finished tiles kept in {self.request.job.out}" if kept
                          else "cancelled before any tile was captioned", Qgis.MessageLevel.Info, 8)
        else:
            # only a run that committed tiles has any to keep: a refused or failed start says so not
            kept = self._kept() if self.tiles_seen else 0
            self._message(f"captioning failed: {outcome.error}" + (f". {kept} finished tiles kept." if kept else ""),
                          Qgis.MessageLevel.Critical, 0)
        warnings = unique([*getattr(self.request, "warnings", []), *outcome.warnings])
        if warnings and (outcome.ok or self.tiles_seen):  # about the tiles just made: where the person looks
            self._bar("\n".join(w[0].upper() + w[1:] for w in warnings), Qgis.MessageLevel.Warning, 0)
        if self.on_done is not None:
            self.on_done(self)

    def _kept(self) -> int:
        if self._committed is not None:
            return self._committed
        return max(0, self.layer.featureCount()) if self.layer is not None else 0

    def _message(self, text: str, level, duration: int) -> None:
        log(text, level)
        self._bar(text, level, duration)

    def _bar(self, text: str, level, duration: int) -> None:
        if self.iface is not None:
            try:
                self.iface.messageBar().pushMessage("rscaption", text, level, duration)
            except Exception:
                pass

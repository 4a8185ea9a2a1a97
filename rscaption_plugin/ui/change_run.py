"""GUI-thread side of one "Compare two dates" run: starts the task, shows the change layer.

The change layer only means something once tiles are scored, so it is added when the task ends
(done, or cancelled/failed with scored rows in the file), styled by change score, and the style is
written into the file. A cancel keeps every finished tile in the GeoPackage; the message says so
and that running the same comparison again resumes.
"""

from __future__ import annotations

from qgis.core import Qgis, QgsApplication, QgsProject, QgsVectorLayer

from ..core.change_layers import (AFTER_LAYER, BEFORE_LAYER, change_uri, find_change_layer, kept_counts,
                                  open_change_layer, store_change_style)
from ..core.change_task import ChangeTask
from ..core.layers import apply_default_style, refresh_layer
from ..core.tasks import Outcome, log
from .large_run import ask_large_run, declined_text

PHASE_WORDS = {"before": "captioning the before date", "after": "captioning the after date",
               "score": "scoring the changes"}


class ChangeRun:
    def __init__(self, request, iface=None, on_done=None, add_to_project: bool = True, confirm_large=None):
        self.request = request
        self.iface = iface
        self.on_done = on_done
        self.add_to_project = add_to_project
        self.confirm_large = confirm_large or (lambda info: ask_large_run(info, iface))
        self.layer = None
        self.date_layers: list = []
        self.outcome: Outcome | None = None
        self.backend: dict = {}
        self.phases_seen: list[str] = []
        self.progress_seen: list[float] = []
        self.task = self._new_task()

    def _new_task(self) -> ChangeTask:
        task = ChangeTask(self.request.job, self.request.mode, self.request.python, on_finished=self._finished,
                          description=f"rscaption: {self.request.layer_name}")
        task.phaseChanged.connect(self._phase)
        task.backendReady.connect(lambda info: self.backend.update(info))
        task.progressChanged.connect(self.progress_seen.append)
        return task

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def start(self) -> "ChangeRun":
        QgsApplication.taskManager().addTask(self.task)
        return self

    def cancel(self) -> None:
        if not self.done:
            try:
                self.task.cancel()
            except RuntimeError:  # the C++ task is already gone: it finished
                pass

    # -- slots (GUI thread) ------------------------------------------------------------------------
    def _phase(self, phase: str, done: int, total: int) -> None:
        if not self.phases_seen or self.phases_seen[-1] != phase:
            self.phases_seen.append(phase)
            try:
                self.task.setDescription(f"rscaption: {PHASE_WORDS.get(phase, phase)}")
            except RuntimeError:
                pass

    def _finished(self, outcome: Outcome) -> None:
        job = self.request.job
        if outcome.large_run and not job.confirm_large:
            if self.confirm_large(outcome.large_run):  # asked here, on the GUI thread
                job.confirm_large = True
                self.task = self._new_task()  # the refused task read no pixel: start it again, confirmed
                self.start()
                return
            outcome.error = declined_text(outcome.large_run)
        self.outcome = outcome
        # a read-write count rolls back what a dying writer left half-done, as settle_store does
        kept = kept_counts(job.out)
        if kept["scored"]:
            self._show_layers()
        summary = outcome.summary or {}
        if outcome.ok:
            self._message(_done_text(summary, job.out), Qgis.MessageLevel.Success, 10)
        elif outcome.cancelled and not outcome.error:
            self._message(_kept_text("cancelled", kept, job.out), Qgis.MessageLevel.Info, 10)
        else:
            text = f"comparing the two dates failed: {outcome.error}"
            if any(kept.values()):
                text += ". " + _kept_text("", kept, job.out).lstrip("; ")
            self._message(text, Qgis.MessageLevel.Critical, 0)
        if self.on_done is not None:
            self.on_done(self)

    def _show_layers(self) -> None:
        out = self.request.job.out
        problem = store_change_style(out)  # the writer is done: the file carries its own style
        if problem:
            log(f"style not saved into {out}: {problem}")
        existing = find_change_layer(out) if self.add_to_project else None
        if existing is not None:  # a resumed comparison already shown: refresh it, do not add a copy
            self.layer = existing
            refresh_layer(existing)
            return
        layer = open_change_layer(out, self.request.layer_name)
        if not layer.isValid():
            log(f"cannot open the changes of {out} as a layer")
            return
        self.layer = layer
        if self.request.add_date_layers:
            for table, when in ((BEFORE_LAYER, "before"), (AFTER_LAYER, "after")):
                date = QgsVectorLayer(change_uri(out, table), f"{self.request.layer_name} ({when})", "ogr")
                if date.isValid():
                    apply_default_style(date)
                    self.date_layers.append(date)
        if self.add_to_project:
            for date in self.date_layers:
                QgsProject.instance().addMapLayer(date)
            QgsProject.instance().addMapLayer(layer)  # last: on top of the two dates

    def _message(self, text: str, level, duration: int) -> None:
        log(text, level)
        if self.iface is not None:
            try:
                self.iface.messageBar().pushMessage("rscaption", text, level, duration)
            except Exception:
                pass


def _done_text(summary: dict, out: str) -> str:
    if summary.get("up_to_date"):
        return f"{out} already holds this comparison: {summary.get('changed', 0)} of {summary.get('scored', 0)} tiles changed"
    scored, changed = summary.get("scored", 0), summary.get("changed", 0)
    text = f"{changed} of {scored} tiles changed"
    if summary.get("threshold") is not None:
        text += f" (score ≥ {float(summary['threshold']):.2f})"
    not_scored = summary.get("not_scored", summary.get("no_data"))
    if not_scored:
        text += f"; {not_scored} without data on both dates"
    reused = [when for when in ("before", "after") if summary.get(f"{when}_reused")]
    if reused:
        text += f"; {' and '.join(reused)} captions reused"
    return text + f" in {float(summary.get('seconds') or 0):.1f} s"


def _kept_text(what: str, kept: dict, out: str) -> str:
    if not any(kept.values()):
        return f"{what} before any tile was finished".strip()
    parts = [f"{kept['before']} tiles of the before date", f"{kept['after']} of the after date"]
    if kept["scored"]:
        parts.append(f"{kept['scored']} scored")
    return f"{what}; {', '.join(parts)} kept for {out}: compare again to resume"

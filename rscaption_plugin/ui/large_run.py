"""Ask before a very large caption run (issue 11: a 1,000,000 px VRT silently started 15 million tiles).

The backend refuses a run above its tile threshold unless confirmed (``rscaption.engine.run_size``) and
says how many tiles and roughly how long; the task passes that out in ``Outcome.large_run``, and
:class:`~rscaption_plugin.ui.caption_run.CaptionRun` calls :func:`ask_large_run` from ``finished()``,
on the GUI thread (a dialog must never be opened from the task thread), then reruns the job with
``confirm_large`` when the user agrees. Nothing heavy happens here: the count came from the backend.
"""

from __future__ import annotations

from qgis.PyQt.QtWidgets import QMessageBox


def format_duration(seconds: float) -> str:
    """Same units as the CLI's estimate (kept here: the plugin never imports the backend at start-up)."""
    if seconds < 5400:
        return f"{seconds / 60:.0f} minutes"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


def question_text(info: dict) -> str:
    return (f"This run would caption {int(info['tiles']):,} tiles, which takes about "
            f"{format_duration(float(info['seconds']))} (a conservative estimate).\n\n"
            "Start it anyway? You can cancel it later; finished tiles are kept. A smaller extent, "
            "a coarser resolution or a larger tile size makes fewer tiles.")


def declined_text(info: dict) -> str:
    return (f"not started: {int(info['tiles']):,} tiles (about {format_duration(float(info['seconds']))}) "
            "were not confirmed")


def ask_large_run(info: dict, iface=None) -> bool:
    """Yes/No dialog; No is the default button so an absent-minded Enter does not start days of work."""
    parent = None
    if iface is not None:
        try:
            parent = iface.mainWindow()
        except Exception:
            parent = None
    answer = QMessageBox.question(parent, "rscaption: large run", question_text(info),
                                  QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                  QMessageBox.StandardButton.No)
    return answer == QMessageBox.StandardButton.Yes

"""Fail a plugin test when QGIS's message log receives a Python error or a warning while it runs.

In the QGIS desktop, Python exceptions raised in slots and callbacks (``sys.excepthook``) and
Python warnings (``warnings.showwarning``) end up in the message log under "Python error" /
"Python warning", and a user sees them there; the plugin's own problems are logged at Warning or
Critical. Under pytest neither hook is QGIS's (an exception in a Qt slot would even abort the
process), so the guard installs hooks that log the same way QGIS does, listens to
``QgsApplication.messageLog().messageReceived`` and reports everything at Warning level or above.

Deprecation warnings raised inside third-party packages are left to pytest: QGIS's Python shows
them only for code run as ``__main__``, so a user never sees them in the log.
"""

from __future__ import annotations

import re
import sys
import traceback
import warnings

from qgis.core import Qgis, QgsApplication, QgsMessageLog

PYTHON_TAGS = ("Python error", "Python warning")
OUR_CODE = ("rscaption_plugin", "rscaption", "tests")
_QUIET_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning)


def _ours(filename: str) -> bool:
    parts = filename.replace("\\", "/").split("/")
    return any(p in OUR_CODE for p in parts) and "site-packages" not in parts


class LogGuard:
    def __init__(self, expected=()):
        """``expected``: regexes for the warnings a test provokes on purpose (a killed backend is
        reported to the user); a Python error or any other warning still fails the test."""
        self.problems: list[str] = []
        self.expected = [re.compile(p) for p in expected]

    def _received(self, message, tag, level) -> None:
        if tag in PYTHON_TAGS or level in (Qgis.MessageLevel.Warning, Qgis.MessageLevel.Critical):
            if tag not in PYTHON_TAGS and any(p.search(message) for p in self.expected):
                return
            self.problems.append(f"[{tag or 'untagged'}] {message}")

    def _excepthook(self, etype, value, tb) -> None:
        QgsMessageLog.logMessage("".join(traceback.format_exception(etype, value, tb)), "Python error",
                                 Qgis.MessageLevel.Critical)

    def _showwarning(self, message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, _QUIET_CATEGORIES) and not _ours(filename):
            # back to pytest's recorder (catch_warnings(record=True) stores through this hook)
            return warnings._showwarnmsg_impl(warnings.WarningMessage(message, category, filename, lineno, file, line))
        QgsMessageLog.logMessage(f"warning:{warnings.formatwarning(message, category, filename, lineno, line)}",
                                 "Python warning", Qgis.MessageLevel.Warning)

    def __enter__(self) -> "LogGuard":
        self._old = (sys.excepthook, warnings.showwarning)
        sys.excepthook = self._excepthook
        warnings.showwarning = self._showwarning
        QgsApplication.messageLog().messageReceived.connect(self._received)
        return self

    def __exit__(self, *exc) -> None:
        QgsApplication.processEvents()  # messages logged from task threads arrive queued
        QgsApplication.messageLog().messageReceived.disconnect(self._received)
        sys.excepthook, warnings.showwarning = self._old

    def report(self) -> str:
        return f"QGIS's message log received {len(self.problems)} error(s)/warning(s):\n" + "\n".join(self.problems)

"""A word-wrapped label that is always as tall as its text at the width it gets.

A wrapped QLabel in a QFormLayout keeps the height its size hint had at a guessed width, and the
form asks heightForWidth at another width than it then gives: the caption dialog showed a line
and a half of a long file path and of the model card. This label reports no heightForWidth to
the layout, and after each resize asks for exactly the height its text needs at its real width.
"""

from __future__ import annotations

from qgis.PyQt.QtWidgets import QLabel


class WrapLabel(QLabel):
    """Used for every wrapped note of the plugin's dialogs (the module docstring says why)."""

    def __init__(self, text: str = ""):
        super().__init__(text)
        self.setWordWrap(True)
        policy = self.sizePolicy()
        policy.setHeightForWidth(False)  # a form layout asks heightForWidth at another width than it gives
        self.setSizePolicy(policy)

    def sizeHint(self):  # noqa: N802  (Qt's name)
        hint = super().sizeHint()
        if self.width() > 0:  # laid out once: the height the text needs at the width it got
            hint.setHeight(max(0, self.heightForWidth(self.width())))
        return hint

    def resizeEvent(self, event):  # noqa: N802  (Qt's name)
        super().resizeEvent(event)
        need = self.heightForWidth(self.width()) if self.text() else 0
        if need != self.minimumHeight():
            self.setMinimumHeight(max(0, need))
            self.updateGeometry()

"""Backend messages in the plugin's words.

The backend speaks to command-line users ("pass --overwrite", "--resume"); the plugin's dialog
has a Resume check box and a file chooser instead, so the same refusals are reworded before a
QGIS user sees them. Unknown messages pass through unchanged.
"""

from __future__ import annotations

import re

_RULES = [
    # "<out> exists; pass --overwrite to replace it or --resume to continue it"
    (re.compile(r"(\S+) exists; pass --overwrite to replace it or --resume to continue it"),
     r"\1 exists: tick Resume to continue it or choose another file"),
    # only the tiling differs: the person means to resume, so say how (never "another file")
    (re.compile(r"was written from different tiling parameters; choose another output or pass --overwrite"),
     "was written with other tile settings: to resume it, use the tile size, overlap, bands and extent "
     "recorded in it (the caption dialog puts them back when the file is chosen as output)"),
    (re.compile(r"choose another output or pass --overwrite"), "choose another output file"),
    (re.compile(r"caption the raster again with --overwrite"),
     "caption the raster again into a new output file"),
    (re.compile(r",? ?(?:or )?pass --overwrite(?: to replace it)?"), ""),
    (re.compile(r"--resume"), "Resume"),
    (re.compile(r"--(tile-size|batch-size|beam-size|bands|extent|model|device|overlap)\b"),
     lambda m: m.group(1).replace("-", " ")),
]


def gui_wording(message: str) -> str:
    """``message`` with command-line options replaced by what the plugin's dialog offers."""
    text = message or ""
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return text


def has_cli_wording(message: str) -> bool:
    """Whether a message still tells a GUI user to pass a command-line option."""
    return bool(re.search(r"(^|\s)--[a-z]", message or ""))

"""Read a model's card from its ``config.json`` without loading the model.

The caption dialog needs the trained tile size and ground resolution to pre-fill its fields; a
JSON read keeps the dialog instant and torch-free.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .paths import default_model_dir


def model_dir(name: str | None) -> Path | None:
    name = (name or "default").strip() or "default"
    if name == "default":
        return default_model_dir()
    path = Path(name).expanduser()
    return path if (path / "config.json").is_file() else None


def read_card(name: str | None) -> dict:
    """The stored card ({} when unknown: a hub id, a tiny model, a missing default)."""
    directory = model_dir(name)
    if directory is None:
        return {}
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    card = config.get("card") if isinstance(config, dict) else None
    return dict(card) if isinstance(card, dict) else {}


def model_languages(name: str | None) -> list[str]:
    """Caption languages of a stored checkpoint: English plus its extra decoders (``decoders``)."""
    directory = model_dir(name)
    if directory is None:
        return ["en"]
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ["en"]
    extra = config.get("decoders") if isinstance(config, dict) else None
    return ["en"] + sorted(extra) if isinstance(extra, dict) else ["en"]


def card_tile_size(name: str | None, fallback: int = 256) -> int:
    try:
        return int(read_card(name).get("tile_size") or fallback)
    except (TypeError, ValueError):
        return fallback


def shorten(text: str, limit: int = 320) -> str:
    """``text`` whole when it fits; else its whole sentences up to ``limit``; only a first sentence
    longer than that is cut, at a word boundary with an ellipsis (a card that stopped mid-sentence
    read as a broken dialog)."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", text[:limit + 1])]
    if ends:
        return text[:ends[-1]]
    cut = text[:limit + 1].rsplit(" ", 1)[0].rstrip(",;:.")
    return (cut or text[:limit]) + "…"


def card_summary(name: str | None, full: bool = False, tiling_hints: bool = True) -> str:
    """One line about the model for the dialog; ``full`` keeps the whole description (tooltip);
    ``tiling_hints`` False leaves out the auto tile sizes (the dialog's footprint line shows the one
    that applies)."""
    card = read_card(name)
    if not card:
        if (name or "default") == "default" and default_model_dir() is None:
            return "no default model installed yet"
        return "no model card (tile size defaults to 256 px)"
    bits = []
    if card.get("tile_size"):
        bits.append(f"trained on {card['tile_size']} px tiles")
    if card.get("ground_resolution_m"):
        bits.append(f"at ~{card['ground_resolution_m']} m/px")
    anchors = card.get("tile_size_by_resolution") if tiling_hints else None
    if isinstance(anchors, list) and anchors:
        try:
            bits.append("auto tiles: " + ", ".join(f"{float(r):g} m/px -> {int(p)} px" for r, p in anchors))
        except (TypeError, ValueError):
            pass
    if card.get("description"):
        bits.append(str(card["description"]) if full else shorten(card["description"]))
    return "; ".join(bits) or "model card has no tiling hints"

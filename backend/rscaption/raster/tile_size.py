"""Choose a tile size in pixels from the raster's ground resolution and the model card.

A captioner recognises a patch of ground of roughly the size it was trained on, so by default
(``--tile-size auto``) tiles keep that footprint rather than a pixel count. The card says how:

``tile_size_by_resolution``: ``[[m_per_px, tile_px], ...]`` anchors, interpolated linearly in
  log-log space (footprints change by factors, not by steps) and clamped to the end anchors
  outside their range, because a model's behaviour beyond what it was tuned on is unknown.
``tile_size`` + ``ground_resolution_m``: one anchor; keep its footprint constant, clamped to
  [32, 1024] px so a very coarse or very fine raster still gives readable, affordable tiles.
neither: the card's ``tile_size`` (or 256) in pixels, as before.

Pure Python on purpose: the CLI, the worker and the QGIS plugin (which has no numpy guarantee and
must stay torch-free at start-up) all show the same number and the same sentence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_TILE_PX = 256
FOOTPRINT_CLAMP = (32, 1024)


def _anchors(card: dict) -> list[tuple[float, float]]:
    raw = (card or {}).get("tile_size_by_resolution") or []
    out = []
    for item in raw:
        try:
            res, px = float(item[0]), float(item[1])
        except (TypeError, ValueError, IndexError):
            continue
        if res > 0 and px >= 1 and math.isfinite(res) and math.isfinite(px):
            out.append((res, px))
    return sorted(out)


def _card_number(card: dict, key: str) -> float | None:
    try:
        value = float((card or {}).get(key) or 0)
    except (TypeError, ValueError):
        return None
    return value if value > 0 and math.isfinite(value) else None


def card_tile_px(card: dict) -> int:
    """The card's own pixel tile size: what a raster without a CRS gets."""
    return int(round(_card_number(card, "tile_size") or DEFAULT_TILE_PX))


def auto_tile_size(card: dict, m_per_px: float | None) -> int:
    """Tile size in pixels for output pixels of ``m_per_px`` metres (None: unknown)."""
    if m_per_px is None or not (m_per_px > 0 and math.isfinite(m_per_px)):
        return card_tile_px(card)
    anchors = _anchors(card)
    if len(anchors) == 1:
        res, px = anchors[0]
        return max(1, int(round(_constant_footprint(px, res, m_per_px))))
    if anchors:
        if m_per_px <= anchors[0][0]:
            return int(round(anchors[0][1]))
        if m_per_px >= anchors[-1][0]:
            return int(round(anchors[-1][1]))
        x = math.log(m_per_px)
        for (r0, p0), (r1, p1) in zip(anchors, anchors[1:]):
            if r0 <= m_per_px <= r1:
                t = (x - math.log(r0)) / (math.log(r1) - math.log(r0)) if r1 > r0 else 0.0
                return int(round(math.exp(math.log(p0) + t * (math.log(p1) - math.log(p0)))))
    trained_res = _card_number(card, "ground_resolution_m")
    if trained_res is not None:
        return int(round(_constant_footprint(card_tile_px(card), trained_res, m_per_px)))
    return card_tile_px(card)


def _constant_footprint(tile_px: float, trained_res: float, m_per_px: float) -> float:
    low, high = FOOTPRINT_CLAMP
    return min(high, max(low, tile_px * trained_res / m_per_px))


def _fmt_res(m_per_px: float) -> str:
    return f"{m_per_px:.2f}" if m_per_px >= 0.1 else f"{m_per_px:.3g}"


def _fmt_metres(metres: float) -> str:
    if metres >= 10_000:
        return f"{metres / 1000:,.1f} km"
    return f"{metres:,.0f} m" if metres >= 10 else f"{metres:.1f} m"


def describe_footprint(tile_px: int, m_per_px: float | None, auto: bool) -> str:
    """One line for the CLI's stderr, the worker's log and the plugin's dialog."""
    if m_per_px is None:
        return f"tiles: {tile_px} px (raster has no CRS: pixel tile size; footprint unknown)"
    how = "auto from the model card" if auto else "as given"
    return (f"tiles: {tile_px} px at {_fmt_res(m_per_px)} m/px = {_fmt_metres(tile_px * m_per_px)} "
            f"footprint ({how})")


@dataclass(frozen=True)
class TileChoice:
    tile_px: int
    m_per_px: float | None
    auto: bool

    @property
    def footprint_m(self) -> float | None:
        return None if self.m_per_px is None else self.tile_px * self.m_per_px

    def describe(self) -> str:
        return describe_footprint(self.tile_px, self.m_per_px, self.auto)

    def to_dict(self) -> dict:
        return {"tile_size": self.tile_px, "ground_resolution_m": self.m_per_px,
                "footprint_m": self.footprint_m, "auto": self.auto}


def choose_tile_size(card: dict, m_per_px: float | None, requested: int | str | None = None) -> TileChoice:
    """``requested`` None, 0 or "auto": from the card and resolution; else that many pixels."""
    if requested in (None, 0, "auto", ""):
        return TileChoice(auto_tile_size(card, m_per_px), m_per_px, True)
    return TileChoice(int(requested), m_per_px, False)


__all__ = ["auto_tile_size", "card_tile_px", "choose_tile_size", "describe_footprint", "TileChoice"]


def resolution_warning(card: dict, m_per_px: float | None, margin: float = 3.0) -> str | None:
    """A one-line warning when the raster's ground resolution is far (more than ``margin`` times)
    outside what the model was trained on: its captions there are guesses, whatever the tile size."""
    if m_per_px is None or not (m_per_px > 0 and math.isfinite(m_per_px)):
        return None
    anchors = _anchors(card)
    if not anchors and (card or {}).get("ground_resolution_m"):
        anchors = [(float(card["ground_resolution_m"]), 0.0)]
    if not anchors:
        return None
    lo, hi = anchors[0][0], anchors[-1][0]
    if lo / margin <= m_per_px <= hi * margin:
        return None
    trained = f"{_fmt_res(lo)}-{_fmt_res(hi)} m/px" if hi > lo else f"{_fmt_res(lo)} m/px"
    return (f"warning: {_fmt_res(m_per_px)} m/px is far from the {trained} this model was trained on; "
            "expect guesses, and read their confidence with care: it was calibrated on imagery in that range")

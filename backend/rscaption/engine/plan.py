"""A run's tiles: their resume keys and the ones left to do, in memory that does not grow with the raster.

Why: lists of every planned tile, of their keys and of the tiles left took about 2.6 KB a tile
before the first was read (2.6 GB for a 1M-tile VRT after ``--yes``). Tiles come from the tiler's
lazy plan (``RasterTiler.tiles()``) by index; a key is made when a batch needs it; a resume keeps
one bit per planned tile for "already done" (125 KB for a million tiles).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator

from ..raster.tiling import Tile, TilePlan


def tile_key(fingerprint: str, tile: Tile, tile_size: int, model_hash: str) -> str:
    c, r, w, hgt = tile.window
    return f"{fingerprint[:16]}/{c},{r},{w},{hgt}/{tile_size}/{model_hash[:16]}"


def _window_of(key: str) -> tuple[int, int, int, int] | None:
    parts = key.split("/")
    try:
        window = tuple(int(v) for v in parts[1].split(","))
    except (IndexError, ValueError):
        return None
    return window if len(parts) == 4 and len(window) == 4 else None


class PlanKeys(Mapping):
    """tile_id -> resume key for every tile of ``plan``, each made when asked."""

    def __init__(self, plan: TilePlan, fingerprint: str, tile_size: int, model_hash: str):
        self.plan, self._args = plan, (fingerprint, tile_size, model_hash)

    def key(self, tile: Tile) -> str:
        fingerprint, tile_size, model_hash = self._args
        return tile_key(fingerprint, tile, tile_size, model_hash)

    def __getitem__(self, tile_id: int) -> str:
        return self.key(self.plan[tile_id])

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        return iter(range(len(self.plan)))

    def index_of(self, key: str) -> int | None:
        """The tile this key belongs to, or None when it names no tile of this plan and run."""
        window = _window_of(key)
        i = None if window is None else self.plan.index_of(window)
        return i if i is not None and self[i] == key else None


def left_to_do(keys: PlanKeys, done: set[str]) -> tuple[int, Iterator[Tile]]:
    """(how many planned tiles are already in the output, the others in plan order, lazily)."""
    plan = keys.plan
    if not done:
        return 0, iter(plan)
    bits = bytearray((len(plan) + 7) // 8)
    resumed = 0
    for key in done:
        i = keys.index_of(key)
        if i is not None and not bits[i >> 3] & (1 << (i & 7)):
            bits[i >> 3] |= 1 << (i & 7)
            resumed += 1
    return resumed, (plan[i] for i in range(len(plan)) if not bits[i >> 3] & (1 << (i & 7)))


__all__ = ["tile_key", "PlanKeys", "left_to_do"]

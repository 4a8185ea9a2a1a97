"""Refuse runaway runs unless confirmed: one place for the threshold and the speed estimate.

Why: a 1,000,000 x 1,000,000 px raster (or ``--resolution 0.001``) silently started 15 million
tiles, about 128 hours of work. Above :data:`LARGE_RUN_TILES` planned tiles the CLI, the worker and
the plugin say how many tiles and roughly how long, and start only when the user confirmed
(``--yes``, ``confirm_large`` in the worker protocol, a dialog in the plugin). The check runs on
the tile *count* (no tile list, no pixels read), so refusing is instant whatever the raster size.

A run of fewer tiles is as wasteful when each tile is enlarged from a handful of source pixels
(``--resolution 1e-9``: 65,536 tiles of one source pixel each, hours of captions of blur): above
:data:`UPSAMPLED_RUN_FACTOR` the same confirmation is needed, whatever the count.
"""

from __future__ import annotations

from ..errors import RscaptionError

# Above this many planned tiles a run needs an explicit confirmation.
LARGE_RUN_TILES = 100_000

# Conservative speed for the estimate: the default model (EfficientNet-Lite0 + 2-layer GPT-2,
# beam 3) captions about 8-15 tiles/s on 2 CPU cores and far more on a GPU; 5 tiles/s keeps the
# estimate on the long side for slow laptops, bigger models and the I/O of real mosaics.
CONSERVATIVE_TILES_PER_S = 5.0

# Tiles enlarged more than this many times per side (e.g. 16 x 16 source pixels to a 256 px tile)
# need the confirmation too; input_check warns from UPSAMPLE_WARN on.
UPSAMPLED_RUN_FACTOR = 16.0


class LargeRunError(RscaptionError):
    """The run plans more tiles than :data:`LARGE_RUN_TILES` and was not confirmed."""

    kind = "large_run"

    def __init__(self, tiles: int, seconds: float, message: str):
        super().__init__(message)
        self.tiles = tiles
        self.seconds = seconds


def estimate_seconds(tiles: int) -> float:
    return tiles / CONSERVATIVE_TILES_PER_S


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def describe(tiles: int) -> str:
    """'15,625,000 tiles, about 36.2 days at 5 tiles/s'"""
    return (f"{tiles:,} tiles, about {format_duration(estimate_seconds(tiles))} "
            f"at {CONSERVATIVE_TILES_PER_S:g} tiles/s")


def check_run_size(tiles: int, confirmed: bool, how: str = "confirm it (rscaption caption --yes)",
                   upsample: float = 1.0, source_px: tuple[int, int] | None = None) -> None:
    """Raise :class:`LargeRunError` for an unconfirmed run above the threshold, or one whose tiles
    are enlarged ``upsample`` times per side from ``source_px`` source pixels beyond the limit."""
    if upsample > UPSAMPLED_RUN_FACTOR and not confirmed:
        sx, sy = source_px or (0, 0)
        raise LargeRunError(tiles, estimate_seconds(tiles),
                            f"this run plans {describe(tiles)}, each upsampled {upsample:,.0f}x from {sx} x {sy} "
                            f"source pixels (more than {UPSAMPLED_RUN_FACTOR:g}x: captions of blur); {how} to "
                            "start it, or choose a coarser resolution")
    if tiles > LARGE_RUN_TILES and not confirmed:
        raise LargeRunError(tiles, estimate_seconds(tiles),
                            f"this run plans {describe(tiles)} (more than {LARGE_RUN_TILES:,}); "
                            f"{how} to start it, or choose a smaller extent or a coarser resolution")

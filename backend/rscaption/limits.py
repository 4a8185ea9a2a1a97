"""The bounds of every size-like option, in one place (reliability issue, item 12).

A number a user types becomes an allocation: ``--beam-size 100000`` once took 4 GB in 14 s before
anything failed. Each bound is generous for real use and far below what hurts; the command line
refuses a value outside it in one line that names the allowed range (the argparse ``type``
functions below), and the worker checks the same table (:func:`check`) before a model loads.
Foundation: imports nothing of rscaption but :mod:`errors`.
"""

from __future__ import annotations

import argparse
import math

from .errors import RscaptionError

MAX_TILE_PX = 8192  # 8192^2 x 3 bytes = 192 MiB per tile before the batch and model copies

# option name -> (least, most), inclusive
BOUNDS = {
    "tile_size": (1, MAX_TILE_PX),
    "overlap": (0, MAX_TILE_PX - 1),  # the CLI checks it against the tile size chosen
    "batch_size": (1, 1024),
    "beam_size": (1, 32),
    "k": (1, 100_000),
}
FLAGS = {"tile_size": "--tile-size", "overlap": "--overlap", "batch_size": "--batch-size",
         "beam_size": "--beam-size", "k": "-k"}


def _range_text(name: str) -> str:
    lo, hi = BOUNDS[name]
    return f"{lo:,} to {hi:,}"


def bounded_int(name: str):
    """An argparse ``type`` for option ``name`` of :data:`BOUNDS`: an integer in its range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number from {_range_text(name)}, got {text!r}") \
                from None
        lo, hi = BOUNDS[name]
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}" if lo == 1 else
                                             f"must be from {_range_text(name)}, got {text}")
        if value > hi:
            raise argparse.ArgumentTypeError(f"must be at most {hi:,} (allowed: {_range_text(name)}), got {text}")
        return value

    parse.__name__ = name  # argparse names the type in its own messages
    return parse


def positive_finite(text: str) -> float:
    """An argparse ``type`` for a ground resolution: a number above 0 (not inf, not nan)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def finite_float(text: str) -> float:
    """An argparse ``type`` for a coordinate (``--extent``, ``--bbox``): any number but inf and nan."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def unit_fraction(text: str) -> float:
    """An argparse ``type`` for a confidence: a number from 0 to 1 (nan compares false with both)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text}")
    return value


def check(values: dict) -> None:
    """Raise one line for the first value in ``values`` (a worker request) outside its bound;
    ``target_resolution`` must be a finite number above 0 (or 0: none). Absent and None values pass."""
    for name, (lo, hi) in BOUNDS.items():
        value = values.get(name)
        if value is not None and not lo <= value <= hi:
            raise RscaptionError(f"{name} must be from {_range_text(name)}, got {value}")
    res = values.get("target_resolution")  # 0 has always meant "no resampling" to the worker
    if res is not None and res != 0 and not (math.isfinite(res) and res > 0):
        raise RscaptionError(f"target_resolution must be a finite number above 0, got {res}")

"""One short sentence per tile of a change file, and its scene names.

The sentence is what an analyst reads in the attribute table and in the search results, so it
says only what the file can back up: the top scene of each date from the calibrated scene
posteriors ("farmland -> residential area"), "no change" with the scene when the score is below
the threshold, and why a tile was not scored (no data on a date, or too little of the tile
covered) instead of any claim. ``confidence`` is the probability that both scene names are right
(the product of the two calibrated posteriors), so an "A -> B" at 0.2 reads as a guess.
"""

from __future__ import annotations

import numpy as np

MIN_VALID_FRACTION = 0.9  # below this share of valid pixels on either date a tile is not scored


def scene_names(scene, post: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(top scene phrase, its posterior) of each row of posteriors (``score.posteriors``)."""
    if scene is None or post is None or not len(post):
        return [""] * (0 if post is None else len(post)), np.full(0 if post is None else len(post), np.nan)
    top = post.argmax(1)
    return [scene.phrases[i] for i in top], post[np.arange(len(post)), top]


def sentence(change: float | None, threshold: float, before: str, after: str) -> str:
    if change is None:
        return "not scored"
    if not before or not after:  # a model without a scene head: no names to give
        return "changed" if change >= threshold else "no change"
    if change >= threshold:
        return f"{before} -> {after}" if before != after else f"changed ({before} on both dates)"
    return f"no change ({before})" if before == after else f"no change ({before} / {after})"


def not_scored(status: str, vf_before: float | None, vf_after: float | None) -> str:
    return {
        "no_data_after": "no data on the after date (outside the overlap or nodata): not compared",
        "no_data_before": "no data on the before date: not compared",
        "partial_data": (f"only {100 * min(v for v in (vf_before, vf_after) if v is not None):.0f} % of the tile "
                         "has data on one date: not compared"),
    }[status]


def status_of(vf_before: float | None, vf_after: float | None) -> str:
    if vf_after is None:
        return "no_data_after"
    if vf_before is None:
        return "no_data_before"
    if min(vf_before, vf_after) < MIN_VALID_FRACTION:
        return "partial_data"
    return "scored"

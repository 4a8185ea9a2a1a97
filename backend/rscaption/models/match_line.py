"""The "no good match" line of a text query, from the model's own reference images.

Why: a search always returns its k best tiles, and a cosine score means nothing on its own: each
text has its own scale ("farmland" reaches 0.66 on farm tiles, "houses" 0.33 on the same tiles,
where there are none). So "houses" on a farm scene listed ten "matches" at 0.21-0.33. What says
whether a score is a match is how the same query scores images it does *not* describe.

The model carries labelled reference images: its scene head's class prototypes (k-means centres
of each scene's training image embeddings, ``scene.safetensors``). For a query, the scenes whose
class prompts the text tower puts nearest the query are the ones it may be describing; the
query's scores against the reference images of every *other* scene are its null distribution,
and the line is that distribution's :data:`NULL_QUANTILE` percentile. A hit below the line scores
no better than images of unrelated scenes do. No number here is a score: the line comes from the
model's own vectors, per model and per query (a few hundred dot products).

Measured on RSICD val (1,094 images the default model was not trained on; tools/match_line_eval.py):
for 59 queries (scene names and held-out captions), the five best images of the query's scene are
above the line for 93 % of queries, 81 % of one-scene sets without the query's scene have no
image above it, and 2.1 % of all unrelated images reach it. A model without a scene head (the tiny
test models) has no line: ``None``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

#: Scenes whose class prompts are nearest the query (text tower): what it may describe, so they
#: are left out of its null distribution.
NEAREST_SCENES = 3
#: Percentile of the query's scores on unrelated scenes' reference images that a match must reach.
NULL_QUANTILE = 99.0

_CACHE: dict = {}
_LOCK = threading.Lock()


class MatchLine:
    """A model's reference image embeddings with their scenes, and the prompts naming the scenes."""

    def __init__(self, prompts: np.ndarray, references: np.ndarray, owner: np.ndarray):
        self.prompts = np.asarray(prompts, np.float32)
        self.references = np.asarray(references, np.float32)
        self.owner = np.asarray(owner, np.int64)

    @classmethod
    def from_scene(cls, scene) -> "MatchLine | None":
        """Labelled prototypes when the head has them; else its unlabelled training prototypes,
        each given the scene whose prompt is nearest it (the model's own zero-shot label)."""
        if scene is None or scene.prompts is None or not len(scene.prompts):
            return None
        if scene.class_prototypes is not None and len(scene.class_prototypes):
            return cls(scene.prompts, scene.class_prototypes, scene.class_owner)
        if scene.prototypes is None or not len(scene.prototypes):
            return None
        refs = np.asarray(scene.prototypes, np.float32)
        return cls(scene.prompts, refs, (refs @ np.asarray(scene.prompts, np.float32).T).argmax(1))

    def line(self, query: np.ndarray) -> float | None:
        q = np.asarray(query, np.float32).reshape(-1)
        if q.shape[0] != self.prompts.shape[1]:
            return None
        near = np.argsort(-(self.prompts @ q))[:NEAREST_SCENES]
        unrelated = self.references[~np.isin(self.owner, near)]
        if not len(unrelated):
            return None
        return float(np.percentile(unrelated @ q, NULL_QUANTILE))


def match_line_for(cap) -> MatchLine | None:
    """The model's :class:`MatchLine` (None without a scene head), loaded once per model: a
    full captioner has its head; the search-only text tower reads it from its checkpoint."""
    key = (getattr(cap, "model_id", None), getattr(cap, "model_hash", None) or id(cap))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    scene = getattr(cap, "scene", None)
    if scene is None and getattr(cap, "source_dir", None) is not None:
        scene = _scene_of(Path(cap.source_dir))
    found = MatchLine.from_scene(scene)
    with _LOCK:
        _CACHE[key] = found
    return found


def _scene_of(directory: Path):
    import json

    from ..errors import ModelError
    from .scene import SceneHead

    try:
        cfg = json.loads((directory / "config.json").read_text()).get("scene")
        return SceneHead.load(cfg, directory) if cfg else None
    except (OSError, ValueError, KeyError, ModelError):  # no line rather than no search
        return None

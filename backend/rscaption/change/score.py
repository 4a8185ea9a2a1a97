"""The change score: how likely a tile's land use changed between two dates (0-1).

``1 - cosine`` of the two image embeddings (the baseline) reacts to anything that moves the
embedding: another season, another sensor, light, a shifted grid, or simply another patch of the
same kind of place. What a land-use change moves is the *scene*: so the score is a tiny logistic
model over features of the two dates' calibrated scene posteriors (the scene head of the model)
beside the cosine:

* ``cosine_change``: 1 - cos(e_before, e_after), the baseline;
* ``scene_tv``: total variation between the two posteriors over the scene vocabulary;
* ``scene_js``: their Jensen-Shannon divergence (bits), which weighs confident disagreements more;
* ``top_disagree``: the two top scenes differ, weighted by the less confident of the two;
* ``proto_tv``: total variation between the labelled-prototype posteriors (where each tile sits
  among the training images of every scene), which a prompt alone cannot say;
* ``metric_change``: log of the squared length of the embedding difference in the 16 directions
  where scene changes move embeddings most *relative to* how appearance changes move them (the
  top generalized eigenvectors of the two difference covariances of the train pairs): the
  directions light, season, sensor and another patch of the same scene barely touch.

Its weights are fitted only on pairs built from training images (``change/fit.py``, ``tools/
fit_change_score.py``) and stored beside the checkpoint as ``change.json``: JSON, not a weight
file, so the checkpoint's hash (and every caption file's resume and search) is unchanged. A
model without ``change.json``, or without a scene head, scores with the baseline and says so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FEATURES = ("cosine_change", "scene_tv", "scene_js", "top_disagree", "proto_tv", "metric_change")
SCORER_FILE = "change.json"
BASELINE = "cosine"


def _js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    m = 0.5 * (p + q)

    def kl(a, b):
        return np.sum(np.where(a > 0, a * (np.log2(np.clip(a, 1e-12, None)) - np.log2(np.clip(b, 1e-12, None))), 0),
                      axis=1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def posteriors(scene, emb: np.ndarray, ground_m: float | None = None) -> np.ndarray:
    """Scene posterior of each tile with the classes never seen at this ground resolution taken out
    and the rest renormalised (``SceneHead.unseen_at``): a golf course is not claimed at 5 m, so it
    cannot appear or vanish there either."""
    p = scene.posterior(np.asarray(emb, np.float32)).astype(np.float64)
    unseen = scene.unseen_at(ground_m)
    if unseen.any() and not unseen.all():
        p = np.where(unseen[None, :], 0.0, p)
        p /= p.sum(1, keepdims=True)
    return p


def _proto_posteriors(scene, emb, ground_m):
    if getattr(scene, "class_prototypes", None) is None:
        return None
    q = scene.prototype_posterior(np.asarray(emb, np.float32)).astype(np.float64)
    unseen = scene.unseen_at(ground_m)
    if unseen.any() and not unseen.all():
        q = np.where(unseen[None, :], 0.0, q)
        q /= np.clip(q.sum(1, keepdims=True), 1e-12, None)
    return q


def pair_features(emb_before: np.ndarray, emb_after: np.ndarray, scene=None,
                  ground_m: float | None = None, projection=None) -> dict[str, np.ndarray]:
    """Every feature of :data:`FEATURES` for N tile pairs (the scene ones only with a scene head,
    ``metric_change`` only with a ``projection`` [D, k])."""
    eb = np.asarray(emb_before, np.float64)
    ea = np.asarray(emb_after, np.float64)
    cos = np.sum(eb * ea, 1) / np.clip(np.linalg.norm(eb, axis=1) * np.linalg.norm(ea, axis=1), 1e-12, None)
    out = {"cosine_change": 1.0 - cos}
    if projection is not None:
        out["metric_change"] = np.log(np.sum(((eb - ea) @ np.asarray(projection, np.float64)) ** 2, 1) + 1e-6)
    if scene is None:
        return out
    pb, pa = posteriors(scene, eb, ground_m), posteriors(scene, ea, ground_m)
    out["scene_tv"] = 0.5 * np.abs(pb - pa).sum(1)
    out["scene_js"] = _js(pb, pa)
    out["top_disagree"] = (pb.argmax(1) != pa.argmax(1)) * np.minimum(pb.max(1), pa.max(1))
    qb, qa = _proto_posteriors(scene, eb, ground_m), _proto_posteriors(scene, ea, ground_m)
    if qb is not None:
        out["proto_tv"] = 0.5 * np.abs(qb - qa).sum(1)
    return out


@dataclass
class ChangeScorer:
    """sigmoid(standardised features . weights + bias); ``threshold`` is where a tile counts as changed."""
    features: tuple = ("cosine_change",)
    mean: list = field(default_factory=lambda: [0.0])
    scale: list = field(default_factory=lambda: [1.0])
    weights: list = field(default_factory=lambda: [1.0])
    bias: float = 0.0
    threshold: float = 0.5
    name: str = BASELINE
    projection: list | None = None  # [D][k] for metric_change
    sha256: str = ""
    note: str = ""
    info: dict = field(default_factory=dict)

    @property
    def needs_scene(self) -> bool:
        return any(f not in ("cosine_change", "metric_change") for f in self.features)

    def score(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        if self.name == BASELINE:  # 1 - cos, clipped to 0-1: what the issue calls the baseline
            return np.clip(feats["cosine_change"], 0.0, 1.0)
        x = np.stack([feats[f] for f in self.features], 1)
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return 1.0 / (1.0 + np.exp(-(z @ np.asarray(self.weights) + self.bias)))

    def to_dict(self) -> dict:
        return {"format": "rscaption-change-scorer", "version": 1, "name": self.name,
                "features": list(self.features), "mean": [float(v) for v in self.mean],
                "scale": [float(v) for v in self.scale], "weights": [float(v) for v in self.weights],
                "bias": float(self.bias), "threshold": float(self.threshold),
                **({"projection": [[round(float(v), 6) for v in row] for row in self.projection]}
                   if self.projection is not None else {}), **self.info}

    def describe(self) -> dict:
        """What a change file records about the scorer that made it."""
        return {"name": self.name, "sha256": self.sha256, "features": list(self.features),
                "threshold": self.threshold, "note": self.note or None}

    @classmethod
    def from_dict(cls, data: dict, sha256: str = "") -> "ChangeScorer":
        known = {"format", "version", "name", "features", "mean", "scale", "weights", "bias", "threshold", "projection"}
        return cls(features=tuple(data["features"]), mean=list(data["mean"]), scale=list(data["scale"]),
                   weights=list(data["weights"]), bias=float(data["bias"]),
                   threshold=float(data.get("threshold", 0.5)), name=str(data.get("name", "logistic")),
                   projection=data.get("projection"),
                   sha256=sha256, info={k: v for k, v in data.items() if k not in known})


def baseline_scorer(note: str = "") -> ChangeScorer:
    return ChangeScorer(note=note, threshold=0.5)


def scorer_for(cap) -> ChangeScorer:
    """The model's fitted scorer (``change.json`` in its checkpoint folder, fitted for this very
    model hash), else the baseline with a note saying why."""
    directory = getattr(cap, "source_dir", None)
    path = Path(directory) / SCORER_FILE if directory else None
    if getattr(cap, "scene", None) is None:
        return baseline_scorer(f"model {cap.model_id} has no scene head: change is 1 - cosine of the embeddings "
                               "(uncalibrated; appearance changes count as change)")
    if path is None or not path.is_file():
        return baseline_scorer(f"model {cap.model_id} has no {SCORER_FILE}: change is 1 - cosine of the embeddings "
                               "(uncalibrated; appearance changes count as change)")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
        scorer = ChangeScorer.from_dict(data, hashlib.sha256(raw).hexdigest())
    except (ValueError, KeyError, TypeError) as exc:
        return baseline_scorer(f"{path} is not a change scorer ({exc}): change is 1 - cosine")
    fitted_for = data.get("model_hash")
    if fitted_for and fitted_for != cap.model_hash:
        return baseline_scorer(f"{path} was fitted for another model ({fitted_for[:12]}): change is 1 - cosine")
    if "metric_change" in scorer.features and scorer.projection is None:
        return baseline_scorer(f"{path} has no projection for metric_change: change is 1 - cosine")
    if "proto_tv" in scorer.features and getattr(cap.scene, "class_prototypes", None) is None:
        return baseline_scorer(f"{path} needs labelled prototypes the scene head lacks: change is 1 - cosine")
    return scorer


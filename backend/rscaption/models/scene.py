"""Scene posterior and calibrated confidence of a captioner (``scene.safetensors`` + config).

The LM's own token probabilities say how fluent a caption is, not whether it is right: the old
default wrote "a golf course" over 5 m farmland with confidence 0.9. What predicts a right
caption is whether the image looks like a scene the model was trained on, and how clearly it
looks like one. So the confidence is a logistic model, fitted on held-out val images, over:

* the temperature-scaled scene posterior over the class prompts (top probability, margin),
* the tile's cosine similarity to the nearest training-embedding prototype (k-means centres of
  the training embeddings): low far from anything the model saw,
* the LM's mean token log-probability,
* the image's posterior probability of the scene the caption itself names (the caption read by the
  text tower against the class prompts): a caption that names a scene the image tower doubts is
  the commonest way to be wrong;
* the same probability from labelled training prototypes (k-means centres of each class's
  training embeddings) instead of the class prompts: where the image sits among the training
  images of each scene, which the one prompt per class cannot say. It mostly improves calibration
  (the per-set calibration error), not ranking.

Its output is the predicted probability that the caption names the right scene. Below
``low_threshold`` the caption is replaced by one that says it is unsure and names the nearest
known scenes, instead of a confident wrong class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FEATURES = ("top_logit", "margin", "prototype_sim", "lm_logprob", "caption_scene_logprob",
            "caption_scene_proto_logprob")
UNSURE_TEMPLATE = "an aerial scene of uncertain type, most like {} or {}."


def _logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


@dataclass
class SceneHead:
    phrases: list[str]
    prompts: np.ndarray                 # [K, D] L2-normalised class-prompt embeddings
    prototypes: np.ndarray              # [M, D] L2-normalised training prototypes
    scale: float = 100.0                # the encoder's logit scale
    temperature: float = 1.0
    weights: list[float] = field(default_factory=lambda: [1.0, 0.0, 0.0, 0.0])
    bias: float = 0.0
    low_threshold: float = 0.0
    feature_names: tuple = FEATURES[:4]  # what ``weights`` weigh (older heads have the first four)
    class_prototypes: np.ndarray | None = None  # [M, D] per-class training centres (last feature)
    class_owner: np.ndarray | None = None       # [M] the vocabulary class of each centre
    proto_temperature: float = 0.05
    # per class, the coarsest ground resolution (m/px) training showed it at; None: unknown (a set
    # without a stated resolution had it); see ``unseen_at``
    class_max_ground_m: list | None = None
    coarser_tolerance: float = 4.0

    # ---------------------------------------------------------------- inference

    def posterior(self, emb: np.ndarray) -> np.ndarray:
        from ..evaluation.calibration import softmax

        emb = np.asarray(emb, dtype=np.float32)
        return softmax(self.scale * emb @ self.prompts.T / self.temperature)

    @property
    def needs_caption_text(self) -> bool:
        return "caption_scene_logprob" in self.feature_names

    def caption_scenes(self, text_emb: np.ndarray) -> np.ndarray:
        """The vocabulary class each caption names (its text embedding's nearest class prompt)."""
        return (np.asarray(text_emb, np.float32) @ self.prompts.T).argmax(1)

    def features(self, emb: np.ndarray, lm_conf, text_emb: np.ndarray | None = None) -> np.ndarray:
        """``[N, F]`` in the order of ``feature_names`` (see :data:`FEATURES`); ``lm_conf`` is
        exp(mean token log-prob) per caption; ``text_emb`` the captions' text embeddings (without
        them, e.g. for a language the text tower cannot read, the caption is taken to name the
        image's top scene)."""
        p = self.posterior(emb)
        top2 = -np.sort(-p, axis=1)[:, :2]
        sim = (np.asarray(emb, np.float32) @ self.prototypes.T).max(1) if len(self.prototypes) else \
            np.ones(len(p), np.float32)
        lm = np.log(np.clip(np.asarray(lm_conf, np.float64), 1e-6, 1.0))
        named = self.caption_scenes(text_emb) if text_emb is not None else p.argmax(1)
        cap_p = np.log(np.clip(p[np.arange(len(p)), named], 1e-6, 1.0))
        cols = {"top_logit": _logit(top2[:, 0]), "margin": top2[:, 0] - top2[:, 1], "prototype_sim": sim,
                "lm_logprob": lm, "caption_scene_logprob": cap_p}
        if "caption_scene_proto_logprob" in self.feature_names:
            q = self.prototype_posterior(emb)
            cols["caption_scene_proto_logprob"] = np.log(np.clip(q[np.arange(len(q)), named], 1e-6, 1.0))
        return np.stack([cols[f] for f in self.feature_names], axis=1).astype(np.float64)

    def prototype_posterior(self, emb: np.ndarray) -> np.ndarray:
        """``[N, K]`` softmax over classes of each class's nearest labelled prototype similarity;
        classes without prototypes get none of the mass."""
        from ..evaluation.calibration import softmax

        if self.class_prototypes is None or not len(self.class_prototypes):
            raise ValueError("this scene head has no labelled prototypes")
        sims = np.asarray(emb, np.float32) @ self.class_prototypes.T
        best = np.full((len(sims), len(self.prompts)), -np.inf, np.float32)
        for c in np.unique(self.class_owner):
            best[:, c] = sims[:, self.class_owner == c].max(1)
        return softmax(best / self.proto_temperature)

    def confidence(self, emb: np.ndarray, lm_conf, text_emb: np.ndarray | None = None) -> np.ndarray:
        from ..evaluation.calibration import sigmoid

        return sigmoid(self.features(emb, lm_conf, text_emb) @ np.asarray(self.weights) + self.bias)

    def top_classes(self, emb: np.ndarray, k: int = 2, exclude: np.ndarray | None = None) -> list[list[str]]:
        p = self.posterior(emb)
        if exclude is not None and exclude.any() and not exclude.all():
            p = np.where(exclude[None, :], -1.0, p)
        return [[self.phrases[j] for j in np.argsort(-row)[:k]] for row in p]

    def unseen_at(self, ground_m: float | None) -> np.ndarray:
        """``[K]`` classes training never showed within ``coarser_tolerance`` x of a tile this coarse.

        A golf course is told apart by greens and bunkers a few metres wide; the model knows it
        only from 0.3 m imagery, and at 5 m it takes smooth meadows for one (the NAIP scenes in the
        model card). So at a ground resolution more than ``coarser_tolerance`` times coarser than
        the coarsest training image of a class, the class is not claimed: the caption falls back to
        the beam's next plausible hypothesis, else to an honest "uncertain" one. Classes of sets
        without a stated resolution are never excluded; finer tiles than training are not judged."""
        k = len(self.prompts)
        if ground_m is None or self.class_max_ground_m is None or not ground_m > 0:
            return np.zeros(k, bool)
        return np.array([m is not None and ground_m > m * self.coarser_tolerance for m in self.class_max_ground_m])

    def apply(self, emb: np.ndarray, captions: list[tuple[str, float]], rewrite: bool = True,
              text_emb: np.ndarray | None = None, ground_m: float | None = None,
              alternatives: list[list[tuple[str, float]]] | None = None, embed=None) -> list[tuple[str, float]]:
        """Calibrated confidences, and (``rewrite``) honest captions where the confidence is low or
        the caption names a scene never seen at the tile's ground resolution ``ground_m``
        (``unseen_at``). ``alternatives`` are each tile's other beam hypotheses, best first, and
        ``embed(texts)`` their text embeddings, for a plausible replacement."""
        if not captions:
            return captions
        conf = self.confidence(emb, [c for _, c in captions], text_emb)
        unseen = self.unseen_at(ground_m) if rewrite and text_emb is not None else np.zeros(len(self.prompts), bool)
        named = self.caption_scenes(text_emb) if unseen.any() else None
        tops = self.top_classes(emb, exclude=unseen) if rewrite and (self.low_threshold > 0 or unseen.any()) else None
        out = []
        for i, ((text, _), c) in enumerate(zip(captions, conf)):
            c = float(c)
            if named is not None and unseen[named[i]]:
                alt = self._plausible(emb[i:i + 1], alternatives[i] if alternatives else [], unseen, embed)
                if alt is None:
                    out.append((UNSURE_TEMPLATE.format(*tops[i][:2]), min(c, self.low_threshold)))
                    continue
                text, c = alt
            if tops is not None and c < self.low_threshold:
                text = UNSURE_TEMPLATE.format(*tops[i][:2])
            out.append((text, c))
        return out

    def _plausible(self, emb: np.ndarray, candidates, unseen: np.ndarray, embed):
        """The first candidate (text, LM confidence) naming a scene not in ``unseen``, with its
        calibrated confidence; None if there is none."""
        if not candidates or embed is None:
            return None
        temb = np.asarray(embed([t for t, _ in candidates]), np.float32)
        for (t, lm), te, cls in zip(candidates, temb, self.caption_scenes(temb)):
            if not unseen[cls]:
                return t, float(self.confidence(emb, [lm], te[None])[0])
        return None

    # ---------------------------------------------------------------- storage

    def save(self, directory: Path, dtype=None) -> dict:
        import torch

        from .weights import save_state

        state = {"prompts": torch.from_numpy(np.ascontiguousarray(self.prompts, dtype=np.float32)),
                 "prototypes": torch.from_numpy(np.ascontiguousarray(self.prototypes, dtype=np.float32))}
        if self.class_prototypes is not None:
            state["class_prototypes"] = torch.from_numpy(np.ascontiguousarray(self.class_prototypes, np.float32))
            state["class_owner"] = torch.from_numpy(np.asarray(self.class_owner, np.int64))
        save_state(state, Path(directory) / "scene.safetensors", dtype)
        cfg = {"weights": "scene.safetensors", "phrases": list(self.phrases), "scale": float(self.scale),
               "temperature": float(self.temperature), "calibration": {
                   "features": list(self.feature_names), "weights": [float(w) for w in self.weights],
                   "bias": float(self.bias)}, "low_threshold": float(self.low_threshold)}
        if self.class_prototypes is not None:
            cfg["proto_temperature"] = float(self.proto_temperature)
        if self.class_max_ground_m is not None:
            cfg["class_max_ground_m"] = [None if m is None else float(m) for m in self.class_max_ground_m]
            cfg["coarser_tolerance"] = float(self.coarser_tolerance)
        return cfg

    @classmethod
    def load(cls, cfg: dict, directory: Path) -> "SceneHead":
        from .weights import load_state

        st = load_state(Path(directory) / cfg.get("weights", "scene.safetensors"))
        cal = cfg.get("calibration", {})
        return cls(phrases=list(cfg["phrases"]), prompts=st["prompts"].float().numpy(),
                   prototypes=st["prototypes"].float().numpy(), scale=float(cfg.get("scale", 100.0)),
                   temperature=float(cfg.get("temperature", 1.0)),
                   weights=[float(w) for w in cal.get("weights", [1.0, 0, 0, 0])],
                   bias=float(cal.get("bias", 0.0)), low_threshold=float(cfg.get("low_threshold", 0.0)),
                   feature_names=tuple(cal.get("features", FEATURES[:4])),
                   class_prototypes=st["class_prototypes"].float().numpy() if "class_prototypes" in st else None,
                   class_owner=st["class_owner"].numpy() if "class_owner" in st else None,
                   proto_temperature=float(cfg.get("proto_temperature", 0.05)),
                   class_max_ground_m=cfg.get("class_max_ground_m"),
                   coarser_tolerance=float(cfg.get("coarser_tolerance", 4.0)))

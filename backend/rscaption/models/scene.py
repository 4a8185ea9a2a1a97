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
  the commonest way to be wrong.

Its output is the predicted probability that the caption names the right scene. Below
``low_threshold`` the caption is replaced by one that says it is unsure and names the nearest
known scenes, instead of a confident wrong class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FEATURES = ("top_logit", "margin", "prototype_sim", "lm_logprob", "caption_scene_logprob")
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
        return np.stack([cols[f] for f in self.feature_names], axis=1).astype(np.float64)

    def confidence(self, emb: np.ndarray, lm_conf, text_emb: np.ndarray | None = None) -> np.ndarray:
        from ..evaluation.calibration import sigmoid

        return sigmoid(self.features(emb, lm_conf, text_emb) @ np.asarray(self.weights) + self.bias)

    def top_classes(self, emb: np.ndarray, k: int = 2) -> list[list[str]]:
        p = self.posterior(emb)
        return [[self.phrases[j] for j in np.argsort(-row)[:k]] for row in p]

    def apply(self, emb: np.ndarray, captions: list[tuple[str, float]], rewrite: bool = True,
              text_emb: np.ndarray | None = None) -> list[tuple[str, float]]:
        """Calibrated confidences, and (``rewrite``) honest captions where the confidence is low."""
        if not captions:
            return captions
        conf = self.confidence(emb, [c for _, c in captions], text_emb)
        out = []
        tops = self.top_classes(emb) if self.low_threshold > 0 and rewrite else None
        for i, ((text, _), c) in enumerate(zip(captions, conf)):
            if tops is not None and c < self.low_threshold:
                text = UNSURE_TEMPLATE.format(*tops[i][:2])
            out.append((text, float(c)))
        return out

    # ---------------------------------------------------------------- storage

    def save(self, directory: Path, dtype=None) -> dict:
        import torch

        from .weights import save_state

        save_state({"prompts": torch.from_numpy(np.ascontiguousarray(self.prompts, dtype=np.float32)),
                    "prototypes": torch.from_numpy(np.ascontiguousarray(self.prototypes, dtype=np.float32))},
                   Path(directory) / "scene.safetensors", dtype)
        return {"weights": "scene.safetensors", "phrases": list(self.phrases), "scale": float(self.scale),
                "temperature": float(self.temperature), "calibration": {
                    "features": list(self.feature_names), "weights": [float(w) for w in self.weights],
                    "bias": float(self.bias)}, "low_threshold": float(self.low_threshold)}

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
                   feature_names=tuple(cal.get("features", FEATURES[:4])))

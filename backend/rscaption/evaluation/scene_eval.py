"""Does a caption name the right scene? The judge behind confidence calibration and its report.

Caption scores (BLEU, CIDEr) say how close a caption's words are to the references; a user asks
a simpler question: is this tile what the caption says it is? A caption's scene is read with the
model's own text tower: the caption's embedding against the class prompts of the scene
vocabulary, nearest prompt wins. It is right when that class is one of the image's right classes
(``positives``; several can be right, e.g. any residential density for EuroSAT "Residential").
The judge is checked on the reference captions themselves (``judge_accuracy``): it is only as good
as the text tower, and the report says how good that is.
"""

from __future__ import annotations

import numpy as np


def caption_embeddings(cap, captions: list[str]) -> np.ndarray:
    """Text-tower embeddings of captions, exactly as ``Captioner.calibrate`` computes them, so the
    judge and the scene head read the same vectors."""
    from ..data.datasets import normalize_caption

    if not captions:
        return np.zeros((0, cap.embed_dim), dtype=np.float32)
    return np.asarray(cap.embed_texts([normalize_caption(c) for c in captions]), np.float32)


def caption_classes(cap, captions: list[str], prompt_emb: np.ndarray, text_emb: np.ndarray | None = None) -> np.ndarray:
    """Nearest class prompt of each caption (index into the vocabulary)."""
    if text_emb is None:
        text_emb = caption_embeddings(cap, captions)
    return (np.asarray(text_emb) @ prompt_emb.T).argmax(1) if len(text_emb) else np.zeros(0, dtype=np.int64)


def names_right_scene(cap, captions: list[str], prompt_emb: np.ndarray, positives: np.ndarray,
                      text_emb: np.ndarray | None = None) -> np.ndarray:
    cls = caption_classes(cap, captions, prompt_emb, text_emb)
    return np.asarray(positives, bool)[np.arange(len(cls)), cls]


def judge_accuracy(cap, records, prompt_emb: np.ndarray, positives: np.ndarray) -> float:
    """How often the judge calls a *reference* caption right (one reference per image, the first)."""
    refs = [r.captions[0] for r in records if r.captions]
    idx = [i for i, r in enumerate(records) if r.captions]
    if not refs:
        return float("nan")
    ok = names_right_scene(cap, refs, prompt_emb, np.asarray(positives)[idx])
    return float(100.0 * ok.mean())


def scene_accuracy(emb: np.ndarray, prompt_emb: np.ndarray, positives: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Per image: is the nearest class prompt among the classes its set can name a right one?
    (The usual scene-classification accuracy of each dataset, on the shared vocabulary.)"""
    logits = np.asarray(emb) @ prompt_emb.T
    logits = np.where(np.asarray(allowed, bool), logits, -np.inf)
    pred = logits.argmax(1)
    return np.asarray(positives, bool)[np.arange(len(pred)), pred]


def split_halves(set_of_image: np.ndarray, seed: int = 0) -> np.ndarray:
    """A seeded half of each set's val images (True = calibration half, False = report half), so
    the confidence is never scored on the images it was fitted on."""
    rng = np.random.default_rng(seed)
    calib = np.zeros(len(set_of_image), bool)
    for s in np.unique(set_of_image):
        idx = np.flatnonzero(set_of_image == s)
        calib[rng.permutation(idx)[: len(idx) // 2]] = True
    return calib

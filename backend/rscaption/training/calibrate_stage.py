"""Stage ``calibrate``: fit the confidence model (``models.scene.SceneHead``) on val data.

Half of every val set (seeded) fits the temperature of the scene posterior and the logistic
confidence model; the other half is left for the report, so the AUROC and calibration error in
the model card are measured on images the confidence never saw. Because a half of a small set
holds few wrong captions (UCM's: 5), the report also cross-fits: the logistic model is fitted on
each half in turn and scores the other, so every val image is scored by a model that did not see
it. The target is "the caption names the right scene" (``evaluation.scene_eval``), with captions
decoded exactly as the pipeline will decode them (the card's beam width and length penalty).
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 25) -> np.ndarray:
    """Spherical k-means (cosine) centres of L2-normalised rows; k-means++ seeding."""
    x = np.asarray(x, dtype=np.float32)
    k = min(k, len(x))
    centres = [x[int(rng.integers(len(x)))]]
    d = 1 - x @ centres[0]
    for _ in range(1, k):
        p = np.clip(d, 0, None) ** 2
        p = p / p.sum() if p.sum() > 0 else None
        c = x[int(rng.choice(len(x), p=p))]
        centres.append(c)
        d = np.minimum(d, 1 - x @ c)
    c = np.stack(centres)
    for _ in range(iters):
        assign = (x @ c.T).argmax(1)
        for j in range(k):
            m = assign == j
            if m.any():
                v = x[m].mean(0)
                c[j] = v / max(np.linalg.norm(v), 1e-8)
    return c


def class_prototypes(train_emb: np.ndarray, train_pos: np.ndarray, per_class: int, rng: np.random.Generator):
    """``(centres [M, D], owner [M])``: k-means centres of each class's training embeddings (up to
    ``per_class``, one per 20 images at least), so a tile can be placed among the training images
    of every scene rather than against one prompt per scene."""
    centres, owner = [], []
    for c in range(train_pos.shape[1]):
        x = np.asarray(train_emb[train_pos[:, c]], np.float32)
        if not len(x):
            continue
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
        k = kmeans(x, min(per_class, max(1, len(x) // 20)), rng)
        centres.append(k)
        owner += [c] * len(k)
    return np.concatenate(centres), np.asarray(owner, np.int64)


def class_ground_limits(plan) -> list:
    """Per vocabulary class, the coarsest ground resolution (m/px) a drawable training sample of it
    had: its set's ``ground_m`` times the view's coarsening factor. None where any sample came from
    a set without a stated resolution, or the class has no training sample (nothing to judge by)."""
    from .features import SCALE_VIEW_BASE, scale_factor

    pos, _ = plan.scene_targets("train")
    tr = plan.train
    out = []
    for c in range(len(plan.vocab)):
        m = pos[tr.sample_record, c] & plan.drawable
        if not m.any():
            out.append(None)
            continue
        limit = 0.0
        for si in np.unique(tr.sample_set[m]):
            ground = plan.sets[int(si)].spec.ground_m
            if not ground:
                limit = None
                break
            views = tr.sample_view[m & (tr.sample_set == si)]
            limit = max(limit, float(ground) * max(scale_factor(v) if v >= SCALE_VIEW_BASE else 1.0 for v in views))
        out.append(limit)
    return out


def cross_fitted(feats: np.ndarray, correct: np.ndarray, calib: np.ndarray, l2: float) -> np.ndarray:
    """Confidence of every image from the logistic model fitted on the half it is not in."""
    from ..evaluation.calibration import fit_logistic, sigmoid

    conf = np.zeros(len(feats))
    for fit in (calib, ~calib):
        w, b = fit_logistic(feats[fit], correct[fit], l2=l2)
        conf[~fit] = sigmoid(feats[~fit] @ w + b)
    return conf


def fit_scene_head(cap, plan, val_emb: np.ndarray, train_emb: np.ndarray, cfg: dict, rng: np.random.Generator,
                   template: str, beam_size: int, log=None, train_pos: np.ndarray | None = None,
                   length_penalty: float = 1.0) -> tuple:
    """(SceneHead, report dict) for a trained captioner. ``train_pos`` ([N, K] classes right for
    each training embedding) enables the labelled-prototype feature (``calibrate.class_prototypes``)."""
    from ..evaluation.calibration import auroc, ece, fit_logistic, fit_temperature
    from ..evaluation.scene_eval import caption_embeddings, judge_accuracy, names_right_scene, split_halves
    from ..models.scene import FEATURES, SceneHead

    t0 = time.time()
    prompt_emb = np.asarray(cap.embed_texts(plan.vocab.prompts(template)), dtype=np.float32)
    pos, allowed = plan.scene_targets("val")
    sets = plan.val.record_set
    calib = split_halves(sets, int(cfg.get("seed", 0)))
    caps = cap.caption(val_emb, beam_size=beam_size, length_penalty=length_penalty, calibrated=False)
    text_emb = caption_embeddings(cap, [c for c, _ in caps])
    correct = names_right_scene(cap, [c for c, _ in caps], prompt_emb, pos, text_emb)
    with torch.no_grad():
        scale = float(cap.encoder.logit_scale.exp().clamp(max=100)) if hasattr(cap.encoder, "logit_scale") else 100.0
    temp = fit_temperature(scale * val_emb[calib] @ prompt_emb.T, pos[calib])
    protos = kmeans(train_emb, int(cfg.get("prototypes", 64)), rng)
    per_class = int(cfg.get("class_prototypes", 0))
    names = FEATURES if per_class and train_pos is not None else FEATURES[:5]
    head = SceneHead(phrases=list(plan.vocab.phrases), prompts=prompt_emb, prototypes=protos, scale=scale,
                     temperature=temp, low_threshold=float(cfg.get("low_threshold", 0.3)),
                     feature_names=tuple(cfg.get("features", names)))
    tolerance = float(cfg.get("coarser_tolerance", 0) or 0)
    if tolerance > 0:
        head.class_max_ground_m, head.coarser_tolerance = class_ground_limits(plan), tolerance
    if "caption_scene_proto_logprob" in head.feature_names:
        head.class_prototypes, head.class_owner = class_prototypes(train_emb, train_pos, per_class, rng)
        head.proto_temperature = float(cfg.get("proto_temperature", 0.05))
    feats = head.features(val_emb, [c for _, c in caps], text_emb)
    l2 = float(cfg.get("l2", 1e-2))
    crossed = cross_fitted(feats, correct, calib, l2)
    w, b = fit_logistic(feats[calib], correct[calib], l2=l2)
    head.weights, head.bias = [float(x) for x in w], float(b)
    conf = head.confidence(val_emb, [c for _, c in caps], text_emb)
    lm_conf = np.array([c for _, c in caps])
    report = {"temperature": round(temp, 4), "weights": [round(x, 4) for x in head.weights],
              "bias": round(head.bias, 4), "calibration_images": int(calib.sum()),
              "report_images": int((~calib).sum()), "per_set": {}}
    for si, s in enumerate(plan.sets):
        m = (sets == si) & ~calib
        if not m.any():
            continue
        recs = [plan.val.records[i] for i in np.flatnonzero(sets == si)]
        report["per_set"][s.spec.name] = {
            "n": int(m.sum()), "caption_right_scene_%": round(float(100 * correct[m].mean()), 2),
            "AUROC": round(auroc(conf[m], correct[m]), 4), "ECE": round(ece(conf[m], correct[m]), 4),
            "AUROC_lm_only": round(auroc(lm_conf[m], correct[m]), 4),
            "cross_fitted": _scores(crossed, correct, sets == si),
            "mean_confidence": round(float(conf[m].mean()), 4),
            "judge_on_references_%": round(judge_accuracy(cap, recs, prompt_emb, pos[sets == si]), 2)}
    m = ~calib
    report["all"] = {"AUROC": round(auroc(conf[m], correct[m]), 4), "ECE": round(ece(conf[m], correct[m]), 4),
                     "caption_right_scene_%": round(float(100 * correct[m].mean()), 2),
                     "cross_fitted": _scores(crossed, correct, np.ones(len(sets), bool))}
    report["seconds"] = round(time.time() - t0, 1)
    if log:
        log({"stage": "calibrate", **{k: v for k, v in report.items() if k != "per_set"}})
        for name, r in report["per_set"].items():
            log({"stage": "calibrate", "set": name, **r})
    return head, report


def _scores(conf: np.ndarray, correct: np.ndarray, m: np.ndarray) -> dict:
    from ..evaluation.calibration import auroc, ece

    return {"n": int(m.sum()), "wrong": int((~correct[m]).sum()), "AUROC": round(auroc(conf[m], correct[m]), 4),
            "ECE": round(ece(conf[m], correct[m]), 4)}


def save_head(head, directory) -> None:
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = head.save(directory)
    (directory / "scene.json").write_text(json.dumps(cfg, indent=2))


def load_head(directory):
    from pathlib import Path

    from ..models.scene import SceneHead

    directory = Path(directory)
    if not (directory / "scene.json").exists():
        return None
    return SceneHead.load(json.loads((directory / "scene.json").read_text()), directory)

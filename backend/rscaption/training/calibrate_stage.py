"""Stage ``calibrate``: fit the confidence model (``models.scene.SceneHead``) on val data.

Half of every val set (seeded) fits the temperature of the scene posterior and the logistic
confidence model; the other half is left for the report, so the AUROC and calibration error in
the model card are measured on images the confidence never saw. The target is "the caption names
the right scene" (``evaluation.scene_eval``), with captions decoded exactly as the pipeline will
decode them (the card's beam width).
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


def fit_scene_head(cap, plan, val_emb: np.ndarray, train_emb: np.ndarray, cfg: dict, rng: np.random.Generator,
                   template: str, beam_size: int, log=None) -> tuple:
    """(SceneHead, report dict) for a trained captioner."""
    from ..evaluation.calibration import auroc, ece, fit_logistic, fit_temperature
    from ..evaluation.scene_eval import caption_embeddings, judge_accuracy, names_right_scene, split_halves
    from ..models.scene import FEATURES, SceneHead

    t0 = time.time()
    prompt_emb = np.asarray(cap.embed_texts(plan.vocab.prompts(template)), dtype=np.float32)
    pos, allowed = plan.scene_targets("val")
    sets = plan.val.record_set
    calib = split_halves(sets, int(cfg.get("seed", 0)))
    caps = cap.caption(val_emb, beam_size=beam_size, calibrated=False)
    text_emb = caption_embeddings(cap, [c for c, _ in caps])
    correct = names_right_scene(cap, [c for c, _ in caps], prompt_emb, pos, text_emb)
    with torch.no_grad():
        scale = float(cap.encoder.logit_scale.exp().clamp(max=100)) if hasattr(cap.encoder, "logit_scale") else 100.0
    temp = fit_temperature(scale * val_emb[calib] @ prompt_emb.T, pos[calib])
    protos = kmeans(train_emb, int(cfg.get("prototypes", 64)), rng)
    head = SceneHead(phrases=list(plan.vocab.phrases), prompts=prompt_emb, prototypes=protos, scale=scale,
                     temperature=temp, low_threshold=float(cfg.get("low_threshold", 0.3)),
                     feature_names=tuple(cfg.get("features", FEATURES)))
    feats = head.features(val_emb, [c for _, c in caps], text_emb)
    w, b = fit_logistic(feats[calib], correct[calib], l2=float(cfg.get("l2", 1e-2)))
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
            "mean_confidence": round(float(conf[m].mean()), 4),
            "judge_on_references_%": round(judge_accuracy(cap, recs, prompt_emb, pos[sets == si]), 2)}
    m = ~calib
    report["all"] = {"AUROC": round(auroc(conf[m], correct[m]), 4), "ECE": round(ece(conf[m], correct[m]), 4),
                     "caption_right_scene_%": round(float(100 * correct[m].mean()), 2)}
    report["seconds"] = round(time.time() - t0, 1)
    if log:
        log({"stage": "calibrate", **{k: v for k, v in report.items() if k != "per_set"}})
        for name, r in report["per_set"].items():
            log({"stage": "calibrate", "set": name, **r})
    return head, report


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

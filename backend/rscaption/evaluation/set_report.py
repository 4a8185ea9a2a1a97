"""One val set's full report: captions, retrieval, scene accuracy, confidence quality, speed.

Used by the training run's ``evaluate`` stage for every set of a multi-dataset run, so the
model card's per-dataset table comes from one function. The images are read and embedded by the
exported model (as a user's tiles would be), not taken from the training caches.
"""

from __future__ import annotations

import time

import numpy as np


def evaluate_set(cap, records, positives: np.ndarray, allowed: np.ndarray, prompt_emb: np.ndarray,
                 has_captions: bool, report_mask: np.ndarray | None = None, beam_size: int = 3,
                 meteor: bool = True, length_penalty: float = 1.0, examples: int = 8,
                 ground_m: float | None = None) -> dict:
    from ..data.datasets import normalize_caption
    from ..data.images import read_rgb
    from .calibration import auroc, ece, reliability
    from .metrics import retrieval_recall, score_captions
    from .scene_eval import caption_embeddings, names_right_scene, scene_accuracy

    rep: dict = {"n_images": len(records), "beam_size": beam_size}
    t0 = time.time()
    imgs = [read_rgb(r.image) for r in records]
    t_read = time.time() - t0
    t0 = time.time()
    emb = cap.embed_images(imgs)
    t_embed = time.time() - t0
    # the decoder's own captions (what caption scores in papers measure) next to what users get,
    # where a calibrated model replaces low-confidence captions by an honest "uncertain" one:
    # decoded once, their text embeddings shared by the scene head and the judge
    t0 = time.time()
    raw = cap.caption(emb, beam_size=beam_size, length_penalty=length_penalty, calibrated=False)
    text_emb = caption_embeddings(cap, [c for c, _ in raw])
    scene = getattr(cap, "scene", None)
    if scene is not None and scene.unseen_at(ground_m).any():
        # what a user's georeferenced tiles of this resolution get: scenes never seen this coarse are
        # replaced by the beam's next plausible hypothesis (a second decoding, n-best)
        out = cap.caption(emb, beam_size=beam_size, length_penalty=length_penalty, ground_m=ground_m)
        rep["ground_m"] = ground_m
    else:
        out = cap.calibrate(emb, raw, text_emb=text_emb) if scene is not None else raw
    t_cap = time.time() - t0
    rep["timing"] = {"read_s": round(t_read, 2), "embed_images_per_s": round(len(records) / max(t_embed, 1e-9), 1),
                     "caption_per_s": round(len(records) / max(t_cap, 1e-9), 1),
                     "tiles_per_s": round(len(records) / max(t_embed + t_cap, 1e-9), 1)}
    captions = [c for c, _ in raw]
    shipped = [c for c, _ in out]
    conf = np.array([c for _, c in out])
    rep["rewritten_uncertain_%"] = round(float(100 * np.mean([a != b for a, b in zip(captions, shipped)])), 2)
    if has_captions:
        refs = {r.image_id: r.captions for r in records}
        scores = score_captions({r.image_id: c for r, c in zip(records, captions)}, refs, meteor=meteor)
        scores.pop("_cider_per_image", None)
        rep["captioning"] = scores
        if shipped != captions:
            s2 = score_captions({r.image_id: c for r, c in zip(records, shipped)}, refs, meteor=False)
            rep["captioning_as_shipped"] = {k: s2[k] for k in ("BLEU-4", "CIDEr-D")}
        texts, owner = [], []
        for i, r in enumerate(records):
            for c in r.captions:
                texts.append(normalize_caption(c))
                owner.append(i)
        rep["retrieval"] = retrieval_recall(cap.embed_texts(texts) @ emb.T, owner)
    pos = np.asarray(positives, bool)
    if pos.any():
        rep["scene_accuracy_%"] = round(float(100 * scene_accuracy(emb, prompt_emb, pos, allowed).mean()), 2)
        right = names_right_scene(cap, captions, prompt_emb, pos, text_emb)
        rep["caption_right_scene_%"] = round(float(100 * right.mean()), 2)
        m = np.ones(len(records), bool) if report_mask is None else np.asarray(report_mask, bool)
        rep["confidence"] = {"n": int(m.sum()), "on": "report half (not used to fit the confidence)"
                             if report_mask is not None else "all images",
                             "AUROC": round(auroc(conf[m], right[m]), 4), "ECE": round(ece(conf[m], right[m]), 4),
                             "mean": round(float(conf[m].mean()), 4),
                             "accuracy_of_confident_0.5": round(float(right[m][conf[m] >= 0.5].mean()), 4)
                             if (conf[m] >= 0.5).any() else None,
                             "share_confident_0.5": round(float((conf[m] >= 0.5).mean()), 4),
                             "reliability": reliability(conf[m], right[m])}
    rep["examples"] = [{"image": r.image_id, "caption": c, "confidence": round(float(k), 3),
                        "reference": r.captions[0] if r.captions else None}
                       for r, c, k in list(zip(records, shipped, conf))[:examples]]
    return rep


def summary_row(name: str, rep: dict) -> dict:
    c, r, k = rep.get("captioning", {}), rep.get("retrieval", {}), rep.get("confidence", {})
    row = {"set": name, "n": rep["n_images"]}
    for key in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"):
        if key in c:
            row[key] = round(c[key], 4)
    if "t2i_mR" in r:
        row["t2i_mR"] = round(r["t2i_mR"], 2)
        row["mR"] = round(r["mR"], 2)
    for key in ("scene_accuracy_%", "caption_right_scene_%"):
        if key in rep:
            row[key] = rep[key]
    if "captioning_as_shipped" in rep:
        row["CIDEr-D_as_shipped"] = round(rep["captioning_as_shipped"]["CIDEr-D"], 4)
    row["rewritten_%"] = rep.get("rewritten_uncertain_%")
    if k:
        row["AUROC"], row["ECE"] = k["AUROC"], k["ECE"]
    row["tiles_per_s"] = rep["timing"]["tiles_per_s"]
    return row

"""Fit the change scorer on train pairs and measure it, beside the 1 - cosine baseline, on val pairs.

``tools/fit_change_score.py`` runs :func:`fit_and_evaluate`; the model card's change table and
``docs/change.md`` are its report. Only embeddings are computed (no captions): the score is a
function of the two embeddings and the scene head, so 40,000 images embed in minutes on a CPU.

Measures, per set and over all sets (val pairs; see ``pairs.py`` for the kinds):

* AUROC: changes (whole and half swaps) against every no-change pair;
* AUROC against same-scene swaps only (the hard negatives: another patch of the same scene);
* AUROC against jitter only (photometric, geometric, both);
* AUROC of half swaps against every no-change pair (a change of half the tile);
* precision at the true count: of the N highest-scored pairs, where N is the number of real
  changes, the share that are changes;
* precision and recall at the shipped threshold;
* scene named: on whole swaps, how often the top scene before and the top scene after are both
  right for the images' labels (what the summary "A -> B" says).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .pairs import SET_GROUND_M, after_image, labelled_images, make_pairs
from .score import FEATURES, ChangeScorer, pair_features, posteriors


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUROC with ties counted half."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_true_count(scores, labels) -> float:
    labels = np.asarray(labels, bool)
    n = int(labels.sum())
    top = np.argsort(-np.asarray(scores), kind="mergesort")[:n]
    return float(labels[top].mean()) if n else float("nan")


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 50):
    """Standardised, class-balanced, L2-regularised logistic regression by Newton steps."""
    mean, scale = x.mean(0), x.std(0) + 1e-9
    z = np.c_[(x - mean) / scale, np.ones(len(x))]
    w_class = np.where(y == 1, 0.5 / max(1, y.sum()), 0.5 / max(1, (1 - y).sum())) * len(y)
    beta = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(z @ beta)))
        grad = z.T @ (w_class * (p - y)) / len(y) + reg * beta
        hess = (z * (w_class * p * (1 - p))[:, None]).T @ z / len(y) + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    return mean, scale, beta[:-1], float(beta[-1])


def embed_pairs(cap, shared: Path, split: str, anchors: int | None, seed: int, log=print,
                cache_dir: Path | None = None) -> dict:
    """Pairs of ``split`` with both embeddings, set by set: {set: {pairs, before, after, items}}.
    ``cache_dir``: embeddings saved per set and model hash, so a second fit (other features) is
    seconds; the pairs themselves are rebuilt from the seed."""
    from ..data.images import read_rgb
    from ..data.scene_vocab import SceneVocab

    vocab = SceneVocab.load()
    rng = np.random.default_rng(seed)
    out = {}
    for name, items in labelled_images(shared, split, vocab).items():
        t0 = time.time()
        pairs = make_pairs(items, rng, anchors)
        cache: dict[int, np.ndarray] = {}

        def load(i, items=items, cache=cache):
            if i not in cache:
                cache[i] = read_rgb(items[i].path)
            return cache[i]

        cached = cache_dir / f"{split}_{name}_{anchors}_{seed}_{cap.model_hash[:12]}.npz" if cache_dir else None
        if cached is not None and cached.is_file():
            with np.load(cached) as z:
                emb_b, emb_a = z["before"], z["after"]
        else:
            anchor_ids = sorted({p.anchor for p in pairs})
            before = dict(zip(anchor_ids, _embed(cap, [load(i) for i in anchor_ids])))
            emb_a = _embed(cap, (after_image(p, load) for p in pairs))
            emb_b = np.stack([before[p.anchor] for p in pairs])
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cached, before=emb_b, after=emb_a)
        out[name] = {"pairs": pairs, "before": emb_b, "after": emb_a, "items": items, "vocab": vocab}
        log(f"{split} {name}: {len(pairs)} pairs from {len({p.anchor for p in pairs})} anchors, {time.time() - t0:.0f} s")
    return out


def _embed(cap, images, batch: int = 64) -> np.ndarray:
    chunk, parts = [], []
    for img in images:
        chunk.append(img)
        if len(chunk) == batch:
            parts.append(cap.embed_images(chunk))
            chunk = []
    if chunk:
        parts.append(cap.embed_images(chunk))
    return np.concatenate(parts).astype(np.float32)


def change_directions(data: dict, k: int = 16) -> np.ndarray:
    """[D, k]: the directions in which the embedding difference of changed pairs is largest
    relative to that of unchanged ones (top generalized eigenvectors of the two covariances,
    Cholesky-whitened; each scaled so an unchanged pair's projection has unit variance)."""
    d = np.concatenate([x["before"] - x["after"] for x in data.values()]).astype(np.float64)
    y = np.concatenate([[p.label for p in x["pairs"]] for x in data.values()]).astype(bool)
    s_n, s_c = np.cov(d[~y].T), np.cov(d[y].T)
    s_n += 1e-3 * np.trace(s_n) / len(s_n) * np.eye(len(s_n))
    chol = np.linalg.cholesky(s_n)
    inv = np.linalg.inv(chol)
    vals, vecs = np.linalg.eigh(inv @ s_c @ inv.T)
    return inv.T @ vecs[:, np.argsort(vals)[::-1][:k]]


def features_of(cap, data: dict, projection=None) -> tuple[dict, dict]:
    """Stacked features (every set) and the per-set columns."""
    per_set = {}
    for name, d in data.items():
        per_set[name] = pair_features(d["before"], d["after"], cap.scene, SET_GROUND_M[name], projection)
    x = {f: np.concatenate([per_set[n][f] for n in data]) for f in FEATURES}
    return x, per_set


def scene_named(cap, d: dict, name: str) -> float:
    """Share of whole swaps whose top scene before and after are both right for their labels."""
    vocab = d["vocab"]
    col = {p: k for k, p in enumerate(cap.scene.phrases)}
    to_head = np.array([col[p] for p in vocab.phrases])
    keep = [k for k, p in enumerate(d["pairs"]) if p.kind == "different"]
    if not keep:
        return float("nan")
    pb = posteriors(cap.scene, d["before"][keep], SET_GROUND_M[name]).argmax(1)
    pa = posteriors(cap.scene, d["after"][keep], SET_GROUND_M[name]).argmax(1)
    ok = 0
    for k, b, a in zip(keep, pb, pa):
        p = d["pairs"][k]
        right_b = {int(to_head[c]) for c in d["items"][p.anchor].positives}
        right_a = {int(to_head[c]) for c in d["items"][p.other].positives}
        ok += int(b in right_b and a in right_a)
    return ok / len(keep)


def measure(scores: np.ndarray, kinds: np.ndarray, threshold: float | None) -> dict:
    y = np.isin(kinds, ["different", "half_different"])
    whole = kinds == "different"
    same = kinds == "same_scene"
    jitter = np.isin(kinds, ["photometric", "geometric", "both"])
    half = (kinds == "half_different") | ~y
    out = {"pairs": int(len(kinds)), "changes": int(y.sum()), "auroc": auroc(scores, y),
           "auroc_same_scene": auroc(scores[whole | same], whole[whole | same]),
           "auroc_jitter": auroc(scores[whole | jitter], whole[whole | jitter]),
           "auroc_half": auroc(scores[half], (kinds == "half_different")[half]),
           "precision_at_true_count": precision_at_true_count(scores, y)}
    if threshold is not None:
        called = scores >= threshold
        out["precision_at_threshold"] = float(y[called].mean()) if called.any() else float("nan")
        out["recall_at_threshold"] = float(called[y].mean())
    return out


def fit_and_evaluate(cap, shared: Path, train_anchors: int = 300, seed: int = 0, log=print,
                     val_anchors: int | None = None, cache_dir: Path | None = None) -> tuple[ChangeScorer, dict]:
    t0 = time.time()
    train = embed_pairs(cap, shared, "train", train_anchors, seed, log, cache_dir)
    projection = change_directions(train)
    xt, _ = features_of(cap, train, projection)
    yt = np.concatenate([[p.label for p in d["pairs"]] for d in train.values()]).astype(np.float64)
    mean, scale, w, b = fit_logistic(np.stack([xt[f] for f in FEATURES], 1), yt)
    scorer = ChangeScorer(features=FEATURES, mean=list(mean), scale=list(scale), weights=list(w), bias=b,
                          threshold=0.5, name="logistic", projection=projection.tolist())
    t_fit = time.time() - t0
    val = embed_pairs(cap, shared, "val", val_anchors, seed + 1, log, cache_dir)
    xv, per_set = features_of(cap, val, projection)
    kinds = {n: np.array([p.kind for p in d["pairs"]]) for n, d in val.items()}
    report = {"sets": {}, "train_pairs": int(len(yt)), "train_changes": int(yt.sum()),
              "seconds_train": round(t_fit, 1)}
    for name in list(val) + ["all"]:
        feats = xv if name == "all" else per_set[name]
        k = np.concatenate(list(kinds.values())) if name == "all" else kinds[name]
        ours, base = scorer.score(feats), np.clip(feats["cosine_change"], 0, 1)
        report["sets"][name] = {"ours": measure(ours, k, scorer.threshold), "cosine": measure(base, k, None)}
        if name != "all":
            report["sets"][name]["scene_named"] = scene_named(cap, val[name], name)
    named = [(report["sets"][n]["scene_named"], int((kinds[n] == "different").sum())) for n in val]
    report["sets"]["all"]["scene_named"] = sum(a * c for a, c in named) / max(1, sum(c for _, c in named))
    report["seconds"] = round(time.time() - t0, 1)
    return scorer, report

"""Every tile of the two dates' caption files -> one ``changes`` row (score, names, sentence).

Only tiles with enough data on both dates are scored (``summary.MIN_VALID_FRACTION``): a tile half
outside the after raster is half black fill there, and the embedding of fill against ground would
be read as a change. The others keep their captions and scene names but get no score and a
sentence saying why.
"""

from __future__ import annotations

import numpy as np

from ..store.gpkg import TileStore
from .score import pair_features, posteriors
from .summary import not_scored, scene_names, sentence, status_of


def _date(path: str):
    with TileStore.open(path, readonly=True) as store:
        tiles = {int(t["tile_id"]): t for t in store.tiles()}
        ids, emb = store.embeddings()
        meta = store.metadata()
    ok = np.isfinite(emb).all(1) if len(emb) else np.zeros(0, bool)
    return tiles, {int(t): e for t, e in zip(ids[ok], emb[ok])}, meta


def score_tiles(before_store: str, after_store: str, cap, scorer, ground_m: float | None):
    """(rows for ``store.write_change_file``, (crs_wkt, epsg) of the before date)."""
    tb, eb, meta_b = _date(before_store)
    ta, ea, _ = _date(after_store)
    ids = sorted((set(tb) & set(eb)) | (set(ta) & set(ea)))
    scene = getattr(cap, "scene", None)
    names, probs = {}, {}
    for date, emb in (("before", eb), ("after", ea)):
        have = [t for t in ids if t in emb]
        post = posteriors(scene, np.stack([emb[t] for t in have]), ground_m) if scene is not None and have else None
        n, p = scene_names(scene, post) if post is not None else ([""] * len(have), np.full(len(have), np.nan))
        names[date] = dict(zip(have, n))
        probs[date] = dict(zip(have, p))
    status = {t: status_of(_vf(tb, eb, t), _vf(ta, ea, t)) for t in ids}
    scored = [t for t in ids if status[t] == "scored"]
    change, cosine = {}, {}
    if scored:
        feats = pair_features(np.stack([eb[t] for t in scored]), np.stack([ea[t] for t in scored]),
                              scene if scorer.needs_scene else None, ground_m, scorer.projection)
        change = dict(zip(scored, scorer.score(feats)))
        cosine = dict(zip(scored, feats["cosine_change"]))
    rows = []
    for t in ids:
        bt, at = tb.get(t) or {}, ta.get(t) or {}
        c = change.get(t)
        sb, sa = names["before"].get(t, ""), names["after"].get(t, "")
        pb, pa = probs["before"].get(t), probs["after"].get(t)
        vb, va = _vf(tb, eb, t), _vf(ta, ea, t)
        rows.append({
            "tile_id": t, "row": bt.get("row", at.get("row")), "col": bt.get("col", at.get("col")),
            "change": None if c is None else float(c),
            "changed": None if c is None else int(c >= scorer.threshold),
            "cosine_change": None if t not in cosine else float(cosine[t]),
            "caption_before": bt.get("caption"), "caption_after": at.get("caption"),
            "scene_before": sb or None, "scene_after": sa or None, "p_scene_before": pb, "p_scene_after": pa,
            "confidence": None if pb is None or pa is None or not (np.isfinite(pb) and np.isfinite(pa)) else
            float(pb * pa),
            "confidence_before": bt.get("confidence"), "confidence_after": at.get("confidence"),
            "summary": sentence(None if c is None else float(c), scorer.threshold, sb, sa) if c is not None else
            not_scored(status[t], vb, va),
            "status": status[t], "valid_fraction_before": vb, "valid_fraction_after": va,
        })
    return rows, (meta_b.get("crs_wkt"), meta_b.get("epsg"))


def _vf(tiles: dict, emb: dict, t: int):
    if t not in tiles or t not in emb:
        return None
    v = tiles[t].get("valid_fraction")
    return 1.0 if v is None else float(v)

"""The LiT image stages on cached trunk activations: ``features``, ``contrastive``, ``embed``.

Every set of the run's plan is cached per (split, view); the caches are concatenated into one
flat array of samples in the plan's order (set, view, image), so the trainer sees one dataset
whatever the number of sets, and draws each epoch with the sets' weights (``MultiSet.epoch_order``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..errors import TrainError


def _cut_points(cfg: dict) -> tuple[int, int]:
    e = cfg.get("encoder", {})
    cache = int(e.get("cache_split", 5))
    return cache, max(cache, int(e.get("finetune_from", cache)))


def _dir(run, plan, si: int, split: str, enc) -> Path:
    from .plan import trunk_dir

    e = run.cfg.get("encoder", {})
    return trunk_dir(run.cache_dir, plan, si, split, int(e.get("cache_split", 5)), enc.preprocess,
                     e.get("timm_name", "efficientnet_lite0"), e.get("image_weights", "package"))


def stage_features(run, plan, enc) -> dict:
    import torch

    from .features import cache_trunk

    cut, _ = _cut_points(run.cfg)
    bs = int(run.cfg.get("encoder", {}).get("cache_batch_size", 32))
    info = {}
    for si, s in enumerate(plan.sets):
        for split, recs, views in (("val", s.val, [0]), ("train", s.train, s.spec.views)):
            if not recs:
                continue
            with torch.no_grad():
                r = cache_trunk(enc, recs, views, cut, _dir(run, plan, si, split, enc), bs)
            info[f"{s.spec.name}/{split}"] = r
            run.log({"stage": "features", "set": s.spec.name, "split": split, "images": len(recs),
                     "views": len(views), **r})
    return info


def _advance(src: Path, dst: Path, blocks) -> np.ndarray:
    """Activations moved from the cache cut to the fine-tune cut through frozen pretrained blocks,
    stored beside the cache (a deeper cut costs one pass)."""
    import torch

    if not dst.exists():
        trunk = np.load(src, mmap_mode="r")
        with torch.no_grad():
            parts = [blocks(torch.from_numpy(np.array(trunk[i:i + 128])).float()).half().numpy()
                     for i in range(0, len(trunk), 128)]
        tmp = dst.with_name(dst.stem + ".tmp.npy")
        np.save(tmp, np.concatenate(parts))
        os.replace(tmp, dst)
    return np.load(dst, mmap_mode="r")


def load_trunks(run, plan, enc, pretrained_enc, split: str) -> np.ndarray:
    """``[n_samples, 1, C, H, W]`` fp16 activations at the fine-tune cut, in the plan's order."""
    from .features import view_path

    cache, to = _cut_points(run.cfg)
    samples = plan.train if split == "train" else plan.val
    blocks = pretrained_enc.image_tower.blocks[cache:to].eval() if to > cache else None
    out = None
    pos = 0
    for si, s in enumerate(plan.sets):
        recs = s.train if split == "train" else s.val
        if not recs:
            continue
        d = _dir(run, plan, si, split, enc)
        for v in (s.spec.views if split == "train" else [0]):
            src = view_path(d, v)
            if not src.exists():
                raise TrainError(f"no cached activations for {s.spec.name}/{split} view {v}; run the features stage")
            arr = np.load(src, mmap_mode="r") if blocks is None else \
                _advance(src, d / f"advanced_{to}_view_{int(v)}.npy", blocks)
            if arr.shape[0] != len(recs):
                raise TrainError("cached features do not match the dataset; rerun the features stage")
            if out is None:
                out = np.empty((len(samples), *arr.shape[1:]), dtype=np.float16)
            out[pos:pos + len(recs)] = arr
            pos += len(recs)
    if out is None or pos != len(samples):
        raise TrainError(f"no cached activations for the {split} split; run the features stage")
    return out[:, None]


def unique_captions(records):
    """Deduplicated normalised sentences + per-image indices (see contrastive multi-positives)."""
    from ..data.datasets import normalize_caption

    index: dict[str, int] = {}
    per_image = []
    for r in records:
        ids = []
        for c in r.captions:
            t = normalize_caption(c)
            if t not in index:
                index[t] = len(index)
            ids.append(index[t])
        per_image.append(sorted(set(ids)))
    return list(index), per_image


def stage_contrastive(run, plan, enc, pretrained_enc, prompts, rng, save_checkpoint) -> dict:
    import torch

    from .contrastive import HeadTrainer, text_features, train_head
    from .features import SplitTower

    tower = SplitTower(enc.image_tower, _cut_points(run.cfg)[1])
    tr = load_trunks(run, plan, enc, pretrained_enc, "train")
    va = load_trunks(run, plan, enc, pretrained_enc, "val")
    cdir = run.dir / "contrastive"
    cdir.mkdir(exist_ok=True)
    feats_path = cdir / "text_features.pt"
    texts, cap_ids = unique_captions(plan.train.records)
    if feats_path.exists():
        tf = torch.load(feats_path, weights_only=True)
    else:
        t0 = time.time()
        tf = {"captions": text_features(enc, texts), "prompts": text_features(enc, prompts)}
        torch.save(tf, feats_path)
        run.log({"stage": "contrastive", "text_features": len(texts), "seconds": round(time.time() - t0, 1)})
    cfg = run.cfg.get("contrastive", {})
    trainer = HeadTrainer(enc, tower, len(prompts), tf["prompts"], cfg)
    start = 0
    ck = cdir / "last.pt"
    if ck.exists():
        st = torch.load(ck, weights_only=True)
        enc.load_trainable(st["live"] if st.get("live") is not None else st["encoder"])
        trainer.opt.load_state_dict(st["opt"])
        if trainer.ema is not None and st.get("live") is not None:
            # "encoder" holds the averaged weights: restore them as the running average
            trainer.swap_ema()
            enc.load_trainable(st["encoder"])
            trainer.swap_ema()
        rng.bit_generator.state = st["rng"]
        start = st["epoch"]

    def save(epoch):
        # called while the averaged weights are swapped in: "encoder" is what gets exported
        live = None
        if trainer.ema is not None:
            trainer.swap_ema()
            live = {k: v.clone() for k, v in enc.trainable_state().items()}
            trainer.swap_ema()
        save_checkpoint({"encoder": enc.trainable_state(), "live": live, "opt": trainer.opt.state_dict(),
                         "epoch": epoch, "rng": rng.bit_generator.state}, ck)

    # per sample: the image's captions and scene targets
    srec = plan.train.sample_record
    pos, allowed = plan.scene_targets("train")
    vpos, vallowed = plan.scene_targets("val")
    sample_caps = [cap_ids[i] for i in srec]
    targets = (pos[srec], allowed[srec])
    hist = train_head(trainer, tr, targets, sample_caps, tf["captions"], cfg, rng, log=run.log,
                      val=(va, (vpos, vallowed), plan.val.record_set, [s.spec.name for s in plan.sets]),
                      start_epoch=start, on_epoch_end=save, order_fn=epoch_order(plan, pos, cfg))
    acc = hist[-1]["val_accuracy"] if hist else None
    return {"epochs": int(cfg.get("epochs", 8)), "val_accuracy": acc}


def scene_keys(plan, pos: np.ndarray, sets) -> np.ndarray:
    """Per train sample: (set, first right scene) for the named sets, -1 for the others."""
    first = np.where(pos.any(1), pos.argmax(1), -1)[plan.train.sample_record]
    chosen = np.isin(plan.train.sample_set, [i for i, s in enumerate(plan.sets) if s.spec.name in set(sets)])
    return np.where(chosen & (first >= 0), plan.train.sample_set * 10_000 + first, -1)


def epoch_order(plan, pos: np.ndarray, cfg: dict):
    """The plan's weighted epoch draws, batched by scene for ``contrastive.group_by_scene``:
    ``{sets: [names], per_scene: N}`` (see ``contrastive.grouped_order``)."""
    g = cfg.get("group_by_scene") or {}
    per, sets = int(g.get("per_scene", 0)), g.get("sets") or []
    if per <= 1 or not sets:
        return plan.epoch_order
    from .contrastive import grouped_order

    unknown = set(sets) - {s.spec.name for s in plan.sets}
    if unknown:
        raise TrainError(f"contrastive.group_by_scene names unknown sets: {', '.join(sorted(unknown))}")
    keys = scene_keys(plan, pos, sets)
    bs = int(cfg.get("batch_size", 64))
    return lambda rng: grouped_order(plan.epoch_order(rng), keys, per, bs, rng)


def stage_embed(run, plan, enc, pretrained_enc) -> dict:
    import torch

    from .contrastive import HeadTrainer
    from .features import SplitTower

    tower = SplitTower(enc.image_tower, _cut_points(run.cfg)[1])
    tf = torch.load(run.dir / "contrastive" / "text_features.pt", weights_only=True)
    trainer = HeadTrainer(enc, tower, 0, tf["prompts"], run.cfg.get("contrastive", {}))
    t0 = time.time()
    emb = {"train": trainer.embed_all(load_trunks(run, plan, enc, pretrained_enc, "train")),
           "val": trainer.embed_all(load_trunks(run, plan, enc, pretrained_enc, "val")),
           "layout": "samples"}
    torch.save(emb, run.dir / "embeddings.pt")
    info = {"train": list(emb["train"].shape), "val": list(emb["val"].shape), "seconds": round(time.time() - t0, 1)}
    run.log({"stage": "embed", **info})
    return info

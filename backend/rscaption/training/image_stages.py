"""Stages ``features``, ``contrastive`` and ``embed``: the image-text encoder.

The LiT path (pretrained towers, cached trunk; ``lit_stages``) is the default; ``encoder.kind: clip``
fine-tunes or trains a whole CLIP on images read per step (``clip_trainer``).
"""

from __future__ import annotations

import time

from .parts import caption_data, lit_encoder, encoder_kind, clip_encoder_for, device_for, train_views, plan_of, pretrained_for_cut, prompt_texts, trained_encoder
from .rundir import Run, save_checkpoint


def stage_features(run: Run, rng):
    from .lit_stages import stage_features as lit_features

    if encoder_kind(run) == "clip":
        info = {"skipped": "encoder.kind clip reads images at every step (nothing to cache)"}
        run.log({"stage": "features", **info})
        return info
    return lit_features(run, plan_of(run), lit_encoder(run))


def stage_contrastive(run: Run, rng):
    from .lit_stages import stage_contrastive as lit_contrastive
    from .plan import prompts

    if encoder_kind(run) == "clip":
        return stage_clip_contrastive(run, rng)
    plan = plan_of(run)
    enc = lit_encoder(run)
    return lit_contrastive(run, plan, enc, pretrained_for_cut(run, enc), prompts(run.cfg, plan), rng,
                           save_checkpoint)


def stage_clip_contrastive(run: Run, rng):
    """``encoder.kind: clip``: every image read per step, both towers run (``clip_trainer``)."""
    import torch

    from .clip_trainer import ClipTrainer, read_views, train_clip
    from .lit_stages import unique_captions

    ds, train, val = caption_data(run)
    enc = clip_encoder_for(run)
    cfg = run.cfg.get("contrastive", {})
    trainer = ClipTrainer(enc, prompt_texts(run, ds), cfg, device_for(run), run.cfg.get("encoder", {}).get("train_params"))
    cdir = run.dir / "contrastive"
    cdir.mkdir(exist_ok=True)
    ck = cdir / "last.pt"
    start = 0
    if ck.exists():
        st = torch.load(ck, weights_only=True)
        trainer.load_trained(st["encoder"])
        trainer.opt.load_state_dict(st["opt"])
        rng.bit_generator.state = st["rng"]
        start = st["epoch"]

    def save(epoch):
        save_checkpoint({"encoder": trainer.trained_state(), "live": None, "opt": trainer.opt.state_dict(),
                          "epoch": epoch, "rng": rng.bit_generator.state}, ck)

    texts, cap_ids = unique_captions(train.records)
    run.log({"stage": "contrastive", "kind": "clip", "device": str(trainer.device), "trained_tensors": len(trainer.names),
             "trained_params": sum(p.numel() for p in trainer.params)})
    val_images = read_views(val.records, [0] * len(val.records))
    hist = train_clip(trainer, train.records, [r.label for r in train.records], texts, cap_ids, cfg,
                      train_views(run)[0], rng, log=run.log, val=(val_images, [r.label for r in val.records]),
                      start_epoch=start, on_epoch_end=save)
    return {"epochs": int(cfg.get("epochs", 5)), "val_accuracy": hist[-1]["val_accuracy"] if hist else None}


def stage_embed(run: Run, rng):
    from .lit_stages import stage_embed as lit_embed

    enc = trained_encoder(run)
    if encoder_kind(run) == "clip":
        _, train, val = caption_data(run)
        return embed_clip(run, enc, train, val)
    plan = plan_of(run)
    return lit_embed(run, plan, enc, pretrained_for_cut(run, enc))


def embed_clip(run: Run, enc, train, val):
    """Image embeddings ``[N, V, D]`` of every train view and of val view 0 (the same layout the
    LiT path writes, so the mapping stage does not care which stage 2 ran)."""
    import torch

    from .clip_trainer import ClipTrainer, embed_records

    trainer = ClipTrainer(enc, [], {}, device_for(run))
    t0 = time.time()
    per_view = [embed_records(trainer, train.records, v) for v in train_views(run)[0]]
    emb = {"train": torch.stack(per_view, dim=1), "val": embed_records(trainer, val.records, 0)[:, None]}
    torch.save(emb, run.dir / "embeddings.pt")
    info = {"train": list(emb["train"].shape), "val": list(emb["val"].shape), "seconds": round(time.time() - t0, 1)}
    run.log({"stage": "embed", **info})
    return info

"""Stage 4: train the image-embedding -> LM-prefix mapping on cached image embeddings.

The encoder is frozen here, so every (image, view) embedding is computed once after stage 2 and
an epoch is only mapping + LM. The LM can stay frozen (pure ClipCap) or be fine-tuned with a
lower learning rate; ``lm_lr: 0`` freezes it. An optional RS-CapRet-style retrieval term
(``retrieval_loss_weight``) pulls the
prefix (mean-pooled, projected back to the embedding space) towards its own image embedding so the
prefix keeps image identity rather than collapsing onto a class-average.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from .contrastive import cosine_lr
from ..models.captioner import pad_batch


def prefix_caption_loss(mapping, lm, emb: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Teacher-forced next-token loss of ``[prefix] caption EOS``; prefix positions carry no loss."""
    prefix = mapping(emb)  # [B, P, n_embd]
    tok = lm.transformer.wte(ids)
    inputs = torch.cat([prefix.to(tok.dtype), tok], 1)
    p = prefix.shape[1]
    att = torch.cat([torch.ones(ids.shape[0], p, dtype=mask.dtype), mask], 1)
    labels = torch.cat([torch.full((ids.shape[0], p), -100, dtype=torch.long), ids.masked_fill(mask == 0, -100)], 1)
    return lm(inputs_embeds=inputs, attention_mask=att, labels=labels).loss


def prefix_retrieval_loss(mapping, head, emb: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """RS-CapRet's retrieval term: the mean-pooled prefix, projected back to the embedding space,
    must pick out its own image embedding among the batch (InfoNCE)."""
    q = F.normalize(head(mapping(emb).mean(dim=1).float()), dim=-1)
    logits = q @ F.normalize(emb.float(), dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(emb.shape[0]))


def train_mapping(mapping, lm, emb: torch.Tensor, seqs_per_image: list[list[list[int]]], pad_id: int,
                  cfg: dict, rng: np.random.Generator, log=None, start_epoch: int = 0, on_epoch_end=None,
                  val_fn=None, loss_fn=None, order_fn=None) -> list[dict]:
    """``emb`` is ``[N, V, D]`` (views of each image); every sample is one view + one random caption.

    ``loss_fn(emb, ids, mask)`` defaults to :func:`prefix_caption_loss`; the runner passes
    ``Captioner.caption_loss`` so training and decoding share one definition of the prefix layout.
    ``order_fn(rng)`` replaces the plain permutation of the ``N * V`` samples (weighted sets; its
    length must not change between epochs).
    """
    if loss_fn is None:
        def loss_fn(e, ids, mask):
            return prefix_caption_loss(mapping, lm, e, ids, mask)
    from .progress import bar as progress_bar

    n, v = emb.shape[:2]
    bs = int(cfg.get("batch_size", 64))
    epochs = int(cfg.get("epochs", 10))
    n_items = len(order_fn(np.random.default_rng(0))) if order_fn is not None else n * v
    steps_per_epoch = max(1, n_items // bs)
    total = epochs * steps_per_epoch
    lm_lr = float(cfg.get("lm_lr", 1e-4))
    groups = [{"params": list(mapping.parameters()), "lr": float(cfg.get("lr", 1e-3))}]
    if lm_lr > 0:
        lm.requires_grad_(True)
        groups.append({"params": list(lm.parameters()), "lr": lm_lr})
    else:
        lm.requires_grad_(False)
    retrieval_w = float(cfg.get("retrieval_loss_weight", 0.0))
    head = None
    if retrieval_w > 0:
        # training-only head (prefix width -> embedding); not exported, restarted on --resume
        width = int(lm.get_input_embeddings().embedding_dim)
        head = torch.nn.Linear(width, int(emb.shape[-1]))
        groups.append({"params": list(head.parameters()), "lr": float(cfg.get("lr", 1e-3))})
    opt = torch.optim.AdamW(groups, weight_decay=float(cfg.get("weight_decay", 0.01)))
    base = [g["lr"] for g in opt.param_groups]
    warmup = int(cfg.get("warmup_steps", 30))
    noise = float(cfg.get("embedding_noise", 0.0))
    history = []
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        mapping.train()
        lm.train() if lm_lr > 0 else lm.eval()
        order = order_fn(rng) if order_fn is not None else rng.permutation(n * v)
        tot = rtot = 0.0
        bar = progress_bar(range(steps_per_epoch), desc=f"mapping {epoch + 1}/{epochs}", leave=False)
        for s in bar:
            step = epoch * steps_per_epoch + s
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * cosine_lr(step, total, warmup)
            idx = order[s * bs:(s + 1) * bs]
            ii, vv = idx // v, idx % v
            e = emb[ii, vv]
            if noise > 0:  # a little noise makes the prefix robust to embeddings of unseen tiles
                e = F.normalize(e + noise * torch.randn_like(e), dim=-1)
            seqs = [seqs_per_image[i][int(rng.integers(len(seqs_per_image[i])))] for i in ii]
            ids, mask = pad_batch(seqs, pad_id)
            loss = loss_fn(e, ids, mask)
            if head is not None:
                r = prefix_retrieval_loss(mapping, head, e)
                rtot += float(r.detach())
                loss = loss + retrieval_w * r
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            opt.step()
            tot += float(loss.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        rec = {"stage": "mapping", "epoch": epoch + 1, "loss": round(tot / steps_per_epoch, 4),
               "seconds": round(time.time() - t0, 1)}
        if head is not None:
            rec["retrieval"] = round(rtot / steps_per_epoch, 4)
        mapping.eval()
        lm.eval()
        if val_fn is not None:
            rec.update(val_fn())
        history.append(rec)
        if log:
            log(rec)
        if on_epoch_end:
            on_epoch_end(epoch + 1)
    mapping.eval()
    lm.eval()
    lm.requires_grad_(False)
    return history

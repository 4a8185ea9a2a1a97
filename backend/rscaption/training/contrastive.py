"""Stage 2: LiT-style contrastive training of the image tower's last blocks and both projections.

Runs on cached trunk activations (``features.cache_trunk``) and cached frozen MiniLM sentence
features, so an epoch costs only the fine-tuned head. Two losses:

* a multi-positive InfoNCE between image and caption embeddings. UCM captions are templates, so
  the same sentence often belongs to several images in a batch; counting every image that owns a
  sentence as a positive (instead of treating duplicates as negatives) keeps the loss honest.
* scene classification *through the text tower*: logits are the image embedding against the
  embeddings of class prompts ("an aerial image of a dense residential area"). This is the
  auxiliary class head, and it needs no extra weights: zero-shot prompt classification at
  evaluation time is exactly the trained classifier.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

PROMPT_TEMPLATE = "an aerial image of a {}."


def class_prompts(phrases, template: str = PROMPT_TEMPLATE) -> list[str]:
    return [template.format(p) for p in phrases]


@torch.no_grad()
def text_features(encoder, texts, batch_size: int = 256) -> torch.Tensor:
    """Frozen MiniLM features (before projection) of ``texts``; computed once per run."""
    out = []
    for i in range(0, len(texts), batch_size):
        out.append(encoder.text_features(texts[i:i + batch_size]).float())
    return torch.cat(out) if out else torch.zeros(0, encoder.text_proj.in_features)


def _multi_positive_nce(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """-log of the softmax mass on all positives, averaged over rows."""
    logp = logits.log_softmax(dim=-1)
    return -(torch.logsumexp(logp.masked_fill(~pos, -1e4), dim=-1)).mean()


def clip_losses(img: torch.Tensor, txt: torch.Tensor, pos: torch.Tensor, scale: torch.Tensor,
                prompts: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                label_smoothing: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(symmetric multi-positive NCE, scene CE through class prompts) for L2-normalised image and
    text embeddings; the scene term is zero when there are no prompts. Shared by the LiT head
    trainer and the full CLIP trainer so both optimise the same objective."""
    logits = scale * img @ txt.T
    nce = 0.5 * (_multi_positive_nce(logits, pos) + _multi_positive_nce(logits.T, pos.T))
    if prompts is None or labels is None:
        return nce, torch.zeros((), device=img.device)
    return nce, scene_loss(scale * img @ prompts.T, labels, label_smoothing)


def scene_loss(logits: torch.Tensor, target, label_smoothing: float = 0.1) -> torch.Tensor:
    """Cross-entropy over class prompts. ``target`` is a class index per row, or ``(positives,
    allowed)`` boolean ``[B, K]`` masks when several training sets share one vocabulary: the
    softmax runs over the classes the row's set can name, and the mass on every right class counts
    (RSSCN7 "Resident" is right as dense, medium or sparse residential). Label smoothing spreads
    over the allowed classes only."""
    if not isinstance(target, (tuple, list)):
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    pos, allowed = target
    logp = logits.masked_fill(~allowed, -1e4).log_softmax(dim=-1)
    nll = -torch.logsumexp(logp.masked_fill(~pos, -1e4), dim=-1)
    if label_smoothing > 0:
        uniform = -(logp * allowed).sum(-1) / allowed.sum(-1).clamp(min=1)
        nll = (1 - label_smoothing) * nll + label_smoothing * uniform
    return nll.mean()


def restricted_predictions(logits: torch.Tensor, allowed=None) -> torch.Tensor:
    """Argmax over the classes a set can name (all classes when ``allowed`` is None)."""
    if allowed is None:
        return logits.argmax(-1)
    return logits.masked_fill(~torch.as_tensor(allowed), float("-inf")).argmax(-1)


class HeadTrainer:
    """Fine-tunes ``SplitTower`` head blocks + image/text projections on cached activations."""

    def __init__(self, encoder, tower, n_classes: int, prompt_feats: torch.Tensor, cfg: dict):
        self.enc = encoder
        self.tower = tower
        self.cfg = cfg
        self.prompt_feats = prompt_feats
        head_params = [p for m in tower.head_modules() for p in m.parameters()]
        proj_params = list(encoder.image_proj.parameters()) + list(encoder.text_proj.parameters()) + [encoder.logit_scale]
        for p in head_params + proj_params:
            p.requires_grad_(True)
        self.params = head_params + proj_params
        self.opt = torch.optim.AdamW([
            {"params": head_params, "lr": float(cfg.get("lr_tower", 3e-4))},
            {"params": proj_params, "lr": float(cfg.get("lr_proj", 1e-3))},
        ], weight_decay=float(cfg.get("weight_decay", 0.05)))
        # peak rates from the config: a resumed optimizer's groups hold the last scheduled rates
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.cls_weight = float(cfg.get("class_loss_weight", 1.0))
        self.nce_weight = float(cfg.get("contrastive_loss_weight", 1.0))
        self.label_smoothing = float(cfg.get("label_smoothing", 0.1))
        # An exponential moving average of the trained weights: with ~2k training images the
        # last-epoch weights swing by a few val images from epoch to epoch; the average does not.
        self.ema_decay = float(cfg.get("ema_decay", 0.0))
        self.ema = [p.detach().clone() for p in self.params] if self.ema_decay > 0 else None

    def update_ema(self):
        if self.ema is None:
            return
        with torch.no_grad():
            for e, p in zip(self.ema, self.params):
                e.mul_(self.ema_decay).add_(p.detach(), alpha=1 - self.ema_decay)

    def swap_ema(self):
        """Exchange live and averaged weights (call twice to swap back)."""
        if self.ema is None:
            return
        with torch.no_grad():
            for e, p in zip(self.ema, self.params):
                tmp = p.detach().clone()
                p.copy_(e)
                e.copy_(tmp)

    def _set_mode(self, train: bool):
        # BatchNorm statistics stay frozen (eval) even while training: batches are small and the
        # exported tower must behave exactly as it did when evaluated.
        for m in self.tower.head_modules():
            m.eval()
        self.enc.text_tower.eval()

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.enc.image_proj(self.tower.head(h.float())), dim=-1)

    def class_logits(self, img_emb: torch.Tensor) -> torch.Tensor:
        txt = F.normalize(self.enc.text_proj(self.prompt_feats), dim=-1)
        return self.enc.logit_scale.exp().clamp(max=100) * img_emb @ txt.T

    def step(self, h, labels, cap_feats, pos_mask) -> dict:
        self._set_mode(True)
        img = self.embed(h)
        txt = F.normalize(self.enc.text_proj(cap_feats), dim=-1)
        prompts = F.normalize(self.enc.text_proj(self.prompt_feats), dim=-1)
        nce, cls = clip_losses(img, txt, pos_mask, self.enc.logit_scale.exp().clamp(max=100), prompts, labels,
                               self.label_smoothing)
        loss = self.nce_weight * nce + self.cls_weight * cls
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.update_ema()
        return {"loss": float(loss.detach()), "nce": float(nce.detach()), "cls": float(cls.detach())}

    @torch.no_grad()
    def embed_all(self, trunk: np.ndarray, batch_size: int = 128) -> torch.Tensor:
        """Embeddings of cached activations ``[N, V, C, H, W]`` -> ``[N, V, D]``."""
        self._set_mode(False)
        n, v = trunk.shape[:2]
        flat = trunk.reshape(n * v, *trunk.shape[2:])
        out = [self.embed(torch.from_numpy(flat[i:i + batch_size])) for i in range(0, n * v, batch_size)]
        return torch.cat(out).reshape(n, v, -1)

    @torch.no_grad()
    def accuracy(self, trunk: np.ndarray, labels) -> float:
        """Percent right; ``labels`` are class indices or ``(positives, allowed)`` masks (a
        prediction is restricted to the allowed classes and right when it is a positive). The
        per-image outcome is kept in ``last_correct`` for per-set figures."""
        emb = self.embed_all(trunk)[:, 0]
        logits = self.class_logits(emb)
        if isinstance(labels, (tuple, list)):
            pos, allowed = labels
            pred = restricted_predictions(logits, allowed).numpy()
            correct = np.asarray(pos)[np.arange(len(pred)), pred]
        else:
            correct = logits.argmax(-1).numpy() == np.asarray(labels)
        self.last_correct = correct
        return float(100.0 * np.mean(correct))


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    p = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def epoch_loop(opt, base_lrs: list[float], n_items: int, batch_size: int, epochs: int, warmup: int,
               rng: np.random.Generator, step_fn, finish_fn, desc: str, start_epoch: int = 0,
               order_fn=None) -> list[dict]:
    """The epoch loop both stage-2 trainers share: a seeded permutation of ``n_items`` per epoch
    (or ``order_fn(rng)``, e.g. weighted draws over several sets, always ``n_items`` long),
    warmup + cosine LR on every parameter group, and per-epoch mean losses in a log record that
    ``finish_fn(epoch, rec)`` completes (validation, logging, checkpoint); ``base_lrs`` are the
    peak rates of the parameter groups."""
    from .progress import bar as progress_bar

    steps_per_epoch = max(1, n_items // batch_size)
    total = epochs * steps_per_epoch
    history = []
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        order = order_fn(rng) if order_fn is not None else rng.permutation(n_items)
        sums: dict[str, float] = {}
        bar = progress_bar(range(steps_per_epoch), desc=f"{desc} {epoch + 1}/{epochs}", leave=False)
        for s in bar:
            step = epoch * steps_per_epoch + s
            for g, b in zip(opt.param_groups, base_lrs):
                g["lr"] = b * cosine_lr(step, total, warmup)
            m = step_fn(order[s * batch_size:(s + 1) * batch_size])
            for k, x in m.items():
                sums[k] = sums.get(k, 0.0) + x
            bar.set_postfix(loss=f"{m['loss']:.3f}")
        rec = {"stage": "contrastive", "epoch": epoch + 1, "seconds": round(time.time() - t0, 1)}
        rec.update({k: round(x / steps_per_epoch, 4) for k, x in sums.items()})
        finish_fn(epoch + 1, rec)
        history.append(rec)
    return history


def grouped_order(order: np.ndarray, keys: np.ndarray, per_group: int, batch_size: int,
                  rng: np.random.Generator) -> np.ndarray:
    """``order`` rearranged so that batches are made of ``per_group``-sized runs of samples that
    share a key (the image's set and scene); samples with a negative key stay in random batches.

    Random batches over ~40 scenes hold almost no two images of one scene, so the contrastive loss
    only ever separates scenes and retrieval within a scene stays near chance; batches of a few
    scenes make the other images of the same scene the negatives. The result has the same length
    and the same samples as ``order``; grouped and random batches are shuffled together."""
    order = np.asarray(order)
    if per_group <= 1 or batch_size % per_group:
        return order
    k = np.asarray(keys)[order]
    runs, rest = [], [order[k < 0]]
    for key in np.unique(k[k >= 0]):
        idx = order[k == key]
        idx = idx[rng.permutation(len(idx))]
        full = len(idx) // per_group * per_group
        runs += [idx[i:i + per_group] for i in range(0, full, per_group)]
        rest.append(idx[full:])
    runs = [runs[i] for i in rng.permutation(len(runs))]
    per_batch = batch_size // per_group
    full = len(runs) // per_batch * per_batch
    batches = [np.concatenate(runs[i:i + per_batch]) for i in range(0, full, per_batch)]
    left = np.concatenate(runs[full:] + rest)
    left = left[rng.permutation(len(left))]
    batches += [left[i:i + batch_size] for i in range(0, len(left), batch_size)]
    tail = [b for b in batches if len(b) < batch_size]
    batches = [b for b in batches if len(b) == batch_size]
    batches = [batches[i] for i in rng.permutation(len(batches))] + tail
    return np.concatenate(batches) if batches else order


def multi_positive_mask(caps: list[int], images, cap_sets: list[set]) -> torch.Tensor:
    """``[i, j]`` true when caption ``caps[j]`` is one of image ``images[i]``'s sentences."""
    return torch.tensor([[c in cap_sets[i] for c in caps] for i in images])


def train_head(trainer: HeadTrainer, trunk: np.ndarray, labels, caption_ids: list[list[int]],
               caption_feats: torch.Tensor, cfg: dict, rng: np.random.Generator, log=None,
               val=None, start_epoch: int = 0, on_epoch_end=None, order_fn=None) -> list[dict]:
    """Epochs over (image, view) pairs with one random caption each.

    ``trunk`` is ``[N, V, ...]``; ``labels`` and ``caption_ids`` are per image (row of ``trunk``).
    ``caption_ids[i]`` are indices into ``caption_feats`` of image i's captions (deduplicated
    sentences share an index, which is what makes the multi-positive mask exact). ``labels`` are
    class indices or ``(positives, allowed)`` masks (see :func:`scene_loss`). ``val`` is
    ``(trunk, labels)`` or ``(trunk, labels, set_of_image, set_names)`` for per-set accuracy;
    ``order_fn(rng)`` replaces the plain permutation of the ``N * V`` samples (weighted sets).
    """
    n, v = trunk.shape[:2]
    cap_sets = [set(c) for c in caption_ids]
    if isinstance(labels, (tuple, list)):
        pos_t, allowed_t = (torch.as_tensor(np.asarray(x), dtype=torch.bool) for x in labels)

        def targets(ii):
            return pos_t[ii], allowed_t[ii]
    else:
        labels_t = torch.as_tensor(labels, dtype=torch.long)

        def targets(ii):
            return labels_t[ii]

    def step(idx):
        ii, vv = idx // v, idx % v
        caps = [int(rng.choice(caption_ids[i])) for i in ii]
        return trainer.step(torch.from_numpy(np.asarray(trunk[ii, vv])), targets(ii), caption_feats[caps],
                            multi_positive_mask(caps, ii, cap_sets))

    n_items = n * v
    if order_fn is not None:
        n_items = len(order_fn(np.random.default_rng(0)))

    def finish(epoch, rec):
        trainer.swap_ema()  # evaluate (and save) the averaged weights
        if val is not None:
            rec["val_accuracy"] = round(trainer.accuracy(val[0], val[1]), 2)
            if len(val) > 3 and len(val[3]) > 1:
                for si, name in enumerate(val[3]):
                    m = np.asarray(val[2]) == si
                    if m.any():
                        rec[f"val_accuracy_{name}"] = round(float(100 * trainer.last_correct[m].mean()), 2)
        if log:
            log(rec)
        if on_epoch_end:
            on_epoch_end(epoch)
        trainer.swap_ema()

    return epoch_loop(trainer.opt, trainer.base_lrs, n_items, int(cfg.get("batch_size", 64)),
                      int(cfg.get("epochs", 8)), int(cfg.get("warmup_steps", 20)), rng, step, finish,
                      "contrastive", start_epoch, order_fn)

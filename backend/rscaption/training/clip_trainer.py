"""Stage 2, CLIP variant: fine-tune a whole open_clip / transformers CLIP, or train one from scratch.

The LiT path (``contrastive.py``) can cache everything below the trained blocks; here both towers may
change, so every step reads its images, draws a view per image (``features.make_view``: dihedral
transforms and seeded crop + colour views) and runs both towers. That is slow on a CPU for anything
bigger than a toy, and the reason this path exists is the GPU machine: fine-tuning RemoteCLIP /
GeoRSCLIP-class models, or training a CLIP from scratch on a large caption set.

The objective is the LiT one (``contrastive.clip_losses``): multi-positive InfoNCE over captions plus
scene classification through class prompts, so the two stage-2 variants compare like for like.

Which weights train is a list of parameter-name prefixes (``train_params``; default: all). Typical
choices for an open_clip ViT: ``["visual."]`` (image tower only; the text tower stays a general
encoder, LiT-style), ``["visual.transformer.resblocks.11", "visual.ln_post", "visual.proj"]`` (last
block). Models stay in eval mode (frozen BatchNorm statistics in ResNet towers, no dropout), which
keeps the fine-tuned encoder behaving at export exactly as it did when validated.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ..errors import TrainError
from .contrastive import clip_losses, epoch_loop, multi_positive_mask
from .features import make_view
from ..data.images import read_rgb


def clip_encoder(spec: dict, resolve=lambda p: p):
    """The encoder a ``{kind: clip}`` run starts from (fp32, CPU).

    ``model``: anything ``load_model`` accepts that has a CLIP encoder (a checkpoint dir, an
    open_clip or transformers CLIP dir, or, when the network or a warm cache is there, a hub name
    such as ``ViT-B-32/openai`` or ``hf-hub:<org>/<repo>``); ``open_clip_config``: an open_clip
    architecture dict (or a JSON file holding one) for a CLIP trained from scratch. ``resolve``
    turns config-relative paths into real ones."""
    from ..models.encoders import HFClipEncoder, OpenClipEncoder
    from ..models.registry import load_model

    arch = spec.get("open_clip_config")
    if arch is not None and spec.get("model"):
        raise TrainError("encoder: give either 'model' (fine-tune) or 'open_clip_config' (from scratch), not both")
    if arch is not None:
        if isinstance(arch, str):
            path = Path(resolve(arch))
            if not path.is_file():
                raise TrainError(f"open_clip_config file not found: {arch}")
            arch = json.loads(path.read_text())
            arch = arch.get("model_cfg", arch)
        torch.manual_seed(int(spec.get("init_seed", 0)))
        try:
            return OpenClipEncoder.from_config(arch).float()
        except Exception as exc:
            raise TrainError(f"invalid open_clip_config: {(str(exc).splitlines() or [''])[0]}") from None
    if not spec.get("model"):
        raise TrainError("encoder.kind 'clip' needs 'model' (a CLIP to fine-tune) or 'open_clip_config' "
                         "(an architecture to train from scratch)")
    src = str(spec["model"])
    local = resolve(src)
    enc = load_model(local if Path(local).exists() else src, device="cpu", dtype=torch.float32).encoder
    if not isinstance(enc, (OpenClipEncoder, HFClipEncoder)):
        raise TrainError(f"'{src}' has a {enc.kind} encoder; encoder.kind 'clip' fine-tunes open_clip or "
                         "transformers CLIP models (use the default kind 'lit' for LiT towers)")
    if isinstance(enc, OpenClipEncoder) and enc.model_cfg is None:
        raise TrainError(f"the architecture config of '{src}' is unknown, so a fine-tuned copy could not be "
                         "saved; load it from a directory with open_clip_config.json or from an rscaption "
                         "checkpoint")
    return enc


def logit_scale(encoder) -> torch.nn.Parameter:
    return encoder.model.logit_scale  # open_clip CLIP and transformers CLIPModel both name it so


def select_params(encoder, prefixes) -> list[str]:
    """Names of the parameters to train (all others frozen); an unknown prefix is an error, since a
    typo would otherwise silently train nothing."""
    prefixes = [""] if not prefixes else [str(p) for p in prefixes]
    names = [n for n, _ in encoder.model.named_parameters()]
    for pre in prefixes:
        if not any(n.startswith(pre) for n in names):
            sample = sorted({n.split(".")[0] for n in names})
            raise TrainError(f"train_params prefix '{pre}' matches no parameter; top-level names: {sample}")
    chosen = [n for n in names if any(n.startswith(p) for p in prefixes)]
    for n, p in encoder.model.named_parameters():
        p.requires_grad_(n in chosen)
    return chosen


class ClipTrainer:
    def __init__(self, encoder, prompts: list[str] | None, cfg: dict, device, train_params=None):
        self.enc = encoder.to(device).float().eval()
        self.device = device
        self.prompts = list(prompts or [])
        self.names = select_params(encoder, train_params)
        params = dict(encoder.model.named_parameters())
        # CLIP practice: no weight decay on gains, biases, embeddings of size 1 and the temperature
        decay = [params[n] for n in self.names if params[n].ndim >= 2 and "logit_scale" not in n]
        no_decay = [params[n] for n in self.names if not (params[n].ndim >= 2 and "logit_scale" not in n)]
        self.params = decay + no_decay
        self.opt = torch.optim.AdamW([
            {"params": decay, "weight_decay": float(cfg.get("weight_decay", 0.05))},
            {"params": no_decay, "weight_decay": 0.0},
        ], lr=float(cfg.get("lr", 1e-5)), betas=(0.9, 0.98), eps=1e-6)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]  # before any resumed state is loaded
        self.cls_weight = float(cfg.get("class_loss_weight", 1.0)) if self.prompts else 0.0
        self.nce_weight = float(cfg.get("contrastive_loss_weight", 1.0))
        self.label_smoothing = float(cfg.get("label_smoothing", 0.1))
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext

    def trained_state(self) -> dict:
        """Only the trained parameters (the rest equals the starting model): small resumable state."""
        params = dict(self.enc.model.named_parameters())
        return {n: params[n].detach().cpu().clone() for n in self.names}

    def load_trained(self, state: dict) -> None:
        load_trained_state(self.enc, state)

    def pixels(self, images) -> torch.Tensor:
        from ..models.encoders import images_to_pixels

        return images_to_pixels(images, self.enc.preprocess, device=self.device)

    def step(self, images, captions, labels, pos) -> dict:
        with self.autocast():
            img = self.enc.encode_image(self.pixels(images)).float()
            txt = self.enc.encode_text(captions).float()
            prompts = self.enc.encode_text(self.prompts).float() if self.cls_weight > 0 else None
            scale = logit_scale(self.enc).exp().clamp(max=100)
            nce, cls = clip_losses(img, txt, pos.to(self.device), scale, prompts, labels.to(self.device),
                                   self.label_smoothing)
            loss = self.nce_weight * nce + self.cls_weight * cls
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return {"loss": float(loss.detach()), "nce": float(nce.detach()), "cls": float(cls.detach())}

    @torch.no_grad()
    def embed(self, images, batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            with self.autocast():
                out.append(self.enc.encode_image(self.pixels(images[i:i + batch_size])).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.enc.embed_dim)

    @torch.no_grad()
    def accuracy(self, images, labels) -> float:
        """Zero-shot scene accuracy through the class prompts (the trained classifier)."""
        with self.autocast():
            prompts = self.enc.encode_text(self.prompts).float().cpu()
        pred = (self.embed(images) @ prompts.T).argmax(-1).numpy()
        return float(100.0 * np.mean(pred == np.asarray(labels)))


def embed_records(trainer: ClipTrainer, records, view: int, chunk: int = 256) -> torch.Tensor:
    """Embeddings of one view of every record, reading ``chunk`` images at a time (a large
    dataset never sits in memory as pixels)."""
    parts = [trainer.embed(read_views(records[i:i + chunk], [view] * len(records[i:i + chunk])))
             for i in range(0, len(records), chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, trainer.enc.embed_dim)


def load_trained_state(encoder, state: dict) -> None:
    params = dict(encoder.model.named_parameters())
    unknown = [n for n in state if n not in params]
    if unknown:
        raise TrainError(f"trained CLIP weights do not match the starting model (e.g. {unknown[0]})")
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v.to(params[n].dtype))


def read_views(records, views, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """One view per record: ``views[i]`` when given per record, else drawn from ``views`` by ``rng``."""
    out = []
    for k, r in enumerate(records):
        v = int(views[k]) if rng is None else int(rng.choice(views))
        out.append(make_view(read_rgb(r.image), v, r.image))
    return out


def train_clip(trainer: ClipTrainer, records, labels, caption_texts: list[str], caption_ids: list[list[int]],
               cfg: dict, views, rng: np.random.Generator, log=None, val=None, start_epoch: int = 0,
               on_epoch_end=None) -> list[dict]:
    """Epochs over the training images, each seen once per epoch in one random view with one random
    caption; multi-positive masks as in ``contrastive.train_head``."""
    cap_sets = [set(c) for c in caption_ids]
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def step(ii):
        images = read_views([records[i] for i in ii], views, rng)
        caps = [int(rng.choice(caption_ids[i])) for i in ii]
        return trainer.step(images, [caption_texts[c] for c in caps], labels_t[ii],
                            multi_positive_mask(caps, ii, cap_sets))

    def finish(epoch, rec):
        if val is not None and trainer.prompts:
            rec["val_accuracy"] = round(trainer.accuracy(*val), 2)
        if log:
            log(rec)
        if on_epoch_end:
            on_epoch_end(epoch)

    n = len(records)
    return epoch_loop(trainer.opt, trainer.base_lrs, n, min(int(cfg.get("batch_size", 64)), n), int(cfg.get("epochs", 5)),
                      int(cfg.get("warmup_steps", 20)), rng, step, finish, "clip", start_epoch)

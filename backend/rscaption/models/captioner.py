"""`Captioner`: encoder + one decoder per caption language (ClipCap-style prefix captioning).

Captioning is split from embedding on purpose: the pipeline stores image embeddings (for text
search) and captions them from the stored vectors, so `caption()` takes embeddings, not pixels.
The English decoder is the captioner's own `mapping`/`lm`/`tokenizer`; other languages are extra
`Decoder`s over the same embedding space (decoding loops in decoder.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelError
from .decoder import Decoder, clean_caption, pad_batch  # noqa: F401  (re-exported)
from .encoders import Encoder, images_to_pixels

LANGUAGE_RE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]+)?$")


def _describe_lm(lm) -> str:
    """A hub name says what the LM is; a local path (where a checkpoint happens to be unpacked)
    does not, so local LMs are described by their shape."""
    cfg = lm.config
    name = getattr(cfg, "_name_or_path", "") or ""
    if name and not Path(name).is_absolute() and not Path(name).exists():
        return name
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    return f"{cfg.model_type} ({layers} layers x {width}, vocabulary {cfg.vocab_size})"


class Captioner(nn.Module):
    def __init__(self, encoder: Encoder, mapping: nn.Module | None = None, lm: nn.Module | None = None,
                 tokenizer=None, card: dict | None = None, model_id: str | None = None,
                 storage_dtype: str = "float32"):
        super().__init__()
        self.encoder = encoder
        self.mapping = mapping
        self.lm = lm
        self.tokenizer = tokenizer
        self._card = dict(card or {})
        self.model_id = model_id or "in-memory"
        self.storage_dtype = storage_dtype
        self._hash: str | None = None
        self.source_dir: Path | None = None
        self.extra_decoders = nn.ModuleDict()  # language -> Decoder, besides the English one
        self.scene = None  # models.scene.SceneHead: calibrated confidence (None: LM token probability)
        self.fast_inference = True  # models/inference.py fast paths (False: the plain modules)
        self.precision = None  # fast paths' compute: fp32 (default) | bf16 | auto (bf16 on AMX CPUs): device.py
        if mapping is not None and getattr(mapping, "embed_dim", encoder.embed_dim) != encoder.embed_dim:
            raise ModelError(f"mapping expects {mapping.embed_dim}-d embeddings, encoder gives {encoder.embed_dim}")
        self.eval()

    # ------------------------------------------------------------------ properties

    @property
    def can_caption(self) -> bool:
        """False for a bare public encoder (e.g. `ViT-B-32/openai`): search works, captions don't."""
        return self.mapping is not None and self.lm is not None and self.tokenizer is not None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    @property
    def prefix_length(self) -> int | None:
        return getattr(self.mapping, "prefix_length", None)

    @property
    def languages(self) -> list[str]:
        return (["en"] if self.can_caption else []) + list(self.extra_decoders)

    def decoder(self, language: str = "en") -> Decoder:
        """The English decoder wraps the captioner's own modules (built on each call, so code that
        swaps `cap.mapping` or `cap.lm` keeps working); other languages are stored decoders."""
        if language in self.extra_decoders:
            return self.extra_decoders[language]
        if language == "en" and self.can_caption:
            return Decoder(self.mapping, self.lm, self.tokenizer)
        if not self.languages:
            raise ModelError(f"model '{self.model_id}' is an encoder only (search works, captions need a "
                             "checkpoint with a trained mapping and language model)")
        raise ModelError(f"model '{self.model_id}' has no '{language}' captions; "
                         f"languages: {', '.join(self.languages)}")

    def add_decoder(self, language: str, decoder: Decoder) -> None:
        if language == "en" or not LANGUAGE_RE.match(str(language)):
            raise ModelError(f"bad decoder language '{language}' (a lower-case code like 'zh', not 'en')")
        if decoder.embed_dim != self.embed_dim:
            raise ModelError(f"the '{language}' decoder expects {decoder.embed_dim}-d embeddings, "
                             f"the encoder gives {self.embed_dim}")
        self.extra_decoders[language] = decoder.to(self.device, self.dtype).eval()
        self._hash = None

    @property
    def eos_token_id(self) -> int:
        return self.decoder().eos_token_id

    @property
    def card(self) -> dict:
        """Facts measured from the modules win over whatever the stored card says."""
        lm_name = None
        if self.lm is not None:
            lm_name = self._card.get("lm") or _describe_lm(self.lm)
        return {
            "description": self._card.get("description", ""),
            "tile_size": self._card.get("tile_size"),
            "ground_resolution_m": self._card.get("ground_resolution_m"),
            "trained_on": self._card.get("trained_on"),
            "metrics": self._card.get("metrics"),
            **{k: v for k, v in self._card.items() if k not in ("encoder", "lm")},
            "encoder": self.encoder.describe(),
            "encoder_kind": self.encoder.kind,
            "lm": lm_name,
            "mapping": getattr(self.mapping, "kind", None),
            "prefix_length": self.prefix_length,
            "embed_dim": self.embed_dim,
            "image_size": self.encoder.image_size,
            "preprocessing": dict(self.encoder.preprocess),
            "can_caption": self.can_caption,
            "languages": self.languages,
        }

    @property
    def model_hash(self) -> str:
        """sha256 over config.json + weight files of the checkpoint dir (see checkpoint.py). For a
        model built in memory it is computed by saving to a temporary dir once."""
        if self._hash is None:
            from .checkpoint_save import hash_unsaved

            self._hash = hash_unsaved(self)
        return self._hash

    def save(self, directory) -> Path:
        from .checkpoint_save import save_checkpoint

        return save_checkpoint(self, directory)

    def to_device(self, device=None, dtype=None) -> "Captioner":
        """Move + cast; LM maths stays stable in fp16 because log-softmax is done in fp32."""
        from ..device import parse_dtype, pick_device

        device = pick_device(device)
        self.to(device=device, dtype=parse_dtype(dtype, device))
        return self

    # ------------------------------------------------------------------ embedding

    @torch.inference_mode()
    def embed_images(self, images, batch_size: int = 32) -> np.ndarray:
        from .inference import compute_dtype, encode_images

        fast = getattr(self, "fast_inference", True) and not self.training
        dtype = compute_dtype(self) if fast else self.dtype
        n = len(images)
        out = []
        for start in range(0, n, batch_size):
            pixels = images_to_pixels(images[start:start + batch_size], self.encoder.preprocess,
                                      self.device, self.dtype)
            emb = encode_images(self.encoder, pixels, dtype) if fast else self.encoder.encode_image(pixels)
            out.append(emb.float().cpu())
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return F.normalize(torch.cat(out), dim=-1).numpy().astype(np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts, batch_size: int = 128) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = [self.encoder.encode_text(texts[i:i + batch_size]).float().cpu()
               for i in range(0, len(texts), batch_size)]
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return F.normalize(torch.cat(out), dim=-1).numpy().astype(np.float32)

    # ------------------------------------------------------------------ training

    # ------------------------------------------------------------------ training / decoding (English)

    def prefix(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.decoder().prefix(embeddings)

    def tokenize_captions(self, texts, max_length: int = 40):
        return self.decoder().tokenize_captions(texts, max_length)

    def caption_loss(self, embeddings, token_ids, attention_mask, label_smoothing: float = 0.0) -> torch.Tensor:
        return self.decoder().caption_loss(embeddings, token_ids, attention_mask, label_smoothing)

    def greedy_ids(self, embeddings: torch.Tensor, max_new_tokens: int = 30):
        return self.decoder().greedy_ids(embeddings, max_new_tokens)

    def beam_ids(self, embeddings: torch.Tensor, beam_size: int = 3, max_new_tokens: int = 30,
                 length_penalty: float = 1.0):
        return self.decoder().beam_ids(embeddings, beam_size, max_new_tokens, length_penalty)

    def decode(self, ids: list[int]) -> str:
        return self.decoder().decode(ids)

    def caption(self, embeddings, beam_size: int = 1, max_new_tokens: int = 30, length_penalty: float | None = None,
                batch_size: int | None = None, language: str = "en",
                calibrated: bool = True, ground_m: float | None = None) -> list[tuple[str, float]]:
        """Captions for stored image embeddings with a confidence: the calibrated probability that
        the caption names the right scene when the model has a scene head (``models.scene``; low
        ones then get an honest "uncertain" caption in English), else exp(mean token log-prob).
        ``length_penalty`` defaults to the model card's (what its confidence was calibrated with),
        else 1.0 (hypotheses ranked by mean token log-prob). ``ground_m`` (the tiles' metres per
        pixel, when known) keeps English captions from naming scenes the model never saw that
        coarse (``SceneHead.unseen_at``): the beam's next plausible hypothesis is used instead."""
        if length_penalty is None:
            length_penalty = float(self._card.get("length_penalty", 1.0))
        dec = self.decoder(language)
        if getattr(self, "fast_inference", True) and not self.training:
            from .inference import compute_dtype, fast_decoder

            dec = fast_decoder(dec, compute_dtype(self))
        emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        if emb.ndim == 1:
            emb = emb[None]
        if emb.ndim != 2 or emb.shape[1] != self.embed_dim:
            raise ModelError(f"expected embeddings of shape [N, {self.embed_dim}], got {tuple(emb.shape)}")
        beam_size = max(1, int(beam_size))
        batch_size = batch_size or max(1, 64 // beam_size)
        alts = calibrated and self.scene is not None and language == "en" and beam_size > 1 and \
            bool(self.scene.unseen_at(ground_m).any())
        results, alternatives = [], []
        for start in range(0, emb.shape[0], batch_size):
            chunk = emb[start:start + batch_size].to(self.device, dec.dtype)
            if beam_size == 1:
                ids, lps = dec.greedy_ids(chunk, max_new_tokens)
            elif alts:
                ranked_ids, ranked_lps = dec.beam_ids(chunk, beam_size, max_new_tokens, length_penalty, n_best=True)
                ranked = [[(dec.decode(i), float(min(1.0, np.exp(lp)))) for i, lp in zip(ii, ll)]
                          for ii, ll in zip(ranked_ids, ranked_lps)]
                results += [r[0] for r in ranked]
                alternatives += [r[1:] for r in ranked]
                continue
            else:
                ids, lps = dec.beam_ids(chunk, beam_size, max_new_tokens, length_penalty)
            results += [(dec.decode(i), float(min(1.0, np.exp(lp)))) for i, lp in zip(ids, lps)]
        if calibrated and self.scene is not None:
            results = self.calibrate(emb.float().cpu().numpy(), results, language, ground_m=ground_m,
                                     alternatives=alternatives or None)
        return results

    def calibrate(self, embeddings: np.ndarray, results: list[tuple[str, float]], language: str = "en",
                  text_emb: np.ndarray | None = None, ground_m: float | None = None,
                  alternatives: list[list[tuple[str, float]]] | None = None) -> list[tuple[str, float]]:
        """Raw ``caption(..., calibrated=False)`` results -> the scene head's confidences (and honest
        English captions below its threshold); ``text_emb`` saves re-embedding captions a caller has
        already embedded."""
        if self.scene is None or not results:
            return results
        if text_emb is None and language == "en" and self.scene.needs_caption_text:
            text_emb = self._embed_caption_texts([c for c, _ in results])
        return self.scene.apply(np.asarray(embeddings, np.float32), results, rewrite=language == "en",
                                text_emb=text_emb if language == "en" else None, ground_m=ground_m,
                                alternatives=alternatives, embed=self._embed_caption_texts)

    def _embed_caption_texts(self, captions: list[str]) -> np.ndarray:
        """Text-tower embeddings of captions as the scene head reads them (each distinct caption
        once per set of weights on the fast path)."""
        from ..data.datasets import normalize_caption

        texts = [normalize_caption(c) for c in captions]
        if getattr(self, "fast_inference", True):
            from .inference import embed_texts_cached

            return embed_texts_cached(self, texts)
        return self.embed_texts(texts)

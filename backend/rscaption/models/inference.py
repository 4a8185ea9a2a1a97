"""Inference-only fast paths of a `Captioner` (on by default; ``cap.fast_inference = False`` gives
the plain modules, which the benchmark's baseline uses).

- Image embeddings go through a folded, channels-last copy of a CNN image tower (models/fold.py).
- With ``precision="bf16"`` (or ``"auto"`` on a CPU with AMX-BF16) the tower copy and a copy of
  the caption decoder compute in bfloat16 (``device.compute_dtype``): the matrix unit runs bf16
  at several times the fp32 rate; val scores move by noise but tiles between two scenes can flip
  (docs/performance.md), so fp32 is the default. The tower is folded in fp32 first, so folding
  adds no rounding.
- The confidence model reads each caption's text embedding; captions repeat a lot over a mosaic
  (whole regions of "it is a large area of water."), so they are embedded once and remembered.

Both caches are keyed on the weights they were built from (storage pointer + in-place version of
every tensor), so training, loading a state dict or moving the model rebuilds them instead of
serving stale results.  Nothing is stored on the modules themselves: saving and hashing a model
never see these copies.
"""

from __future__ import annotations

import copy
import threading
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from .fold import folded_copy

TEXT_CACHE_MAX = 20000  # captions; ~30 MB of 384-d float32 at most

_lock = threading.Lock()
_text_lock = threading.Lock()
_towers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_decoders: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_texts: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def weights_key(module: torch.nn.Module) -> tuple:
    return tuple((t.data_ptr(), t._version, t.dtype, t.device.type)
                 for t in [*module.parameters(), *module.buffers()])


def compute_dtype(cap) -> torch.dtype:
    """What ``cap``'s fast paths compute in (its ``precision``: auto, fp32 or bf16)."""
    from ..device import compute_dtype as resolve

    return resolve(getattr(cap, "precision", None), cap.device, cap.dtype)


def _fast_tower(tower: torch.nn.Module, pixels: torch.Tensor, dtype: torch.dtype) -> torch.nn.Module:
    key = (weights_key(tower), dtype)
    with _lock:
        hit = _towers.get(tower)
        if hit is not None and hit[0] == key:
            return hit[1]
        fast, _ = folded_copy(tower, probe=pixels[:2])
        if dtype != pixels.dtype:
            fast = fast.to(dtype)
        _towers[tower] = (key, fast)
        return fast


def encode_images(encoder, pixels: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``encoder.encode_image(pixels)`` with the image tower folded when it is a CNN (lit), computed
    in ``dtype`` (default: the pixels'); the projection stays in the weights' dtype."""
    if getattr(encoder, "kind", None) != "lit" or encoder.training:
        return encoder.encode_image(pixels)
    dtype = dtype or pixels.dtype
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    feats = _fast_tower(encoder.image_tower, pixels, dtype)(pixels.to(dtype))
    return F.normalize(encoder.image_proj(feats.to(pixels.dtype)).float(), dim=-1)


def fast_decoder(dec, dtype: torch.dtype):
    """The decoder the loops should run: its mapping and LM in ``dtype`` (a cached copy when that is
    not theirs, e.g. bf16 on AMX CPUs) with the lean GPT-2 forward (``gpt2_runner``) when the LM
    is a plain GPT-2; else ``dec`` itself. Keyed on the LM module and the weights of both, like
    the tower copy."""
    from . import gpt2_runner
    from .decoder import Decoder

    if dtype == dec.dtype and not gpt2_runner.supports(dec.lm):
        return dec
    key = (weights_key(dec.mapping), weights_key(dec.lm), dtype)
    with _lock:
        hit = _decoders.get(dec.lm)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            mapping, lm = dec.mapping, dec.lm
            if dtype != dec.dtype:
                mapping, lm = copy.deepcopy(mapping).to(dtype).eval(), copy.deepcopy(lm).to(dtype).eval()
            runner = gpt2_runner.GPT2Runner(lm) if gpt2_runner.supports(lm) else None
            fast = Decoder(mapping, lm, dec.tokenizer, runner=runner).eval()
        _decoders[dec.lm] = (key, fast)
        return fast


def embed_texts_cached(cap, texts: list[str]) -> np.ndarray:
    """``cap.embed_texts(texts)``, embedding each distinct text once per set of weights.  New texts
    are embedded under a lock: a fast tokenizer used from two threads at once fails ("Already
    borrowed") when it sets its padding and truncation."""
    key = weights_key(cap.encoder)
    with _lock:
        entry = _texts.get(cap)
        if entry is None or entry[0] != key:
            entry = (key, {})
            _texts[cap] = entry
        cache = entry[1]
        rows = {t: cache[t] for t in set(texts) if t in cache}
    missing = [t for t in dict.fromkeys(texts) if t not in rows]
    if missing:
        with _text_lock:
            new = cap.embed_texts(missing)
        rows.update(zip(missing, new))
        with _lock:
            if len(cache) + len(missing) > TEXT_CACHE_MAX:
                cache.clear()
            cache.update(zip(missing, new))
    if not texts:
        return np.zeros((0, cap.embed_dim), np.float32)
    return np.stack([rows[t] for t in texts]).astype(np.float32)

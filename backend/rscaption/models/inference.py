"""Inference-only fast paths of a `Captioner` (on by default; ``cap.fast_inference = False`` gives
the plain modules, which the benchmark's baseline uses).

- Image embeddings go through a folded, channels-last copy of a CNN image tower (models/fold.py).
- The confidence model reads each caption's text embedding; captions repeat a lot over a mosaic
  (whole regions of "it is a large area of water."), so they are embedded once and remembered.

Both caches are keyed on the weights they were built from (storage pointer + in-place version of
every tensor), so training, loading a state dict or moving the model rebuilds them instead of
serving stale results.  Nothing is stored on the modules themselves: saving and hashing a model
never see these copies.
"""

from __future__ import annotations

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
_texts: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def weights_key(module: torch.nn.Module) -> tuple:
    return tuple((t.data_ptr(), t._version, t.dtype, t.device.type)
                 for t in [*module.parameters(), *module.buffers()])


def _fast_tower(tower: torch.nn.Module, pixels: torch.Tensor) -> torch.nn.Module:
    key = weights_key(tower)
    with _lock:
        hit = _towers.get(tower)
        if hit is not None and hit[0] == key:
            return hit[1]
        fast, _ = folded_copy(tower, probe=pixels[:2])
        _towers[tower] = (key, fast)
        return fast


def encode_images(encoder, pixels: torch.Tensor) -> torch.Tensor:
    """``encoder.encode_image(pixels)`` with the image tower folded when it is a CNN (lit)."""
    if getattr(encoder, "kind", None) != "lit" or encoder.training:
        return encoder.encode_image(pixels)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    feats = _fast_tower(encoder.image_tower, pixels)(pixels)
    return F.normalize(encoder.image_proj(feats).float(), dim=-1)


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

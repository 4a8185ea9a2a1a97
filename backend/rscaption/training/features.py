"""Cache image-tower activations so CPU training touches the expensive early layers only once.

The EfficientNet trunk up to a split block costs ~90 % of a forward pass; the last blocks + head
that are fine-tuned cost ~10 %. Running the frozen trunk once per (image, view) and storing its
output lets every later epoch fine-tune the last blocks, the projection, the class head and the
caption mapping in seconds. Views are dihedral transforms (rotations by 90 degrees and flips): for
nadir imagery they are label-preserving, unlike for ground-level photos.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from .datasets import CaptionRecord


def dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """View ``k`` (0..7) of an HxWxC array: ``k % 4`` quarter turns, mirrored when ``k >= 4``."""
    out = np.rot90(img, k % 4, axes=(0, 1))
    if k >= 4:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def read_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


class SplitTower(nn.Module):
    """An EfficientNet (timm) cut at ``blocks[split]``: ``trunk`` is frozen, ``head`` is trained.

    The head shares its modules with the original tower, so training the head trains the tower
    that is saved in the checkpoint: no weight copying at export time.
    """

    def __init__(self, tower: nn.Module, split: int):
        super().__init__()
        self.tower = tower
        self.split = int(split)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tower
        x = t.bn1(t.conv_stem(x))
        for b in t.blocks[: self.split]:
            x = b(x)
        return x

    def head(self, h: torch.Tensor) -> torch.Tensor:
        t = self.tower
        for b in t.blocks[self.split:]:
            h = b(h)
        h = t.bn2(t.conv_head(h))
        return t.forward_head(h)

    def head_modules(self) -> list[nn.Module]:
        t = self.tower
        return list(t.blocks[self.split:]) + [t.conv_head, t.bn2]


def cache_trunk(encoder, records: Sequence[CaptionRecord], views: Sequence[int], split: int,
                out_dir: Path, batch_size: int = 32, progress: bool = True) -> dict:
    """Trunk activations ``[n_images, n_views, C, H, W]`` (fp16) for ``records``, resumable.

    Written in chunk files so an interrupted run keeps what it computed; a finished cache is
    reused when its manifest matches (same images, views, split and image size).
    """
    from ..models.encoders import images_to_pixels

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"images": [r.image for r in records], "views": list(views), "split": split,
                "preprocess": encoder.preprocess}
    final = out_dir / "trunk.npy"
    man_path = out_dir / "manifest.json"
    if final.exists() and man_path.exists() and json.loads(man_path.read_text()) == manifest:
        return {"path": str(final), "cached": True, "seconds": 0.0}
    tower = SplitTower(encoder.image_tower, split).eval()
    chunk = max(1, batch_size // max(1, len(views)))
    n_chunks = (len(records) + chunk - 1) // chunk
    t0 = time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(records), desc="cache trunk", unit="img", dynamic_ncols=True)
    parts = []
    with torch.no_grad():
        for c in range(n_chunks):
            part = out_dir / f"part_{c:05d}.npy"
            recs = records[c * chunk:(c + 1) * chunk]
            if not part.exists():
                imgs = []
                for r in recs:
                    im = read_rgb(r.image)
                    imgs.extend(dihedral(im, v) for v in views)
                px = torch.cat([images_to_pixels([im], encoder.preprocess) for im in imgs])
                h = tower.trunk(px).to(torch.float16).numpy()
                h = h.reshape(len(recs), len(views), *h.shape[1:])
                tmp = part.with_suffix(".tmp.npy")
                np.save(tmp, h)
                tmp.rename(part)
            parts.append(part)
            if bar:
                bar.update(len(recs))
    if bar:
        bar.close()
    arr = np.concatenate([np.load(p) for p in parts]) if parts else np.zeros((0,), np.float16)
    np.save(out_dir / "trunk.tmp.npy", arr)
    (out_dir / "trunk.tmp.npy").rename(final)
    man_path.write_text(json.dumps(manifest))
    for p in parts:
        p.unlink()
    return {"path": str(final), "cached": False, "seconds": time.time() - t0}

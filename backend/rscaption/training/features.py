"""Cache image-tower activations so CPU training touches the expensive early layers only once.

The EfficientNet trunk up to a split block costs ~90 % of a forward pass; the last blocks + head
that are fine-tuned cost ~10 %. Running the frozen trunk once per (image, view) and storing its
output lets every later epoch fine-tune the last blocks, the projection, the class head and the
caption mapping in seconds. The price is that augmentation is fixed per cached view instead of
drawn anew every epoch, so a run lists the views it trains on: 0..7 are the dihedral transforms
(rotations by 90 degrees and flips, label-preserving for nadir imagery, unlike for ground-level
photos), 8 and up are seeded crop + mild colour views.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from ..data.datasets import CaptionRecord
from ..data.images import read_rgb


def dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """View ``k`` (0..7) of an HxWxC array: ``k % 4`` quarter turns, mirrored when ``k >= 4``."""
    out = np.rot90(img, k % 4, axes=(0, 1))
    if k >= 4:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


# Augmented views (numbers >= 8): a random dihedral transform, a crop of 60-100 % of the area
# resized back to the tile size, and mild brightness/contrast/saturation changes (+-10 %). Strong
# colour changes are left out on purpose: colour separates several UCM classes (chaparral vs.
# forest, beach vs. river). Each augmented view is a fixed function of (view number, image file
# name), so a cached view is reproducible and two runs share it.
AUG_CROP_AREA = (0.6, 1.0)
AUG_COLOUR = 0.1


def _view_rng(view: int, image_path: str) -> np.random.Generator:
    import zlib

    return np.random.default_rng([int(view), zlib.crc32(Path(image_path).name.encode())])


def augment(img: np.ndarray, view: int, image_path: str = "") -> np.ndarray:
    """Augmented view ``view`` (>= 8) of an HxWx3 uint8 tile; deterministic per (view, file name)."""
    from PIL import Image

    rng = _view_rng(view, image_path)
    out = dihedral(img, int(rng.integers(8)))
    h, w = out.shape[:2]
    area = rng.uniform(*AUG_CROP_AREA)
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    ch = int(min(h, max(8, round(h * np.sqrt(area / aspect)))))
    cw = int(min(w, max(8, round(w * np.sqrt(area * aspect)))))
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(out[y0:y0 + ch, x0:x0 + cw]).resize((w, h), Image.BILINEAR)
    x = np.asarray(crop, dtype=np.float32)
    b, c, s = rng.uniform(1 - AUG_COLOUR, 1 + AUG_COLOUR, size=3)
    x = x * b
    x = (x - x.mean()) * c + x.mean()
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = grey[..., None] + (x - grey[..., None]) * s
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# Coarser-resolution views (numbers >= 20): the tile as a sensor with a coarser ground resolution
# would see it: area-averaged down by 2 ** ((view - 20) / 2) (view 22 = 2x coarser, 24 = 4x, 26 = 8x;
# odd numbers are the half steps) and resized back to its size, under a seeded dihedral transform.
# The footprint stays the same; the detail goes. This is what lets a model trained on 0.3 m tiles
# recognise the same scene in 2.4 m imagery.
SCALE_VIEW_BASE = 20


def scale_factor(view: int) -> float:
    return float(2.0 ** ((int(view) - SCALE_VIEW_BASE) / 2.0))


def coarsen(img: np.ndarray, factor: float) -> np.ndarray:
    """``img`` resampled to ``factor`` times coarser pixels and back to its own size."""
    from PIL import Image

    if factor <= 1.0:
        return np.ascontiguousarray(img)
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BILINEAR), dtype=np.uint8)


def make_view(img: np.ndarray, view: int, image_path: str = "") -> np.ndarray:
    """View 0..7: a dihedral transform (label-preserving for nadir imagery); 8..19: ``augment``;
    20+: a coarser ground resolution (``coarsen``)."""
    view = int(view)
    if view < 0:
        raise ValueError(f"view numbers are >= 0, got {view}")
    if view < 8:
        return dihedral(img, view)
    if view < SCALE_VIEW_BASE:
        return augment(img, view, image_path)
    k = int(_view_rng(view, image_path).integers(8))
    return coarsen(dihedral(img, k), scale_factor(view))


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


def view_path(out_dir: Path, view: int) -> Path:
    return Path(out_dir) / f"view_{int(view)}.npy"


def cache_trunk(encoder, records: Sequence[CaptionRecord], views: Sequence[int], split: int,
                out_dir: Path, batch_size: int = 32, progress: bool = True) -> dict:
    """Trunk activations ``[n_images, C, H, W]`` (fp16) per view in ``out_dir/view_K.npy``.

    One file per view, so a run that adds views computes only the new ones. Written in chunk
    files so an interrupted run keeps what it computed; a finished view is reused when its
    manifest matches (same images, split and preprocessing).
    """
    from ..models.encoders import images_to_pixels

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"images": [r.image for r in records], "split": split, "preprocess": encoder.preprocess}
    man_path = out_dir / "manifest.json"
    if man_path.exists() and json.loads(man_path.read_text()) != manifest:
        raise ValueError(f"{out_dir} holds activations of other images or another preprocessing; remove it")
    man_path.write_text(json.dumps(manifest))
    todo = [int(v) for v in views if not view_path(out_dir, v).exists()]
    info = {"views_cached": [int(v) for v in views if int(v) not in todo], "views_computed": todo}
    if not todo:
        return {**info, "seconds": 0.0}
    tower = SplitTower(encoder.image_tower, split).eval()
    t0 = time.time()
    bar = None
    if progress:
        from .progress import bar as progress_bar

        bar = progress_bar(total=len(records) * len(todo), desc="cache trunk", unit="img")
    n_chunks = (len(records) + batch_size - 1) // batch_size
    with torch.no_grad():
        for v in todo:
            parts = []
            for c in range(n_chunks):
                part = out_dir / f"part_{v}_{c:05d}.npy"
                recs = records[c * batch_size:(c + 1) * batch_size]
                if not part.exists():
                    imgs = [make_view(read_rgb(r.image), v, r.image) for r in recs]
                    px = torch.cat([images_to_pixels([im], encoder.preprocess) for im in imgs])
                    h = tower.trunk(px).to(torch.float16).numpy()
                    tmp = part.with_suffix(".tmp.npy")
                    np.save(tmp, h)
                    tmp.rename(part)
                parts.append(part)
                if bar:
                    bar.update(len(recs))
            arr = np.concatenate([np.load(p) for p in parts])
            tmp = out_dir / f"view_{v}.tmp.npy"
            np.save(tmp, arr)
            tmp.rename(view_path(out_dir, v))
            for p in parts:
                p.unlink()
    if bar:
        bar.close()
    return {**info, "seconds": round(time.time() - t0, 1)}

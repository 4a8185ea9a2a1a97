"""Tile pairs with a known answer, built from the labelled scene images of the shared data sets.

There is no labelled change data set here, so pairs are made from single images whose scene is
known (UCM, RSICD, RSSCN7, EuroSAT), each pair an anchor image "before" and an "after" image:

* ``different``: another image of a scene with no class in common -> a change of land use (1);
* ``half_different``: the anchor with one half replaced by such an image -> a change (1);
* ``same_scene``: another image of the same scene label (a replanted field, another roof colour,
  another street of the same kind of housing) -> no change (0);
* ``half_same``: one half replaced by an image of the same label -> no change (0);
* ``photometric``: the anchor re-lit, another sensor's colour response, a hue shift (season),
  blur, noise -> no change (0);
* ``geometric``: the anchor misregistered by 1-3 px, turned by up to 2 degrees, scaled by up to
  3 % -> no change (0);
* ``both``: photometric and geometric together -> no change (0).

The "after" image of every swap is also re-lit with probability one half, so no kind of pair can
be told by its colours alone. Train pairs come only from train splits, val pairs only from val
splits: the scorer is fitted on the first and measured on the second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KINDS = ("different", "half_different", "same_scene", "half_same", "photometric", "geometric", "both")
POSITIVE = {"different", "half_different"}
# ground metres per pixel of each set's images (None: varies); what the scene head is told
SET_GROUND_M = {"ucm": 0.3, "rsicd": None, "rsscn7": None, "eurosat": 10.0}


@dataclass
class Item:
    set: str
    path: str
    label: str
    positives: frozenset  # scene-vocabulary classes that are right for the label


def labelled_images(shared: Path, split: str, vocab) -> dict[str, list[Item]]:
    """The images of ``split`` of each set with their labels mapped onto the scene vocabulary."""
    from ..data.datasets import UCM_CLASSES, load_karpathy, ucm_label

    out: dict[str, list[Item]] = {}
    ucm = load_karpathy(shared / "ucm_captions" / "dataset.json").split(split)
    out["ucm"] = [Item("ucm", r.image, UCM_CLASSES[ucm_label(r.image_id)],
                       frozenset(vocab.positives("ucm", UCM_CLASSES[ucm_label(r.image_id)]))) for r in ucm.records]
    rsicd = load_karpathy(shared / "rsicd" / "dataset.json").split(split)
    out["rsicd"] = [Item("rsicd", r.image, rsicd.classes[r.label], frozenset(vocab.positives("rsicd", rsicd.classes[r.label])))
                    for r in rsicd.records if r.label is not None]
    index = json.loads((shared / "scenes" / "index.json").read_text())
    for name in ("rsscn7", "eurosat"):
        out[name] = [Item(name, str(shared / "scenes" / im["path"]), im["class"],
                          frozenset(vocab.positives(name, im["class"])))
                     for im in index[name]["images"] if im["split"] == split]
    return out


# ------------------------------------------------------------------------------------ jitter
def photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light, sensor and season: gains, brightness, contrast, gamma, saturation, hue, a light
    gradient, sometimes blur, noise."""
    from PIL import Image, ImageFilter

    x = img.astype(np.float32) / 255.0
    x = x * rng.uniform(0.85, 1.15, 3) * rng.uniform(0.75, 1.25)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.7, 1.3) + mean
    x = np.clip(x, 0, 1) ** rng.uniform(0.75, 1.35)
    gray = x.mean(2, keepdims=True)
    x = gray + (x - gray) * rng.uniform(0.6, 1.4)
    x = _hue_rotate(x, np.radians(rng.uniform(-20, 20)))
    h, w = x.shape[:2]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * np.linspace(-1, 1, w)[None, :] + np.sin(angle) * np.linspace(-1, 1, h)[:, None])
    x = x * (1 + rng.uniform(0, 0.15) * ramp)[..., None]
    x = x + rng.normal(0, rng.uniform(0, 0.02), x.shape)
    out = (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)
    if rng.random() < 0.3:
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0))))
    return out


def _hue_rotate(x: np.ndarray, theta: float) -> np.ndarray:
    """Rotate the chroma plane of YIQ by ``theta``: greens drift to yellow or blue."""
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
    rot = np.array([[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]], np.float32)
    m = np.linalg.inv(to_yiq) @ rot @ to_yiq
    return x @ m.T.astype(np.float32)


def geometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Misregistration: a 1-3 px shift in a random direction, up to 2 degrees of turn and 3 % of
    scale, resampled bilinearly; edges reflected (no black border a model could see)."""
    from PIL import Image

    pad = 12
    big = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    h, w = img.shape[:2]
    dist, direction = rng.uniform(1, 3), rng.uniform(0, 2 * np.pi)
    dx, dy = dist * np.cos(direction), dist * np.sin(direction)
    a, s = np.radians(rng.uniform(-2, 2)), rng.uniform(0.97, 1.03)
    cx, cy = big.shape[1] / 2, big.shape[0] / 2
    ca, sa = np.cos(a) / s, np.sin(a) / s
    # output (x, y) -> input: rotate/scale about the centre, then shift
    coeffs = (ca, -sa, cx - ca * cx + sa * cy + dx, sa, ca, cy - sa * cx - ca * cy + dy)
    out = Image.fromarray(big).transform(big.shape[1::-1], Image.AFFINE, coeffs, resample=Image.BILINEAR)
    return np.asarray(out)[pad:pad + h, pad:pad + w]


def half_swap(img: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    if other.shape[:2] != (h, w):
        other = np.asarray(Image.fromarray(other).resize((w, h), Image.BILINEAR))
    out = img.copy()
    side = rng.integers(4)
    if side == 0:
        out[:, : w // 2] = other[:, : w // 2]
    elif side == 1:
        out[:, w // 2:] = other[:, w // 2:]
    elif side == 2:
        out[: h // 2] = other[: h // 2]
    else:
        out[h // 2:] = other[h // 2:]
    return out


# ------------------------------------------------------------------------------------- pairs
@dataclass
class Pair:
    set: str
    kind: str
    anchor: int  # index into the set's items
    other: int   # the swapped-in item (-1: none)
    seed: int

    @property
    def label(self) -> int:
        return int(self.kind in POSITIVE)


def make_pairs(items: list[Item], rng: np.random.Generator, anchors: int | None = None) -> list[Pair]:
    """Seven pairs per anchor, one of each kind; ``anchors`` None = every image is an anchor."""
    idx = np.arange(len(items))
    if anchors is not None and anchors < len(items):
        idx = np.sort(rng.choice(len(items), anchors, replace=False))
    by_label: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_label.setdefault(it.label, []).append(i)
    pairs = []
    for i in idx:
        i = int(i)
        same = [j for j in by_label[items[i].label] if j != i]
        diff = [j for j in range(len(items)) if not (items[j].positives & items[i].positives)]
        if not same or not diff:
            continue
        for kind in KINDS:
            other = -1
            if kind in ("different", "half_different"):
                other = int(diff[rng.integers(len(diff))])
            elif kind in ("same_scene", "half_same"):
                other = int(same[rng.integers(len(same))])
            pairs.append(Pair(items[i].set, kind, i, other, int(rng.integers(2 ** 31))))
    return pairs


def after_image(pair: Pair, load) -> np.ndarray:
    """The pair's "after" image; ``load(index)`` reads an item of the pair's set as HxWx3 uint8."""
    rng = np.random.default_rng(pair.seed)
    a = load(pair.anchor)
    if pair.kind == "photometric":
        return photometric(a, rng)
    if pair.kind == "geometric":
        return geometric(a, rng)
    if pair.kind == "both":
        return photometric(geometric(a, rng), rng)
    b = load(pair.other)
    out = half_swap(a, b, rng) if pair.kind.startswith("half_") else b
    return photometric(out, rng) if rng.random() < 0.5 else out

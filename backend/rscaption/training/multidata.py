"""Several training sets as one: caption datasets, class-only scene datasets and image folders.

A run config lists sets under ``data.sets``::

    data:
      sets:
        - {name: ucm, path: ../shared/data/ucm_captions/dataset.json, weight: 2, views: [0, 1, 23, 26],
           ground_m: 0.3, tile_px: 256}
        - {name: eurosat, kind: scenes, path: ../shared/data/scenes/index.json, subset: eurosat,
           weight: 0.5, views: [0], ground_m: 10, tile_px: 64}
        - {name: mine, kind: folder, path: /data/my_scenes}        # one sub-folder per class

``kind`` is ``captions`` (any format ``datasets.load_dataset`` reads; the default), ``scenes``
(a ``scenes/index.json`` with class labels) or ``folder`` (class-named sub-folders, optionally
``train/`` and ``val/`` above them). Class-only sets get captions from the scene vocabulary's
written caption sets. ``weight`` is how many images of the set an epoch draws per image it has
(2 = each image twice per epoch on average, 0.5 = half of them), so a small, well-captioned set
is not drowned by a large class-only one. ``views`` are the cached views of each train image
(``features.make_view``; 20+ are coarser-resolution views). ``ground_m``/``tile_px`` describe
the ground footprint the set represents and go into the model card.

Every image gets the list of scene-vocabulary classes that are right for it (``positives``) and
its set's ``label_space`` (the classes the set can name), which is what the scene loss needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import TrainError
from ..data.datasets import IMAGE_EXTENSIONS, CaptionRecord, check_images, load_dataset
from ..data.scene_vocab import SceneVocab


@dataclass
class SetSpec:
    name: str
    kind: str
    path: str
    subset: str | None = None
    images: str | None = None
    weight: float = 1.0
    views: list[int] = field(default_factory=lambda: [0])
    train_split: str = "train"
    val_split: str = "val"
    ground_m: float | None = None
    ground_note: str | None = None
    tile_px: int | None = None
    limit_train: int | None = None
    limit_val: int | None = None

    @classmethod
    def from_config(cls, raw: dict, resolve, default_views) -> "SetSpec":
        if not isinstance(raw, dict) or not raw.get("path"):
            raise TrainError(f"each entry of data.sets needs a 'path': {raw!r}")
        kind = str(raw.get("kind", "captions"))
        if kind not in ("captions", "scenes", "folder"):
            raise TrainError(f"data.sets kind must be captions, scenes or folder, not '{kind}'")
        name = str(raw.get("name") or raw.get("subset") or Path(str(raw["path"])).parent.name)
        weight = float(raw.get("weight", 1.0))
        if weight <= 0:
            raise TrainError(f"data.sets '{name}': weight must be > 0")
        return cls(name=name, kind=kind, path=resolve(raw["path"]), subset=raw.get("subset"),
                   images=resolve(raw["images"]) if raw.get("images") else None, weight=weight,
                   views=[int(v) for v in raw.get("views", default_views)],
                   train_split=str(raw.get("train_split", "train")), val_split=str(raw.get("val_split", "val")),
                   ground_m=raw.get("ground_m"), ground_note=raw.get("ground_note"), tile_px=raw.get("tile_px"),
                   limit_train=raw.get("limit_train"), limit_val=raw.get("limit_val"))

    def key(self) -> dict:
        """What the cached activations of this set depend on."""
        return {"kind": self.kind, "path": self.path, "subset": self.subset, "images": self.images,
                "limit_train": self.limit_train, "limit_val": self.limit_val}


@dataclass
class LoadedSet:
    spec: SetSpec
    train: list[CaptionRecord]
    val: list[CaptionRecord]
    class_names: list[str]           # the set's own labels (record.label indexes these)
    has_captions: bool               # real captions (else written class captions)
    label_space: list[int] = field(default_factory=list)   # vocabulary classes the set can name
    positives: dict[int, list[int]] = field(default_factory=dict)  # own label -> vocab classes


def _scene_records(spec: SetSpec) -> tuple[list[CaptionRecord], list[str]]:
    path = Path(spec.path)
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot read scene index {path}: {exc}") from None
    entry = index.get(spec.subset) if spec.subset else (next(iter(index.values())) if len(index) == 1 else None)
    if not isinstance(entry, dict) or "images" not in entry:
        raise TrainError(f"{path}: no scene set '{spec.subset}' (has: {', '.join(index)})")
    classes = list(entry.get("classes") or sorted({im["class"] for im in entry["images"]}))
    pos = {c: i for i, c in enumerate(classes)}
    root = Path(spec.images) if spec.images else path.parent
    recs = [CaptionRecord(image_id=im["path"], captions=[], split=str(im.get("split", "train")),
                          image=str((root / im["path"]).resolve()), label=pos[im["class"]], dataset=spec.name)
            for im in entry["images"]]
    return recs, classes


def _folder_records(spec: SetSpec) -> tuple[list[CaptionRecord], list[str]]:
    """``root/<class>/*`` (all train unless ``root/train`` and ``root/val`` exist)."""
    root = Path(spec.path)
    if not root.is_dir():
        raise TrainError(f"image folder not found: {root}")
    split_dirs = [(s, root / s) for s in ("train", "val") if (root / s).is_dir()] or [("train", root)]
    classes = sorted({d.name for _, sd in split_dirs for d in sd.iterdir() if d.is_dir()})
    if not classes:
        raise TrainError(f"{root} has no class sub-folders")
    recs = []
    for split, sd in split_dirs:
        for k, c in enumerate(classes):
            for f in sorted((sd / c).glob("*")) if (sd / c).is_dir() else []:
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    recs.append(CaptionRecord(image_id=f"{c}/{f.name}", captions=[], split=split,
                                              image=str(f.resolve()), label=k, dataset=spec.name))
    return recs, classes


def load_set(spec: SetSpec, vocab: SceneVocab) -> LoadedSet:
    if spec.kind == "captions":
        ds = load_dataset(spec.path, images_dir=spec.images, check=False)
        recs, classes = ds.records, list(ds.classes or [])
        has_captions = True
    elif spec.kind == "scenes":
        recs, classes = _scene_records(spec)
        has_captions = False
    else:
        recs, classes = _folder_records(spec)
        has_captions = False
    train = [r for r in recs if r.split == spec.train_split][: spec.limit_train or None]
    val = [r for r in recs if r.split == spec.val_split][: spec.limit_val or None]
    if not train:
        raise TrainError(f"data set '{spec.name}' ({spec.path}) has no images in split '{spec.train_split}'")
    check_images(train + val, what=spec.path)
    out = LoadedSet(spec, train, val, classes, has_captions)
    if classes:
        out.positives = {k: vocab.positives(spec.name, c) for k, c in enumerate(classes)}
        out.label_space = sorted({i for p in out.positives.values() for i in p})
    if not has_captions:
        if not classes:
            raise TrainError(f"data set '{spec.name}' has neither captions nor classes")
        for r in train + val:
            r.captions = vocab.class_captions(spec.name, classes[r.label])
    return out


@dataclass
class Samples:
    """Flat (record, view) samples of one split across every set, in set-major, view, record order
    (the order the trunk caches are concatenated in)."""

    records: list[CaptionRecord]     # one per image
    record_set: np.ndarray           # set index per image
    sample_record: np.ndarray        # image index per sample
    sample_view: np.ndarray
    sample_set: np.ndarray

    def __len__(self) -> int:
        return len(self.sample_record)


class MultiSet:
    def __init__(self, sets: list[LoadedSet], vocab: SceneVocab):
        self.sets = sets
        self.vocab = vocab
        self.train = self._samples("train")
        self.val = self._samples("val")
        self.drawable = self._drawable()

    def _samples(self, split: str) -> Samples:
        recs, rset, srec, sview, sset = [], [], [], [], []
        for si, s in enumerate(self.sets):
            base = len(recs)
            own = s.train if split == "train" else s.val
            recs.extend(own)
            rset.extend([si] * len(own))
            for v in (s.spec.views if split == "train" else [0]):
                srec.extend(range(base, base + len(own)))
                sview.extend([v] * len(own))
                sset.extend([si] * len(own))
        a = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
        return Samples(recs, a(rset), a(srec), a(sview), a(sset))

    def positives_of(self, rec_index: int, split: str = "train") -> list[int]:
        samples = self.train if split == "train" else self.val
        r = samples.records[rec_index]
        s = self.sets[int(samples.record_set[rec_index])]
        return s.positives.get(r.label, []) if r.label is not None else []

    def scene_targets(self, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """``(positives, allowed)`` boolean ``[n_images, n_classes]``: classes that are right for
        the image, and classes its set can name (the support of its scene softmax)."""
        samples = self.train if split == "train" else self.val
        k = len(self.vocab)
        pos = np.zeros((len(samples.records), k), bool)
        allowed = np.zeros((len(samples.records), k), bool)
        for i in range(len(samples.records)):
            s = self.sets[int(samples.record_set[i])]
            pos[i, self.positives_of(i, split)] = True
            allowed[i, s.label_space] = True
        return pos, allowed

    def _drawable(self) -> np.ndarray:
        """Train samples that epochs may draw: not a coarser-resolution view of an image whose
        scene is one of the vocabulary's fine-detail classes (``coarse_views: false``)."""
        from .features import SCALE_VIEW_BASE

        ok = np.ones(len(self.train), bool)
        fine = sorted(self.vocab.fine_detail)
        if fine:
            pos, _ = self.scene_targets("train")
            fine_img = pos[:, fine].any(1)
            ok &= ~((self.train.sample_view >= SCALE_VIEW_BASE) & fine_img[self.train.sample_record])
        return ok

    def epoch_order(self, rng: np.random.Generator, weights: dict | None = None) -> np.ndarray:
        """Train sample indices for one epoch: ``round(weight * n_images)`` draws per set, spread
        over its drawable views without repeats until every such sample of the set was drawn once.
        ``weights`` (set name -> weight) overrides the sets' own for one stage (the mapping's)."""
        weights = weights or {}
        unknown = set(weights) - {s.spec.name for s in self.sets}
        if unknown:
            raise TrainError(f"set weights name unknown sets: {', '.join(sorted(unknown))}")
        out = []
        for si, s in enumerate(self.sets):
            idx = np.flatnonzero((self.train.sample_set == si) & self.drawable)
            want = int(round(float(weights.get(s.spec.name, s.spec.weight)) * len(s.train)))
            reps = [rng.permutation(idx) for _ in range(-(-want // max(1, len(idx))))]
            out.append(np.concatenate(reps)[:want] if reps else idx[:0])
        order = np.concatenate(out)
        return order[rng.permutation(len(order))]

    def footprints(self) -> list[dict]:
        """The ground footprint each training set represents (for the model card)."""
        out = []
        for s in self.sets:
            f = {"dataset": s.spec.name, "train_images": len(s.train)}
            if s.spec.ground_m:
                f["ground_m_per_px"] = float(s.spec.ground_m)
            if s.spec.ground_note:
                f["ground_note"] = s.spec.ground_note
            if s.spec.tile_px:
                f["tile_px"] = int(s.spec.tile_px)
                if s.spec.ground_m:
                    f["footprint_m"] = round(float(s.spec.ground_m) * int(s.spec.tile_px), 1)
            out.append(f)
        return out


def load_multiset(data_cfg: dict, resolve, default_views, vocab: SceneVocab) -> MultiSet:
    sets_cfg = data_cfg.get("sets")
    if not sets_cfg:
        raise TrainError("data.sets is empty")
    specs = [SetSpec.from_config(raw, resolve, default_views) for raw in sets_cfg]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise TrainError(f"data.sets names must be unique: {', '.join(names)}")
    return MultiSet([load_set(s, vocab) for s in specs], vocab)

"""Caption dataset loaders: Karpathy ``dataset.json`` (UCM, Sydney, RSICD, RSITMD), NWPU-Captions,
COCO captions and caption-only jsonl files, all reduced to one record type.

Everything downstream (feature caching, tokenizer and LM training, evaluation) only sees
:class:`CaptionRecord`, so adding a dataset format means adding one loader here and nothing else.
Image files are never copied: records point at the files where they are.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import RscaptionError

#: The 21 UC Merced Land Use classes in alphabetical order; image ``N`` belongs to class
#: ``(N - 1) // 100`` (1-based numbering, 100 images per class).
UCM_CLASSES = (
    "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral",
    "denseresidential", "forest", "freeway", "golfcourse", "harbor", "intersection",
    "mediumresidential", "mobilehomepark", "overpass", "parkinglot", "river", "runway",
    "sparseresidential", "storagetanks", "tenniscourt",
)

#: Human-readable names for prompts ("an aerial image of a dense residential area"): the
#: concatenated folder names above read badly to a sentence encoder.
UCM_CLASS_PHRASES = (
    "agricultural field", "airplane", "baseball diamond", "beach", "buildings", "chaparral",
    "dense residential area", "forest", "freeway", "golf course", "harbor", "intersection",
    "medium residential area", "mobile home park", "overpass", "parking lot", "river", "runway",
    "sparse residential area", "storage tanks", "tennis court",
)

IMAGE_EXTENSIONS = (".webp", ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


class DatasetError(RscaptionError):
    """A dataset file is missing, malformed, or refers to images that are not there."""


@dataclass
class CaptionRecord:
    """One image (or one caption group without an image) and its reference captions."""

    image_id: str
    captions: list[str]
    split: str
    image: str | None = None  # absolute path; None for caption-only sources
    label: int | None = None  # scene class index into ``DatasetInfo.classes``
    dataset: str = ""


@dataclass
class CaptionDataset:
    """Records plus what is known about the dataset as a whole (class names for accuracy)."""

    name: str
    records: list[CaptionRecord]
    classes: tuple[str, ...] | None = None
    class_phrases: tuple[str, ...] | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    def split(self, *names: str) -> "CaptionDataset":
        """Keep only records of the given splits (``"all"`` keeps everything)."""
        if not names or "all" in names:
            return self
        wanted = set(names)
        return CaptionDataset(self.name, [r for r in self.records if r.split in wanted],
                              self.classes, self.class_phrases, self.source, dict(self.extra))

    def limit(self, n: int | None) -> "CaptionDataset":
        if not n or n <= 0:
            return self
        return CaptionDataset(self.name, self.records[:n], self.classes, self.class_phrases,
                              self.source, dict(self.extra))

    def __len__(self) -> int:
        return len(self.records)

    def splits(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.split] = out.get(r.split, 0) + 1
        return out

    def texts(self) -> list[str]:
        return [c for r in self.records for c in r.captions]


# --------------------------------------------------------------------------------------------
# caption text normalisation


_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")
_MULTISPACE = re.compile(r"\s+")


def normalize_caption(text: str) -> str:
    """Lower-case, single-spaced, one closing full stop attached to the last word.

    The source datasets disagree on casing and on " ." versus "." endings; training the LM on one
    form keeps the vocabulary small and makes generated captions look the same whatever data a
    model was trained on. Scores are unaffected: the PTB tokenizer used for evaluation lower-cases
    and drops punctuation anyway.
    """
    t = _MULTISPACE.sub(" ", str(text).strip().lower())
    t = _SPACE_BEFORE_PUNCT.sub(r"\1", t)
    t = t.rstrip(" .")
    return (t + ".") if t else ""


# --------------------------------------------------------------------------------------------
# class labels from file names


def ucm_label(filename: str) -> int | None:
    """Class of a UCM image from its number (``N.webp`` / ``N.tif``), None when not numeric."""
    stem = Path(filename).stem
    if not stem.isdigit():
        return None
    n = int(stem)
    if n < 1 or (n - 1) // 100 >= len(UCM_CLASSES):
        return None
    return (n - 1) // 100


_PREFIX_LABEL = re.compile(r"^([A-Za-z][A-Za-z_ -]*?)[_ -]?\d+$")


def prefix_label(filename: str) -> str | None:
    """Class name from ``airport_12.jpg`` style names (RSICD, NWPU), None if the name has none."""
    m = _PREFIX_LABEL.match(Path(filename).stem)
    return m.group(1).lower() if m else None


# --------------------------------------------------------------------------------------------
# loaders


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"dataset file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from None


def _default_images_dir(path: Path) -> Path:
    """Where images usually sit next to a caption file: ``imgs/`` or ``images/``, else beside it."""
    for name in ("imgs", "images", "Images", "imgs_all"):
        if (path.parent / name).is_dir():
            return path.parent / name
    return path.parent


def _resolve(images_dir: Path | None, *parts: str) -> str | None:
    if images_dir is None:
        return None
    return str((images_dir.joinpath(*[p for p in parts if p])).resolve())


def check_images(records: Sequence[CaptionRecord], what: str = "dataset", show: int = 5) -> None:
    """Raise one :class:`DatasetError` naming how many image files are missing and the first few.

    One error instead of a failure deep inside a training epoch: a wrong ``--images`` folder is the
    common cause, and the first names usually make that obvious.
    """
    missing = [r.image for r in records if r.image is not None and not os.path.isfile(r.image)]
    if missing:
        first = ", ".join(missing[:show])
        more = f" (and {len(missing) - show} more)" if len(missing) > show else ""
        raise DatasetError(
            f"{len(missing)} of {len(records)} image files of {what} are missing: {first}{more}; "
            "pass the image folder with --images"
        )


def load_karpathy(path, images_dir=None, check: bool = True, require_images: bool = True) -> CaptionDataset:
    """Karpathy-split ``dataset.json`` as used by UCM-, Sydney-Captions, RSICD and RSITMD.

    ``images_dir`` defaults to ``imgs/`` or ``images/`` beside the file. With
    ``require_images=False`` (caption text only, e.g. for LM pretraining) image paths are None.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or "images" not in data:
        raise DatasetError(f"{path} is not a Karpathy dataset.json (no 'images' list)")
    name = str(data.get("dataset", path.parent.name or "karpathy"))
    img_dir = Path(images_dir) if images_dir else (_default_images_dir(path) if require_images else None)
    is_ucm = name.lower().startswith("ucm") or "ucm" in path.parent.name.lower()
    records: list[CaptionRecord] = []
    prefix_names: set[str] = set()
    for i, im in enumerate(data["images"]):
        fn = im.get("filename") or im.get("file_name")
        if fn is None:
            raise DatasetError(f"{path}: image entry {i} has no 'filename'")
        caps = [s.get("raw") or " ".join(s.get("tokens", [])) for s in im.get("sentences", [])]
        caps = [c.strip() for c in caps if c and c.strip()]
        rec = CaptionRecord(
            image_id=str(fn), captions=caps, split=str(im.get("split", "train")),
            image=_resolve(img_dir, im.get("filepath", ""), fn) if require_images else None,
            dataset=name,
        )
        if is_ucm:
            rec.label = ucm_label(fn)
        else:
            # RSICD-style files carry the scene in a 'class' field; others in the file name
            p = str(im["class"]) if im.get("class") else prefix_label(fn)
            if p:
                prefix_names.add(p)
            rec.extra_label = p  # type: ignore[attr-defined]
        records.append(rec)
    classes = phrases = None
    if is_ucm:
        classes, phrases = UCM_CLASSES, UCM_CLASS_PHRASES
    elif prefix_names and all(getattr(r, "extra_label", None) for r in records):
        classes = tuple(sorted(prefix_names))
        phrases = tuple(c.replace("_", " ") for c in classes)
        index = {c: k for k, c in enumerate(classes)}
        for r in records:
            r.label = index[r.extra_label]  # type: ignore[attr-defined]
    for r in records:
        if hasattr(r, "extra_label"):
            del r.extra_label  # type: ignore[attr-defined]
    ds = CaptionDataset(name, records, classes, phrases, source=str(path))
    if check and require_images:
        check_images(records, what=str(path))
    return ds


def load_nwpu(path, images_dir=None, check: bool = True) -> CaptionDataset:
    """NWPU-Captions: ``{category: [{filename, split, raw, raw_1..raw_4, ...}]}``.

    Images are looked for as ``<images_dir>/<category>/<filename>`` (the layout of the
    NWPU-RESISC45 download) and, failing that, directly in ``images_dir``.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DatasetError(f"{path} is not an NWPU-Captions file (expected {{category: [images]}})")
    img_dir = Path(images_dir) if images_dir else _default_images_dir(path)
    classes = tuple(sorted(data))
    records: list[CaptionRecord] = []
    for k, cat in enumerate(classes):
        for i, im in enumerate(data[cat]):
            fn = im.get("filename")
            if fn is None:
                raise DatasetError(f"{path}: entry {i} of '{cat}' has no 'filename'")
            caps = [im.get(key) for key in ("raw", "raw_1", "raw_2", "raw_3", "raw_4", "raw_5")]
            caps = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
            nested = img_dir / cat / fn
            flat = img_dir / fn
            image = nested if nested.exists() or not flat.exists() else flat
            records.append(CaptionRecord(
                image_id=str(fn), captions=caps, split=str(im.get("split", "train")),
                image=str(image.resolve()), label=k, dataset="NWPU-Captions",
            ))
    ds = CaptionDataset("NWPU-Captions", records, classes,
                        tuple(c.replace("_", " ") for c in classes), source=str(path))
    if check:
        check_images(records, what=str(path))
    return ds


def load_coco(path, images_dir=None, split: str | None = None, check: bool = True) -> CaptionDataset:
    """COCO captions JSON (``images`` + ``annotations``).

    COCO files carry no split inside; the split is an image's own ``split`` field if present,
    else ``split`` given here, else guessed from the file name (``captions_val2017.json``).
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise DatasetError(f"{path} is not a COCO captions file (needs 'images' and 'annotations')")
    if split is None:
        stem = path.stem.lower()
        split = "val" if "val" in stem else "test" if "test" in stem else "train"
    img_dir = Path(images_dir) if images_dir else _default_images_dir(path)
    caps: dict = {}
    for a in data["annotations"]:
        caps.setdefault(a["image_id"], []).append(str(a["caption"]).strip())
    records = []
    for im in data["images"]:
        fn = im.get("file_name") or im.get("filename")
        records.append(CaptionRecord(
            image_id=str(im.get("id", fn)), captions=caps.get(im.get("id"), []),
            split=str(im.get("split", split)), image=_resolve(img_dir, fn), dataset="COCO",
        ))
    ds = CaptionDataset("COCO", records, source=str(path))
    if check:
        check_images(records, what=str(path))
    return ds


def load_caption_jsonl(path) -> CaptionDataset:
    """Caption-only jsonl (``{"dataset", "filename", "split", "captions"}`` per line), no images.

    Used for LM pretraining and caption banks, so repeated padding captions (RSICD repeats some
    to reach five) are kept once per image.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"caption file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{n}: not JSON: {e}") from None
            seen, caps = set(), []
            for c in obj.get("captions", []):
                c = str(c).strip()
                if c and c not in seen:
                    seen.add(c)
                    caps.append(c)
            records.append(CaptionRecord(
                image_id=str(obj.get("filename", n)), captions=caps,
                split=str(obj.get("split", "train")), dataset=str(obj.get("dataset", path.stem)),
            ))
    return CaptionDataset(path.stem, records, source=str(path))


def detect_format(path) -> str:
    """``karpathy`` | ``nwpu`` | ``coco`` | ``jsonl`` from the file's content, not its name."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        return "jsonl"
    data = _read_json(path)
    if isinstance(data, dict):
        if "annotations" in data and "images" in data:
            return "coco"
        if "images" in data:
            return "karpathy"
        if data and all(isinstance(v, list) for v in data.values()):
            return "nwpu"
    raise DatasetError(f"cannot tell the format of {path} (not Karpathy, NWPU, COCO or jsonl)")


def load_dataset(path, images_dir=None, split: str | Iterable[str] | None = None,
                 check: bool = True, require_images: bool = True) -> CaptionDataset:
    """Load any supported caption file; ``split`` filters (a name, several, or None/"all")."""
    fmt = detect_format(path)
    if fmt == "karpathy":
        ds = load_karpathy(path, images_dir, check=False, require_images=require_images)
    elif fmt == "nwpu":
        ds = load_nwpu(path, images_dir, check=False)
    elif fmt == "coco":
        ds = load_coco(path, images_dir, check=False)
    else:
        ds = load_caption_jsonl(path)
    if split is not None:
        names = [split] if isinstance(split, str) else list(split)
        ds = ds.split(*names)
        if not ds.records:
            raise DatasetError(f"{path} has no images in split {', '.join(names)}")
    if check and require_images and fmt != "jsonl":
        check_images(ds.records, what=str(path))
    return ds


def caption_corpus(sources: Sequence[dict]) -> list[str]:
    """Normalised caption text from several sources for tokenizer/LM training.

    ``sources`` are ``{"path": ..., "splits": [...]}``; the split filter is how UCM val stays out
    of LM pretraining (the LM must never see the captions it is evaluated on).
    """
    texts: list[str] = []
    for src in sources:
        ds = load_dataset(src["path"], check=False, require_images=False)
        splits = src.get("splits")
        if splits:
            ds = ds.split(*splits)
        texts.extend(normalize_caption(c) for c in ds.texts())
    return [t for t in texts if t]

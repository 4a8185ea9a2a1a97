"""Dataset loaders on small fixture files written by the tests (plus the real UCM file when present)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from rscaption.data.datasets import (
    DatasetError, UCM_CLASSES, caption_corpus, detect_format, load_caption_jsonl, load_coco,
    load_dataset, load_karpathy, load_nwpu, normalize_caption, prefix_label, ucm_label,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _img(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)


def _karpathy(tmp_path: Path, name="UCM", files=("1.png", "205.png", "2100.png"), make=None):
    images = []
    for i, fn in enumerate(files):
        images.append({
            "filename": fn, "imgid": i, "split": "val" if i == 1 else "train", "sentids": [2 * i, 2 * i + 1],
            "sentences": [{"raw": f"There is a thing {i} .", "tokens": ["there"], "imgid": i, "sentid": 2 * i},
                          {"raw": f"Another thing {i} .", "tokens": ["another"], "imgid": i, "sentid": 2 * i + 1}],
        })
    p = tmp_path / "dataset.json"
    p.write_text(json.dumps({"dataset": name, "images": images}))
    for fn in (files if make is None else make):
        _img(tmp_path / "imgs" / fn)
    return p


def test_karpathy_ucm_labels_splits_and_paths(tmp_path):
    p = _karpathy(tmp_path)
    ds = load_karpathy(p)
    assert ds.classes == UCM_CLASSES and len(ds) == 3
    assert [r.label for r in ds.records] == [0, 2, 20]
    assert ds.records[0].captions == ["There is a thing 0 .", "Another thing 0 ."]
    assert ds.records[1].split == "val" and Path(ds.records[1].image).is_file()
    assert ds.splits() == {"train": 2, "val": 1}
    val = load_dataset(p, split="val")
    assert [r.image_id for r in val.records] == ["205.png"]


def test_missing_images_one_clear_error(tmp_path):
    p = _karpathy(tmp_path, files=("1.png", "2.png", "3.png", "4.png"), make=("1.png",))
    with pytest.raises(DatasetError) as e:
        load_karpathy(p)
    msg = str(e.value)
    assert "3 of 4 image files" in msg and "2.png" in msg and "--images" in msg
    # only the requested split is checked: split "val" holds 2.png, which is missing
    with pytest.raises(DatasetError, match="1 of 1"):
        load_dataset(p, split="val")
    # text-only use never needs the images
    assert len(load_karpathy(p, require_images=False).texts()) == 8


def test_karpathy_prefix_labels(tmp_path):
    p = _karpathy(tmp_path, name="RSICD", files=("airport_1.jpg", "beach_2.jpg", "airport_3.jpg"))
    ds = load_karpathy(p)
    assert ds.classes == ("airport", "beach")
    assert [r.label for r in ds.records] == [0, 1, 0]


def test_nwpu_loader(tmp_path):
    data = {
        "airplane": [{"filename": "airplane_001.jpg", "split": "train", "raw": "a plane .",
                      "raw_1": "b plane .", "raw_2": "c", "raw_3": "d", "raw_4": "e", "imgid": 0}],
        "beach": [{"filename": "beach_001.jpg", "split": "test", "raw": "sand .", "raw_1": "sea",
                   "raw_2": "x", "raw_3": "y", "raw_4": "z", "imgid": 1}],
    }
    p = tmp_path / "dataset_nwpu.json"
    p.write_text(json.dumps(data))
    _img(tmp_path / "imgs" / "airplane" / "airplane_001.jpg")
    _img(tmp_path / "imgs" / "beach_001.jpg")  # flat layout is found too
    assert detect_format(p) == "nwpu"
    ds = load_nwpu(p)
    assert ds.classes == ("airplane", "beach")
    assert ds.records[0].captions == ["a plane .", "b plane .", "c", "d", "e"]
    assert ds.records[1].label == 1 and ds.records[1].split == "test"
    (tmp_path / "imgs" / "beach_001.jpg").unlink()
    with pytest.raises(DatasetError, match="1 of 2"):
        load_nwpu(p)


def test_coco_loader(tmp_path):
    data = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 7, "id": 1, "caption": "a dog"},
                            {"image_id": 7, "id": 2, "caption": "a cat"},
                            {"image_id": 9, "id": 3, "caption": "a car"}]}
    p = tmp_path / "captions_val2017.json"
    p.write_text(json.dumps(data))
    _img(tmp_path / "images" / "a.jpg")
    _img(tmp_path / "images" / "b.jpg")
    assert detect_format(p) == "coco"
    ds = load_coco(p)
    assert [r.split for r in ds.records] == ["val", "val"]
    assert ds.records[0].captions == ["a dog", "a cat"] and ds.records[1].image_id == "9"


def test_caption_jsonl_and_corpus(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(
        json.dumps({"dataset": "rsicd", "filename": "a_1.jpg", "split": "train",
                    "captions": ["Many planes .", "Many planes .", "a runway"]}) + "\n"
        + json.dumps({"dataset": "rsicd", "filename": "a_2.jpg", "split": "test", "captions": ["x ."]}) + "\n")
    ds = load_caption_jsonl(p)
    assert ds.records[0].captions == ["Many planes .", "a runway"]  # padding repeats dropped
    assert caption_corpus([{"path": str(p), "splits": ["train"]}]) == ["many planes.", "a runway."]


def test_normalize_and_labels():
    assert normalize_caption("There is a  piece of Farmland .") == "there is a piece of farmland."
    assert normalize_caption("  ") == ""
    assert ucm_label("100.webp") == 0 and ucm_label("101.webp") == 1 and ucm_label("x.webp") is None
    assert ucm_label("2101.webp") is None
    assert prefix_label("storage_tanks_12.jpg") == "storage_tanks"


@pytest.mark.needs_data
def test_real_ucm_file():
    p = SHARED / "ucm_captions" / "dataset.json"
    if not p.exists():
        pytest.skip(f"shared data not found at {p}")
    ds = load_dataset(p, split="val")
    assert len(ds) == 210 and all(len(r.captions) == 5 for r in ds.records)
    counts = {}
    for r in ds.records:
        counts[r.label] = counts.get(r.label, 0) + 1
    assert sorted(counts) == list(range(21)) and min(counts.values()) >= 9

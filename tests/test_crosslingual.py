"""``--language zh``: a Chinese decoder trained on text (English text embedding + noise -> Chinese),
saved inside the checkpoint, reloaded, and used by the CLI. Tiny real models, no mocks."""

import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rscaption.errors import ModelError, TrainError
from rscaption.training import progress
from rscaption.evaluation.scenes import chinese_scene, english_scene, is_chinese
from rscaption.training.crosslingual import (attach_decoders, inject_noise, load_zh_pairs, train_decoder,
                                             zh_references, zh_scene_agreement)

PAIRS = [
    ("A residential area with houses arranged neatly .", "一个住宅区，房屋排列整齐."),
    ("Many houses with red roofs in the residential area .", "住宅区内有许多红顶的房子."),
    ("Two white airplanes parked on the airport .", "两架白色飞机停在机场上."),
    ("Some airplanes are parked at the airport .", "一些飞机停在机场上."),
    ("A wide river with dark green waters go through a meadow .", "一条宽阔的河流，深绿色的水穿过一片草原."),
    ("A small river with dense plants on both banks .", "一条小河，两岸长有茂密的植物."),
    ("This is a part of deep green sparkling sea .", "这是深绿色闪烁海面的一部分."),
    ("A part of ocean with deep green waters .", "海洋的一部分，深绿色的水面."),
    ("An industrial area with many white buildings .", "这是一个工业区，有许多白色建筑."),
    ("A straight runway with some mark lines on it .", "一条笔直的跑道上有一些标记线."),
    ("Some green bushes on the meadow .", "草原上有一些绿灌木丛."),
    ("There is a wide railway goes through the industrial area .", "有一条宽阔的铁路穿过工业区.###"),
]

CFG = {"vocab_size": 400, "lm": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 48, "dropout": 0.0,
                                 "max_steps": 60, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "log_every": 20},
       "epochs": 30, "batch_size": 2, "lr": 1e-2, "lm_lr": 3e-3, "warmup_steps": 5, "noise_std": 0.05}


def _dataset(path: Path) -> Path:
    """Karpathy-style Sydney CN file: two sentences per image, the last image in val."""
    images = []
    for k in range(0, len(PAIRS), 2):
        sents = [{"raw": en, "raw_chinese": zh, "tokens_chinese": list(zh)} for en, zh in PAIRS[k:k + 2]]
        images.append({"imgid": k // 2, "filename": f"{k}.tif", "split": "val" if k >= 10 else "train",
                       "sentences": sents})
    images[0]["sentences"].append({"raw": "An empty sentence .", "raw_chinese": "  "})  # skipped
    path.write_text(json.dumps({"dataset": "sydney", "images": images}, ensure_ascii=False), encoding="utf-8")
    return path


def test_scene_keywords_in_both_languages():
    assert english_scene("An industrial area with many white buildings and a lawn beside .") == "industrial"
    assert chinese_scene("这是一个工业区，有许多白色建筑，旁边是一个草坪.") == "industrial"
    assert english_scene("Some marking lines are on the runways while some lawns beside .") == "runway"
    assert chinese_scene("一些跑道上有一些标记线，旁边有一些草坪.") == "runway"
    assert english_scene("A wide river with dark green waters go through a meadow .") == "river"
    assert chinese_scene("一条宽阔的河流，深绿色的水穿过一片草原.") == "river"
    assert english_scene("This is a part of deep green sparkling sea .") == "ocean"
    assert chinese_scene("这是深绿色闪烁海面的一部分.") == "ocean"
    assert english_scene("There are lots of houses arranged neatly in the dense residential area .") == "residential"
    assert chinese_scene("在密集的住宅区内，大量房屋排列整齐.") == "residential"
    assert english_scene("Two white airplanes parked on the airport .") == "airport"
    assert chinese_scene("两架白色飞机停在机场上.") == "airport"
    assert english_scene("Some green bushes on the meadow .") == "meadow"
    assert chinese_scene("草原上有一些绿灌木丛.") == "meadow"
    assert english_scene("a road.") is None and chinese_scene("一条道路.") is None
    assert is_chinese("一条道路.") and not is_chinese("a road.")


def test_noise_moves_embeddings_by_the_configured_amount():
    d, std = 256, 0.09
    clean = torch.nn.functional.normalize(torch.randn(4000, d), dim=-1)
    noisy = inject_noise(clean, std, torch.Generator().manual_seed(0))
    assert torch.allclose(noisy.norm(dim=-1), torch.ones(4000), atol=1e-5)
    cos = float((noisy * clean).sum(-1).mean())
    assert cos == pytest.approx(1 / math.sqrt(1 + d * std ** 2), abs=0.01)
    assert torch.equal(inject_noise(clean, 0.0), clean)


def test_pairs_and_references_from_a_karpathy_file(tmp_path):
    data = _dataset(tmp_path / "sydney_cn.json")
    train = load_zh_pairs(data, "train")
    assert len(train) == 10 and train[0] == ("a residential area with houses arranged neatly.", "一个住宅区，房屋排列整齐.")
    val = load_zh_pairs(data, "val")
    assert val[-1][1] == "有一条宽阔的铁路穿过工业区."  # the stray ### is gone
    refs = zh_references(data, "val")
    assert refs[0] == refs[1] == [zh for _, zh in val]


def test_tiny_zh_decoder_trains_saves_reloads_and_captions_through_the_cli(tmp_path, monkeypatch):
    from rscaption.models.registry import load_model
    from rscaption.models.tiny import build_tiny_captioner

    torch.manual_seed(0)
    monkeypatch.setattr(progress, "ENABLED", False)
    data = _dataset(tmp_path / "sydney_cn.json")
    pairs = load_zh_pairs(data, "train")
    cap = build_tiny_captioner()
    run = tmp_path / "run"
    records = []
    rng = np.random.default_rng(0)
    cfg = {**CFG, "epochs": 2}
    train_decoder(cap, pairs, cfg, rng, run / "crosslingual" / "zh", log=records.append)
    epochs = [r for r in records if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [1, 2] and (run / "crosslingual" / "zh" / "last.pt").exists()
    # the training input is the noisy text embedding, as far from the clean one as noise_std says
    expect = 1 / math.sqrt(1 + cap.embed_dim * CFG["noise_std"] ** 2)
    assert epochs[0]["input_cosine"] == pytest.approx(expect, abs=0.03) and epochs[0]["input_cosine"] < 0.999

    # resume continues from epoch 2
    train_decoder(cap, pairs, CFG, np.random.default_rng(0), run / "crosslingual" / "zh", log=records.append)
    epochs = [r for r in records if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [1, 2] + list(range(3, CFG["epochs"] + 1))
    assert epochs[-1]["loss"] < epochs[0]["loss"]

    with pytest.raises(TrainError, match="another text tower"):
        attach_decoders(build_tiny_captioner(seed=1), run)
    assert attach_decoders(cap, run) == ["zh"]
    assert cap.languages == ["en", "zh"]
    model = cap.save(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    assert config["decoders"]["zh"]["path"] == "decoders/zh"
    assert (model / "decoders" / "zh" / "mapping.safetensors").is_file()

    loaded = load_model(str(model), device="cpu")
    assert loaded.languages == ["en", "zh"] and loaded.model_hash == cap.model_hash
    emb = loaded.embed_texts([en for en, _ in pairs[:4]])
    zh = loaded.caption(emb, language="zh")
    assert all(is_chinese(c) for c, _ in zh), zh
    assert all(is_chinese(c) for c, _ in loaded.caption(emb, beam_size=2, language="zh"))
    assert not any(is_chinese(c) for c, _ in loaded.caption(emb))  # English stays the default
    with pytest.raises(ModelError, match="languages: en, zh"):
        loaded.caption(emb, language="xx")

    report = zh_scene_agreement(loaded, load_zh_pairs(data, "val"), zh_references(data, "val"))
    for key in ("reference_scene_agreement", "keyword_ceiling", "char_BLEU-4"):
        assert 0.0 <= report[key] <= 1.0
    assert report["scene_agreement"] is None or 0.0 <= report["scene_agreement"] <= 1.0
    assert report["keyword_ceiling"] == 1.0 and report["examples"]

    # the CLI: --language zh writes Chinese captions and records the language
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin

    tif = tmp_path / "small.tif"
    arr = np.random.default_rng(0).integers(0, 255, (3, 96, 96), dtype=np.uint8)
    with rasterio.open(tif, "w", driver="GTiff", width=96, height=96, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, 0.3, 0.3)) as dst:
        dst.write(arr)
    out = tmp_path / "zh.gpkg"
    cli = [sys.executable, "-m", "rscaption.cli", "caption", str(tif), "-o", str(out), "--model", str(model),
           "--tile-size", "48", "--language", "zh", "-q"]
    r = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(out) as db:
        captions = [row[0] for row in db.execute("SELECT caption FROM tiles")]
    assert len(captions) == 4 and all(is_chinese(c) for c in captions), captions
    from rscaption.store.gpkg import TileStore

    with TileStore.open(str(out)) as store:
        assert store.metadata()["language"] == "zh"
    # resuming the same file in English would mix languages: refused in one line
    r = subprocess.run(cli[:-3] + ["-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "'zh'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cli[:-3] + ["--language", "xx", "-o", str(tmp_path / "xx.gpkg")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "languages: en, zh" in r.stderr and not (tmp_path / "xx.gpkg").exists()


def test_real_sydney_cn_file_splits_and_keyword_tables():
    from conftest import require_shared

    path = require_shared("captions_text", "sydney_cn_dataset.json")
    train, val = load_zh_pairs(path, "train"), load_zh_pairs(path, "val")
    assert len(train) == 497 * 5 and len(val) == 58 * 5
    both = [(english_scene(en), chinese_scene(zh)) for en, zh in train]
    both = [(a, b) for a, b in both if a and b]
    assert len(both) > 0.8 * len(train)
    assert sum(a == b for a, b in both) / len(both) > 0.9  # the tables agree on the human translations

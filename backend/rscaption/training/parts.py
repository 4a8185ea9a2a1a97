"""The pieces stages share: the run's data, encoders, scene prompts and captioner, built from its config.

Stages are functions of the run dir; everything they need to rebuild a model or a data split from the
config lives here, so no stage imports another.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import TrainError
from .config import resolve_path
from .rundir import Run


def caption_data(run: Run):
    from ..data.datasets import load_dataset

    d = run.cfg["data"]
    ds = load_dataset(resolve_path(d["captions"], run.cfg), images_dir=resolve_path(d.get("images"), run.cfg),
                      check=False)
    train = ds.split(d.get("train_split", "train"))
    val = ds.split(d.get("val_split", "val"))
    if d.get("limit_train"):
        train = train.limit(int(d["limit_train"]))
    if d.get("limit_val"):
        val = val.limit(int(d["limit_val"]))
    from ..data.datasets import check_images

    check_images(train.records + val.records, what=d["captions"])
    return ds, train, val


def lm_corpus(run: Run) -> list[str]:
    from ..data.datasets import caption_corpus

    sources = [{**s, "path": resolve_path(s["path"], run.cfg)} for s in run.cfg.get("lm_corpus", [])]
    if not sources:
        d = run.cfg["data"]
        sources = [{"path": resolve_path(d["captions"], run.cfg), "splits": [d.get("train_split", "train")]}]
    texts = caption_corpus(sources)
    if not texts:
        raise TrainError("the LM corpus is empty")
    return texts


def lit_encoder(run: Run):
    from ..models.encoders import lit_from_pretrained_parts

    e = run.cfg.get("encoder", {})
    weights = e.get("image_weights", "package")
    return lit_from_pretrained_parts(embed_dim=int(e.get("embed_dim", 256)), image_size=int(e.get("image_size", 256)),
                                     timm_name=e.get("timm_name", "efficientnet_lite0"), image_weights=weights)


def encoder_kind(run: Run) -> str:
    kind = run.cfg.get("encoder", {}).get("kind", "lit")
    if kind not in ("lit", "clip"):
        raise TrainError(f"encoder.kind must be 'lit' (pretrained towers, cached trunk) or 'clip' (fine-tune "
                         f"or train an open_clip / transformers CLIP), not '{kind}'")
    return kind


def clip_encoder_for(run: Run):
    from .clip_trainer import clip_encoder

    spec = run.cfg.get("encoder", {})
    return load_or_fail("CLIP encoder", str(spec.get("model") or spec.get("open_clip_config")),
                         lambda: clip_encoder(spec, resolve=lambda p: resolve_path(p, run.cfg)))


def device_for(run: Run):
    from ..device import pick_device

    return pick_device(run.cfg.get("device"))


def train_views(run: Run):
    e = run.cfg.get("encoder", {})
    return list(e.get("train_views", [0, 1, 4, 6])), [0]


def lm_source(run: Run) -> str | None:
    src = run.cfg.get("lm", {}).get("pretrained")
    if not src:
        return None
    local = resolve_path(src, run.cfg)
    return local if Path(local).exists() else str(src)  # else a hub name (needs network)


def load_or_fail(what: str, source: str, fn):
    """Loading errors of pretrained parts as one-line TrainErrors (the checkpoint loader's wording)."""
    from ..models.checkpoint import load_error

    try:
        return fn()
    except TrainError:
        raise
    except Exception as exc:
        raise TrainError(str(load_error(exc, source, what))) from None


def plan_of(run: Run):
    from .plan import build_plan

    if getattr(run, "_plan_cache", None) is None:
        run._plan_cache = build_plan(run.cfg, lambda p: resolve_path(p, run.cfg))
    return run._plan_cache


def pretrained_for_cut(run: Run, enc):
    """The frozen blocks between the cache cut and the fine-tuned part must be the pretrained ones."""
    from .lit_stages import _cut_points

    cache, to = _cut_points(run.cfg)
    return lit_encoder(run) if to > cache else enc


def prompt_texts(run: Run, ds):
    from .contrastive import PROMPT_TEMPLATE, class_prompts

    phrases = ds.class_phrases or ds.classes
    if float(run.cfg.get("contrastive", {}).get("class_loss_weight", 1.0)) == 0 and encoder_kind(run) == "clip":
        return []
    if not phrases:
        raise TrainError("the dataset has no scene classes; set contrastive.class_loss_weight: 0")
    return class_prompts(phrases, run.cfg.get("contrastive", {}).get("prompt_template", PROMPT_TEMPLATE))


def trained_encoder(run: Run):
    import torch

    st = torch.load(run.dir / "contrastive" / "last.pt", weights_only=True)
    if encoder_kind(run) == "clip":
        from .clip_trainer import load_trained_state

        enc = clip_encoder_for(run)
        load_trained_state(enc, st["encoder"])
        return enc.eval()
    enc = lit_encoder(run)
    enc.load_trainable(st["encoder"])
    return enc.eval()


def run_captioner(run: Run, enc=None, lm=None, mapping=None):
    import torch
    from transformers import AutoModelForCausalLM

    from ..models.captioner import Captioner
    from ..models.mapping import build_mapping
    from .lm import lm_width, load_tokenizer

    tok = load_tokenizer(run.dir / "tokenizer")
    enc = enc if enc is not None else trained_encoder(run)
    if lm is None:
        lm = AutoModelForCausalLM.from_pretrained(str(run.dir / "lm"), dtype=torch.float32).eval()
    if mapping is None:
        m = dict(run.cfg.get("mapping", {}).get("module", {"kind": "mlp", "prefix_length": 4}))
        m.setdefault("kind", "mlp")
        mapping = build_mapping({**m, "embed_dim": enc.embed_dim, "lm_hidden": lm_width(lm)})
    cap = Captioner(enc, mapping, lm, tok, card=model_card(run), model_id=run.cfg.get("name", "run"),
                    storage_dtype=run.cfg.get("export", {}).get("storage_dtype", "float16"))
    cap.precision = "fp32"  # val captioning and calibration in training give the same numbers on every CPU
    cap.train(False)
    return cap


def model_card(run: Run) -> dict:
    card = dict(run.cfg.get("export", {}).get("card", {}))
    card.setdefault("tile_size", int(run.cfg.get("encoder", {}).get("image_size", 256)))
    card.setdefault("training_config", run.cfg.get("name", Path(run.cfg.get("_config_path", "run")).stem))
    plan = plan_of(run)
    card.setdefault("trained_on", ", ".join(s.spec.name for s in plan.sets))
    if len(plan.vocab):
        card.setdefault("classes", list(plan.vocab.phrases))
    card.setdefault("training_sets", plan.footprints())
    return card


def trained_captioner(run: Run):
    """The run's captioner with the mapping and LM weights of the mapping stage."""
    import torch

    cap = run_captioner(run)
    st = torch.load(run.dir / "mapping" / "last.pt", weights_only=True)
    cap.mapping.load_state_dict(st["mapping"])
    cap.lm.load_state_dict(st["lm"])
    return cap

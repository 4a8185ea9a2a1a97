"""``rscaption train CONFIG``: a seeded, resumable, staged training run.

Stages (each usable alone with ``--stages``, each leaving its result in the run dir):

1. ``tokenizer``  byte-level BPE on the LM corpus, or the CLIP BPE, the MiniLM WordPiece, or a
                  pretrained LM's tokenizer (``tokenizer/``)
2. ``lm``         small GPT-2 pretrained on caption text (UCM val never included), or a pretrained
                  causal LM, optionally adapted to caption text (``lm/``)
3. ``features``   frozen trunk activations for every (train image, view) (``runs/cache``; views
                  0..7 dihedral, 8+ seeded crop + colour, see ``features.make_view``)
4. ``contrastive``LiT training of the last image blocks + projections, scene loss via class
                  prompts (``contrastive/``; per-epoch checkpoints); with ``encoder.kind: clip``
                  a whole open_clip / transformers CLIP, fine-tuned or from scratch, on images read
                  per step (``clip_trainer``; the features stage then has nothing to do)
5. ``embed``      image embeddings of every training view with the trained tower (``embeddings.pt``)
6. ``mapping``    prefix mapping (+ LM fine-tuning) on those embeddings (``mapping/``)
7. ``export``     the checkpoint directory (``model/``, copied to ``export.dir`` if set)
8. ``evaluate``   the exported model on the val split with ``rscaption evaluate`` (``eval.json``)

A run dir holds ``config.json`` (the resolved config), ``log.jsonl`` (one JSON object per epoch or
logging step) and per-stage state. ``--resume`` skips finished stages and continues an interrupted
stage from its last epoch; without it an existing run dir with progress is refused rather than
silently overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import RscaptionError, TrainError

STAGES = ("tokenizer", "lm", "features", "contrastive", "embed", "mapping", "export", "evaluate")
REPO_ROOT = Path(__file__).resolve().parents[3]


# --------------------------------------------------------------------------------------------
# config


def load_config(path, _seen=()) -> dict:
    """A YAML or JSON run config. ``extends: other.yaml`` (relative to this file) starts from another
    config and overrides it key by key (nested mappings merge, everything else replaces), so a
    variant states only what differs from the recipe it varies."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"training config not found: {path}")
    text = path.read_text()
    import yaml

    try:
        is_yaml = path.suffix.lower() in (".yaml", ".yml")
        cfg = yaml.safe_load(text) if is_yaml else json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise TrainError(f"{path}: not valid {'YAML' if is_yaml else 'JSON'}: "
                         f"{(str(exc).splitlines() or [''])[0]}") from None
    if not isinstance(cfg, dict):
        raise TrainError(f"{path}: a training config must be a mapping")
    base = cfg.pop("extends", None)
    if base:
        base_path = (path.parent / str(base)).resolve()
        if base_path in _seen:
            raise TrainError(f"{path}: 'extends' loops back to {base_path}")
        parent = load_config(base_path, (*_seen, path.resolve()))
        parent.pop("_config_path", None)
        cfg = merge_config(parent, cfg)
    cfg["_config_path"] = str(path.resolve())
    return cfg


def merge_config(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_path(p, cfg: dict) -> str | None:
    """Relative paths are tried from the working dir, then from the repo root (configs use
    ``../shared/data/...``, which is relative to the repo root)."""
    if p is None:
        return None
    p = Path(os.path.expanduser(str(p)))
    if p.is_absolute():
        return str(p)
    if p.exists():
        return str(p.resolve())
    base = Path(cfg.get("_config_path", ".")).parent.parent
    cand = (base / p)
    return str(cand.resolve()) if cand.exists() else str((REPO_ROOT / p).resolve())


def seed_everything(seed: int) -> np.random.Generator:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


class Run:
    """Run dir bookkeeping: stage markers, the JSONL log, and timing."""

    def __init__(self, cfg: dict, out: Path, resume: bool):
        self.cfg = cfg
        self.dir = Path(out)
        self.resume = resume
        if self.dir.exists() and (self.dir / "state.json").exists() and not resume:
            raise TrainError(f"run dir {self.dir} already has progress; pass --resume to continue it "
                             "or --out for a new run")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"done": {}}
        (self.dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        self.log_path = self.dir / "log.jsonl"
        self.cache_dir = Path(resolve_path(cfg.get("cache_dir", "runs/cache"), cfg))

    def done(self, stage: str) -> bool:
        return stage in self.state["done"]

    def mark(self, stage: str, info: dict) -> None:
        self.state["done"][stage] = info
        self.save_state()

    def save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, default=str))
        os.replace(tmp, self.state_path)

    def log(self, rec: dict) -> None:
        rec = {"time": round(time.time(), 1), **rec}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        print(json.dumps(rec, default=str), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# stage helpers


def _data(run: Run):
    from .datasets import load_dataset

    d = run.cfg["data"]
    ds = load_dataset(resolve_path(d["captions"], run.cfg), images_dir=resolve_path(d.get("images"), run.cfg),
                      check=False)
    train = ds.split(d.get("train_split", "train"))
    val = ds.split(d.get("val_split", "val"))
    if d.get("limit_train"):
        train = train.limit(int(d["limit_train"]))
    if d.get("limit_val"):
        val = val.limit(int(d["limit_val"]))
    from .datasets import check_images

    check_images(train.records + val.records, what=d["captions"])
    return ds, train, val


def _corpus(run: Run) -> list[str]:
    from .datasets import caption_corpus

    sources = [{**s, "path": resolve_path(s["path"], run.cfg)} for s in run.cfg.get("lm_corpus", [])]
    if not sources:
        d = run.cfg["data"]
        sources = [{"path": resolve_path(d["captions"], run.cfg), "splits": [d.get("train_split", "train")]}]
    texts = caption_corpus(sources)
    if not texts:
        raise TrainError("the LM corpus is empty")
    return texts


def _encoder(run: Run):
    from ..models.encoders import lit_from_pretrained_parts

    e = run.cfg.get("encoder", {})
    weights = e.get("image_weights", "package")
    return lit_from_pretrained_parts(embed_dim=int(e.get("embed_dim", 256)), image_size=int(e.get("image_size", 256)),
                                     timm_name=e.get("timm_name", "efficientnet_lite0"), image_weights=weights)


def _encoder_kind(run: Run) -> str:
    kind = run.cfg.get("encoder", {}).get("kind", "lit")
    if kind not in ("lit", "clip"):
        raise TrainError(f"encoder.kind must be 'lit' (pretrained towers, cached trunk) or 'clip' (fine-tune "
                         f"or train an open_clip / transformers CLIP), not '{kind}'")
    return kind


def _clip_encoder(run: Run):
    from .clip_trainer import clip_encoder

    spec = run.cfg.get("encoder", {})
    return _load_or_fail("CLIP encoder", str(spec.get("model") or spec.get("open_clip_config")),
                         lambda: clip_encoder(spec, resolve=lambda p: resolve_path(p, run.cfg)))


def _device(run: Run):
    from ..device import pick_device

    return pick_device(run.cfg.get("device"))


def _views(run: Run):
    e = run.cfg.get("encoder", {})
    return list(e.get("train_views", [0, 1, 4, 6])), [0]


def _save_checkpoint(state: dict, path: Path) -> None:
    """A stage's resumable state, replaced atomically: an interrupt never leaves half a file."""
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# stages


def _lm_source(run: Run) -> str | None:
    src = run.cfg.get("lm", {}).get("pretrained")
    if not src:
        return None
    local = resolve_path(src, run.cfg)
    return local if Path(local).exists() else str(src)  # else a hub name (needs network)


def _load_or_fail(what: str, source: str, fn):
    """Loading errors of pretrained parts as one-line TrainErrors (the checkpoint loader's wording)."""
    from ..models.checkpoint import load_error

    try:
        return fn()
    except TrainError:
        raise
    except Exception as exc:
        raise TrainError(str(load_error(exc, source, what))) from None


def stage_tokenizer(run: Run, rng):
    from .lm import make_tokenizer

    cfg = dict(run.cfg.get("tokenizer", {}))
    kind = cfg.get("kind", "bpe")
    if kind == "pretrained":
        cfg["path"] = resolve_path(cfg["path"], run.cfg) if cfg.get("path") else _lm_source(run)
    texts = _corpus(run) if kind == "bpe" else []
    tok = _load_or_fail(f"{kind} tokenizer", str(cfg.get("path", kind)),
                        lambda: make_tokenizer(cfg, texts, run.dir / "tokenizer"))
    info = {"kind": kind, "vocab_size": len(tok), "corpus_captions": len(texts)}
    run.log({"stage": "tokenizer", **info})
    return info


def stage_lm(run: Run, rng):
    """A fresh small GPT-2 pretrained on caption text, or a pretrained LM (``lm.pretrained``),
    optionally adapted to caption text for ``max_steps`` (default 0 for a pretrained LM)."""
    from .lm import build_lm, load_pretrained_lm, load_tokenizer, pretrain_lm

    tok = load_tokenizer(run.dir / "tokenizer")
    cfg = dict(run.cfg.get("lm", {}))
    source = _lm_source(run)
    if source:
        lm = _load_or_fail("pretrained language model", source, lambda: load_pretrained_lm(source, tok))
        cfg.setdefault("max_steps", 0)
    else:
        lm = build_lm(tok, cfg)
    hist = []
    if int(cfg.get("max_steps", 1000)) > 0:
        hist = pretrain_lm(lm, tok, _corpus(run), cfg, rng, log=run.log)
    lm.eval()
    lm.save_pretrained(str(run.dir / "lm"))
    return {"params": sum(p.numel() for p in lm.parameters()), "pretrained": source,
            "final_loss": hist[-1]["loss"] if hist else None, "seconds": hist[-1]["seconds"] if hist else 0}


def _plan(run: Run):
    from .plan import build_plan

    if getattr(run, "_plan_cache", None) is None:
        run._plan_cache = build_plan(run.cfg, lambda p: resolve_path(p, run.cfg))
    return run._plan_cache


def _pretrained_for_cut(run: Run, enc):
    """The frozen blocks between the cache cut and the fine-tuned part must be the pretrained ones."""
    from .lit_stages import _cut_points

    cache, to = _cut_points(run.cfg)
    return _encoder(run) if to > cache else enc


def stage_features(run: Run, rng):
    from .lit_stages import stage_features as lit_features

    if _encoder_kind(run) == "clip":
        info = {"skipped": "encoder.kind clip reads images at every step (nothing to cache)"}
        run.log({"stage": "features", **info})
        return info
    return lit_features(run, _plan(run), _encoder(run))


def _prompt_texts(run: Run, ds):
    from .contrastive import PROMPT_TEMPLATE, class_prompts

    phrases = ds.class_phrases or ds.classes
    if float(run.cfg.get("contrastive", {}).get("class_loss_weight", 1.0)) == 0 and _encoder_kind(run) == "clip":
        return []
    if not phrases:
        raise TrainError("the dataset has no scene classes; set contrastive.class_loss_weight: 0")
    return class_prompts(phrases, run.cfg.get("contrastive", {}).get("prompt_template", PROMPT_TEMPLATE))


def stage_contrastive(run: Run, rng):
    from .lit_stages import stage_contrastive as lit_contrastive
    from .plan import prompts

    if _encoder_kind(run) == "clip":
        return stage_clip_contrastive(run, rng)
    plan = _plan(run)
    enc = _encoder(run)
    return lit_contrastive(run, plan, enc, _pretrained_for_cut(run, enc), prompts(run.cfg, plan), rng,
                           _save_checkpoint)


def stage_clip_contrastive(run: Run, rng):
    """``encoder.kind: clip``: every image read per step, both towers run (``clip_trainer``)."""
    import torch

    from .clip_trainer import ClipTrainer, read_views, train_clip
    from .lit_stages import unique_captions

    ds, train, val = _data(run)
    enc = _clip_encoder(run)
    cfg = run.cfg.get("contrastive", {})
    trainer = ClipTrainer(enc, _prompt_texts(run, ds), cfg, _device(run), run.cfg.get("encoder", {}).get("train_params"))
    cdir = run.dir / "contrastive"
    cdir.mkdir(exist_ok=True)
    ck = cdir / "last.pt"
    start = 0
    if ck.exists():
        st = torch.load(ck, weights_only=False)
        trainer.load_trained(st["encoder"])
        trainer.opt.load_state_dict(st["opt"])
        rng.bit_generator.state = st["rng"]
        start = st["epoch"]

    def save(epoch):
        _save_checkpoint({"encoder": trainer.trained_state(), "live": None, "opt": trainer.opt.state_dict(),
                          "epoch": epoch, "rng": rng.bit_generator.state}, ck)

    texts, cap_ids = unique_captions(train.records)
    run.log({"stage": "contrastive", "kind": "clip", "device": str(trainer.device), "trained_tensors": len(trainer.names),
             "trained_params": sum(p.numel() for p in trainer.params)})
    val_images = read_views(val.records, [0] * len(val.records))
    hist = train_clip(trainer, train.records, [r.label for r in train.records], texts, cap_ids, cfg,
                      _views(run)[0], rng, log=run.log, val=(val_images, [r.label for r in val.records]),
                      start_epoch=start, on_epoch_end=save)
    return {"epochs": int(cfg.get("epochs", 5)), "val_accuracy": hist[-1]["val_accuracy"] if hist else None}


def _trained_encoder(run: Run):
    import torch

    st = torch.load(run.dir / "contrastive" / "last.pt", weights_only=False)
    if _encoder_kind(run) == "clip":
        from .clip_trainer import load_trained_state

        enc = _clip_encoder(run)
        load_trained_state(enc, st["encoder"])
        return enc.eval()
    enc = _encoder(run)
    enc.load_trainable(st["encoder"])
    return enc.eval()


def stage_embed(run: Run, rng):
    from .lit_stages import stage_embed as lit_embed

    enc = _trained_encoder(run)
    if _encoder_kind(run) == "clip":
        _, train, val = _data(run)
        return _embed_clip(run, enc, train, val)
    plan = _plan(run)
    return lit_embed(run, plan, enc, _pretrained_for_cut(run, enc), [])


def _embed_clip(run: Run, enc, train, val):
    """Image embeddings ``[N, V, D]`` of every train view and of val view 0 (the same layout the
    LiT path writes, so the mapping stage does not care which stage 2 ran)."""
    import torch

    from .clip_trainer import ClipTrainer, embed_records

    trainer = ClipTrainer(enc, [], {}, _device(run))
    t0 = time.time()
    per_view = [embed_records(trainer, train.records, v) for v in _views(run)[0]]
    emb = {"train": torch.stack(per_view, dim=1), "val": embed_records(trainer, val.records, 0)[:, None]}
    torch.save(emb, run.dir / "embeddings.pt")
    info = {"train": list(emb["train"].shape), "val": list(emb["val"].shape), "seconds": round(time.time() - t0, 1)}
    run.log({"stage": "embed", **info})
    return info


def _captioner(run: Run, enc=None, lm=None, mapping=None):
    import torch
    from transformers import AutoModelForCausalLM

    from ..models.captioner import Captioner
    from ..models.mapping import build_mapping
    from .lm import lm_width, load_tokenizer

    tok = load_tokenizer(run.dir / "tokenizer")
    enc = enc if enc is not None else _trained_encoder(run)
    if lm is None:
        lm = AutoModelForCausalLM.from_pretrained(str(run.dir / "lm"), dtype=torch.float32).eval()
    if mapping is None:
        m = dict(run.cfg.get("mapping", {}).get("module", {"kind": "mlp", "prefix_length": 4}))
        m.setdefault("kind", "mlp")
        mapping = build_mapping({**m, "embed_dim": enc.embed_dim, "lm_hidden": lm_width(lm)})
    cap = Captioner(enc, mapping, lm, tok, card=_card(run), model_id=run.cfg.get("name", "run"),
                    storage_dtype=run.cfg.get("export", {}).get("storage_dtype", "float16"))
    cap.train(False)
    return cap


def _card(run: Run) -> dict:
    card = dict(run.cfg.get("export", {}).get("card", {}))
    card.setdefault("tile_size", int(run.cfg.get("encoder", {}).get("image_size", 256)))
    card.setdefault("training_config", run.cfg.get("name", Path(run.cfg.get("_config_path", "run")).stem))
    plan = _plan(run)
    card.setdefault("trained_on", ", ".join(s.spec.name for s in plan.sets))
    if len(plan.vocab):
        card.setdefault("classes", list(plan.vocab.phrases))
    card.setdefault("training_sets", plan.footprints())
    return card


def _quick_val(cap, val_emb, val_records, beam: int = 1) -> dict:
    """Fast val scores during training (python tokenizer, no METEOR): for picking epochs only."""
    from ..evaluation.metrics import score_captions

    caps = cap.caption(val_emb.numpy(), beam_size=beam)
    cands = {r.image_id: c for r, (c, _) in zip(val_records, caps)}
    refs = {r.image_id: r.captions for r in val_records}
    s = score_captions(cands, refs, meteor=False, use_java=False)
    return {"val_CIDEr": round(s["CIDEr-D"], 3), "val_BLEU-4": round(s["BLEU-4"], 3)}


def _sample_embeddings(emb: dict):
    """Train embeddings as ``[n_samples, 1, D]`` in the plan's order: the LiT stages write that
    layout; the CLIP stage writes ``[N, V, D]``, which is the same samples view by view."""
    tr = emb["train"]
    if emb.get("layout") != "samples" and tr.shape[1] > 1:
        tr = tr.permute(1, 0, 2).reshape(-1, 1, tr.shape[-1])
    return tr


def _val_captioned(plan):
    """Indices of val images with real captions (class-only sets have written captions only)."""
    return [i for i, si in enumerate(plan.val.record_set) if plan.sets[int(si)].has_captions]


def stage_mapping(run: Run, rng):
    import torch

    from .datasets import normalize_caption
    from .mapping_stage import train_mapping

    plan = _plan(run)
    cap = _captioner(run)
    emb = torch.load(run.dir / "embeddings.pt")
    train_emb = _sample_embeddings(emb)
    if train_emb.shape[0] != len(plan.train):
        raise TrainError("embeddings do not match the training data; rerun the embed stage")
    mdir = run.dir / "mapping"
    mdir.mkdir(exist_ok=True)
    cfg = run.cfg.get("mapping", {})
    per_image = []
    for r in plan.train.records:
        ids, mask = cap.tokenize_captions([normalize_caption(c) for c in r.captions])
        per_image.append([row[: int(m.sum())].tolist() for row, m in zip(ids, mask)])
    seqs = [per_image[i] for i in plan.train.sample_record]
    start = 0
    ck = mdir / "last.pt"
    if ck.exists():
        st = torch.load(ck, weights_only=False)
        cap.mapping.load_state_dict(st["mapping"])
        cap.lm.load_state_dict(st["lm"])
        rng.bit_generator.state = st["rng"]
        start = st["epoch"]

    def save(epoch):
        _save_checkpoint({"mapping": cap.mapping.state_dict(), "lm": cap.lm.state_dict(), "epoch": epoch,
                          "rng": rng.bit_generator.state}, ck)

    every = int(cfg.get("val_every", 0))
    epochs = int(cfg.get("epochs", 10))
    counter = {"e": start}
    val_idx = _val_captioned(plan)

    def val_fn():
        counter["e"] += 1
        if val_idx and every and (counter["e"] % every == 0 or counter["e"] == epochs):
            return _quick_val(cap, emb["val"][val_idx, 0], [plan.val.records[i] for i in val_idx])
        return {}

    hist = train_mapping(cap.mapping, cap.lm, train_emb, seqs, cap.tokenizer.pad_token_id, cfg, rng,
                         log=run.log, start_epoch=start, on_epoch_end=save, val_fn=val_fn,
                         loss_fn=cap.caption_loss, order_fn=plan.epoch_order)
    return {"epochs": epochs, "final_loss": hist[-1]["loss"] if hist else None,
            **({k: v for k, v in hist[-1].items() if k.startswith("val_")} if hist else {})}


def stage_export(run: Run, rng):
    import torch

    cap = _captioner(run)
    st = torch.load(run.dir / "mapping" / "last.pt", weights_only=False)
    cap.mapping.load_state_dict(st["mapping"])
    cap.lm.load_state_dict(st["lm"])
    model_dir = run.dir / "model"
    cap.save(model_dir)
    info = {"model_dir": str(model_dir), "model_hash": cap.model_hash, "bytes": _du(model_dir)}
    target = run.cfg.get("export", {}).get("dir")
    if target and not run.cfg.get("_no_export_copy"):
        target = Path(resolve_path(target, run.cfg))
        _copy_model(model_dir, target)
        info["exported_to"] = str(target)
    run.log({"stage": "export", **info})
    return info


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _copy_model(src: Path, dst: Path) -> None:
    """Replace the checkpoint files in ``dst`` but keep files that are not part of a checkpoint
    (``MODEL_CARD.md``, ``eval.json``)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "encoder.safetensors", "mapping.safetensors", "lm", "tokenizer", "text_tower", "encoder"):
        p = dst / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for item in src.iterdir():
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)


def stage_evaluate(run: Run, rng):
    from ..evaluation.evaluate import evaluate_model

    d = run.cfg["data"]
    e = run.cfg.get("evaluate", {})
    report = evaluate_model(str(run.dir / "model"), resolve_path(d["captions"], run.cfg),
                            split=d.get("val_split", "val"), images=resolve_path(d.get("images"), run.cfg),
                            beam_size=int(e.get("beam_size", 3)), length_penalty=float(e.get("length_penalty", 1.0)),
                            limit=d.get("limit_val"), meteor=bool(e.get("meteor", True)))
    (run.dir / "eval.json").write_text(json.dumps(report, indent=2))
    summary = {k: report["captioning"].get(k) for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")}
    summary["accuracy"] = report.get("classification", {}).get("accuracy")
    summary["t2i_mR"] = report.get("retrieval", {}).get("t2i_mR")
    run.log({"stage": "evaluate", **summary})
    return summary


STAGE_FUNCS = {"tokenizer": stage_tokenizer, "lm": stage_lm, "features": stage_features,
               "contrastive": stage_contrastive, "embed": stage_embed, "mapping": stage_mapping,
               "export": stage_export, "evaluate": stage_evaluate}


def train(cfg: dict, out=None, resume: bool = False, stages=None, progress: bool = True) -> dict:
    """Run (or continue) the configured stages; returns the state with per-stage results."""
    import torch

    from . import progress as progress_bars

    progress_bars.set_enabled(progress)
    threads = cfg.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out or resolve_path(cfg.get("out", f"runs/{cfg.get('name', 'run')}"), cfg))
    run = Run(cfg, out, resume)
    wanted = list(stages or cfg.get("stages") or STAGES)
    bad = [s for s in wanted if s not in STAGE_FUNCS]
    if bad:
        raise TrainError(f"unknown stage(s) {', '.join(bad)}; stages are {', '.join(STAGES)}")
    seed = int(cfg.get("seed", 0))
    t_all = time.time()
    for i, stage in enumerate(STAGES):
        if stage not in wanted:
            continue
        if run.done(stage) and not (stages and stage in stages):
            continue
        rng = seed_everything(seed + i)
        t0 = time.time()
        run.log({"stage": stage, "event": "start"})
        info = STAGE_FUNCS[stage](run, rng) or {}
        info["stage_seconds"] = round(time.time() - t0, 1)
        run.mark(stage, info)
        run.log({"stage": stage, "event": "done", **info})
    run.state["total_seconds_this_invocation"] = round(time.time() - t_all, 1)
    run.save_state()
    return run.state


# --------------------------------------------------------------------------------------------
# CLI hooks


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", help="run config (YAML or JSON), e.g. configs/default.yaml")
    parser.add_argument("--out", help="run directory (default: the config's 'out', else runs/<name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the run directory")
    parser.add_argument("--stages", nargs="+", metavar="STAGE",
                        help=f"run only these stages (rerun if already done): {' '.join(STAGES)}")
    parser.add_argument("--no-export", action="store_true", help="do not copy the model to the config's export dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_train(args) -> int:
    try:
        cfg = load_config(args.config)
        if getattr(args, "no_export", False):
            cfg["_no_export_copy"] = True
        state = train(cfg, args.out, args.resume, args.stages, progress=not getattr(args, "no_progress", False))
    except RscaptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in state.get("done", {}).items()}, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rscaption train", description="Train a captioner (staged, resumable).")
    add_train_args(p)
    return run_train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

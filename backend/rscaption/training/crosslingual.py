"""Cross-lingual captions (``--language zh``): a Chinese decoder trained on text alone.

The only Chinese captions we have (Sydney-Captions CN) come without images. The captioner's text
tower puts an English caption in the same joint space as the images, so a decoder trained to map
*text embedding of an English caption -> its Chinese translation* can be fed an image embedding
at inference (CapDec, Nukrai et al. 2022). The two modalities do not land on the same points, so
the training input is the text embedding plus Gaussian noise, re-normalised: the decoder learns to
read a neighbourhood of each text embedding, which is where image embeddings of that scene fall.

Noise level. On the default model (resources/default_model, 256-d), UCM val images and their own
captions have a mean cosine of 0.562 (sd 0.155; unrelated pairs 0.004), and the mean image and
mean text embedding differ by only 0.136 in norm, so the gap is mostly spread, not an offset. For
a unit vector x in D dimensions, cos(x, normalize(x + n)) with n ~ N(0, s^2 I) is about
1 / sqrt(1 + D s^2); matching 0.562 at D = 256 gives s = 0.092 (variance 0.0085; CapDec's 0.016
for 512-d CLIP is the same idea for a wider gap). ``noise_std`` defaults to 0.09.

Layout of a trained language in ``<run>/crosslingual/<lang>/``: ``tokenizer/``, ``lm_pretrained/``
(the LM after text-only pretraining), ``last.pt`` (per-epoch state: resumable), ``decoder/`` (the
exported decoder: ``decoder.json`` + the files ``checkpoint_save.write_decoder`` writes) and
``report.json`` (scene agreement and character BLEU on the val split).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import TrainError
from ..evaluation.scenes import chinese_scene, english_scene
from ..models.decoder import Decoder

NOISE_STD = 0.09
# embedded once at training time and again when a decoder is attached: a different text tower
# (a retrained contrastive stage) means the decoder reads a space it was not trained on
PROBE = "many buildings and green trees are around a parking lot."


# --------------------------------------------------------------------------------------------
# data


def _sentences(path, split: str) -> list[tuple[int, str, str]]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    out = []
    for img in data.get("images", []):
        if img.get("split") != split:
            continue
        for s in img.get("sentences", []):
            zh = clean_chinese(s.get("raw_chinese", ""))
            en = str(s.get("raw", "")).strip()
            if zh and en:
                out.append((int(img.get("imgid", len(out))), en, zh))
    return out


def clean_chinese(text: str) -> str:
    """The CN file has stray ``###`` markers and ASCII full stops; keep the sentence only."""
    return "".join(str(text).replace("#", "").split())


def load_zh_pairs(path, split: str) -> list[tuple[str, str]]:
    """(English, Chinese) sentence pairs of one split of the Sydney-Captions CN file."""
    from ..data.datasets import normalize_caption

    return [(normalize_caption(en), zh) for _, en, zh in _sentences(path, split)]


def zh_references(path, split: str) -> list[list[str]]:
    """For each pair of `load_zh_pairs`, every Chinese sentence of the same image (BLEU references)."""
    rows = _sentences(path, split)
    by_image: dict[int, list[str]] = {}
    for img, _, zh in rows:
        by_image.setdefault(img, []).append(zh)
    return [by_image[img] for img, _, _ in rows]


def inject_noise(emb: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The training prefix input: ``normalize(emb + N(0, std^2))`` (see the module docstring)."""
    if std <= 0:
        return emb
    noise = torch.randn(emb.shape, generator=generator, dtype=emb.dtype) * float(std)
    return F.normalize(emb + noise, dim=-1)


# --------------------------------------------------------------------------------------------
# training


def _save(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _build(cap, texts: list[str], cfg: dict, out: Path, rng: np.random.Generator, log) -> Decoder:
    """Tokenizer (byte-level BPE on the target-language train text), GPT-2 (optionally pretrained
    on that text with BOS standing in for the prefix), and a mapping shaped like the English one."""
    from ..models.mapping import build_mapping
    from .lm import build_lm, load_tokenizer, lm_width, pretrain_lm, train_tokenizer

    if (out / "tokenizer" / "tokenizer.json").is_file():
        tok = load_tokenizer(out / "tokenizer")
    else:
        tok = train_tokenizer(texts, int(cfg.get("vocab_size", 1000)), out / "tokenizer")
    lm_cfg = dict(cfg.get("lm", {}))
    torch.manual_seed(int(rng.integers(2**31)))
    if (out / "lm_pretrained" / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(str(out / "lm_pretrained"), dtype=torch.float32)
    else:
        lm = build_lm(tok, lm_cfg)
        if int(lm_cfg.get("max_steps", 0)) > 0:
            pretrain_lm(lm, tok, texts, lm_cfg, rng, log=log)
        lm.save_pretrained(str(out / "lm_pretrained"))
    english = cap.mapping.config() if cap.mapping is not None else {"kind": "mlp", "prefix_length": 4}
    mcfg = {"kind": english["kind"], "prefix_length": english["prefix_length"], **cfg.get("mapping", {}),
            "embed_dim": cap.embed_dim, "lm_hidden": lm_width(lm)}
    return Decoder(build_mapping(mcfg), lm.eval(), tok)


def train_decoder(cap, pairs: list[tuple[str, str]], cfg: dict, rng: np.random.Generator, out_dir,
                  log=None) -> tuple[Decoder, list[dict]]:
    """Train one language's decoder on (English, target) pairs with ``cap``'s text tower as the
    input side; writes ``out_dir`` as described in the module docstring and resumes from its
    ``last.pt``. Returns the decoder (float32, CPU, eval mode) and the per-epoch log records."""
    from .contrastive import epoch_loop

    if not pairs:
        raise TrainError("no cross-lingual training pairs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    english = sorted({en for en, _ in pairs})
    index = {en: i for i, en in enumerate(english)}
    targets = [zh for _, zh in pairs]
    dec = _build(cap, targets, cfg, out, rng, log)
    t0 = time.time()
    emb = torch.from_numpy(cap.embed_texts(english)).float()
    if log:
        log({"stage": "crosslingual", "pairs": len(pairs), "english_sentences": len(english),
             "vocab_size": len(dec.tokenizer), "embed_seconds": round(time.time() - t0, 1)})
    ids, mask = dec.tokenize_captions(targets, int(cfg.get("max_len", 40)))
    src = torch.tensor([index[en] for en, _ in pairs])

    std = float(cfg.get("noise_std", NOISE_STD))
    smoothing = float(cfg.get("label_smoothing", 0.0))
    lm_lr = float(cfg.get("lm_lr", 5e-4))
    groups = [{"params": list(dec.mapping.parameters()), "lr": float(cfg.get("lr", 1e-3))}]
    if lm_lr > 0:
        groups.append({"params": list(dec.lm.parameters()), "lr": lm_lr})
    dec.lm.requires_grad_(lm_lr > 0)
    opt = torch.optim.AdamW(groups, weight_decay=float(cfg.get("weight_decay", 0.01)))
    base = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    start, ck = 0, out / "last.pt"
    if ck.exists():
        st = torch.load(ck, weights_only=True)
        dec.mapping.load_state_dict(st["mapping"])
        dec.lm.load_state_dict(st["lm"])
        opt.load_state_dict(st["opt"])
        for g, b in zip(opt.param_groups, base):  # keep the configured peak rates (schedule restarts from them)
            g["lr"] = b
        gen.set_state(st["gen"])
        rng.bit_generator.state = st["rng"]
        start = int(st["epoch"])

    def step(idx):
        clean = emb[src[idx]]
        noisy = inject_noise(clean, std, gen)
        rows = ids[idx]
        m = mask[idx]
        keep = int(m.sum(1).max())
        loss = dec.caption_loss(noisy, rows[:, :keep], m[:, :keep], label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        return {"loss": float(loss.detach()), "input_cosine": float((noisy * clean).sum(-1).mean())}

    def finish(epoch, rec):
        rec["stage"] = "crosslingual"
        rec["noise_std"] = std
        dec.eval()
        _save({"mapping": dec.mapping.state_dict(), "lm": dec.lm.state_dict(), "opt": opt.state_dict(),
               "epoch": epoch, "gen": gen.get_state(), "rng": rng.bit_generator.state}, ck)
        if log:
            log(rec)
        dec.train()

    dec.train()
    hist = epoch_loop(opt, base, len(pairs), int(cfg.get("batch_size", 64)), int(cfg.get("epochs", 10)),
                      int(cfg.get("warmup_steps", 30)), rng, step, finish, "crosslingual", start)
    dec.eval()
    dec.lm.requires_grad_(False)
    export_decoder(cap, dec, out / "decoder")
    return dec, hist


def export_decoder(cap, dec: Decoder, directory) -> Path:
    from ..models.checkpoint_save import write_decoder

    directory = Path(directory)
    entry = write_decoder(dec, directory, torch.float32)
    probe = cap.embed_texts([PROBE])[0].round(5).tolist()
    (directory / "decoder.json").write_text(json.dumps({"decoder": entry, "probe": probe}, indent=1))
    return directory


def attach_decoders(cap, run_dir, languages=None) -> list[str]:
    """Attach every decoder trained in ``<run_dir>/crosslingual/*/decoder`` (or only ``languages``)
    to ``cap`` before ``cap.save(...)``; refuses one trained against another text tower."""
    from ..models.checkpoint import load_decoder

    root = Path(run_dir) / "crosslingual"
    found = sorted(p.parent.parent.name for p in root.glob("*/decoder/decoder.json"))
    if languages is not None:
        missing = [lang for lang in languages if lang not in found]
        if missing:
            raise TrainError(f"no trained decoder for {', '.join(missing)} in {root}; run the crosslingual stage")
        found = [lang for lang in found if lang in languages]
    for lang in found:
        d = root / lang / "decoder"
        meta = json.loads((d / "decoder.json").read_text())
        probe = np.asarray(meta.get("probe", []), np.float32)
        now = cap.embed_texts([PROBE])[0]
        if probe.shape != now.shape or float(probe @ now) < 0.999:
            raise TrainError(f"the '{lang}' decoder in {d} was trained on another text tower; "
                             "rerun the crosslingual stage")
        cap.add_decoder(lang, load_decoder(meta["decoder"], d))
    return found


# --------------------------------------------------------------------------------------------
# evaluation


def scene_agreement(cap, embeddings, language: str = "zh", beam_size: int = 1) -> dict:
    """English and ``language`` captions of the same embeddings, and how often they name the same
    scene (among those whose English caption names one)."""
    en = [c for c, _ in cap.caption(embeddings, beam_size=beam_size)]
    zh = [c for c, _ in cap.caption(embeddings, beam_size=beam_size, language=language)]
    se, sz = [english_scene(c) for c in en], [chinese_scene(c) for c in zh]
    named = [i for i, s in enumerate(se) if s is not None]
    agree = sum(se[i] == sz[i] for i in named)
    return {"english": en, "chinese": zh, "n": len(en), "n_english_scene": len(named),
            "scene_agreement": round(agree / len(named), 4) if named else None}


def char_bleu(candidates: list[str], references: list[list[str]]) -> dict:
    """BLEU-1..4 on characters (Chinese has no spaces; word segmentation would add its own
    errors), via pycocoevalcap's scorer on space-joined characters."""
    from pycocoevalcap.bleu.bleu import Bleu

    def chars(t):
        return " ".join(c for c in t if not c.isspace() and c not in "，。.,、") or "<empty>"

    res = {str(i): [chars(c)] for i, c in enumerate(candidates)}
    gts = {str(i): [chars(r) for r in refs] for i, refs in enumerate(references)}
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {f"char_BLEU-{n}": round(float(s), 4) for n, s in enumerate(scores, 1)}


def zh_scene_agreement(cap, pairs: list[tuple[str, str]], references: list[list[str]] | None = None,
                       language: str = "zh", beam_size: int = 1, examples: int = 5) -> dict:
    """On (English, Chinese) pairs: both captions come from the same prefix, the text embedding of
    the English sentence. ``scene_agreement``: the Chinese caption names the English caption's
    scene; ``reference_scene_agreement``: it names the scene of the reference translation;
    ``keyword_ceiling``: the keyword tables agree on the reference pairs themselves (how far the
    tables, not the model, limit the numbers). ``references`` (default: each pair's own
    translation) feed character BLEU."""
    emb = cap.embed_texts([en for en, _ in pairs])
    out = scene_agreement(cap, emb, language, beam_size)
    ref_scene = [chinese_scene(zh) for _, zh in pairs]
    src_scene = [english_scene(en) for en, _ in pairs]
    named = [i for i, s in enumerate(ref_scene) if s is not None]
    both = [i for i, s in enumerate(src_scene) if s is not None and ref_scene[i] is not None]
    zh_scene = [chinese_scene(c) for c in out["chinese"]]
    report = {
        "n": out["n"], "n_english_scene": out["n_english_scene"], "scene_agreement": out["scene_agreement"],
        "reference_scene_agreement": round(sum(zh_scene[i] == ref_scene[i] for i in named) / len(named), 4)
        if named else None,
        "keyword_ceiling": round(sum(src_scene[i] == ref_scene[i] for i in both) / len(both), 4) if both else None,
        **char_bleu(out["chinese"], references or [[zh] for _, zh in pairs]),
        "examples": [{"source": pairs[i][0], "english": out["english"][i], "chinese": out["chinese"][i],
                      "reference": pairs[i][1]} for i in _spread(len(pairs), examples)],
    }
    return report


def _spread(n: int, k: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, n - 1, num=min(n, k))}) if n else []


# --------------------------------------------------------------------------------------------
# the training-runner stage


def english_captioner(run):
    """The run's trained English captioner (what ``stage_export`` would export)."""
    from .parts import trained_captioner

    if not (run.dir / "mapping" / "last.pt").exists():
        raise TrainError("the crosslingual stage needs a trained mapping; run the mapping stage first")
    return trained_captioner(run).eval()


def stage_crosslingual(run, rng) -> dict:
    """Train and evaluate every language in ``run.cfg["crosslingual"]["languages"]`` (only ``zh``,
    from the Sydney-Captions CN file, is supported); returns a small summary per language."""
    from .config import resolve_path

    langs = (run.cfg.get("crosslingual") or {}).get("languages") or {}
    if not langs:
        info = {"skipped": "no crosslingual.languages configured"}
        run.log({"stage": "crosslingual", **info})
        return info
    bad = [lang for lang in langs if lang != "zh"]
    if bad:
        raise TrainError(f"crosslingual: only 'zh' is supported (Sydney-Captions CN), not {', '.join(bad)}")
    cap = english_captioner(run)
    summary = {}
    for lang, cfg in langs.items():
        cfg = dict(cfg or {})
        if not cfg.get("data"):
            raise TrainError(f"crosslingual.languages.{lang}.data: the Sydney-Captions CN file is required")
        path = resolve_path(cfg["data"], run.cfg)
        if not Path(path).is_file():
            raise TrainError(f"crosslingual data not found: {path}")
        pairs = load_zh_pairs(path, cfg.get("train_split", "train"))
        out = run.dir / "crosslingual" / lang
        dec, hist = train_decoder(cap, pairs, cfg, rng, out, log=run.log)
        if lang in cap.extra_decoders:  # ModuleDict.pop takes no default
            del cap.extra_decoders[lang]
        cap.add_decoder(lang, dec)
        val_split = cfg.get("val_split", "val")
        report = zh_scene_agreement(cap, load_zh_pairs(path, val_split), zh_references(path, val_split),
                                    lang, beam_size=int(cfg.get("eval_beam_size", 1)))
        (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
        small = {k: v for k, v in report.items() if k != "examples"}
        run.log({"stage": "crosslingual", "language": lang, "split": val_split, **small})
        summary[lang] = {**small, "final_loss": hist[-1]["loss"] if hist else None}
    return summary

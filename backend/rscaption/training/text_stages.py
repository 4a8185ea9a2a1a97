"""Stages ``tokenizer`` and ``lm``: the caption tokenizer and the language model before it sees images."""

from __future__ import annotations

from .config import resolve_path
from .parts import lm_corpus, lm_source, load_or_fail
from .rundir import Run


def stage_tokenizer(run: Run, rng):
    from .lm import make_tokenizer

    cfg = dict(run.cfg.get("tokenizer", {}))
    kind = cfg.get("kind", "bpe")
    if kind == "pretrained":
        cfg["path"] = resolve_path(cfg["path"], run.cfg) if cfg.get("path") else lm_source(run)
    texts = lm_corpus(run) if kind == "bpe" else []
    tok = load_or_fail(f"{kind} tokenizer", str(cfg.get("path", kind)),
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
    source = lm_source(run)
    if source:
        lm = load_or_fail("pretrained language model", source, lambda: load_pretrained_lm(source, tok))
        cfg.setdefault("max_steps", 0)
    else:
        lm = build_lm(tok, cfg)
    hist = []
    if int(cfg.get("max_steps", 1000)) > 0:
        hist = pretrain_lm(lm, tok, lm_corpus(run), cfg, rng, log=run.log)
    lm.eval()
    lm.save_pretrained(str(run.dir / "lm"))
    return {"params": sum(p.numel() for p in lm.parameters()), "pretrained": source,
            "final_loss": hist[-1]["loss"] if hist else None, "seconds": hist[-1]["seconds"] if hist else 0}

"""Stages 1 and 3: a small BPE tokenizer and a small GPT-2 trained on caption text.

Remote-sensing captions use a few thousand words; GPT-2's 50k-token vocabulary would make the
embedding and output layers most of the model. A byte-level BPE trained on the captions (about
2k tokens) keeps the LM small enough to train on two CPU cores in minutes and still never
produces an unknown token.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ..models.captioner import pad_batch

EOS = "<|endoftext|>"


def train_tokenizer(texts, vocab_size: int = 2000, out_dir: Path | None = None):
    """Byte-level BPE on caption text, wrapped as a transformers fast tokenizer (bos = eos = pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=EOS, model_max_length=64)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast


TOKENIZER_KINDS = ("bpe", "clip", "minilm", "pretrained")


def make_tokenizer(cfg: dict, texts, out_dir: Path | None = None):
    """The caption tokenizer a run's config asks for.

    ``bpe`` (default) trains a small byte-level BPE on ``texts``; ``clip`` is the CLIP BPE that
    ships inside open_clip (49,408 tokens, ids identical to ``open_clip.tokenize``); ``minilm``
    is the WordPiece of the installed all-MiniLM-L6-v2; ``pretrained`` loads ``path`` (the
    tokenizer of a pretrained LM). All come back as transformers tokenizers with bos/eos/pad set,
    which is all the captioner needs.
    """
    kind = str(cfg.get("kind", "bpe")).lower()
    if kind == "bpe":
        return train_tokenizer(texts, int(cfg.get("vocab_size", 2000)), out_dir)
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind '{kind}'; kinds are {', '.join(TOKENIZER_KINDS)}")
    if kind == "clip":
        tok = clip_bpe_tokenizer()
    else:
        from transformers import AutoTokenizer

        from ..models.encoders import minilm_dir

        path = minilm_dir() if kind == "minilm" else cfg.get("path")
        if not path:
            raise ValueError("tokenizer kind 'pretrained' needs a 'path' (a local dir or hub name)")
        tok = AutoTokenizer.from_pretrained(str(path))
    ensure_special_tokens(tok)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out_dir))
    return tok


def ensure_special_tokens(tok) -> None:
    """Captions end with EOS and batches pad with PAD: borrow WordPiece's [SEP]/[CLS] or the EOS
    token where a tokenizer lacks them (GPT-2 has no pad token, BERT has no eos/bos)."""
    if tok.eos_token is None:
        tok.eos_token = tok.sep_token or EOS
    if tok.bos_token is None:
        tok.bos_token = tok.cls_token or tok.eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def clip_bpe_tokenizer():
    """open_clip's BPE (the file inside the installed package) as a transformers CLIPTokenizer.

    The vocabulary is rebuilt exactly as open_clip builds it (bytes, bytes + '</w>', merges,
    start/end markers), so token ids match ``open_clip.tokenize``.
    """
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges])


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def encode_captions(tokenizer, texts, max_len: int = 40) -> list[list[int]]:
    """Token ids of each caption followed by EOS (the stop signal the captioner generates)."""
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        out.append(ids[: max_len - 1] + [eos])
    return out


def build_lm(tokenizer, cfg: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=int(cfg.get("n_positions", 64)),
        n_embd=int(cfg.get("n_embd", 256)), n_layer=int(cfg.get("n_layer", 4)),
        n_head=int(cfg.get("n_head", 4)), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=float(cfg.get("dropout", 0.1)), embd_pdrop=float(cfg.get("dropout", 0.1)),
        attn_pdrop=float(cfg.get("dropout", 0.1)), tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def load_pretrained_lm(source: str, tokenizer):
    """A pretrained causal LM (local dir, or hub name when online), its embeddings resized when
    the caption tokenizer has more tokens than the LM's vocabulary."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))
    if lm.config.pad_token_id is None:
        lm.config.pad_token_id = tokenizer.pad_token_id
    return lm


def lm_width(lm) -> int:
    """Hidden size of any causal LM (GPT-2's n_embd, LLaMA's hidden_size): the prefix width."""
    return int(lm.get_input_embeddings().embedding_dim)


def lm_loss(lm, ids: torch.Tensor, mask: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Next-token loss of ``[BOS] caption EOS``; BOS stands in for the image prefix during
    pretraining so the LM learns to start a caption from a 'context' position."""
    bos = torch.full((ids.shape[0], 1), bos_id, dtype=torch.long)
    inp = torch.cat([bos, ids], 1)
    att = torch.cat([torch.ones_like(bos), mask], 1)
    labels = torch.cat([torch.full_like(bos, -100), ids.masked_fill(mask == 0, -100)], 1)
    return lm(input_ids=inp, attention_mask=att, labels=labels).loss


def pretrain_lm(lm, tokenizer, texts, cfg: dict, rng: np.random.Generator, log=None, state=None) -> list[dict]:
    """``max_steps`` steps on a cosine schedule, counted in steps rather than epochs because the
    corpus size varies with the sources. ``max_minutes`` is only a safety cap: a run that hits it
    depends on the machine's speed and is no longer reproducible from its config (logged)."""
    from .progress import bar as progress_bar

    seqs = encode_captions(tokenizer, texts, int(cfg.get("max_len", 40)))
    bs = int(cfg.get("batch_size", 128))
    max_steps = int(cfg.get("max_steps", 1000))
    max_sec = float(cfg.get("max_minutes", 1e9)) * 60
    warmup = int(cfg.get("warmup_steps", 50))
    opt = torch.optim.AdamW(lm.parameters(), lr=float(cfg.get("lr", 1e-3)), weight_decay=0.01)
    lm.train()
    t0 = time.time()
    history, run, n_run = [], 0.0, 0
    steps_per_epoch = max(1, len(seqs) // bs)
    order = rng.permutation(len(seqs))
    log_every = int(cfg.get("log_every", 100))
    bar = progress_bar(range(max_steps), desc="lm")
    for step in bar:
        if step and step % steps_per_epoch == 0:
            order = rng.permutation(len(seqs))
        lr = float(cfg.get("lr", 1e-3)) * (min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / max_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        j = step % steps_per_epoch
        batch = [seqs[k] for k in order[j * bs:(j + 1) * bs]]
        ids, mask = pad_batch(batch, tokenizer.pad_token_id)
        loss = lm_loss(lm, ids, mask, tokenizer.bos_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        run += float(loss.detach())
        n_run += 1
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        capped = time.time() - t0 > max_sec and step + 1 < max_steps
        last = step + 1 == max_steps or capped
        if (step + 1) % log_every == 0 or last:
            rec = {"stage": "lm", "step": step + 1, "loss": round(run / n_run, 4),
                   "seconds": round(time.time() - t0, 1)}
            if capped:
                rec["stopped_by"] = "max_minutes"
            history.append(rec)
            if log:
                log(rec)
            run, n_run = 0.0, 0
        if last:
            break
    bar.close()
    lm.eval()
    return history

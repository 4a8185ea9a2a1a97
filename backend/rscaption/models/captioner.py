"""`Captioner`: encoder + mapping + causal LM + tokenizer (ClipCap-style prefix captioning).

Captioning is split from embedding on purpose: the pipeline stores image embeddings (for text
search) and captions them from the stored vectors, so `caption()` takes embeddings, not pixels.

Decoding is a hand-written loop over the LM with its KV cache (`past_key_values`) rather than
`lm.generate(inputs_embeds=...)`: the loop is short, behaves the same across transformers
versions, gives us per-token log-probs for the confidence directly, and batches beam search.
Every caption starts from the same-length prefix, so a batch needs no padding and batched results
match unbatched ones.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelError
from .encoders import Encoder, images_to_pixels


def _describe_lm(lm) -> str:
    """A hub name says what the LM is; a local path (where a checkpoint happens to be unpacked)
    does not, so local LMs are described by their shape."""
    cfg = lm.config
    name = getattr(cfg, "_name_or_path", "") or ""
    if name and not Path(name).is_absolute() and not Path(name).exists():
        return name
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    return f"{cfg.model_type} ({layers} layers x {width}, vocabulary {cfg.vocab_size})"


class Captioner(nn.Module):
    def __init__(self, encoder: Encoder, mapping: nn.Module | None = None, lm: nn.Module | None = None,
                 tokenizer=None, card: dict | None = None, model_id: str | None = None,
                 storage_dtype: str = "float32"):
        super().__init__()
        self.encoder = encoder
        self.mapping = mapping
        self.lm = lm
        self.tokenizer = tokenizer
        self._card = dict(card or {})
        self.model_id = model_id or "in-memory"
        self.storage_dtype = storage_dtype
        self._hash: str | None = None
        self.source_dir: Path | None = None
        if mapping is not None and getattr(mapping, "embed_dim", encoder.embed_dim) != encoder.embed_dim:
            raise ModelError(f"mapping expects {mapping.embed_dim}-d embeddings, encoder gives {encoder.embed_dim}")
        self.eval()

    # ------------------------------------------------------------------ properties

    @property
    def can_caption(self) -> bool:
        """False for a bare public encoder (e.g. `ViT-B-32/openai`): search works, captions don't."""
        return self.mapping is not None and self.lm is not None and self.tokenizer is not None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    @property
    def prefix_length(self) -> int | None:
        return getattr(self.mapping, "prefix_length", None)

    @property
    def eos_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = getattr(self.lm.config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0]
        if eos is None:
            raise ModelError("the caption tokenizer has no end-of-sequence token")
        return int(eos)

    @property
    def card(self) -> dict:
        """Facts measured from the modules win over whatever the stored card says."""
        lm_name = None
        if self.lm is not None:
            lm_name = self._card.get("lm") or _describe_lm(self.lm)
        return {
            "description": self._card.get("description", ""),
            "tile_size": self._card.get("tile_size"),
            "ground_resolution_m": self._card.get("ground_resolution_m"),
            "trained_on": self._card.get("trained_on"),
            "metrics": self._card.get("metrics"),
            **{k: v for k, v in self._card.items() if k not in ("encoder", "lm")},
            "encoder": self.encoder.describe(),
            "encoder_kind": self.encoder.kind,
            "lm": lm_name,
            "mapping": getattr(self.mapping, "kind", None),
            "prefix_length": self.prefix_length,
            "embed_dim": self.embed_dim,
            "image_size": self.encoder.image_size,
            "preprocessing": dict(self.encoder.preprocess),
            "can_caption": self.can_caption,
        }

    @property
    def model_hash(self) -> str:
        """sha256 over config.json + weight files of the checkpoint dir (see checkpoint.py). For a
        model built in memory it is computed by saving to a temporary dir once."""
        if self._hash is None:
            from .checkpoint import hash_unsaved

            self._hash = hash_unsaved(self)
        return self._hash

    def save(self, directory) -> Path:
        from .checkpoint import save_checkpoint

        return save_checkpoint(self, directory)

    def to_device(self, device=None, dtype=None) -> "Captioner":
        """Move + cast; LM maths stays stable in fp16 because log-softmax is done in fp32."""
        from ..device import parse_dtype, pick_device

        device = pick_device(device)
        self.to(device=device, dtype=parse_dtype(dtype, device))
        return self

    # ------------------------------------------------------------------ embedding

    @torch.inference_mode()
    def embed_images(self, images, batch_size: int = 32) -> np.ndarray:
        n = len(images)
        out = []
        for start in range(0, n, batch_size):
            pixels = images_to_pixels(images[start:start + batch_size], self.encoder.preprocess,
                                      self.device, self.dtype)
            out.append(self.encoder.encode_image(pixels).float().cpu())
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return F.normalize(torch.cat(out), dim=-1).numpy().astype(np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts, batch_size: int = 128) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = [self.encoder.encode_text(texts[i:i + batch_size]).float().cpu()
               for i in range(0, len(texts), batch_size)]
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return F.normalize(torch.cat(out), dim=-1).numpy().astype(np.float32)

    # ------------------------------------------------------------------ training

    def prefix(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.mapping(embeddings.to(self.device, self.dtype))

    def tokenize_captions(self, texts, max_length: int = 40):
        """Caption token ids with EOS appended (the LM must learn to stop), right-padded.
        Returns (token_ids [B, T], attention_mask [B, T]) as LongTensors on the CPU."""
        eos = self.eos_token_id
        rows = []
        for text in texts:
            ids = self.tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"][: max_length - 1]
            rows.append(ids + [eos])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        return pad_batch(rows, pad)

    def caption_loss(self, embeddings: torch.Tensor, token_ids: torch.Tensor, attention_mask: torch.Tensor,
                     label_smoothing: float = 0.0) -> torch.Tensor:
        """Teacher forcing on [prefix, caption]: mean cross-entropy over caption tokens only
        (prefix positions and padding carry no loss). `token_ids` come from `tokenize_captions`."""
        if not self.can_caption:
            raise ModelError(f"model '{self.model_id}' has no caption head")
        device = self.device
        token_ids, attention_mask = token_ids.to(device), attention_mask.to(device)
        prefix = self.prefix(embeddings)
        p = prefix.shape[1]
        tok_emb = self.lm.get_input_embeddings()(token_ids)
        inputs = torch.cat([prefix, tok_emb.to(prefix.dtype)], dim=1)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=attention_mask.dtype, device=device), attention_mask], 1)
        logits = self.lm(inputs_embeds=inputs, attention_mask=mask, use_cache=False).logits
        # position p-1 (last prefix slot) predicts caption token 0, and so on
        pred = logits[:, p - 1:-1].float()
        labels = token_ids.masked_fill(attention_mask == 0, -100)
        return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), labels.reshape(-1), ignore_index=-100,
                               label_smoothing=label_smoothing)

    # ------------------------------------------------------------------ decoding

    def _start(self, prefix: torch.Tensor):
        """Run the prefix through the LM once; returns (last logits, cache, attention mask)."""
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        extra = {"logits_to_keep": 1} if self._keeps_logits() else {}  # skip vocab logits of prefix slots
        out = self.lm(inputs_embeds=prefix, attention_mask=mask, use_cache=True, **extra)
        return out.logits[:, -1].float(), out.past_key_values, mask

    def _keeps_logits(self) -> bool:
        import inspect

        return "logits_to_keep" in inspect.signature(self.lm.forward).parameters

    def _step(self, tokens: torch.Tensor, cache, mask: torch.Tensor):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = self.lm(input_ids=tokens[:, None], attention_mask=mask, past_key_values=cache, use_cache=True)
        return out.logits[:, -1].float(), out.past_key_values, mask

    @torch.inference_mode()
    def greedy_ids(self, embeddings: torch.Tensor, max_new_tokens: int = 30):
        """Returns (token lists without EOS, mean log-prob per sequence including the EOS step)."""
        eos = self.eos_token_id
        logits, cache, mask = self._start(self.prefix(embeddings))
        b = logits.shape[0]
        tokens = torch.zeros((b, 0), dtype=torch.long, device=logits.device)
        finished = torch.zeros(b, dtype=torch.bool, device=logits.device)
        total = torch.zeros(b, device=logits.device)
        count = torch.zeros(b, device=logits.device)
        for step in range(max_new_tokens):
            logp = torch.log_softmax(logits, dim=-1)
            if step == 0:
                logp[:, eos] = -float("inf")  # an empty caption is never useful
            lp, tok = logp.max(dim=-1)
            tok = tok.masked_fill(finished, eos)
            total += torch.where(finished, torch.zeros_like(lp), lp)
            count += (~finished).float()
            tokens = torch.cat([tokens, tok[:, None]], dim=1)
            finished |= tok == eos
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            logits, cache, mask = self._step(tok, cache, mask)
        seqs = [_until_eos(row, eos) for row in tokens.tolist()]
        return seqs, (total / count.clamp(min=1)).tolist()

    @torch.inference_mode()
    def beam_ids(self, embeddings: torch.Tensor, beam_size: int = 3, max_new_tokens: int = 30,
                 length_penalty: float = 1.0):
        """Batched beam search on the KV cache. A hypothesis is ranked by
        sum log-prob / length ** length_penalty; the returned score is its mean log-prob."""
        eos, k = self.eos_token_id, int(beam_size)
        prefix = self.prefix(embeddings)
        b = prefix.shape[0]
        logits, cache, mask = self._start(prefix.repeat_interleave(k, dim=0))
        dev = logits.device
        vocab = logits.shape[-1]
        scores = torch.zeros(b, k, device=dev)
        scores[:, 1:] = -float("inf")  # all beams start identical: expand only the first
        seqs = torch.zeros((b * k, 0), dtype=torch.long, device=dev)
        hyps: list[list[tuple[float, float, list[int]]]] = [[] for _ in range(b)]  # (rank score, mean lp, ids)
        done = [False] * b
        for step in range(max_new_tokens):
            length = step + 1
            logp = torch.log_softmax(logits, dim=-1)
            if step == 0:
                logp[:, eos] = -float("inf")
            cand = (scores.view(-1, 1) + logp).view(b, k * vocab)
            top_scores, top_idx = cand.topk(min(2 * k, k * vocab), dim=1)
            top_beam, top_tok = top_idx // vocab, top_idx % vocab
            next_scores = torch.full((b, k), -float("inf"), device=dev)
            next_tok = torch.full((b, k), eos, dtype=torch.long, device=dev)
            next_beam = torch.zeros((b, k), dtype=torch.long, device=dev)
            ts, tb, tt = top_scores.tolist(), top_beam.tolist(), top_tok.tolist()
            for i in range(b):
                if done[i]:
                    continue
                slot = 0
                for rank in range(len(ts[i])):
                    s, beam, tok = ts[i][rank], tb[i][rank], tt[i][rank]
                    if s == -float("inf"):
                        break
                    if tok == eos:
                        if rank < k:  # only EOS among the best k counts (as in HF beam search)
                            ids = seqs[i * k + beam].tolist()
                            hyps[i].append((s / length ** length_penalty, s / length, ids))
                        continue
                    next_scores[i, slot], next_tok[i, slot], next_beam[i, slot] = s, tok, beam
                    slot += 1
                    if slot == k:
                        break
                hyps[i].sort(key=lambda h: -h[0])
                del hyps[i][k:]
                best_running = float(next_scores[i].max())
                if len(hyps[i]) >= k and (best_running == -float("inf") or
                                          hyps[i][-1][0] >= best_running / length ** length_penalty):
                    done[i] = True
            if all(done):
                break
            flat = (torch.arange(b, device=dev)[:, None] * k + next_beam).view(-1)
            seqs = torch.cat([seqs[flat], next_tok.view(-1, 1)], dim=1)
            scores = next_scores
            if step == max_new_tokens - 1:
                break
            cache = _reorder_cache(cache, flat)
            logits, cache, mask = self._step(next_tok.view(-1), cache, mask)
        out_ids, out_scores = [], []
        for i in range(b):
            if not done[i]:  # ran out of tokens: unfinished beams compete with the finished ones
                n = seqs.shape[1]
                for j in range(k):
                    s = float(scores[i, j])
                    if s > -float("inf"):
                        hyps[i].append((s / n ** length_penalty, s / n, seqs[i * k + j].tolist()))
                hyps[i].sort(key=lambda h: -h[0])
            best = hyps[i][0] if hyps[i] else (-float("inf"), -float("inf"), [])
            out_ids.append(best[2])
            out_scores.append(best[1])
        return out_ids, out_scores

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return clean_caption(text)

    def caption(self, embeddings, beam_size: int = 1, max_new_tokens: int = 30, length_penalty: float = 1.0,
                batch_size: int | None = None) -> list[tuple[str, float]]:
        """Captions for stored image embeddings, with confidence = exp(mean token log-prob)."""
        if not self.can_caption:
            raise ModelError(f"model '{self.model_id}' is an encoder only (search works, captions need a "
                             "checkpoint with a trained mapping and language model)")
        emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        if emb.ndim == 1:
            emb = emb[None]
        if emb.ndim != 2 or emb.shape[1] != self.embed_dim:
            raise ModelError(f"expected embeddings of shape [N, {self.embed_dim}], got {tuple(emb.shape)}")
        beam_size = max(1, int(beam_size))
        batch_size = batch_size or max(1, 64 // beam_size)
        results = []
        for start in range(0, emb.shape[0], batch_size):
            chunk = emb[start:start + batch_size].to(self.device, self.dtype)
            if beam_size == 1:
                ids, lps = self.greedy_ids(chunk, max_new_tokens)
            else:
                ids, lps = self.beam_ids(chunk, beam_size, max_new_tokens, length_penalty)
            results += [(self.decode(i), float(min(1.0, np.exp(lp)))) for i, lp in zip(ids, lps)]
        return results


def pad_batch(seqs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (ids [B, T], attention mask [B, T]) LongTensors."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def _until_eos(row: list[int], eos: int) -> list[int]:
    return row[:row.index(eos)] if eos in row else row


def _reorder_cache(cache, index: torch.Tensor):
    """Beam search keeps the cache rows of the surviving beams (Cache objects or legacy tuples)."""
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
        return cache
    return tuple(tuple(t.index_select(0, index) for t in layer) for layer in cache)


_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")


def clean_caption(text: str) -> str:
    """One line, single spaces, no space before punctuation."""
    text = " ".join(text.replace("\n", " ").split())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text).strip()

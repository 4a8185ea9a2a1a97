"""`Decoder`: one caption language = prefix mapping + causal LM + tokenizer, and the decoding
loops over it.

A captioner has one English decoder (its own mapping/lm/tokenizer) and may carry more, e.g. a
Chinese one trained on text (see training/crosslingual.py); they all read the same joint-space
embedding, so one set of decoding loops serves every language.

Decoding is a hand-written loop over the LM with its KV cache (`past_key_values`) rather than
`lm.generate(inputs_embeds=...)`: the loop is short, behaves the same across transformers
versions, gives us per-token log-probs for the confidence directly, and batches beam search.
Every caption starts from the same-length prefix, so a batch needs no padding and batched results
match unbatched ones.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelError


class Decoder(nn.Module):
    def __init__(self, mapping: nn.Module, lm: nn.Module, tokenizer, runner=None):
        super().__init__()
        self.mapping = mapping
        self.lm = lm
        self.tokenizer = tokenizer
        self.runner = runner  # gpt2_runner.GPT2Runner over ``lm``'s weights (inference.fast_decoder)

    @property
    def device(self) -> torch.device:
        return next(self.mapping.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.mapping.parameters() if p.is_floating_point()).dtype

    @property
    def embed_dim(self) -> int | None:
        return getattr(self.mapping, "embed_dim", None)

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
        if self.runner is not None:
            logits, cache = self.runner.start(prefix)
            return logits.float(), cache, None
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        extra = {"logits_to_keep": 1} if self._keeps_logits() else {}  # skip vocab logits of prefix slots
        out = self.lm(inputs_embeds=prefix, attention_mask=mask, use_cache=True, **extra)
        return out.logits[:, -1].float(), out.past_key_values, mask

    def _keeps_logits(self) -> bool:
        import inspect

        return "logits_to_keep" in inspect.signature(self.lm.forward).parameters

    def _step(self, tokens: torch.Tensor, cache, mask: torch.Tensor):
        if self.runner is not None:
            logits, cache = self.runner.step(tokens, cache)
            return logits.float(), cache, None
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
                 length_penalty: float = 1.0, n_best: bool = False):
        """Batched beam search on the KV cache. A hypothesis is ranked by
        sum log-prob / length ** length_penalty; the returned score is its mean log-prob. With
        ``n_best`` every input gets its finished hypotheses best first (lists of ids and of scores)."""
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
            ranked = hyps[i] or [(-float("inf"), -float("inf"), [])]
            out_ids.append([h[2] for h in ranked] if n_best else ranked[0][2])
            out_scores.append([h[1] for h in ranked] if n_best else ranked[0][1])
        return out_ids, out_scores

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        text = text.replace("\ufffd", "")  # a byte-level BPE may stop inside a multi-byte character
        return clean_caption(text)


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

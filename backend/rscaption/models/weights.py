"""Tensor files: safetensors only, so a checkpoint can never execute code when it is opened."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ModelError

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def storage_dtype(name: str | None) -> torch.dtype:
    """fp16 storage halves the shipped default model; compute always happens in the load dtype."""
    name = name or "float32"
    if name not in STORAGE_DTYPES:
        raise ModelError(f"unsupported storage dtype '{name}' (use float32 or float16)")
    return STORAGE_DTYPES[name]


def save_state(state: dict, path: Path, dtype: torch.dtype = torch.float32) -> None:
    """Clone every tensor so tied/shared storages (which safetensors refuses) become plain copies;
    only floating tensors are cast, so integer buffers (e.g. position ids) stay exact."""
    out = {}
    for key in sorted(state):
        t = state[key].detach().to("cpu")
        if t.is_floating_point():
            t = t.to(dtype)
        out[key] = t.contiguous().clone()
    save_file(out, str(path), metadata={"format": "pt"})


def load_state(path: Path) -> dict:
    """Read back to fp32: fp16 storage is a size choice, not a compute choice."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint file missing: {path}")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise ModelError(f"checkpoint file is corrupt: {path} ({exc})") from None
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def load_into(module: torch.nn.Module, state: dict, what: str, prefix: str = "") -> None:
    """Strict load with a readable error: a shape or key mismatch means config and weights disagree."""
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelError(f"{what} weights do not match its config: {str(exc).splitlines()[0]}") from None
    if missing or unexpected:
        raise ModelError(
            f"{what} weights do not match its config (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
        )


@contextlib.contextmanager
def quiet_loading():
    """transformers progress bars/load reports and open_clip's root-logger warnings about random
    init are noise for a CLI that loads known checkpoints; errors still raise (open_clip also logs
    the error it raises, a second line beside the CLI's one: kept quiet too)."""
    import logging

    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        hf_logging = None
    old_level = hf_logging.get_verbosity() if hf_logging else None
    bars = hf_logging.is_progress_bar_enabled() if hf_logging else False
    if hf_logging:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    root = logging.getLogger()
    old_root = root.level
    root.setLevel(max(old_root, logging.CRITICAL))
    try:
        yield
    finally:
        root.setLevel(old_root)
        if hf_logging:
            hf_logging.set_verbosity(old_level)
            if bars:
                hf_logging.enable_progress_bar()

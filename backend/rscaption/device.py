"""Pick the torch device and dtype the models run on.

Kept apart from the models so the CLI and the plugin can validate a ``--device`` option (and show
what will be used) without building a model.
"""

from __future__ import annotations

from .errors import ModelError


def _torch():
    import torch  # imported lazily: the plugin imports this module at start-up without torch

    return torch


def available_devices() -> list[str]:
    """Devices this machine can run on, best first (shown by ``rscaption info``)."""
    torch = _torch()
    found = []
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    found.append("cpu")
    return found


def pick_device(requested=None):
    """CUDA, then MPS, then CPU unless the user asked for one; a device that is not there is a
    user error (one clear line), not a torch traceback in the middle of a run."""
    torch = _torch()
    if isinstance(requested, torch.device):
        requested = str(requested)
    if requested is None or str(requested).strip().lower() in ("", "auto"):
        return torch.device(available_devices()[0])
    name = str(requested).strip().lower()
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ModelError(f"unknown device '{requested}'; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device '{requested}' requested but CUDA is not available here")
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ModelError(
                f"device '{requested}' requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return torch.device("cuda", index)
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelError(f"device '{requested}' requested but MPS is not available here")
        return dev
    raise ModelError(f"unsupported device '{requested}'; use auto, cpu, cuda, cuda:N or mps")


def default_dtype(device):
    """Half precision where it is fast and safe (CUDA); fp32 elsewhere because CPU fp16 matmuls are
    slow and MPS fp16 has had numerical problems with some ops."""
    torch = _torch()
    device = torch.device(device) if not isinstance(device, torch.device) else device
    return torch.float16 if device.type == "cuda" else torch.float32


def parse_dtype(value, device):
    """Accept ``None``/"auto", a torch dtype or a name ("float16", "fp16", "bf16", "float32")."""
    torch = _torch()
    if value is None or (isinstance(value, str) and value.lower() in ("", "auto")):
        return default_dtype(device)
    if isinstance(value, torch.dtype):
        return value
    names = {
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    }
    key = str(value).lower().replace("torch.", "")
    if key not in names:
        raise ModelError(f"unsupported dtype '{value}'; use float32, float16 or bfloat16")
    return names[key]

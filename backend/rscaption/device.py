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


PRECISIONS = ("fp32", "bf16", "auto")


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX-BF16 (Intel Sapphire Rapids and later), where torch's bf16 matmuls and
    convolutions run on the matrix unit: about 6x the fp32 GEMM rate on one core of the project's
    machine. Elsewhere bf16 on a CPU is emulated or dot-product-only and rarely pays."""
    torch = _torch()
    try:
        return bool(torch.cpu.get_capabilities().get("amx_bf16"))
    except Exception:  # older torch without the query: stay in fp32
        return False


def parse_precision(value) -> str:
    """``fp32`` | ``bf16`` | ``auto`` (``None``: the ``RSCAPTION_PRECISION`` environment variable,
    else ``fp32``); anything else is a user error.

    fp32 is the default on a CPU although bf16 is about 1.3x faster end to end on AMX CPUs: bf16
    rounding moves tiles that sit between two scenes, and on the 5 m NAIP test scene it turned 6
    more of 108 meadow tiles into golf courses (docs/performance.md). Speed is opt-in."""
    import os

    if value is None or str(value).strip() == "":
        value = os.environ.get("RSCAPTION_PRECISION", "fp32") or "fp32"
    key = {"float32": "fp32", "bfloat16": "bf16"}.get(str(value).strip().lower(), str(value).strip().lower())
    if key not in PRECISIONS:
        raise ModelError(f"unsupported precision '{value}'; use auto, fp32 or bf16")
    return key


def compute_dtype(precision, device, param_dtype):
    """The dtype inference computes in. Half-precision weights (CUDA) compute in their own dtype.
    fp32 weights on a CPU compute in bf16 when asked to (``bf16``, or ``auto`` on a CPU with
    AMX-BF16); the weights themselves stay fp32 (training and saving never see the bf16 copies)."""
    torch = _torch()
    if param_dtype != torch.float32 or torch.device(device).type != "cpu":
        return param_dtype
    p = parse_precision(precision)
    if p == "bf16" or (p == "auto" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return torch.float32


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

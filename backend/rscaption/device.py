"""Pick the torch device and dtype the models run on.

Kept apart from the models so the CLI and the plugin can validate a ``--device`` option (and show
what will be used) without building a model.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

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

# What the CPU offers for bf16, in the names of ``torch.cpu.get_capabilities()`` (the bench reports them).
CPU_FLAGS = ("avx2", "avx512_f", "avx512_bw", "avx512_vl", "avx512_dq", "avx512_bf16", "amx_bf16", "amx_tile",
             "avx_ne_convert", "avx_vnni")
# oneDNN's bf16 convolutions on x86 need avx_ne_convert, or else all three of these.
_BF16_CONV_FLAGS = ("avx512_bw", "avx512_vl", "avx512_dq")


class Bf16Support(NamedTuple):
    """Whether this process can compute the model in bf16 on the CPU; ``reason`` (one line) says why not."""

    ok: bool
    reason: str = ""


def cpu_flags() -> dict[str, bool]:
    """The bf16-relevant CPU flags (``CPU_FLAGS``) as torch's cpuinfo sees them; empty when the query
    is missing (older torch)."""
    try:
        caps = _torch().cpu.get_capabilities()
    except Exception:
        return {}
    return {f: bool(caps.get(f)) for f in CPU_FLAGS}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else what the platform says)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def mkldnn_bf16_supported() -> bool:
    """The low-level query the bf16 probe starts from: torch's own check, the one that raises
    ``mkldnn_convolution: bf16 path needs ...`` on CPUs without the instructions (AVX2-only AMD
    EPYC, for one). Tests replace this function to simulate such a CPU on any machine."""
    try:
        return bool(_torch().ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN
        return False


def _missing_cpu_support() -> str:
    """One phrase naming what this CPU lacks for oneDNN's bf16 convolutions."""
    import os
    import platform

    flags = cpu_flags()
    missing = [f.replace("_", "") for f in _BF16_CONV_FLAGS if not flags.get(f)]
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    if x86 and flags and missing and not flags.get("avx_ne_convert"):
        return f"this CPU has no avx_ne_convert nor {', '.join(missing)}, which oneDNN's bf16 convolutions need"
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return "oneDNN offers no bf16 convolutions on this CPU" + (f" (ONEDNN_MAX_CPU_ISA={capped})" if capped else "")


def mkldnn_fusion_available() -> bool:
    """This torch has oneDNN's fused convolution (conv + bias + activation in one call), which the
    folded image tower uses on the CPU. Here rather than in models/fold.py so that the bf16 probe
    below needs nothing from the models."""
    torch = _torch()
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _bf16_ops_fail() -> str:
    """Run the bf16 ops the model's fast paths use, tiny: a fused oneDNN convolution as the folded
    tower calls it (models/fold.py), a channels-last convolution, and a matrix product. Returns the
    first failure as one line, "" when all run."""
    torch = _torch()
    import torch.nn.functional as F

    x = torch.randn(1, 4, 6, 6, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 4, 3, 3, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    b = torch.zeros(4, dtype=torch.bfloat16)
    ops = {"convolution": lambda: F.conv2d(x, w, b, padding=1),
           "matrix product": lambda: F.linear(torch.randn(3, 8, dtype=torch.bfloat16),
                                              torch.randn(5, 8, dtype=torch.bfloat16))}
    if mkldnn_fusion_available():
        ops["fused oneDNN convolution"] = lambda: torch.ops.mkldnn._convolution_pointwise(
            x, w, b, [1, 1], [1, 1], [1, 1], 1, "hardtanh", [0.0, 6.0], "")
    with torch.inference_mode():
        for name, op in ops.items():
            try:
                op()
            except RuntimeError as exc:
                return f"a bf16 {name} fails here: {(str(exc).strip().splitlines() or ['?'])[0]}"
    return ""


@functools.lru_cache(maxsize=1)
def bf16_support() -> Bf16Support:
    """Can this CPU run the model in bf16, the way the model runs it? Asked once per process (the
    answer cannot change); ``bf16_support.cache_clear()`` asks again.

    Torch runs bf16 matrix products on any CPU, but the folded tower's fused convolutions go to
    oneDNN, which refuses bf16 without AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: an AVX2-only CPU
    failed in the middle of a run, after the output was created. So: torch's check first, then the
    real ops, tiny."""
    if not mkldnn_bf16_supported():
        return Bf16Support(False, _missing_cpu_support())
    failure = _bf16_ops_fail()
    return Bf16Support(not failure, failure)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX-BF16 (Intel Sapphire Rapids and later) where the bf16 probe passes:
    there torch's bf16 matmuls and convolutions run on the matrix unit, about 6x the fp32 GEMM rate
    on one core of the project's machine. Elsewhere bf16 on a CPU is emulated or dot-product-only
    and rarely pays, or does not run at all (``bf16_support``)."""
    return bool(cpu_flags().get("amx_bf16")) and bf16_support().ok


def require_bf16() -> None:
    """An explicit bf16 on a CPU that cannot run it: one line the user can act on, raised before
    anything is written (load_model, the pipeline's setup), not a oneDNN error mid-run."""
    support = bf16_support()
    if not support.ok:
        raise ModelError(f"precision bf16 cannot run on this CPU: {support.reason}; "
                         "use fp32, or auto (bf16 only where it runs and is fast)")


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
    fp32 weights on a CPU compute in bf16 when asked to (``bf16``: a ModelError where this CPU
    cannot run it; ``auto``: only on a CPU with AMX-BF16 that runs it); the weights themselves stay
    fp32 (training and saving never see the bf16 copies)."""
    torch = _torch()
    if param_dtype != torch.float32 or torch.device(device).type != "cpu":
        return param_dtype
    p = parse_precision(precision)
    if p == "bf16":
        require_bf16()
        return torch.bfloat16
    if p == "auto" and cpu_has_fast_bf16():
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

"""What "Set up backend" will install, and how large it is, said before Start is pressed.

torch from the default package index on Linux is the CUDA build: with it come about 3.2 GB of
NVIDIA libraries and 0.9 GB of triton, useless on a machine without an NVIDIA GPU (a person's
laptop got them all unannounced). There the plugin installs the CPU build of the same pinned
torch and torchvision from the PyTorch CPU wheel index, which the pins allow: ``torch==2.14.1``
matches ``2.14.1+cpu``, and the requirements step after it finds them already satisfied. On
Windows and macOS the default index's torch is the CPU (or Apple MPS) build already.

The sizes are measured on Linux x86_64 with Python 3.11 (rounded up); they are there so a person
knows what the download costs before it starts, not to the megabyte.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_PACKAGES = ("torch", "torchvision")
# (download GB, on disk GB)
SIZE_CPU_TORCH = (0.2, 0.8)
SIZE_CUDA_TORCH = (3.6, 5.3)  # torch 1.2 GB + NVIDIA CUDA libraries 3.2 GB + triton 0.9 GB on disk
SIZE_REST = (0.3, 0.5)  # rasterio, transformers, open_clip, timm, the MiniLM text tower, ...
CUDA_LIBS_GB = 3.2


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver is installed (Linux: its /proc entry; elsewhere: nvidia-smi on PATH)."""
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def cpu_build_helps() -> bool:
    """Only Linux's default torch wheel drags in the CUDA libraries."""
    return sys.platform.startswith("linux")


def _name(line: str) -> str:
    return re.split(r"[\s;=<>!~\[]", line.strip(), maxsplit=1)[0].lower()


def requirement_lines(requirements: Path | None) -> list[str]:
    """The requirement lines of a requirements file (comments and blank lines dropped)."""
    if requirements is None or not Path(requirements).is_file():
        return []
    lines = []
    for raw in Path(requirements).read_text(encoding="utf-8").splitlines():
        line = raw.split(" #")[0].strip()
        if line and not line.startswith(("#", "-")):
            lines.append(line)
    return lines


def torch_pins(requirements: Path | None) -> list[str]:
    """The torch and torchvision lines, as pinned (markers kept): what the CPU step installs."""
    return [line for line in requirement_lines(requirements) if _name(line) in TORCH_PACKAGES]


def package_names(requirements: Path | None) -> list[str]:
    names = []
    for line in requirement_lines(requirements):
        name = _name(line)
        if name not in names:
            names.append(name)
    return names


@dataclass
class InstallPlan:
    cpu_torch: bool  # the CPU build from the PyTorch CPU index
    gpu: bool  # an NVIDIA GPU was found
    packages: list[str]
    download_gb: float
    disk_gb: float

    def text(self, target) -> str:
        """Two or three sentences for the dialog, before Start."""
        what = ", ".join(self.packages) or "the pinned requirements"
        if self.cpu_torch:
            build = ("the CPU build of torch (from the PyTorch CPU wheel index: no CUDA libraries"
                     + (", although an NVIDIA GPU was found)" if self.gpu else "; no NVIDIA GPU was found)"))
        elif cpu_build_helps():
            build = (f"the CUDA build of torch with {CUDA_LIBS_GB:.1f} GB of NVIDIA CUDA libraries"
                     + (" (an NVIDIA GPU was found)" if self.gpu else "; tick the CPU build to leave them out"))
        else:
            build = "torch from the default package index (CPU" + (" and Apple MPS)" if sys.platform == "darwin" else ")")
        return (f"Installs into {target}: {what}; the runtime only (no Ray, no test tools). torch is {build}. "
                f"About {self.download_gb:.1f} GB to download and {self.disk_gb:.1f} GB on disk; "
                "a few minutes, and QGIS stays usable meanwhile.")


def install_plan(requirements: Path | None, cpu_torch: bool | None = None, gpu: bool | None = None) -> InstallPlan:
    """The plan for this machine: the CPU build where it helps and no NVIDIA GPU is found, unless
    ``cpu_torch`` says otherwise."""
    gpu = has_nvidia_gpu() if gpu is None else gpu
    if cpu_torch is None:
        cpu_torch = cpu_build_helps() and not gpu
    cpu_torch = bool(cpu_torch and torch_pins(requirements))
    if cpu_torch or not cpu_build_helps():
        torch_size = SIZE_CPU_TORCH
    else:
        torch_size = SIZE_CUDA_TORCH
    return InstallPlan(cpu_torch, gpu, package_names(requirements), torch_size[0] + SIZE_REST[0],
                       torch_size[1] + SIZE_REST[1])

"""Keep torch's optional compilers out of QGIS's process before the in-process backend loads torch.

torch 2.14 imports ``triton`` when the package is installed, not only when something is
compiled: ``torchvision.ops`` imports ``torch._dynamo.utils``, which imports ``triton`` if
``torch.utils._triton.has_triton_package()`` says it is there. Loading ``libtriton.so`` runs
LLVM's static initialisers, and inside the QGIS desktop process (which links its own copies of
libraries LLVM also uses) that is a segfault seconds after Caption is pressed; headless QGIS and
``qgis_process`` survive, which is why it went unnoticed. The captioner never compiles anything,
so nothing is lost by refusing triton here.

How: ``sys.modules["triton"] = None`` is Python's own "this module is absent" marker. ``import
triton`` then raises ModuleNotFoundError, which torch catches everywhere it probes for triton, and
``importlib.util.find_spec("triton")`` returns None (torch.cuda and inductor probe that way), so
torch behaves exactly as on a machine without triton. ``TORCH_COMPILE_DISABLE`` and
``TORCHDYNAMO_DISABLE`` turn any ``torch.compile`` a library might call into a no-op, so inductor
never starts compiling either. torch._dynamo still imports a few pure-Python ``torch._inductor``
configuration modules (torchvision needs ``torch._dynamo``); those load no native compiler.

Only the in-process backend calls :func:`guard_inprocess`; the plugin's start-up imports nothing
of torch, and a triton that something else already loaded into the process is left alone.
"""

from __future__ import annotations

import os
import sys

REFUSED = ("triton",)
#: Environment switches torch reads at import time; set only if the user did not choose otherwise.
ENV = {"TORCH_COMPILE_DISABLE": "1", "TORCHDYNAMO_DISABLE": "1"}
#: torch._inductor modules that only load when something is actually compiled.
COMPILER_MODULES = ("torch._inductor.compile_fx", "torch._inductor.codecache", "torch._inductor.async_compile",
                    "torch._inductor.scheduler", "torch._inductor.graph")


def guard_inprocess() -> None:
    """Make this process behave as if triton were not installed. Idempotent."""
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    for name in REFUSED:
        if name not in sys.modules:  # a triton loaded before us did not crash this process
            sys.modules[name] = None


def compilers_loaded() -> list[str]:
    """Names of the refused compiler modules actually loaded in this process (for tests, diagnostics)."""
    return sorted(name for name, module in list(sys.modules.items())
                  if module is not None and (name.split(".")[0] in REFUSED or name in COMPILER_MODULES))


#: What PROJ says when a proj.db from another PROJ release is opened.
PROJ_DB_MISMATCH = ("DATABASE.LAYOUT.VERSION", "another PROJ installation")


def share_proj_database() -> str | None:
    """Inside the QGIS desktop, rasterio's own PROJ calls can land in QGIS's PROJ (the executable
    links PROJ, and its symbols come first), which then reads the proj.db that rasterio's wheel ships.
    When that PROJ is newer than the wheel's (QGIS 3.44 on Debian sid: PROJ 9.9 against 9.7) every
    read fails with "proj.db ... comes from another PROJ installation". Probe one CRS lookup; on
    that error point rasterio at QGIS's own PROJ data, which is what the running PROJ expects (then,
    failing that, at the wheel's own). Returns the folder switched to, else None (no mismatch:
    nothing changes, or no folder helped)."""
    from rasterio.crs import CRS
    from rasterio.env import PROJDataFinder, set_proj_data_search_path

    def mismatch() -> bool:
        try:
            CRS.from_epsg(32614).to_epsg()
        except Exception as exc:  # rasterio wraps PROJ's message in a CRSError or a CPLE error
            return any(text in str(exc) for text in PROJ_DB_MISMATCH)
        return False

    if not mismatch():
        return None
    from qgis.core import QgsProjUtils

    for folder in [*QgsProjUtils.searchPaths(), PROJDataFinder().search_wheel()]:
        if folder and os.path.isfile(os.path.join(folder, "proj.db")):
            set_proj_data_search_path(folder)
            if not mismatch():
                return folder
    return None

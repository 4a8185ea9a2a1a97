"""Out of accelerator memory in a batch: halve the batch, and at one tile fall back to the CPU.

Why in the pipeline and not in the models: the batch size is the pipeline's choice, and a run of
hours should not die at tile 40,000 because a bigger tile or a busier GPU left less memory than
the first batch needed. The smaller size is kept for the rest of the run (trying the full batch
again would fail again), and every step is one warning on the ``rscaption`` logger (stderr in the
CLI and the worker). Device-agnostic: torch's ``OutOfMemoryError`` (CUDA, and the newer
device-generic one), the "out of memory" ``RuntimeError`` of MPS and older builds, and the CPU
allocator's "can't allocate memory" (halved too; at one tile on the CPU it is one clear line).
"""

from __future__ import annotations

import logging
import sys
import weakref

from ..errors import RscaptionError

log = logging.getLogger("rscaption.engine.pipeline")


def is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None:
        kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None))
                      if isinstance(k, type))
        if kinds and isinstance(exc, kinds):
            return True
    text = str(exc).lower()  # MPS and older builds: a RuntimeError; the CPU allocator: "can't allocate"
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _device_type(cap) -> str:
    device = getattr(cap, "device", "cpu")
    return getattr(device, "type", str(device).split(":")[0])


def _release_cached_memory() -> None:
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # freeing is best effort; the retry decides
        pass


class OomGuard:
    """Runs ``fn(items) -> list`` (one entry per item) in chunks small enough for the device."""

    def __init__(self, cap):
        self.cap = cap
        self.limit: int | None = None  # the batch size that last fit, once one did not

    def run(self, fn, items: list) -> list:
        out: list = []
        size = len(items) if self.limit is None else min(self.limit, len(items))
        start = 0
        while start < len(items):
            chunk = items[start:start + size]
            try:
                out += fn(chunk)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                _release_cached_memory()
                size = self._smaller(len(chunk)) or len(items) - start  # None: now on the CPU, full size
                continue
            start += len(chunk)
        return out

    def _smaller(self, failed: int) -> int | None:
        device = getattr(self.cap, "device", "?")
        if failed > 1:
            self.limit = max(1, failed // 2)
            log.warning("warning: out of memory on %s with %d tiles per batch; continuing with %d",
                        device, failed, self.limit)
            return self.limit
        if _device_type(self.cap) == "cpu":
            raise RscaptionError("out of memory on the CPU even for one tile; choose a smaller --tile-size "
                                 "or close other programs") from None
        log.warning("warning: out of memory on %s even for one tile; continuing on the CPU (slower)", device)
        self.cap.to_device("cpu")
        self.limit = None  # main memory is far larger: back to the requested batch size
        return None


_GUARDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def oom_guard(cap) -> OomGuard:
    """The guard of one loaded model: a batch size that did not fit stays small for the model's
    later batches (every engine's step calls this, so they share what was learnt)."""
    guard = _GUARDS.get(cap)
    if guard is None:
        guard = _GUARDS.setdefault(cap, OomGuard(cap))
    return guard

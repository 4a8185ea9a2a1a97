"""Progress bars for training stages, switchable off for logs and CI (``--no-progress``).

tqdm reads ``TQDM_DISABLE`` only when it is first imported (usually by transformers, long before
the run starts), so the switch is a flag here rather than an environment variable.
"""

from __future__ import annotations

ENABLED = True


def set_enabled(on: bool) -> None:
    global ENABLED
    ENABLED = bool(on)


def bar(*args, **kwargs):
    from tqdm import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(*args, disable=not ENABLED, **kwargs)

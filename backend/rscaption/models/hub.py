"""Hub model names (``org/name``, open_clip tags) without a network: one line at once, not 30 s.

Why: huggingface_hub retries a request that cannot reach the hub five times with back-off (about
25 s and two log lines a try) before transformers gives up, and ``HF_HUB_OFFLINE`` is often not set
on a machine without a network. One short connection to the hub (or the proxy) tells first: when it
fails, the load runs in offline mode, from the local cache or not at all, and the error says that
the model is not in the cache and how to put it there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0
PROBE_KEPT_S = 60.0  # one probe answers the quick check and the load that follows it
_probed: dict = {}


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(getattr(constants, "ENDPOINT", None) or "https://huggingface.co")


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def offline_by_setting() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, as huggingface_hub read them at import or as set since."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or any(
        os.environ.get(v, "0").strip().lower() not in ("", "0", "false", "no", "off")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def unreachable_reason(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the hub (or the HTTPS proxy in the environment) opens within
    ``timeout``; else why not, in a few words."""
    key = (_endpoint(), os.environ.get("HTTPS_PROXY"), os.environ.get("https_proxy"))
    seen = _probed.get(key)
    if seen is None or time.monotonic() - seen[0] > PROBE_KEPT_S:
        _probed[key] = seen = (time.monotonic(), _probe(timeout))
    return seen[1]


def _probe(timeout: float) -> str | None:
    proxy = next((os.environ[v] for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(v)), None)
    target = urlsplit(proxy if proxy else _endpoint())
    host = target.hostname
    port = target.port or (443 if target.scheme == "https" else 80)
    if not host:
        return None  # nothing to probe: let the libraries say what is wrong
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host}:{port} cannot be reached ({exc.strerror or type(exc).__name__})"
    return None


@contextlib.contextmanager
def offline_unless_reachable():
    """Run the block in huggingface_hub's offline mode when the settings ask for it or the hub
    cannot be reached (transformers and open_clip read that flag at each call); yields why the load
    is offline ("HF_HUB_OFFLINE is set", an unreachable host) or None when it may download."""
    from huggingface_hub import constants

    reason = "HF_HUB_OFFLINE is set" if offline_by_setting() else unreachable_reason()
    if reason is None or constants.HF_HUB_OFFLINE:
        yield reason
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE = False


def not_cached_message(name: str, why_offline: str) -> str:
    """What the user reads when an offline load found nothing in the cache: where the cache is and
    how to fill it."""
    repo = name[len("hf-hub:"):] if name.startswith("hf-hub:") else name
    if name.startswith("hf-hub:") or repo.count("/") == 1 and not _is_open_clip_tag(repo):
        fetch = f"`hf download {repo}`"
    else:
        fetch = f"`rscaption info {name}`"
    return (f"model '{name}' is not available offline: it is not in the local Hugging Face cache "
            f"({cache_dir()}) and {why_offline}; run {fetch} on a machine with a network and copy that "
            "cache here (or point HF_HOME at it), or pass a checkpoint directory")


def offline_and_missing(name: str) -> str | None:
    """The error line for a hub repository name (``org/name``, ``hf-hub:org/name``) that cannot load
    here: offline (by setting, or the hub unreachable) and not in the local cache; None when it may
    load. Decided without importing torch, transformers or open_clip (seconds), before the device
    is picked."""
    repo = name[len("hf-hub:"):] if name.startswith("hf-hub:") else name
    if repo.count("/") != 1 or (not name.startswith("hf-hub:") and _is_open_clip_tag(repo)):
        return None  # an open_clip tag names weights in another repository: the loader says
    if (Path(cache_dir()) / f"models--{repo.replace('/', '--')}" / "snapshots").is_dir():
        return None
    reason = "HF_HUB_OFFLINE is set" if offline_by_setting() else unreachable_reason()
    return not_cached_message(name, reason) if reason else None


def _is_open_clip_tag(name: str) -> bool:
    """'ViT-B-32/openai': an open_clip architecture and its weights' tag, not a hub repository.
    Read from open_clip's folder of architecture configs: importing it takes seconds."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return False
    folder = Path(list(spec.submodule_search_locations)[0]) / "model_configs"
    return (folder / f"{name.split('/', 1)[0]}.json").is_file()

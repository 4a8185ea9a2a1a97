"""Names of the tiny random captioners ("tiny", "tiny-lit-linear-seed2", ...).

Their own module because both sides need them: the registry parses a name into the builder's
arguments, and the builder (tiny.py) stamps the name on what it builds as its model_id. Imports
nothing heavy, so the registry stays importable without torch.
"""

from __future__ import annotations

TINY_KINDS = ("open_clip", "hf_clip", "lit")


def tiny_name(kind: str = "open_clip", mapping: str = "mlp", seed: int = 0) -> str:
    """The loadable name of a tiny model, used as its model_id (so a run made with an in-memory
    tiny model can be searched again by name)."""
    return "tiny-" + "-".join([kind] + ([mapping] if mapping != "mlp" else []) + ([f"seed{seed}"] if seed else []))


def parse_tiny_name(name: str) -> dict | None:
    """'tiny', 'tiny-lit', 'tiny-hf_clip-transformer-seed3' -> build_tiny_captioner kwargs."""
    from .mapping import MAPPINGS

    if name == "tiny":
        return {"kind": "open_clip"}
    parts = name.split("-")
    if parts[0] != "tiny" or len(parts) < 2 or parts[1] not in TINY_KINDS:
        return None
    out = {"kind": parts[1]}
    for p in parts[2:]:
        if p in MAPPINGS:
            out["mapping"] = p
        elif p.startswith("seed") and p[4:].isdigit():
            out["seed"] = int(p[4:])
        else:
            return None
    return out

"""Writing a captioner as a checkpoint directory, and the directory's hash (the format is
described in checkpoint.py, which reads it).

Kept apart from the reader so ``Captioner.save`` and ``Captioner.model_hash`` need nothing that
imports the Captioner class: the reader builds Captioners, the writer only walks one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ModelError
from .decoder import Decoder
from .encoders import save_hf_model
from .weights import quiet_loading, save_state, storage_dtype

FORMAT = "rscaption-captioner"
VERSION = 1


def is_checkpoint_dir(path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (ValueError, OSError):
        return False


# Weight files in any format: the hash covers them all (a checkpoint whose numbers change must get
# another hash), though only safetensors ever load (checkpoint.refuse_pickled_weights).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES, ".h5", ".msgpack", ".onnx", ".gguf", ".npz", ".npy")


def weight_files(directory) -> list[Path]:
    """Every weight file under ``directory`` (any format), sorted by path."""
    directory = Path(directory)
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in WEIGHT_SUFFIXES and p.is_file())


def hash_dir(directory) -> str:
    """sha256 over config.json and every weight file (paths included, sorted). A safetensors-only
    checkpoint hashes as it always did."""
    directory = Path(directory)
    files = [directory / "config.json"] + weight_files(directory)
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(directory).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def hash_unsaved(cap) -> str:
    with tempfile.TemporaryDirectory(prefix="rscaption-hash-") as tmp:
        _write(cap, Path(tmp) / "ckpt")
        return hash_dir(Path(tmp) / "ckpt")


def _write(cap, out: Path) -> None:
    with quiet_loading():
        _write_files(cap, out)


def _write_files(cap, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=False)
    dtype = storage_dtype(cap.storage_dtype)
    config = {"format": FORMAT, "version": VERSION, "storage_dtype": cap.storage_dtype,
              "encoder": cap.encoder.save(out, dtype), "mapping": None, "lm": None, "tokenizer": None,
              "card": {k: v for k, v in cap._card.items()}}
    if cap.mapping is not None:
        save_state(cap.mapping.state_dict(), out / "mapping.safetensors", dtype)
        config["mapping"] = {**cap.mapping.config(), "weights": "mapping.safetensors"}
    if cap.lm is not None:
        save_hf_model(cap.lm, out / "lm", dtype)
        config["lm"] = {"path": "lm", "model_type": cap.lm.config.model_type}
    if cap.tokenizer is not None:
        cap.tokenizer.save_pretrained(str(out / "tokenizer"))
        config["tokenizer"] = {"path": "tokenizer"}
    if len(cap.extra_decoders):  # no key at all for English-only models: their hashes stay as they were
        config["decoders"] = {lang: {"path": f"decoders/{lang}", **write_decoder(dec, out / "decoders" / lang, dtype)}
                              for lang, dec in cap.extra_decoders.items()}
    if getattr(cap, "scene", None) is not None:  # calibrated confidence (models.scene)
        config["scene"] = cap.scene.save(out, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_decoder(dec: Decoder, out: Path, dtype: torch.dtype) -> dict:
    """A decoder's files in ``out``; returns its config entry (paths relative to ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    save_state(dec.mapping.state_dict(), out / "mapping.safetensors", dtype)
    save_hf_model(dec.lm, out / "lm", dtype)
    dec.tokenizer.save_pretrained(str(out / "tokenizer"))
    return {"mapping": {**dec.mapping.config(), "weights": "mapping.safetensors"},
            "lm": {"path": "lm", "model_type": dec.lm.config.model_type}, "tokenizer": {"path": "tokenizer"}}


def save_checkpoint(cap, directory) -> Path:
    """Write to a sibling temp dir, then swap it in, so an interrupted save never leaves a
    half-written checkpoint where a good one was. Refuses to overwrite a non-checkpoint dir."""
    directory = Path(directory).resolve()
    if directory.exists() and any(directory.iterdir()) and not is_checkpoint_dir(directory):
        raise ModelError(f"refusing to overwrite {directory}: not empty and not an rscaption checkpoint")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
    try:
        _write(cap, tmp / "ckpt")
        old = None
        if directory.exists():
            old = directory.with_name(directory.name + ".old-" + tmp.name[-8:])
            os.replace(directory, old)
        os.replace(tmp / "ckpt", directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cap._hash = hash_dir(directory)
    return directory

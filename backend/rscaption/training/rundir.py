"""A run directory: stage markers (``state.json``), the JSONL log, atomic checkpoints, the exported model copy."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import TrainError
from .config import resolve_path


class Run:
    """Run dir bookkeeping: stage markers, the JSONL log, and timing."""

    def __init__(self, cfg: dict, out: Path, resume: bool):
        self.cfg = cfg
        self.dir = Path(out)
        self.resume = resume
        if self.dir.exists() and (self.dir / "state.json").exists() and not resume:
            raise TrainError(f"run dir {self.dir} already has progress; pass --resume to continue it "
                             "or --out for a new run")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"done": {}}
        (self.dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        self.log_path = self.dir / "log.jsonl"
        self.cache_dir = Path(resolve_path(cfg.get("cache_dir", "runs/cache"), cfg))

    def done(self, stage: str) -> bool:
        return stage in self.state["done"]

    def mark(self, stage: str, info: dict) -> None:
        self.state["done"][stage] = info
        self.save_state()

    def save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, default=str))
        os.replace(tmp, self.state_path)

    def log(self, rec: dict) -> None:
        rec = {"time": round(time.time(), 1), **rec}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        print(json.dumps(rec, default=str), file=sys.stderr, flush=True)


def save_checkpoint(state: dict, path: Path) -> None:
    """A stage's resumable state, replaced atomically: an interrupt never leaves half a file."""
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def copy_model(src: Path, dst: Path) -> None:
    """Replace the checkpoint files in ``dst`` but keep files that are not part of a checkpoint
    (``MODEL_CARD.md``, ``eval.json``)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "encoder.safetensors", "mapping.safetensors", "scene.safetensors", "lm", "tokenizer",
                 "text_tower", "encoder", "decoders"):
        p = dst / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for item in src.iterdir():
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)

"""``rscaption train CONFIG``: a seeded, resumable, staged training run.

Stages (each usable alone with ``--stages``, each leaving its result in the run dir):

1. ``tokenizer``  byte-level BPE on the LM corpus, or the CLIP BPE, the MiniLM WordPiece, or a
                  pretrained LM's tokenizer (``tokenizer/``)
2. ``lm``         small GPT-2 pretrained on caption text (UCM val never included), or a pretrained
                  causal LM, optionally adapted to caption text (``lm/``)
3. ``features``   frozen trunk activations for every (train image, view) (``runs/cache``; views
                  0..7 dihedral, 8+ seeded crop + colour, see ``features.make_view``)
4. ``contrastive``LiT training of the last image blocks + projections, scene loss via class
                  prompts (``contrastive/``; per-epoch checkpoints); with ``encoder.kind: clip``
                  a whole open_clip / transformers CLIP, fine-tuned or from scratch, on images read
                  per step (``clip_trainer``; the features stage then has nothing to do)
5. ``embed``      image embeddings of every training view with the trained tower (``embeddings.pt``)
6. ``mapping``    prefix mapping (+ LM fine-tuning) on those embeddings (``mapping/``)
7. ``crosslingual`` decoders for other caption languages trained on translated caption text
                  (``crosslingual/<lang>``; only when the config has ``crosslingual:``)
8. ``calibrate``  the confidence model on half of every val set (``calibrate/``)
9. ``export``     the checkpoint directory (``model/``, copied to ``export.dir`` if set)
10. ``evaluate``  the exported model on every val set (``eval.json``)

The stages live in ``text_stages``, ``image_stages`` (+ ``lit_stages``, ``clip_trainer``) and
``caption_stages``; what they share (data, encoders, the captioner of a run) in ``parts``; the run
dir in ``rundir``; config loading in ``config``.

A run dir holds ``config.json`` (the resolved config), ``log.jsonl`` (one JSON object per epoch or
logging step) and per-stage state. ``--resume`` skips finished stages and continues an interrupted
stage from its last epoch; without it an existing run dir with progress is refused rather than
silently overwritten.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import RscaptionError, TrainError
from .caption_stages import stage_calibrate, stage_crosslingual, stage_evaluate, stage_export, stage_mapping
from .config import REPO_ROOT, load_config, merge_config, resolve_path, seed_everything  # noqa: F401 (API)
from .image_stages import stage_contrastive, stage_embed, stage_features
from .rundir import Run
from .text_stages import stage_lm, stage_tokenizer

__all__ = ["STAGES", "TrainError", "load_config", "merge_config", "resolve_path", "train", "main"]

STAGES = ("tokenizer", "lm", "features", "contrastive", "embed", "mapping", "crosslingual", "calibrate",
          "export", "evaluate")
STAGE_FUNCS = {"tokenizer": stage_tokenizer, "lm": stage_lm, "features": stage_features,
               "contrastive": stage_contrastive, "embed": stage_embed, "mapping": stage_mapping,
               "crosslingual": stage_crosslingual, "calibrate": stage_calibrate, "export": stage_export,
               "evaluate": stage_evaluate}


def train(cfg: dict, out=None, resume: bool = False, stages=None, progress: bool = True) -> dict:
    """Run (or continue) the configured stages; returns the state with per-stage results."""
    import torch

    from . import progress as progress_bars

    progress_bars.set_enabled(progress)
    threads = cfg.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out or resolve_path(cfg.get("out", f"runs/{cfg.get('name', 'run')}"), cfg))
    run = Run(cfg, out, resume)
    wanted = list(stages or cfg.get("stages") or STAGES)
    bad = [s for s in wanted if s not in STAGE_FUNCS]
    if bad:
        raise TrainError(f"unknown stage(s) {', '.join(bad)}; stages are {', '.join(STAGES)}")
    seed = int(cfg.get("seed", 0))
    t_all = time.time()
    for i, stage in enumerate(STAGES):
        if stage not in wanted:
            continue
        if run.done(stage) and not (stages and stage in stages):
            continue
        rng = seed_everything(seed + i)
        t0 = time.time()
        run.log({"stage": stage, "event": "start"})
        info = STAGE_FUNCS[stage](run, rng) or {}
        info["stage_seconds"] = round(time.time() - t0, 1)
        run.mark(stage, info)
        run.log({"stage": stage, "event": "done", **info})
    run.state["total_seconds_this_invocation"] = round(time.time() - t_all, 1)
    run.save_state()
    return run.state


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", help="run config (YAML or JSON), e.g. configs/default.yaml")
    parser.add_argument("--out", help="run directory (default: the config's 'out', else runs/<name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the run directory")
    parser.add_argument("--stages", nargs="+", metavar="STAGE",
                        help=f"run only these stages (rerun if already done): {' '.join(STAGES)}")
    parser.add_argument("--no-export", action="store_true", help="do not copy the model to the config's export dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_train(args) -> int:
    try:
        cfg = load_config(args.config)
        if not isinstance(cfg.get("data"), dict):  # every stage reads it: one line, not a KeyError
            raise TrainError(f"{args.config}: no 'data' section (the caption sets to train on; "
                             "see configs/default.yaml)")
        if getattr(args, "no_export", False):
            cfg["_no_export_copy"] = True
        state = train(cfg, args.out, args.resume, args.stages, progress=not getattr(args, "no_progress", False))
    except RscaptionError as exc:
        print(f"rscaption: error: {exc}", file=sys.stderr)  # the CLI's prefix, as every subcommand
        return 2
    print(json.dumps({k: v for k, v in state.get("done", {}).items()}, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rscaption train", description="Train a captioner (staged, resumable).")
    add_train_args(p)
    return run_train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

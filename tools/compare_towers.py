"""Compare pretrained image towers for the default model: frozen-feature linear probes on every
val set of a training config, plus encoding speed, all measured in one run.

    .venv/bin/python tools/compare_towers.py [--config configs/default.yaml] [--train-per-set 1500]
        [--val-per-set 500] [--towers efficientnet_lite0:224 efficientnet_lite2:260] [--out out/towers.json]

A linear probe on frozen pooled features is the cheap, fair first question ("does the bigger tower
see these scenes better before any fine-tuning?"); it is what decides whether a full training run
with the bigger tower is worth its CPU time. Speed is images/s of the whole tower at batch 32 on
this machine, threads as configured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backend"))

from rscaption.models.encoders import images_to_pixels, lit_from_pretrained_parts  # noqa: E402
from rscaption.data.images import read_rgb  # noqa: E402
from rscaption.training.plan import build_plan  # noqa: E402
from rscaption.training.runner import load_config, resolve_path  # noqa: E402


@torch.no_grad()
def pooled_features(enc, paths, batch_size=32):
    tower = enc.image_tower.eval()
    out = []
    for i in range(0, len(paths), batch_size):
        px = images_to_pixels([read_rgb(p) for p in paths[i:i + batch_size]], enc.preprocess)
        out.append(tower(px).float().numpy())
    f = np.concatenate(out)
    return f / np.linalg.norm(f, axis=1, keepdims=True).clip(1e-8)


def speed(enc, n=64, batch_size=32):
    size = enc.preprocess["image_size"]
    x = torch.randn(batch_size, 3, size, size)
    with torch.no_grad():
        enc.image_tower(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(n // batch_size):
            enc.image_tower(x)
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--train-per-set", type=int, default=1500)
    ap.add_argument("--val-per-set", type=int, default=500)
    ap.add_argument("--towers", nargs="+", default=["efficientnet_lite0:224", "efficientnet_lite2:260"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "out" / "towers.json"))
    args = ap.parse_args(argv)
    from sklearn.linear_model import LogisticRegression

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    plan = build_plan(cfg, lambda p: resolve_path(p, cfg))
    rng = np.random.default_rng(0)
    picks = {}
    for s in plan.sets:
        tr = [s.train[i] for i in sorted(rng.permutation(len(s.train))[: args.train_per_set])]
        va = [s.val[i] for i in sorted(rng.permutation(len(s.val))[: args.val_per_set])]
        picks[s.spec.name] = (tr, va)
    report = {"machine": f"{torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d"),
              "train_per_set": args.train_per_set, "val_per_set": args.val_per_set, "towers": {}}
    for spec in args.towers:
        name, size = spec.split(":")
        enc = lit_from_pretrained_parts(timm_name=name, image_size=int(size))
        row = {"image_size": int(size), "params_M": round(sum(p.numel() for p in enc.image_tower.parameters()) / 1e6, 2),
               "images_per_s": round(speed(enc), 1), "probe_val_accuracy_%": {}}
        t0 = time.time()
        for set_name, (tr, va) in picks.items():
            ftr = pooled_features(enc, [r.image for r in tr])
            fva = pooled_features(enc, [r.image for r in va])
            clf = LogisticRegression(C=10.0, max_iter=3000).fit(ftr, [r.label for r in tr])
            acc = float((clf.predict(fva) == np.array([r.label for r in va])).mean() * 100)
            row["probe_val_accuracy_%"][set_name] = round(acc, 2)
            print(f"{name}@{size} {set_name}: {acc:.2f} %", file=sys.stderr, flush=True)
        row["seconds"] = round(time.time() - t0, 1)
        report["towers"][spec] = row
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

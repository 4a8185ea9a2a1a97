"""Fit the change scorer of a checkpoint (``change.json``) and print its val table beside 1 - cosine.

    nice -n 10 .venv/bin/python tools/fit_change_score.py [--model resources/default_model]
        [--shared ../shared/data] [--train-anchors 200] [--val-anchors 250] [--seed 0] [--report runs/change_fit/report.json]
        [--table-only]

Train pairs come from the train splits only, val pairs from the val splits (rscaption/change/
pairs.py); the fitted weights, the command, the seconds and the CPU are written into
``<model>/change.json`` (JSON: the checkpoint's hash does not cover it, so existing caption files
still resume and search). ``--table-only`` prints the tables from an existing report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backend"))


def _f(v, nd=3):
    return "" if v is None or v != v else f"{v:.{nd}f}"


def tables(report: dict) -> str:
    rows = ["| val set | pairs | changes | AUROC ours | AUROC 1-cos | vs same-scene ours | vs same-scene 1-cos "
            "| vs jitter ours | vs jitter 1-cos | half swaps ours | half swaps 1-cos | prec. at true count ours "
            "| prec. at true count 1-cos "
            "| prec. / recall at 0.5 | scene named before & after % |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rep in report["sets"].items():
        o, c = rep["ours"], rep["cosine"]
        rows.append("| " + " | ".join([
            name, f"{o['pairs']:,}", f"{o['changes']:,}", _f(o["auroc"]), _f(c["auroc"]), _f(o["auroc_same_scene"]),
            _f(c["auroc_same_scene"]), _f(o["auroc_jitter"]), _f(c["auroc_jitter"]), _f(o["auroc_half"]),
            _f(c["auroc_half"]), _f(o["precision_at_true_count"]),
            _f(c["precision_at_true_count"]),
            f"{_f(o.get('precision_at_threshold'), 2)} / {_f(o.get('recall_at_threshold'), 2)}",
            _f(100 * rep["scene_named"], 1)]) + " |")
    return "\n".join(rows)


def weights_table(scorer: dict) -> str:
    rows = ["| feature | mean | scale | weight |", "|---|---|---|---|"]
    for f, m, s, w in zip(scorer["features"], scorer["mean"], scorer["scale"], scorer["weights"]):  # noqa: B007
        rows.append(f"| {f} | {m:.4f} | {s:.4f} | {w:+.3f} |")
    rows.append(f"| bias |  |  | {scorer['bias']:+.3f} |")
    return "\n".join(rows)


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "resources" / "default_model"))
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--train-anchors", type=int, default=200, help="anchor images per set (train split)")
    ap.add_argument("--val-anchors", type=int, default=250, help="anchor images per set (val split; 0: all)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine more threads spin and burn CPU waiting)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", default=str(ROOT / "runs" / "change_fit" / "report.json"))
    ap.add_argument("--cache", default=str(ROOT / "runs" / "change_fit" / "embeddings"),
                    help="embeddings of the pairs, per set and model hash (a refit is then seconds)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    if args.table_only:
        report = json.loads(Path(args.report).read_text())
        print(tables(report))
        print()
        print(weights_table(json.loads((Path(args.model) / "change.json").read_text())))
        return 0

    import torch

    from rscaption.change.fit import fit_and_evaluate
    from rscaption.models.registry import load_model

    torch.set_num_threads(max(1, args.threads))
    t0, c0 = time.time(), time.process_time()
    cap = load_model(args.model, device="cpu")
    scorer, report = fit_and_evaluate(cap, Path(args.shared), args.train_anchors, args.seed,
                                      log=lambda s: print(s, flush=True), val_anchors=args.val_anchors or None,
                                      cache_dir=Path(args.cache) if args.cache else None)
    report["wall_seconds"] = round(time.time() - t0, 1)
    report["cpu_seconds"] = round(time.process_time() - c0, 1)
    scorer.info = {
        "model_hash": cap.model_hash,
        "fit": {"command": "nice -n 10 .venv/bin/python tools/fit_change_score.py " + " ".join(argv or sys.argv[1:]),
                "date": dt.date.today().isoformat(), "wall_seconds": report["wall_seconds"],
                "cpu_seconds": report["cpu_seconds"], "cpu": _cpu(), "torch_threads": torch.get_num_threads(),
                "train": f"{report['train_pairs']} pairs ({report['train_changes']} changes) from "
                         f"{args.train_anchors} train anchors per set of UCM, RSICD, RSSCN7, EuroSAT; seed {args.seed}",
                "val_anchors": f"{args.val_anchors or 'all'} val anchors per set (seed {args.seed + 1})",
                "val": {k: {"ours": v["ours"], "cosine": v["cosine"], "scene_named": v["scene_named"]}
                        for k, v in report["sets"].items()}},
    }
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=1))
    (Path(args.model) / "change.json").write_text(json.dumps(scorer.to_dict(), indent=1) + "\n")
    print(tables(report))
    print()
    print(weights_table(scorer.to_dict()))
    print(f"\n{report['wall_seconds']} s wall, {report['cpu_seconds']} s CPU -> {Path(args.model) / 'change.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

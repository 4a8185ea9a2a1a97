"""Markdown tables for the model card from a training run's reports (eval.json, calibrate/ and
crosslingual/ reports, log.jsonl stage times), so the card's figures are copied by a program,
not by hand.

    .venv/bin/python tools/card_tables.py [runs/default]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(v, nd=3):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def val_table(ev: dict) -> str:
    rows = ["| val set | images | BLEU-4 | METEOR | ROUGE-L | CIDEr-D | scene acc. % | caption names right scene % "
            "| t2i mR | mR | conf. AUROC | conf. ECE | tiles/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rep in ev["sets"].items():
        c, r, k = rep.get("captioning", {}), rep.get("retrieval", {}), rep.get("confidence", {})
        rows.append("| " + " | ".join([
            name, str(rep["n_images"]), _fmt(c.get("BLEU-4")), _fmt(c.get("METEOR")), _fmt(c.get("ROUGE-L")),
            _fmt(c.get("CIDEr-D")), _fmt(rep.get("scene_accuracy_%"), 2), _fmt(rep.get("caption_right_scene_%"), 2),
            _fmt(r.get("t2i_mR"), 2), _fmt(r.get("mR"), 2), _fmt(k.get("AUROC")), _fmt(k.get("ECE")),
            _fmt(rep["timing"]["tiles_per_s"], 1)]) + " |")
    return "\n".join(rows)


def precision_table(ev: dict) -> str:
    """The main (fp32) summary beside each ``summary_<precision>`` the evaluate stage ran."""
    keys = ("BLEU-4", "CIDEr-D", "scene_accuracy_%", "caption_right_scene_%", "t2i_mR", "AUROC", "ECE", "tiles_per_s")
    rows = ["| val set | precision | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    extra = {k[len("summary_"):]: v for k, v in ev.items() if k.startswith("summary_")}
    for i, row in enumerate(ev["summary"]):
        for tag, summary in [(ev.get("precision") or "fp32", ev["summary"]), *extra.items()]:
            r = summary[i]
            rows.append(f"| {r['set']} | {tag} | " + " | ".join(_fmt(r.get(k), 2 if k.endswith("%") or k in
                                                                     ("t2i_mR", "tiles_per_s") else 3) for k in keys) + " |")
    return "\n".join(rows)


def confidence_table(cal: dict) -> str:
    rows = ["| val set | report half: images / AUROC / ECE | cross-fitted: images (wrong) / AUROC / ECE |",
            "|---|---|---|"]
    for name, r in [*cal["per_set"].items(), ("all", cal["all"])]:
        x = r.get("cross_fitted", {})
        rows.append(f"| {name} | {r.get('n', cal.get('report_images', ''))} / {_fmt(r['AUROC'])} / {_fmt(r['ECE'])} | "
                    f"{x.get('n', '')} ({x.get('wrong', '')}) / {_fmt(x.get('AUROC'))} / {_fmt(x.get('ECE'))} |")
    return "\n".join(rows)


def stage_table(log_path: Path) -> str:
    recs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    done = {}
    for r in recs:
        if r.get("event") == "done":
            done[r["stage"]] = r.get("stage_seconds")
    rows = ["| stage | seconds |", "|---|---|"]
    rows += [f"| {k} | {v} |" for k, v in done.items()]
    rows.append(f"| **total** | **{round(sum(v or 0 for v in done.values()), 1)}** |")
    return "\n".join(rows)


def main(argv=None) -> int:
    run = Path((argv or sys.argv[1:] or ["runs/default"])[0])
    ev = json.loads((run / "eval.json").read_text())
    print("## val\n")
    print(val_table(ev))
    if any(k.startswith("summary_") for k in ev):
        print("\n## precision\n")
        print(precision_table(ev))
    cal = run / "calibrate" / "report.json"
    if cal.exists():
        c = json.loads(cal.read_text())
        print("\n## confidence\n")
        print(confidence_table(c))
        print("\n## calibration (report halves)\n")
        print(json.dumps({k: v for k, v in c.items() if k != "per_set"}, indent=1))
        for name, r in c["per_set"].items():
            print(f"- {name}: {r}")
    for rep in sorted(run.glob("crosslingual/*/report.json")):
        r = json.loads(rep.read_text())
        print(f"\n## crosslingual {rep.parent.name}\n")
        print(json.dumps({k: v for k, v in r.items() if k != "examples"}, indent=1, ensure_ascii=False))
        for e in r.get("examples", [])[:5]:
            print(f"- {json.dumps(e, ensure_ascii=False)}")
    print("\n## stage times\n")
    print(stage_table(run / "log.jsonl"))
    for name, rep in ev["sets"].items():
        print(f"\n## examples {name}\n")
        for e in rep.get("examples", [])[:5]:
            print(f"| {e['image']} | {e['caption']} | {e['confidence']} | {e['reference']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

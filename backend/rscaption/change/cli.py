"""``rscaption change`` (arguments, progress, the table of most changed tiles) and ``rscaption
search`` on a change file, kept out of ``cli.py``, which only wires commands."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import RscaptionError
from ..limits import bounded_int

PHASE_LABEL = {"before": "captioning before", "after": "captioning after", "score": "scoring"}


def add_change_args(p: argparse.ArgumentParser, tile_size_type) -> None:
    p.add_argument("before", help="the earlier date: a raster, or a GeoPackage rscaption caption wrote")
    p.add_argument("after", help="the later date: a raster (read on the before grid), or a caption GeoPackage "
                                 "of the same grid")
    p.add_argument("-o", "--output", required=True, help="output change GeoPackage (.gpkg)")
    p.add_argument("--model", default="default", help="'default', a checkpoint directory or a hub name "
                                                      "(a reused GeoPackage's own model by default)")
    p.add_argument("--tile-size", type=tile_size_type, default="auto",
                   help="tile size in pixels of the before raster, or 'auto' (default)")
    p.add_argument("-k", "--top", type=bounded_int("k"), default=10, help="most changed tiles to list (default 10)")
    p.add_argument("--batch-size", type=bounded_int("batch_size"), default=8)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace an existing output (and its unfinished work)")
    g.add_argument("--no-resume", action="store_true", help="fail if the output exists instead of resuming")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-y", "--yes", action="store_true", help="start even a very large run without asking")
    p.add_argument("--json", action="store_true", help="print the summary and the most changed tiles as JSON")


def run_change(args) -> int:
    from .run import change_rasters

    if args.no_resume and (os.path.exists(args.output) or os.path.isdir(args.output + ".parts")):
        raise RscaptionError(f"{args.output} (or its unfinished work) exists and --no-resume was given; "
                             "pass --overwrite to replace it or leave out --no-resume to continue it")
    bar = {"phase": None, "bar": None}

    def progress(phase, done, total):
        if args.quiet:
            return
        if bar["phase"] != phase:
            if bar["bar"] is not None:
                bar["bar"].close()
            from tqdm import tqdm

            bar["phase"] = phase
            bar["bar"] = tqdm(total=total, unit="tile" if phase != "score" else "step", file=sys.stderr,
                              desc=PHASE_LABEL[phase], dynamic_ncols=True)
        bar["bar"].total = total
        bar["bar"].n = done
        bar["bar"].refresh()

    def message(line):
        if bar["bar"] is not None:
            bar["bar"].clear()
        print(line, file=sys.stderr)

    try:
        summary = change_rasters(args.before, args.after, args.output, model=args.model, tile_size=args.tile_size,
                                 top_k=args.top, batch_size=args.batch_size, device=args.device,
                                 on_progress=progress, on_message=message, overwrite=args.overwrite,
                                 confirm_large=args.yes)
    except KeyboardInterrupt as exc:  # Ctrl-C (130) or SIGTERM (143), as ``rscaption caption``
        print(f"rscaption: cancelled; finished tiles are kept in {args.output}.parts (run again to resume)",
              file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)
    finally:
        if bar["bar"] is not None:
            bar["bar"].close()
    print(summary.one_line(), file=sys.stderr)
    if summary.cancelled:
        return 130
    if args.json:
        print(json.dumps(summary.to_dict(), indent=1))
        return 0
    print(f"{'rank':>4} {'change':>6} {'tile':>6} {'row':>4} {'col':>4}  summary   (most changed tiles)")
    for i, t in enumerate(summary.top, 1):
        print(f"{i:>4} {t['change']:6.3f} {t['tile_id']:>6} {t['row']:>4} {t['col']:>4}  {t['summary']}")
    return 0


def run_change_search(args) -> int:
    """``rscaption search CHANGE.gpkg ...``: the same output as a caption file's, plus the date
    ranked, the change score and the sentence."""
    from ..search.cli import read_queries
    from .search import search_changes

    if args.query is not None and not args.query.strip():
        raise RscaptionError("the search query is empty")
    queries = ([args.query] if args.query else []) + (read_queries(args.queries) if args.queries else [])
    if not queries:
        raise RscaptionError("the following arguments are required: query or --queries FILE")

    results = search_changes(args.gpkg, queries, k=args.k, model=args.model, device=args.device,
                             date=getattr(args, "date", None), where=args.where, bbox=args.bbox,
                             min_confidence=args.min_confidence)
    grouped = args.queries is not None
    if args.json:
        rows = [[h.to_dict() for h in hits] for hits in results]
        print(json.dumps([{"query": q, "hits": r} for q, r in zip(queries, rows)] if grouped else rows[0], indent=1))
        return 0
    for n, (q, hits) in enumerate(zip(queries, results)):
        if grouped:
            print(("\n" if n else "") + f"query {n + 1}: {q}  ({len(hits)} hits)")
        print(f"{'rank':>4} {'score':>7} {'date':>6} {'tile':>6} {'row':>4} {'col':>4} {'change':>6}  caption  [summary]")
        for i, h in enumerate(hits, 1):
            ch = f"{h.change:6.3f}" if h.change is not None else "     -"
            print(f"{i:>4} {h.score:7.4f} {h.date:>6} {h.tile_id:>6} {h.row:>4} {h.col:>4} {ch}  {h.caption}  "
                  f"[{h.summary}]")
    return 0

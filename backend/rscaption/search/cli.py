"""``rscaption search``: arguments and output, kept out of ``cli.py`` (which only wires commands).

Several queries share one model load and one pass over the embedding matrix (``--queries FILE``,
one per line), which is what makes a batch of questions about a 10^6-tile mosaic cheap: the
start-up (torch, the model, the matrix) is paid once.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import RscaptionError
from ..limits import bounded_int, finite_float, unit_fraction

MAX_QUERY_FILE_BYTES = 16 * 1024 * 1024


def add_search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("gpkg")
    p.add_argument("query", nargs="?", default=None, help="the text to look for (or use --queries)")
    p.add_argument("--queries", metavar="FILE", default=None,
                   help="a text file with one query per line ('-': standard input); one model load for all")
    p.add_argument("-k", type=bounded_int("k"), default=10, help="number of results per query (default 10)")
    p.add_argument("--model", default=None, help="override the model recorded in the file (hash must match)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true",
                   help="print JSON: a list of hits, or with --queries a list of {query, hits}")
    p.add_argument("--min-confidence", type=unit_fraction, default=None, metavar="C",
                   help="rank only tiles whose caption confidence is at least C (0-1)")
    p.add_argument("--bbox", type=finite_float, nargs=4, metavar=("MINX", "MINY", "MAXX", "MAXY"), default=None,
                   help="rank only tiles intersecting this box (in the layer's CRS)")
    p.add_argument("--where", metavar="EXPR", default=None,
                   help="rank only tiles matching this SQLite expression over the layer's columns, "
                        "e.g. \"confidence >= 0.5\" or \"caption LIKE '%%river%%'\"")
    p.set_defaults(search_parser=p)  # "one of query / --queries" is checked after parsing, in its words


def read_queries(path: str) -> list[str]:
    """Non-blank lines of a queries file, stripped; a missing, unreadable, empty or too large file
    (a device such as /dev/zero, a pipe, standard input included) is one line. At most
    MAX_QUERY_FILE_BYTES + 1 bytes are ever read, whatever the source."""
    import os

    if path == "-":
        stream = getattr(sys.stdin, "buffer", None)
        raw = stream.read(MAX_QUERY_FILE_BYTES + 1) if stream is not None else \
            sys.stdin.read(MAX_QUERY_FILE_BYTES + 1).encode("utf-8", "surrogateescape")
        where = "standard input"
    else:
        if not os.path.exists(path):
            raise RscaptionError(f"queries file not found: {path}")
        if os.path.isdir(path):
            raise RscaptionError(f"{path} is a directory, not a queries file")
        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_QUERY_FILE_BYTES + 1)  # getsize says 0 for a device or a pipe
        except OSError as exc:
            raise RscaptionError(f"cannot read queries file {path}: {exc.strerror}") from None
        where = f"queries file {path}"
    if len(raw) > MAX_QUERY_FILE_BYTES:
        raise RscaptionError(f"{where} is larger than 16 MB; is it really one query per line?")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RscaptionError(f"{where} is not UTF-8 text") from None
    queries = [line.strip() for line in text.splitlines() if line.strip()]
    if not queries:
        raise RscaptionError(f"{where} has no queries (expected one per line)")
    return queries


def run_search(args) -> int:
    from .query import search_queries

    if args.query is not None and not args.query.strip():
        raise RscaptionError("the search query is empty")
    queries = ([args.query] if args.query else []) + (read_queries(args.queries) if args.queries else [])
    if not queries:
        message = "the following arguments are required: query or --queries FILE"
        parser = getattr(args, "search_parser", None)
        if parser is not None:
            parser.error(message)  # one line, exit 2, like every other argument mistake
        raise RscaptionError(message)
    results = search_queries(args.gpkg, queries, k=args.k, model=args.model, device=args.device,
                             min_confidence=args.min_confidence, bbox=args.bbox, where=args.where)
    grouped = args.queries is not None
    if args.json:
        if grouped:
            print(json.dumps([{"query": q, "hits": [h.to_dict() for h in hits]} for q, hits in zip(queries, results)],
                             indent=1))
        else:
            print(json.dumps([h.to_dict() for h in results[0]], indent=1))
        return 0
    for n, (q, hits) in enumerate(zip(queries, results)):
        if grouped:
            print(("\n" if n else "") + f"query {n + 1}: {q}  ({len(hits)} hits)")
        print(f"{'rank':>4} {'score':>7} {'tile':>6} {'row':>4} {'col':>4} {'conf':>5}  caption")
        for i, h in enumerate(hits, 1):
            conf = f"{h.confidence:5.2f}" if h.confidence is not None else "    -"
            print(f"{i:>4} {h.score:7.4f} {h.tile_id:>6} {h.row:>4} {h.col:>4} {conf}  {h.caption}")
        note = match_note(hits)
        if note:
            print(note)
    return 0


def match_note(hits) -> str | None:
    """One line on the query's "no good match" line (models/match_line.py), None without one: k
    hits always come back, and a list of weak ones must not read as matches."""
    line = next((h.match_line for h in hits if h.match_line is not None), None)
    if line is None:
        return None
    good = sum(1 for h in hits if h.score >= line)
    if not good:
        return (f"no good match: every hit scores below this query's match line {line:.4f} (what it scores "
                "on images of unrelated scenes); these are only the closest tiles")
    if good == len(hits):
        return f"all {good} hits reach this query's match line {line:.4f}"
    return f"{good} of {len(hits)} hits reach this query's match line {line:.4f}; the rest are weak matches"

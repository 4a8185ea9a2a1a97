"""`rscaption` command line: caption, search, change, similar, info, train, evaluate, serve.

User mistakes (missing files, bad options, unknown models) print one line on stderr and exit 2;
a cancel (Ctrl-C, or SIGTERM: the same clean stop) exits 130 (143) and says how much finished work
was kept. Heavy imports (torch) happen inside the subcommands so `rscaption --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from . import __version__
from .errors import RscaptionError
from .limits import bounded_int, finite_float, positive_finite

EXIT_USER_ERROR = 2
EXIT_CANCELLED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a pipeline's writer cut short


class _Parser(argparse.ArgumentParser):
    """Argument mistakes are one line plus where to look, not the whole usage block."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))  # an empty entry (1,,2) is a typo, not a skip
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated band numbers like 1,2,3, got {text!r}")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError("band numbers start at 1")
    return vals


def _tile_size(text: str):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels or 'auto', got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v  # the upper bound (limits.MAX_TILE_PX) is the tiler's, so the worker and plugin get it too


def _add_caption(sub):
    p = sub.add_parser("caption", help="caption the tiles of a raster into a searchable GeoPackage")
    p.add_argument("raster")
    p.add_argument("-o", "--output", required=True, help="output GeoPackage (.gpkg)")
    p.add_argument("--model", default="default", help="'default', a checkpoint directory or a hub name")
    p.add_argument("--tile-size", type=_tile_size, default="auto",
                   help="tile size in pixels, or 'auto' (default): the model's ground footprint at this "
                        "raster's resolution")
    p.add_argument("--overlap", type=bounded_int("overlap"), default=0,
                   help="overlap between tiles in pixels (less than the tile size)")
    p.add_argument("--bands", type=_csv_ints, default=None, help="1-based bands, e.g. 1,2,3 (default: RGB)")
    p.add_argument("--extent", type=finite_float, nargs=4, metavar=("MINX", "MINY", "MAXX", "MAXY"),
                   help="only tile this extent (in the raster's CRS)")
    p.add_argument("--resolution", type=positive_finite, default=None,
                   help="resample to this ground resolution (raster CRS units per pixel)")
    p.add_argument("--nodata-threshold", type=float, default=0.95,
                   help="skip tiles with at least this fraction of nodata (default 0.95)")
    p.add_argument("--batch-size", type=bounded_int("batch_size"), default=8)
    p.add_argument("--beam-size", type=bounded_int("beam_size"), default=None, help="beam width (default: the model's)")
    p.add_argument("--language", default="en", help="caption language: en or another the model has, e.g. zh")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default=None,
                   help="what a CPU computes in: fp32 (default), bf16 (about 1.3x faster on CPUs with AMX-BF16; "
                        "some captions change; a CPU without AVX-512 BW/VL/DQ or AVX-NE-CONVERT cannot run it: "
                        "exit 2, nothing written) or auto (bf16 where the CPU has AMX-BF16 and runs it, else "
                        "fp32) (env RSCAPTION_PRECISION)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local (default) or ray: shards of tiles on a Ray cluster, written here (docs/scaling.md)")
    p.add_argument("--address", default=None,
                   help="with --engine ray: the cluster to join (auto, HOST:PORT, ray://HOST:10001); "
                        "default: start a local one")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace an existing output")
    g.add_argument("--no-resume", action="store_true", help="fail if the output exists instead of resuming")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-y", "--yes", action="store_true",
                   help="start even a very large run (more than 100,000 tiles) without asking")
    p.set_defaults(func=cmd_caption)


def cmd_caption(args) -> int:
    from .models.registry import load_model
    from .engine.pipeline import caption_raster, tile_choice_for
    from .raster.tiling import TilingParams

    from .raster.paths import check_raster_path

    check_raster_path(args.raster)  # local files must exist; /vsicurl/, /vsis3/ ... are GDAL's to open
    if args.address and args.engine != "ray":
        raise RscaptionError("--address needs --engine ray")
    if args.engine == "ray":
        from .engine.ray import import_ray

        import_ray()  # a missing extra is one line before the model loads
    from .store.run_lock import check_output_path

    check_output_path(args.output, args.raster)  # the worker and caption_raster run the same checks
    if args.no_resume and os.path.exists(args.output):  # in the words of this command line (no --resume)
        raise RscaptionError(f"{args.output} exists and --no-resume was given; pass --overwrite to replace it "
                             "or leave out --no-resume to continue it")
    cap = load_model(args.model, device=args.device, precision=args.precision)
    card = cap.card or {}
    choice = tile_choice_for(cap, args.raster, args.tile_size, args.resolution)
    tile_size = choice.tile_px
    if not 0 <= args.overlap < tile_size:
        raise RscaptionError(f"--overlap must be between 0 and tile size - 1 ({tile_size - 1})")
    tiling = TilingParams(tile_size=tile_size, overlap=args.overlap, bands=args.bands,
                          extent=tuple(args.extent) if args.extent else None,
                          target_resolution=args.resolution, nodata_threshold=args.nodata_threshold)
    beam = args.beam_size or int(card.get("beam_size") or 1)

    bar = None
    from .raster.input_check import input_warnings

    announce = [choice.describe(), *input_warnings(args.raster, card, choice.m_per_px, args.bands, tiling)][::-1]

    def progress(done, total, _records):
        # created on the first callback so an error before any tile leaves no empty bar behind
        nonlocal bar
        while announce:  # the raster opened fine: say what the tiles are before the first one
            print(announce.pop(), file=sys.stderr)
        if args.quiet:
            return
        if bar is None:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="tile", file=sys.stderr, desc="captioning", dynamic_ncols=True)
        bar.n = done
        bar.refresh()

    try:
        run = dict(model=cap, tiling=tiling, batch_size=args.batch_size, beam_size=beam, on_progress=progress,
                   resume=not args.no_resume, overwrite=args.overwrite, language=args.language, tile_choice=choice,
                   confirm_large=args.yes)
        if args.engine == "ray":
            from .engine.ray import caption_raster_ray

            summary = caption_raster_ray(args.raster, args.output, model_spec=args.model, device=args.device,
                                         address=args.address, **run)
        else:
            summary = caption_raster(args.raster, args.output, **run)
    except KeyboardInterrupt as exc:
        print(f"rscaption: cancelled; finished tiles are kept in {args.output} (run again to resume)",
              file=sys.stderr)
        return _cancelled_status(exc)
    finally:
        if bar is not None:
            bar.close()
    print(summary.one_line(), file=sys.stderr)
    return 0


def _add_search(sub):
    p = sub.add_parser("search", help="rank the tiles of a captioned GeoPackage by text queries")
    from .search.cli import add_search_args  # light: argparse only

    add_search_args(p)
    p.set_defaults(func=cmd_search)


def cmd_search(args) -> int:
    from .change.store import is_change_file

    if is_change_file(args.gpkg):  # both dates and the transitions between them (docs/change.md)
        from .change.cli import run_change_search

        return run_change_search(args)
    from .search.cli import run_search

    return run_search(args)


def _add_change(sub):
    p = sub.add_parser("change", help="what changed between two dates: score every tile of BEFORE against AFTER")
    from .change.cli import add_change_args  # light: argparse only

    add_change_args(p, _tile_size)
    p.set_defaults(func=cmd_change)


def cmd_change(args) -> int:
    from .change.cli import run_change

    return run_change(args)


def _add_similar(sub):
    p = sub.add_parser("similar", help="rank the tiles of a captioned GeoPackage by likeness to one of its tiles")
    p.add_argument("gpkg")
    p.add_argument("tile_id", type=int, help="the tile to match (its tile_id attribute); it is not listed itself")
    p.add_argument("-k", type=bounded_int("k"), default=10, help="number of results (default 10)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_similar)


def cmd_similar(args) -> int:
    from .search.similar import similar

    hits = similar(args.gpkg, args.tile_id, k=args.k)
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], indent=1))
    else:
        print(f"{'rank':>4} {'score':>7} {'tile':>6} {'row':>4} {'col':>4}  caption   (tiles like tile {args.tile_id})")
        for i, h in enumerate(hits, 1):
            print(f"{i:>4} {h.score:7.4f} {h.tile_id:>6} {h.row:>4} {h.col:>4}  {h.caption}")
    return 0


def _add_info(sub):
    p = sub.add_parser("info", help="print a model card")
    p.add_argument("model", nargs="?", default="default")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from .models.registry import load_model

    cap = load_model(args.model, device="cpu")
    if args.json:
        print(json.dumps({"model_id": cap.model_id, "model_hash": cap.model_hash, "card": cap.card}, indent=1))
    else:
        from .models.registry import describe_model
        print(describe_model(cap))
    return 0


def _add_check(sub):
    p = sub.add_parser("check", help="report damaged tiles of a captioned GeoPackage (--repair re-captions them)")
    from .engine.check import add_check_args  # light: the store and argparse only

    add_check_args(p)
    p.set_defaults(func=cmd_check)


def cmd_check(args) -> int:
    from .engine.check import run_check

    return run_check(args)


def _add_serve(sub):
    p = sub.add_parser("serve", help="newline-delimited JSON worker on stdin/stdout (used by the QGIS plugin)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from .worker import serve

    rc = serve(sys.stdin, sys.stdout) or 0
    # Same exit as `python -m rscaption.worker`: interpreter teardown after torch threads ran can
    # abort ("terminate called without an active exception") and turn a clean stop into a crash.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(rc))


def _add_lazy(sub, name, module, help_text):
    """train/evaluate live in their own packages; import them only when asked for."""
    p = sub.add_parser(name, help=help_text)
    try:
        mod = __import__(f"rscaption.{module}", fromlist=["x"])
    except ImportError as e:  # optional training extras missing
        p.set_defaults(func=lambda a, e=e: _missing(name, e))
        return
    adder = getattr(mod, "add_train_args" if name == "train" else "add_evaluate_args")
    runner = getattr(mod, "run_train" if name == "train" else "run_evaluate")
    adder(p)
    p.set_defaults(func=runner)


def _missing(name, err) -> int:
    raise RscaptionError(f"'rscaption {name}' is unavailable: {err}")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="rscaption", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"rscaption {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_caption(sub)
    _add_search(sub)
    _add_change(sub)
    _add_similar(sub)
    _add_info(sub)
    _add_check(sub)
    _add_lazy(sub, "train", "training.runner", "train a model from a config file")
    _add_lazy(sub, "evaluate", "evaluation.evaluate", "score a model on a captioning dataset")
    _add_serve(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_logging()
    previous = _sigterm_cancels() if args.command != "serve" else None  # the worker has its own
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed reader (`| head -1`) shows here, not in the interpreter's exit
        return rc
    except BrokenPipeError:
        return _reader_gone()
    except RscaptionError as e:
        print(f"rscaption: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        print("rscaption: interrupted", file=sys.stderr)
        return _cancelled_status(exc)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _sigterm_cancels():
    """SIGTERM (``kill``, a service manager's stop, a batch system's time limit) becomes a Ctrl-C:
    by default it killed the process at once, leaving the run lock file, a hot journal and no word
    of what was kept. Returns the handler to put back (None: not installed: not the main thread, or
    SIGTERM deliberately ignored)."""
    from .errors import raise_interrupted

    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        return None
    signal.signal(signal.SIGTERM, raise_interrupted)
    return previous if previous is not None else signal.SIG_DFL


def _cancelled_status(exc: KeyboardInterrupt) -> int:
    """128 + the signal, as a shell reports it: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + getattr(exc, "signum", EXIT_CANCELLED - 128)


def _reader_gone() -> int:
    """The reader of stdout went away (``rscaption search G q --json | head -1``): stop quietly,
    like a tool killed by SIGPIPE (exit 141), with stdout pointed at /dev/null so the interpreter's
    own final flush finds nothing to complain about."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (a test's capture)
        pass
    return EXIT_BROKEN_PIPE


def _quiet_logging() -> None:
    """Warnings (ours, e.g. out-of-memory fallbacks) as plain lines on stderr; GDAL's chatter off:
    a library's first ``logging.info`` would otherwise set up ``WARNING:rasterio._err:...`` lines
    around the one-line error that already carries GDAL's reason."""
    import logging

    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    logging.getLogger("rasterio").setLevel(logging.ERROR + 1)


if __name__ == "__main__":
    sys.exit(main())

"""``rscaption serve``: a long-lived backend process the QGIS plugin drives over stdin/stdout.

Why a subprocess at all: QGIS's own Python rarely has torch, and a crash or out-of-memory in
torch must not take the QGIS session down. The plugin starts ``python -m rscaption.worker`` with
whatever environment the user pointed it to and speaks :mod:`rscaption.protocol` with it.

Design points:

* stdout carries protocol lines only. When serving the real stdout, file descriptor 1 is
  re-pointed at stderr so a stray ``print`` or a C library writing to fd 1 cannot corrupt the
  stream; logging goes to stderr.
* stdin is read in its own thread so ``cancel`` (and ``shutdown``, and EOF when the plugin dies)
  take effect between batches of a running job, not after it. SIGTERM (and Ctrl-C) is a
  ``shutdown`` from outside: the running job is cancelled (finished tiles kept, run lock removed)
  and answered, then the worker leaves with 128 + the signal.
* a heartbeat every few seconds lets the plugin tell "busy loading a model" from "hung".
* loaded models are kept between requests, so a second caption run or a search does not pay the
  model load again.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback

from . import __version__
from .errors import RscaptionError
from .limits import check as check_limits
from .protocol import PROTOCOL_VERSION, ProtocolError, clean_float, encode_message, parse_request

log = logging.getLogger("rscaption.worker")

_EOF = object()
POLL_S = 0.25  # the main loop's longest sleep: a signal handler runs only when it wakes
MAX_LINE_CHARS = 16 * 1024 * 1024  # far above any real request (a search's list of queries)


class _Writer:
    """Serialises whole lines from several threads (job, heartbeat, reader) onto one stream."""

    def __init__(self, stream, on_broken=None):
        self._stream = stream
        self._lock = threading.Lock()
        self.broken = False
        self.on_broken = on_broken

    def send(self, msg_type: str, /, **fields) -> None:
        line = encode_message(msg_type, **fields)
        with self._lock:
            if self.broken:
                return
            try:
                self._stream.write(line)
                self._stream.flush()
            except (BrokenPipeError, OSError, ValueError):
                # Nobody reads us any more (the plugin died): stop working for it.
                self.broken = True
                if self.on_broken is not None:
                    self.on_broken()


class Worker:
    def __init__(self, stdin, writer: _Writer, device=None, heartbeat_s: float = 2.0):
        self.stdin = stdin
        self.out = writer
        self.requested_device = device
        self.heartbeat_s = heartbeat_s
        self.jobs: queue.Queue = queue.Queue()
        self.cancel_event = threading.Event()
        self.stop_event = threading.Event()
        self.shutdown_requested = False
        self.signalled = 0  # the SIGTERM/SIGINT that stopped us, if one did
        self._models: dict = {}

    # -- threads -------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        try:
            self._read_lines()
        except Exception:  # a dead reader would leave the main loop waiting forever
            traceback.print_exc(file=sys.stderr)
            self.jobs.put(_EOF)

    def _read_line(self) -> str:
        """One request line; an over-long one is skipped to its end and answered with an error
        (a runaway writer must not make the worker hold gigabytes of one line)."""
        line = self.stdin.readline(MAX_LINE_CHARS + 1)
        if len(line) <= MAX_LINE_CHARS or line.endswith("\n"):
            return line
        while True:
            rest = self.stdin.readline(MAX_LINE_CHARS)
            if not rest or rest.endswith("\n"):
                break
        self.out.send("error", message=f"bad request: a line longer than {MAX_LINE_CHARS:,} characters",
                      kind="protocol")
        return "\n"

    def _read_lines(self) -> None:
        while True:
            try:
                line = self._read_line()
            except (OSError, ValueError):
                line = ""
            if not line:
                # No more requests: answer the ones already queued, then leave. A dead plugin is
                # noticed when writing to it fails (see _Writer), which cancels the running job.
                self.jobs.put(_EOF)
                return
            if not line.strip():
                continue
            try:
                req = parse_request(line)
            except ProtocolError as exc:
                self.out.send("error", message=f"bad request: {exc}", kind="protocol")
                continue
            if req["cmd"] == "cancel":
                log.info("cancel requested")
                self.cancel_event.set()
            elif req["cmd"] == "shutdown":
                self.shutdown_requested = True
                self.cancel_event.set()
                self.jobs.put(_EOF)
                return
            else:
                self.jobs.put(req)

    def _heartbeat_loop(self) -> None:
        while not self.stop_event.wait(self.heartbeat_s):
            self.out.send("heartbeat", time=time.time())

    # -- main loop -----------------------------------------------------------------------------
    def run(self) -> int:
        reader = threading.Thread(target=self._read_loop, name="rscaption-stdin", daemon=True)
        beat = threading.Thread(target=self._heartbeat_loop, name="rscaption-heartbeat", daemon=True)
        reader.start()
        beat.start()
        self._hello()
        while True:
            req = self._next_job()
            if req is _EOF or self.shutdown_requested or self.out.broken:
                break
            # A cancel that arrived while idle must not kill the next job.
            self.cancel_event.clear()
            self._dispatch(req)
        self.stop_event.set()
        if self.signalled:
            log.info("stopped by signal %d", self.signalled)
        return 128 + self.signalled if self.signalled else 0

    def _next_job(self):
        """The next request, waited for in short steps: a signal is often delivered to the reader or
        heartbeat thread, and Python runs its handler only when the main thread wakes."""
        while not self.shutdown_requested:
            try:
                return self.jobs.get(timeout=POLL_S)
            except queue.Empty:
                continue
        return _EOF

    def on_signal(self, signum, frame) -> None:
        """SIGTERM or Ctrl-C: cancel the running job (it stops between batches, keeps what it
        finished and answers ``done`` with ``cancelled``; a ``--where`` filter stops at once), then
        leave. Only flags are set: the interrupted main thread may hold the writer's or the queue's
        lock, so nothing here takes one."""
        self.signalled = signum
        self.shutdown_requested = True
        self.cancel_event.set()

    def _hello(self) -> None:
        info = {"torch": None, "device": None}
        try:
            import torch

            from .device import pick_device

            info["torch"] = torch.__version__
            info["device"] = str(pick_device(self.requested_device))
        except RscaptionError as exc:
            info["device_error"] = str(exc)
        except Exception as exc:  # torch missing or broken: still answer, the plugin shows why
            info["torch_error"] = f"{type(exc).__name__}: {exc}"
        self.out.send(
            "hello",
            version=__version__,
            protocol=PROTOCOL_VERSION,
            python=sys.version.split()[0],
            executable=sys.executable,
            pid=os.getpid(),
            **info,
        )

    def _dispatch(self, req: dict) -> None:
        cmd = req["cmd"]
        started = time.time()
        try:
            handler = getattr(self, f"_do_{cmd}")
            check_limits(req)  # the CLI's bounds (beam, batch, k, resolution): one error, not 4 GB or a traceback
            summary = handler(req)
            summary = dict(summary or {})
            summary.setdefault("seconds", round(time.time() - started, 3))
            self.out.send("done", cmd=cmd, summary=summary)
        except RscaptionError as exc:
            log.info("%s failed: %s", cmd, exc)
            kind = "cancelled" if type(exc).__name__ == "Cancelled" else getattr(exc, "kind", "user")
            extra = {"tiles": exc.tiles, "seconds": exc.seconds} if kind == "large_run" else {}
            self.out.send("error", cmd=cmd, message=str(exc), kind=kind, **extra)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            self.out.send("error", cmd=cmd, message=f"{type(exc).__name__}: {exc}", kind="internal")

    # -- model cache ----------------------------------------------------------------------------
    def _model(self, name, device, precision=None):
        """The model, loaded once per (name, device, precision). A precision this CPU cannot run
        (bf16 without the instructions) is a ModelError here, answered as one error message before
        a caption run opens its output."""
        from .device import parse_precision
        from .models.registry import load_model

        key = (name or "default", device or self.requested_device, parse_precision(precision))
        if key not in self._models:
            self._models.clear()  # one model at a time: they can be large
            log.info("loading model %s on %s (%s)", key[0], key[1] or "auto", key[2])
            self._models[key] = load_model(key[0], device=key[1], precision=key[2])
        return self._models[key]

    # -- commands -------------------------------------------------------------------------------
    def _do_caption(self, req: dict) -> dict:
        from .engine.pipeline import caption_raster, tile_choice_for
        from .raster.paths import check_raster_path
        from .raster.tiling import TilingParams
        from .store.run_lock import check_output_path

        check_raster_path(req["raster"])  # the CLI's checks, before a model loads or a file goes
        check_output_path(req["out"], req["raster"])
        device = req.get("device") or self.requested_device
        model = self._model(req.get("model"), device, req.get("precision"))
        tiling_kwargs = {}
        for key in ("tile_size", "overlap", "bands", "target_resolution"):
            if req.get(key) is not None:
                tiling_kwargs[key] = req[key]
        # No size asked for (None or 0): auto from the ground resolution, like the CLI does.
        choice = tile_choice_for(model, req["raster"], tiling_kwargs.get("tile_size"),
                                 tiling_kwargs.get("target_resolution"), req.get("ground_resolution"))
        tiling_kwargs["tile_size"] = choice.tile_px
        if req.get("extent") is not None:
            tiling_kwargs["extent"] = tuple(float(v) for v in req["extent"])
        tiling = TilingParams(**tiling_kwargs)
        self.out.send("log", message=f"model {getattr(model, 'model_id', req.get('model'))} loaded")
        self.out.send("log", message=choice.describe())
        from .raster.input_check import input_warnings

        for warning in input_warnings(req["raster"], getattr(model, "card", {}) or {}, choice.m_per_px,
                                      req.get("bands"), tiling):
            self.out.send("log", message=warning)

        def on_progress(done, total, records):
            ids = [_plain(getattr(r, "tile_id", r)) for r in (records or [])]
            if ids:
                self.out.send("tiles", tile_ids=ids)
            self.out.send("progress", done=int(done), total=int(total))

        summary = caption_raster(
            req["raster"],
            req["out"],
            model=model,
            tiling=tiling,
            batch_size=req.get("batch_size") or 8,
            device=device,
            beam_size=req.get("beam_size") or None,
            on_progress=on_progress,
            should_cancel=self.cancel_event.is_set,
            resume=True if req.get("resume") is None else bool(req["resume"]),
            overwrite=bool(req.get("overwrite")),
            language=req.get("language") or "en",
            tile_choice=choice,
            confirm_large=bool(req.get("confirm_large")),
        )
        return _summary_dict(summary)

    def _do_search(self, req: dict) -> dict:
        """One query -> ``hits``; ``queries`` -> ``results`` [{query, hits}], one model load. The
        embedding matrix stays in memory between requests while the file is unchanged."""
        from .search.query import search_queries

        device = req.get("device") or self.requested_device
        from .change.store import is_change_file

        if is_change_file(req["gpkg"]):  # both dates and transitions (change/search.py)
            return self._search_change(req, device)
        model = self._model(req["model"], device) if req.get("model") else self._store_model(req["gpkg"], device)
        grouped = req.get("queries") is not None
        queries = list(req["queries"]) if grouped else [req["query"]]
        results = search_queries(req["gpkg"], queries, k=req.get("k") or 10, model=model, device=device,
                                 min_confidence=req.get("min_confidence"), bbox=req.get("bbox"),
                                 where=req.get("where"), should_cancel=self.cancel_event.is_set)
        rows = [[_hit_row(h) for h in hits] for hits in results]
        if grouped:
            self.out.send("result", cmd="search", results=[{"query": q, "hits": r} for q, r in zip(queries, rows)])
            return {"count": sum(len(r) for r in rows), "queries": len(queries)}
        self.out.send("result", cmd="search", hits=rows[0])
        return {"count": len(rows[0])}

    def _search_change(self, req: dict, device) -> dict:
        """A change file's hits carry ``date``, ``change`` and ``summary`` besides the usual keys."""
        from .change.search import search_changes

        grouped = req.get("queries") is not None
        queries = list(req["queries"]) if grouped else [req["query"]]
        results = search_changes(req["gpkg"], queries, k=req.get("k") or 10, model=req.get("model"), device=device,
                                 date=req.get("date"), where=req.get("where"), bbox=req.get("bbox"),
                                 min_confidence=req.get("min_confidence"))
        rows = [[{**_hit_row(h), "date": h.date, "change": None if h.change is None else clean_float(h.change),
                  "summary": h.summary} for h in hits] for hits in results]
        if grouped:
            self.out.send("result", cmd="search", results=[{"query": q, "hits": r} for q, r in zip(queries, rows)])
            return {"count": sum(len(r) for r in rows), "queries": len(queries)}
        self.out.send("result", cmd="search", hits=rows[0])
        return {"count": len(rows[0])}

    def _do_change(self, req: dict) -> dict:
        """Two dates -> a change file, with the caption job's events: ``log`` lines, ``progress``
        (with ``phase``: before, after, score), ``result`` (the most changed tiles), ``done``."""
        from .change.run import change_rasters

        device = req.get("device") or self.requested_device
        model = req.get("model") or "default"
        if not any(str(req[k]).lower().endswith(".gpkg") for k in ("before", "after")):
            model = self._model(model, device, req.get("precision"))  # kept loaded for the next run
        summary = change_rasters(
            req["before"], req["after"], req["out"], model=model, tile_size=req.get("tile_size") or "auto",
            top_k=req.get("k") or 10, batch_size=req.get("batch_size") or 8, device=device,
            on_progress=lambda phase, done, total: self.out.send("progress", done=done, total=total, phase=phase),
            on_message=lambda line: self.out.send("log", message=line), should_cancel=self.cancel_event.is_set,
            resume=True if req.get("resume") is None else bool(req["resume"]), overwrite=bool(req.get("overwrite")),
            confirm_large=bool(req.get("confirm_large")))
        if not summary.cancelled:
            self.out.send("result", cmd="change", top=summary.top)
        return _summary_dict(summary)

    def _do_similar(self, req: dict) -> dict:
        from .search.similar import similar  # embeddings only: no model load

        hits = similar(req["gpkg"], req["tile_id"], k=req.get("k") or 10, min_confidence=req.get("min_confidence"))
        self.out.send("result", cmd="similar", hits=[_hit_row(h) for h in hits])
        return {"count": len(hits)}

    def _store_model(self, gpkg, device):
        """The model that made ``gpkg``, kept loaded: a search dock asks many queries in a row."""
        import os

        if not os.path.exists(gpkg):
            return None  # search_store says so in its own words
        from .store.gpkg import TileStore
        from .search.query import model_for_store

        with TileStore.open(gpkg) as store:
            meta = store.metadata().get("model", {}) or {}
            key = ("store", meta.get("id"), meta.get("hash"), device)
            if key not in self._models:
                cap = model_for_store(store, None, device, text_only=True)  # search only: the text tower
                self._models.clear()
                self._models[key] = cap
        return self._models[key]

    def _do_info(self, req: dict) -> dict:
        import torch

        from .device import available_devices, bf16_support

        info = {"version": __version__, "torch": torch.__version__, "devices": available_devices(),
                "cpu_bf16": bf16_support()._asdict()}  # whether precision bf16 can run here, and why not
        if req.get("model"):
            model = self._model(req["model"], req.get("device"), req.get("precision"))
            info.update(
                model_id=getattr(model, "model_id", None),
                model_hash=getattr(model, "model_hash", None),
                card=getattr(model, "card", None),
                device=str(getattr(model, "device", "")) or None,
            )
        self.out.send("result", cmd="info", **info)
        return {}


def _hit_row(h) -> dict:
    row = {"tile_id": _plain(h.tile_id), "row": int(h.row), "col": int(h.col), "score": clean_float(h.score),
           "caption": h.caption, "confidence": None if h.confidence is None else clean_float(h.confidence)}
    if getattr(h, "match_line", None) is not None:  # the query's "no good match" line (search only)
        row["match_line"] = clean_float(h.match_line)
    return row


def _plain(value):
    """tile ids are ints in the store; keep them ints on the wire, but never fail on odd types."""
    if isinstance(value, (int, str)):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return str(value)


def _summary_dict(summary) -> dict:
    if dataclasses.is_dataclass(summary):
        data = dataclasses.asdict(summary)
    elif isinstance(summary, dict):
        data = dict(summary)
    else:
        data = dict(vars(summary))
    return {k: (str(v) if hasattr(v, "__fspath__") else v) for k, v in data.items()}


def _protocol_stdout():
    """Keep a private handle on the real stdout for protocol lines and point fd 1 at stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", encoding="utf-8", buffering=1, newline="\n")


def serve(stdin=None, stdout=None, device=None, heartbeat_s: float = 2.0) -> int:
    """Answer requests from ``stdin`` until shutdown or EOF. Returns the process exit code."""
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="rscaption-worker %(levelname)s %(message)s")
    if stdin is None or stdin is sys.stdin:
        # bytes that are not UTF-8 become U+FFFD and get a protocol error: with the default strict
        # decoding they raised in the reader, which read as end of input and stopped the worker
        stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
    if stdout is None or stdout is sys.stdout or stdout is sys.__stdout__:
        stdout = _protocol_stdout()
    writer = _Writer(stdout)
    worker = Worker(stdin, writer, device=device, heartbeat_s=heartbeat_s)
    writer.on_broken = worker.cancel_event.set
    previous = _stop_on_signals(worker)
    try:
        return worker.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_on_signals(worker: Worker) -> dict:
    """SIGTERM's default killed the worker mid-batch: the run lock file, a hot journal and no answer
    were left. An ignored signal (Ctrl-C in a background job) stays ignored. Returns the handlers
    to put back (a test serving in its own process)."""
    previous = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for name in ("SIGTERM", "SIGINT"):
        sig = getattr(signal, name, None)
        if sig is not None and (handler := signal.getsignal(sig)) is not signal.SIG_IGN:
            previous[sig] = signal.SIG_DFL if handler is None else handler
            signal.signal(sig, worker.on_signal)
    return previous


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rscaption serve", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=os.environ.get("RSCAPTION_DEVICE") or None)
    parser.add_argument("--heartbeat", type=float, default=2.0, help="seconds between heartbeats")
    args = parser.parse_args(argv)
    return serve(device=args.device, heartbeat_s=args.heartbeat)


def _exit_now(code: int) -> None:
    """Leave without running interpreter teardown: torch's and the reader's threads can abort
    the process during finalisation ("terminate called without an active exception"), turning a
    clean shutdown into exit code 134."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())

"""The `rscaption serve` protocol under abuse (issue 11), property-based with hypothesis: whatever
arrives on stdin (random bytes, huge lines, unknown commands, malformed JSON, cancels between and
during jobs) each line gets the answer the protocol promises and a good request is still answered
afterwards; stdout carries protocol lines only; end of input ends the worker with nothing left
running. One real worker process per test, many messages through it."""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rscaption.protocol import ProtocolError, encode_request, parse_message, parse_request
from test_plugin_support import ROOT

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class RawWorker:
    """A worker subprocess spoken to in bytes; every stdout line is kept and must parse."""

    def __init__(self, *python_args):
        env = dict(os.environ, PYTHONPATH=str(ROOT / "backend"), HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
        args = python_args or ("-m", "rscaption.worker")
        self.proc = subprocess.Popen([sys.executable, *args, "--heartbeat", "0.5"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.messages: queue.Queue = queue.Queue()
        self.bad: list[bytes] = []
        self.stderr = bytearray()
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr.read()), daemon=True).start()
        self.wait_for(lambda m: m["type"] == "hello")

    def _pump(self):
        for raw in self.proc.stdout:
            try:
                self.messages.put(parse_message(raw.decode("utf-8")))
            except (UnicodeDecodeError, ProtocolError, ValueError):
                self.bad.append(raw)
        self.messages.put(None)

    def send(self, data: bytes):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def wait_for(self, predicate, timeout=120.0) -> list[dict]:
        """Messages up to and including the first one ``predicate`` accepts (heartbeats dropped)."""
        seen, deadline = [], time.monotonic() + timeout
        while True:
            msg = self.messages.get(timeout=max(0.1, deadline - time.monotonic()))
            assert msg is not None, f"worker exited; last messages {seen[-3:]}; stderr {bytes(self.stderr[-500:])}"
            if msg["type"] != "heartbeat":
                seen.append(msg)
                if predicate(msg):
                    return seen

    def terminals(self, n: int, timeout=120.0) -> list[dict]:
        """The next ``n`` done/error messages (and what came between them)."""
        got = []

        def enough(msg) -> bool:
            if msg["type"] in ("done", "error"):
                got.append(msg)
            return len(got) == n

        if n:
            self.wait_for(enough, timeout)
        return got

    def close(self) -> int:
        self.proc.stdin.close()
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def expected_answers(line: bytes) -> int:
    """Terminal messages the protocol promises for one line: none for a blank line or a cancel,
    one protocol error for anything unparsable, one done/error for a request."""
    text = line.decode("utf-8", errors="replace")
    if not text.strip():
        return 0
    try:
        req = parse_request(text)
    except ProtocolError:
        return 1
    return 0 if req["cmd"] == "cancel" else 1


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_model_dir):
    """A 4-tile raster and a captioned GeoPackage of it (searches and quick caption jobs)."""
    from rscaption.engine.pipeline import caption_raster
    from rscaption.raster.tiling import TilingParams
    from test_bad_rasters import write_raster

    d = tmp_path_factory.mktemp("fuzz")
    raster = write_raster(d / "r.tif")
    gpkg = d / "r.gpkg"
    caption_raster(str(raster), str(gpkg), model=tiny_model_dir, tiling=TilingParams(tile_size=32))
    return d, raster, gpkg, tiny_model_dir


@pytest.fixture(scope="module")
def worker():
    w = RawWorker()
    yield w
    w.close()


def one_line(data: bytes) -> bytes:
    return data.replace(b"\n", b" ").replace(b"\r", b" ") + b"\n"


def lines_strategy(small):
    d, raster, gpkg, model = small
    garbage = st.binary(max_size=300).filter(lambda b: b"shutdown" not in b).map(one_line)
    unknown = st.text(max_size=20).filter(lambda c: c not in ("caption", "search", "similar", "info", "cancel",
                                                              "shutdown")).map(
        lambda c: (json.dumps({"cmd": c}) + "\n").encode())
    good = [encode_request("info"), encode_request("search", gpkg=str(gpkg), query="a river", k=2),
            encode_request("caption", raster=str(raster), out=str(d / "fuzz-out.gpkg"), model=model, tile_size=32,
                           batch_size=1, overwrite=True)]
    truncated = st.tuples(st.sampled_from(good), st.integers(1, 30)).map(lambda g: g[0][:-1 - g[1]].encode() + b"\n")
    wrong_types = st.sampled_from([b'{"cmd": "search", "gpkg": 3, "query": "x"}\n', b'{"cmd": 7}\n', b'[]\n',
                                   b'{"cmd": "caption", "raster": "a", "out": "b", "tile_size": -1}\n',
                                   b'"just a string"\n', b"\n", b"   \t \n"])
    cancel = st.just(encode_request("cancel").encode())
    return st.lists(st.one_of(garbage, unknown, truncated, wrong_types, cancel,
                              st.sampled_from([g.encode() for g in good])), min_size=1, max_size=8)


def test_any_lines_get_their_answers_and_a_good_request_still_works(worker, small):
    @FUZZ
    @given(lines=lines_strategy(small))
    def check(lines):
        expected = sum(expected_answers(line) for line in lines)
        worker.send(b"".join(lines) + encode_request("info").encode())
        got = worker.terminals(expected + 1)
        assert got[-1]["type"] == "done" and got[-1]["cmd"] == "info"
        errors = [m for m in got if m["type"] == "error"]
        assert all(m["kind"] in ("protocol", "user", "cancelled") for m in errors), errors
        assert not worker.bad, worker.bad[:3]

    check()
    out = small[0] / "fuzz-out.gpkg"
    if out.exists():  # caption jobs cancelled at random points leave an intact file
        con = sqlite3.connect(out)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
    assert worker.proc.poll() is None


def test_huge_lines(worker):
    ten_mb = 10 * 1024 * 1024
    worker.send(b"x" * ten_mb + b"\n")  # not JSON
    (err,) = worker.terminals(1)
    assert err["kind"] == "protocol" and err["message"].startswith("bad request: not JSON: Expecting value")
    worker.send(json.dumps({"cmd": "info", "padding": "p" * ten_mb}).encode() + b"\n")  # valid, just long
    (done,) = worker.terminals(1)
    assert done["type"] == "done" and done["cmd"] == "info"
    worker.send(b"{" * (17 * 1024 * 1024) + b"\n" + encode_request("info").encode())  # over the line limit
    err, done = worker.terminals(2)
    assert err == {"type": "error", "message": "bad request: a line longer than 16,777,216 characters",
                   "kind": "protocol"}
    assert done["cmd"] == "info" and not worker.bad


def test_lone_surrogates_and_invalid_utf8_are_answered(worker, tmp_path):
    worker.send(b"\xff\xfe\x80 not utf-8\n")
    worker.send(b'{"cmd": "search", "gpkg": "\\udcff.gpkg", "query": "x"}\n')  # valid JSON, unencodable text
    err1, err2 = worker.terminals(2)
    assert err1["kind"] == "protocol" and "\ufffd\ufffd\ufffd not utf-8" in err1["message"]
    assert err2 == {"type": "error", "cmd": "search", "message": "\udcff.gpkg does not exist", "kind": "user"}
    assert not worker.bad


STRAY = """
import os, sys, warnings
from rscaption import worker

answer_info = worker.Worker._do_info

def noisy_info(self, req):
    # what a library might do while a request runs: print, write to sys.stdout or to fd 1, warn
    print("stray print from a library")
    sys.stdout.write("stray sys.stdout.write\\n")
    sys.stdout.flush()
    os.write(1, b"stray write to file descriptor 1\\n")
    warnings.warn("stray library warning")
    return answer_info(self, req)

worker.Worker._do_info = noisy_info
worker._exit_now(worker.main(sys.argv[1:]))
"""


def test_stray_output_goes_to_stderr_not_the_protocol():
    w = RawWorker("-c", STRAY)
    try:
        w.send(encode_request("info").encode())
        w.terminals(1)
        assert w.close() == 0
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
    assert not w.bad, w.bad
    err = bytes(w.stderr)
    for text in (b"stray print from a library", b"stray sys.stdout.write", b"stray write to file descriptor 1",
                 b"stray library warning"):
        assert text in err


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in os.listdir(f"/proc/{p}/task") if os.path.isdir(f"/proc/{p}/task") else []:
            try:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = {int(c) for c in f.read().split()}
            except OSError:
                continue
            todo += list(kids - found)
            found |= kids
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("when", ["idle", "during a caption job"])
def test_end_of_input_ends_the_worker_with_nothing_left(small, tmp_path, when):
    d, raster, gpkg, model = small
    w = RawWorker()
    try:
        w.send(encode_request("search", gpkg=str(gpkg), query="houses", k=1).encode())
        w.terminals(1)
        kids = descendants(w.proc.pid)
        if when == "idle":
            assert w.close() == 0
        else:
            out = tmp_path / "o.gpkg"
            w.send(encode_request("caption", raster=str(raster), out=str(out), model=model, tile_size=16,
                                  batch_size=1).encode())
            w.wait_for(lambda m: m["type"] == "tiles")
            kids |= descendants(w.proc.pid)
            w.proc.stdin.close()  # the job already running is finished and answered, then the worker leaves
            (done,) = w.terminals(1)
            assert done["type"] == "done" and done["summary"]["written"] == 16
            assert w.proc.wait(60) == 0
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
    assert not [k for k in kids if alive(k)]
    assert not w.bad

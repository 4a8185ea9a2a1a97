"""The NDJSON protocol (pure) and the ``rscaption serve`` worker as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import queue

import pytest

from test_plugin_support import ROOT, gpkg_tile_count, tiny_model_dir

from rscaption.protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    encode_message,
    encode_request,
    parse_message,
    parse_request,
)


# -- protocol ------------------------------------------------------------------------------------------
def test_request_round_trip():
    line = encode_request("caption", raster="/a.tif", out="/b.gpkg", tile_size=64, extent=[0, 0, 1, 1], bands=[1, 2, 3])
    assert line.endswith("\n") and line.count("\n") == 1
    req = parse_request(line)
    assert req == {"cmd": "caption", "raster": "/a.tif", "out": "/b.gpkg", "tile_size": 64,
                   "extent": [0, 0, 1, 1], "bands": [1, 2, 3]}
    assert parse_request(encode_request("cancel")) == {"cmd": "cancel"}


@pytest.mark.parametrize("line, fragment", [
    ("not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"cmd": "fly"}', "unknown command"),
    ('{"cmd": "caption", "out": "x.gpkg"}', "missing 'raster'"),
    ('{"cmd": "caption", "raster": 3, "out": "x"}', "'raster' must be str"),
    ('{"cmd": "caption", "raster": "a", "out": "b", "tile_size": 0}', "at least 1"),
    ('{"cmd": "caption", "raster": "a", "out": "b", "tile_size": true}', "must be int"),
    ('{"cmd": "caption", "raster": "a", "out": "b", "extent": [1, 0, 0, 1]}', "empty"),
    ('{"cmd": "caption", "raster": "a", "out": "b", "bands": [0]}', "1-based"),
    ('{"cmd": "search", "gpkg": "a", "query": "q", "k": 0}', "at least 1"),
    ("", "empty line"),
])
def test_bad_requests_are_rejected_with_a_reason(line, fragment):
    with pytest.raises(ProtocolError, match=fragment):
        parse_request(line)


def test_messages_validate_and_never_emit_nan():
    assert parse_message(encode_message("progress", done=3, total=10)) == {"type": "progress", "done": 3, "total": 10}
    assert parse_message(encode_message("hello", version="0", protocol=PROTOCOL_VERSION))["protocol"] == 1
    with pytest.raises(ProtocolError, match="missing 'done'"):
        encode_message("progress", total=3)
    with pytest.raises(ProtocolError, match="unknown message type"):
        parse_message('{"type": "shout"}')
    with pytest.raises(ValueError):
        encode_message("result", score=float("nan"))


def test_protocol_module_is_pure():
    code = "import sys, rscaption.protocol; print(sorted(m for m in ('torch', 'numpy', 'rasterio') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "backend")))
    assert out.stdout.strip() == "[]"


# -- worker subprocess ---------------------------------------------------------------------------------
class Worker:
    def __init__(self):
        env = dict(os.environ, PYTHONPATH=str(ROOT / "backend"), HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "rscaption.worker", "--heartbeat", "0.5"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.raw: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.raw.append(line)
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def send(self, cmd, **fields):
        self.proc.stdin.write(encode_request(cmd, **fields))
        self.proc.stdin.flush()

    def until(self, predicate, timeout=120):
        seen = []
        while True:
            msg = self.lines.get(timeout=timeout)
            assert msg is not None, f"worker exited; seen {seen[-5:]}"
            seen.append(msg)
            if predicate(msg):
                return msg, seen


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


def test_worker_session(tiny, geotiff, tmp_path):
    raster = str(geotiff("RGB.byte.tif"))
    out = str(tmp_path / "w.gpkg")
    w = Worker()
    try:
        hello, _ = w.until(lambda m: m["type"] == "hello")
        assert hello["protocol"] == PROTOCOL_VERSION and hello["device"] == "cpu" and hello["torch"]

        w.proc.stdin.write("this is not json\n")
        w.proc.stdin.flush()
        err, _ = w.until(lambda m: m["type"] == "error")
        assert err["kind"] == "protocol" and "not JSON" in err["message"]

        w.send("info", model=tiny)
        res, _ = w.until(lambda m: m["type"] == "result")
        assert res["devices"][-1] == "cpu" and res["card"]["embed_dim"] == 32
        w.until(lambda m: m["type"] == "done")

        # a full small run, then a cancelled one on a different output
        w.send("caption", raster=raster, out=out, model=tiny, tile_size=256, batch_size=4)
        done, seen = w.until(lambda m: m["type"] in ("done", "error"))
        assert done["type"] == "done", done
        summary = done["summary"]
        assert summary["written"] == gpkg_tile_count(out) > 0 and not summary["cancelled"]
        tiles = [t for m in seen if m["type"] == "tiles" for t in m["tile_ids"]]
        assert len(tiles) == summary["written"]
        progress = [m for m in seen if m["type"] == "progress"]
        assert progress[-1]["done"] == progress[-1]["total"] == summary["total"]

        out2 = str(tmp_path / "cancel.gpkg")
        w.send("caption", raster=raster, out=out2, model=tiny, tile_size=64, batch_size=2)
        w.until(lambda m: m["type"] == "tiles")
        w.send("cancel")
        done, _ = w.until(lambda m: m["type"] in ("done", "error"))
        assert done["type"] == "done" and done["summary"]["cancelled"]
        assert 0 < gpkg_tile_count(out2) == done["summary"]["written"] < done["summary"]["total"]

        w.send("search", gpkg=out, query="a river", k=3)
        res, _ = w.until(lambda m: m["type"] == "result")
        assert len(res["hits"]) == 3
        assert [h["score"] for h in res["hits"]] == sorted((h["score"] for h in res["hits"]), reverse=True)
        w.until(lambda m: m["type"] == "done")

        w.send("search", gpkg=str(tmp_path / "missing.gpkg"), query="x")
        err, _ = w.until(lambda m: m["type"] == "error")
        assert err["kind"] == "user" and "does not exist" in err["message"]

        heartbeats = [m for m in (json.loads(line) for line in w.raw) if m["type"] == "heartbeat"]
        assert heartbeats, "no heartbeat in the whole session"
        w.send("shutdown")
        assert w.proc.wait(30) == 0
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
    # only protocol on stdout: every line parsed as a message
    for line in w.raw:
        parse_message(line)


def test_serve_through_the_cli(tiny):
    """`rscaption serve` is the same worker (the plugin may start either)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "backend"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "rscaption.cli", "serve"], input=encode_request("info"),
                          capture_output=True, text=True, timeout=120, env=env)
    types = [parse_message(line)["type"] for line in proc.stdout.splitlines() if line.strip()]
    assert "hello" in types and "result" in types and types[-1] in ("done", "heartbeat")

"""Reliability issue, third round: input that is too much (a queries "file" that never ends, a beam
of 100,000, an infinite resolution), a reader that goes away, and small wording slips. The real
CLI in this process; a subprocess where the process is the subject (a closed pipe)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, geotiff_path
from rscaption.limits import BOUNDS
from test_bad_inputs import one_error_line, run_main
from test_bad_queries import gpkg  # noqa: F401 (fixture: a small captioned GeoPackage)

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "backend"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# -- 11: the queries file is read with a hard cap, whatever it is ----------------------------------
def test_queries_from_a_device_are_capped(tmp_path, capsys):
    # getsize says 0 for /dev/zero: the old check let it through and the read grew without bound
    rc, err = run_main(capsys, "search", tmp_path / "x.gpkg", "--queries", "/dev/zero")
    assert rc == 2
    assert one_error_line(err) == ("rscaption: error: queries file /dev/zero is larger than 16 MB; "
                                   "is it really one query per line?")


def test_queries_from_standard_input_are_capped(tmp_path, capsys, monkeypatch):
    big = io.TextIOWrapper(io.BytesIO(b"a river\n" * (2 * 1024 * 1024 + 1)), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", big)
    rc, err = run_main(capsys, "search", tmp_path / "x.gpkg", "--queries", "-")
    assert rc == 2
    assert one_error_line(err) == ("rscaption: error: standard input is larger than 16 MB; "
                                   "is it really one query per line?")


# -- 12: every size-like option has a bound, named in its one line --------------------------------
@pytest.mark.parametrize("argv, flag, name", [
    (["caption", "r.tif", "-o", "o.gpkg", "--beam-size", "100000"], "--beam-size", "beam_size"),
    (["caption", "r.tif", "-o", "o.gpkg", "--batch-size", "100000"], "--batch-size", "batch_size"),
    (["search", "g.gpkg", "river", "-k", "1000000000"], "-k", "k"),
    (["similar", "g.gpkg", "1", "-k", "1000000000"], "-k", "k"),
])
def test_size_options_are_capped(tmp_path, capsys, argv, flag, name):
    cmd = argv[0]
    argv = [str(tmp_path / a) if a.endswith((".tif", ".gpkg")) else a for a in argv]
    rc, err = run_main(capsys, *argv)
    lo, hi = BOUNDS[name]
    assert rc == 2
    assert one_error_line(err) == (f"rscaption {cmd}: error: argument {flag}: must be at most {hi:,} "
                                   f"(allowed: {lo:,} to {hi:,}), got {argv[-1]} (see rscaption {cmd} --help)")


def test_worker_refuses_an_oversized_beam(tiny_model_dir, tmp_path):
    errors = worker_errors(tiny_model_dir, tmp_path, [{"beam_size": 100000}, {"batch_size": 100000}])
    assert errors == [("beam_size must be from 1 to 32, got 100000", "user"),
                      ("batch_size must be from 1 to 1,024, got 100000", "user")]


# -- 15: --resolution inf / nan / 0 / negative -------------------------------------------------------
@pytest.mark.parametrize("value", ["inf", "nan", "0", "-2", "1e999"])
def test_resolution_must_be_finite_and_positive(tmp_path, capsys, tiny_model_dir, value):
    rc, err = run_main(capsys, "caption", geotiff_path("RGB.byte.tif"), "-o", tmp_path / "o.gpkg",
                       "--model", tiny_model_dir, "--resolution", value)
    assert rc == 2
    assert one_error_line(err) == (f"rscaption caption: error: argument --resolution: must be a finite number "
                                   f"above 0, got {value} (see rscaption caption --help)")
    assert not (tmp_path / "o.gpkg").exists()


def worker_errors(model, tmp_path, extras: list[dict]) -> list[tuple[str, str]]:
    """Each caption request (RGB.byte.tif, the tiny model, plus one extra's fields; raw JSON, so
    1e999 and NaN arrive as Python reads them) through the real worker loop, in this process."""
    from rscaption.worker import serve

    lines = []
    for n, extra in enumerate(extras):
        req = {"cmd": "caption", "raster": str(geotiff_path("RGB.byte.tif")), "out": str(tmp_path / f"{n}.gpkg"),
               "model": str(model), "device": "cpu"}
        text = json.dumps({**req, **{k: v for k, v in extra.items() if isinstance(v, int)}})
        for key, raw in extra.items():
            if isinstance(raw, str):
                text = text[:-1] + f', "{key}": {raw}}}'
        lines.append(text + "\n")
    out = io.StringIO()
    serve(io.StringIO("".join(lines)), out, heartbeat_s=0)
    msgs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert not any(m["type"] == "done" for m in msgs)
    return [(m["message"], m["kind"]) for m in msgs if m["type"] == "error"]


def test_worker_refuses_a_non_finite_resolution(tiny_model_dir, tmp_path):
    errors = worker_errors(tiny_model_dir, tmp_path, [{"target_resolution": raw}
                                                      for raw in ("1e999", "NaN", "-Infinity", "-3")])
    assert errors == [(f"target_resolution must be a finite number above 0, got {v}", "user")
                      for v in ("inf", "nan", "-inf", "-3")]
    assert not list(tmp_path.glob("*.gpkg"))


# -- 17: a reader that goes away (`| head -1`) ------------------------------------------------------
@pytest.mark.parametrize("argv", [["similar", "{g}", "1", "--json"], ["search", "{g}", "a river", "--json"]])
def test_closed_stdout_exits_quietly(gpkg, argv):  # noqa: F811
    proc = subprocess.Popen([sys.executable, "-m", "rscaption.cli", *(a.format(g=gpkg) for a in argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True)
    proc.stdout.close()  # like `| head -0`: every write to stdout now fails with EPIPE
    err = proc.stderr.read()
    rc = proc.wait(timeout=300)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert rc == 141 and not err.strip(), (rc, err)


# -- smaller ones ------------------------------------------------------------------------------------
def test_empty_band_entry_is_refused(tmp_path, capsys):
    rc, err = run_main(capsys, "caption", tmp_path / "r.tif", "-o", tmp_path / "o.gpkg", "--bands", "1,,2,3")
    assert rc == 2
    assert one_error_line(err) == ("rscaption caption: error: argument --bands: expected comma-separated band "
                                   "numbers like 1,2,3, got '1,,2,3' (see rscaption caption --help)")


def test_empty_query_says_so(tmp_path, capsys):
    rc, err = run_main(capsys, "search", tmp_path / "x.gpkg", "")
    assert rc == 2 and one_error_line(err) == "rscaption: error: the search query is empty"


def test_no_resume_message_does_not_suggest_a_missing_option(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "o.gpkg"
    out.write_bytes(b"")
    rc, err = run_main(capsys, "caption", geotiff_path("RGB.byte.tif"), "-o", out, "--model", tiny_model_dir,
                       "--no-resume")
    line = one_error_line(err)
    assert rc == 2 and "--resume " not in line
    assert line == (f"rscaption: error: {out} exists and --no-resume was given; pass --overwrite to replace it "
                    "or leave out --no-resume to continue it")

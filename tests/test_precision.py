"""Inference precision: fp32 by default, bf16 on request (``precision="bf16"``, or ``"auto"`` on
CPUs with AMX-BF16 that run it).

bf16 needs oneDNN's bf16 kernels (AVX-512 BW/VL/DQ or AVX-NE-CONVERT on x86): the agreement tests
carry ``needs_bf16`` and skip, with the CPU's reason, where ``device.bf16_support()`` says no; what
``auto`` picks is asserted against the CPU's own flags and the probe, and a CPU without bf16 is
simulated on every machine (``no_bf16_cpu``). Real default model, real UC Merced images, real GeoTIFF."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import require_shared
from rscaption import device
from rscaption.device import bf16_support, compute_dtype, cpu_has_fast_bf16, parse_precision
from rscaption.errors import ModelError
from rscaption.store.gpkg import TileStore
from rscaption.models.registry import load_model
from rscaption.data.images import read_rgb
from test_bad_inputs import one_error_line, run_main
from test_bad_rasters import write_raster


def test_fp32_by_default_and_auto_picks_bf16_exactly_where_the_cpu_has_amx_bf16_and_runs_it(monkeypatch):
    monkeypatch.delenv("RSCAPTION_PRECISION", raising=False)
    amx = bool(torch.cpu.get_capabilities().get("amx_bf16")) and bf16_support().ok
    assert cpu_has_fast_bf16() is amx
    assert compute_dtype("auto", "cpu", torch.float32) == (torch.bfloat16 if amx else torch.float32)
    assert compute_dtype(None, "cpu", torch.float32) == torch.float32
    assert load_model("default", device="cpu").precision == "fp32"
    assert compute_dtype("fp32", "cpu", torch.float32) == torch.float32
    # half-precision weights (CUDA's default) compute in their own dtype whatever is asked
    assert compute_dtype("bf16", "cpu", torch.float16) == torch.float16
    assert parse_precision("bfloat16") == "bf16" and parse_precision("FP32") == "fp32"
    with pytest.raises(ModelError, match="auto, fp32 or bf16"):
        parse_precision("int4")


@pytest.mark.needs_bf16
def test_bf16_on_request_where_the_cpu_runs_it(monkeypatch):
    assert compute_dtype("bf16", "cpu", torch.float32) == torch.bfloat16
    monkeypatch.setenv("RSCAPTION_PRECISION", "bf16")
    assert compute_dtype(None, "cpu", torch.float32) == torch.bfloat16


def test_a_cpu_without_bf16_computes_auto_in_fp32_and_refuses_bf16_before_writing(
        no_bf16_cpu, monkeypatch, tmp_path, capsys, tiny_model_dir):
    """An AVX2-only CPU (simulated): ``auto`` is fp32; an explicit bf16 is one line and exit 2 from
    the CLI with no output file, and one error message (not a traceback) from the worker."""
    monkeypatch.delenv("RSCAPTION_PRECISION", raising=False)
    assert not no_bf16_cpu.ok and no_bf16_cpu.reason and "\n" not in no_bf16_cpu.reason
    assert cpu_has_fast_bf16() is False
    assert compute_dtype("auto", "cpu", torch.float32) == torch.float32
    with pytest.raises(ModelError, match="^precision bf16 cannot run on this CPU: "):
        compute_dtype("bf16", "cpu", torch.float32)
    with pytest.raises(ModelError, match="precision bf16 cannot run"):
        load_model(tiny_model_dir, device="cpu", precision="bf16")
    cap = load_model(tiny_model_dir, device="cpu", precision="auto")
    assert cap.embed_images([np.zeros((32, 32, 3), np.uint8)]).shape[0] == 1  # auto runs, in fp32
    from rscaption.training.caption_stages import _cannot_run  # training's bf16 comparison is skipped

    assert _cannot_run("bf16", cap).startswith("precision bf16 cannot run") and _cannot_run("auto", cap) == ""

    raster = write_raster(tmp_path / "r.tif")
    out = tmp_path / "o.gpkg"
    rc, err = run_main(capsys, "caption", raster, "-o", out, "--model", tiny_model_dir, "--precision", "bf16")
    line = one_error_line(err)
    assert rc == 2 and line.startswith("rscaption: error: precision bf16 cannot run on this CPU: ")
    assert no_bf16_cpu.reason in line and "fp32" in line
    monkeypatch.setenv("RSCAPTION_PRECISION", "bf16")  # the environment variable is the same request
    rc, err = run_main(capsys, "caption", raster, "-o", out, "--model", tiny_model_dir)
    assert rc == 2 and one_error_line(err) == line
    assert os.listdir(tmp_path) == ["r.tif"]  # no GeoPackage, no lock file
    monkeypatch.delenv("RSCAPTION_PRECISION")

    from rscaption.protocol import encode_request, parse_message
    from rscaption.worker import serve

    requests = (encode_request("caption", raster=str(raster), out=str(out), model=tiny_model_dir, tile_size=32,
                               precision="bf16") + encode_request("info"))
    answers = io.StringIO()
    assert serve(io.StringIO(requests), answers, heartbeat_s=60) == 0
    said = [m for m in map(parse_message, answers.getvalue().splitlines()) if m["type"] in ("error", "result")]
    assert [m["type"] for m in said] == ["error", "result"]  # refused, and the worker goes on answering
    assert said[0]["kind"] == "user" and said[0]["message"] == line.removeprefix("rscaption: error: ")
    assert said[1]["cpu_bf16"] == {"ok": False, "reason": no_bf16_cpu.reason}
    assert os.listdir(tmp_path) == ["r.tif"]


def test_the_reason_names_what_the_cpu_lacks(no_bf16_cpu, monkeypatch):
    avx2_only = dict.fromkeys(device.CPU_FLAGS, False) | {"avx2": True, "avx_vnni": False}
    monkeypatch.setattr(device, "cpu_flags", lambda: avx2_only)
    device.bf16_support.cache_clear()
    reason = bf16_support().reason
    assert reason == ("this CPU has no avx_ne_convert nor avx512bw, avx512vl, avx512dq, "
                      "which oneDNN's bf16 convolutions need")


@pytest.fixture(scope="module")
def ucm_images():
    root = require_shared("ucm_captions")
    files = sorted(root.rglob("*.webp"))[::60][:24]
    assert len(files) == 24
    return [read_rgb(str(f)) for f in files]


@pytest.mark.needs_bf16
def test_bf16_gives_the_fp32_embeddings_and_captions_of_the_default_model(ucm_images):
    cap = load_model("default", device="cpu", precision="fp32")
    e32 = cap.embed_images(ucm_images)
    c32 = cap.caption(e32, beam_size=3)
    cap.precision = "bf16"
    eb = cap.embed_images(ucm_images)
    cb = cap.caption(eb, beam_size=3)
    cos = (e32 * eb).sum(1)
    assert cos.min() > 0.99, cos.min()
    assert np.abs(eb - e32).max() > 1e-6  # it really computed in bf16
    same = sum(a[0] == b[0] for a, b in zip(c32, cb))
    assert same >= 20, [(a[0], b[0]) for a, b in zip(c32, cb) if a[0] != b[0]]
    # the weights stay fp32: training, saving and hashing never see the bf16 copies
    assert cap.dtype == torch.float32 and all(p.dtype == torch.float32 for p in cap.parameters())
    cap.precision = "fp32"
    np.testing.assert_allclose(cap.embed_images(ucm_images[:4]), e32[:4], atol=1e-5)


@pytest.mark.needs_bf16
def test_cli_precision_is_recorded_with_the_tiles(tmp_path, geotiff):
    raster = geotiff("RGB.byte.tif")
    out = {}
    for p in ("fp32", "bf16"):
        gpkg = tmp_path / f"{p}.gpkg"
        r = subprocess.run([sys.executable, "-m", "rscaption.cli", "caption", str(raster), "-o", str(gpkg),
                            "--precision", p, "--tile-size", "256", "-q"], capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr
        with TileStore.open(str(gpkg)) as s:
            meta = s.metadata()
            ids, emb = s.embeddings()
        assert meta["compute_dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[p]
        out[p] = dict(zip(ids.tolist(), emb))
    assert out["fp32"].keys() == out["bf16"].keys() and len(out["fp32"]) > 4
    cos = [float(np.dot(out["fp32"][k], out["bf16"][k])) for k in out["fp32"]]
    assert min(cos) > 0.99
    r = subprocess.run([sys.executable, "-m", "rscaption.cli", "caption", str(raster), "-o",
                        str(tmp_path / "x.gpkg"), "--precision", "fp8"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    json.dumps(meta)  # provenance stays JSON

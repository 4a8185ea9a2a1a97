"""Inference precision: fp32 by default, bf16 on request (``precision="bf16"``, or ``"auto"`` on
CPUs with AMX-BF16).

bf16 runs on any CPU torch supports (emulated where there is no matrix unit), so the agreement
tests run everywhere; only what ``auto`` picks depends on the machine, and that is asserted against
the CPU's own capability flags. Real default model, real UC Merced images, real GeoTIFF."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import require_shared
from rscaption.device import compute_dtype, cpu_has_fast_bf16, parse_precision
from rscaption.errors import ModelError
from rscaption.gpkg import TileStore
from rscaption.models.registry import load_model
from rscaption.training.features import read_rgb


def test_fp32_by_default_and_auto_picks_bf16_exactly_where_the_cpu_has_amx_bf16(monkeypatch):
    monkeypatch.delenv("RSCAPTION_PRECISION", raising=False)
    amx = bool(torch.cpu.get_capabilities().get("amx_bf16"))
    assert cpu_has_fast_bf16() is amx
    assert compute_dtype("auto", "cpu", torch.float32) == (torch.bfloat16 if amx else torch.float32)
    assert compute_dtype(None, "cpu", torch.float32) == torch.float32
    assert load_model("default", device="cpu").precision == "fp32"
    assert compute_dtype("fp32", "cpu", torch.float32) == torch.float32
    assert compute_dtype("bf16", "cpu", torch.float32) == torch.bfloat16
    # half-precision weights (CUDA's default) compute in their own dtype whatever is asked
    assert compute_dtype("bf16", "cpu", torch.float16) == torch.float16
    monkeypatch.setenv("RSCAPTION_PRECISION", "bf16")
    assert compute_dtype(None, "cpu", torch.float32) == torch.bfloat16
    assert parse_precision("bfloat16") == "bf16" and parse_precision("FP32") == "fp32"
    with pytest.raises(ModelError, match="auto, fp32 or bf16"):
        parse_precision("int4")


@pytest.fixture(scope="module")
def ucm_images():
    root = require_shared("ucm_captions")
    files = sorted(root.rglob("*.webp"))[::60][:24]
    assert len(files) == 24
    return [read_rgb(str(f)) for f in files]


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

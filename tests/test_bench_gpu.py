"""The GPU benchmark (rscaption.bench.gpu) runs its whole code at toy sizes on the CPU, so it is known
to work before a GPU machine is lent for it; without CUDA `make bench` skips it with a reason."""

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from rscaption.bench import gpu as bench_gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the section runs")
def test_without_cuda_the_section_says_why_it_is_skipped():
    assert bench_gpu.run() == {"skipped": "no CUDA device: GPU figures need a GPU machine"}


def test_quick_run_on_the_cpu_measures_the_default_model_and_the_reference(tmp_path):
    raster = tmp_path / "small.tif"
    rgb = np.random.default_rng(0).integers(0, 256, size=(3, 128, 192), dtype=np.uint8)
    with rasterio.open(raster, "w", driver="GTiff", width=192, height=128, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 5000000, 5.0, 5.0)) as ds:
        ds.write(rgb)
    r = bench_gpu.run("cpu", quick=True, raster=str(raster))
    fp32 = r["default_model"]["by_dtype"]["float32"]
    assert [m["batch"] for m in fp32["model_only"]] == [4, 8]
    for m in fp32["model_only"]:
        assert m["tiles"] == 8 and m["tiles_per_s"] > 0 and m["gpu"] is None  # no nvidia-smi samples on a CPU
        assert sum(m["share"].values()) == pytest.approx(1.0, abs=2e-3)
    e2e = fp32["end_to_end"]
    assert e2e["tiles"] == 6 and e2e["tiles_per_s"] > 0  # 3 x 2 tiles of 64 px
    (ref,) = r["reference_clipcap"]
    assert ref["batch"] == 2 and all(v > 0 for v in ref["ms_per_image"].values())


def test_the_reference_is_clip_vit_b32_with_gpt2_small():
    """Published ClipCap timings are for these sizes: 87.8 M parameters in the ViT-B/32 image tower,
    124.4 M in GPT-2 small (random weights here, built from open_clip's and transformers' configs)."""
    clip, mapping, lm = bench_gpu.reference_clipcap("cpu", "float32")
    assert round(sum(p.numel() for p in clip.parameters()) / 1e6, 1) == 87.8
    assert round(sum(p.numel() for p in lm.parameters()) / 1e6, 1) == 124.4
    assert mapping(torch.zeros(1, clip.output_dim)).shape == (1, 10, 768)


def test_a_dtype_the_device_cannot_run_is_skipped_with_the_reason(no_bf16_cpu, tmp_path):
    why = f"bf16 does not run on this CPU: {no_bf16_cpu.reason}"
    assert bench_gpu.unsupported("cpu", "bfloat16") == why
    assert bench_gpu.unsupported("cpu", "float32") == bench_gpu.unsupported("cpu", "float16") == ""
    r = bench_gpu.default_model_section("cpu", None, dtypes=("bfloat16",), batches=(2,), n_tiles=2, tile=32,
                                        model="tiny")
    assert r["by_dtype"] == {"bfloat16": {"skipped": why}}

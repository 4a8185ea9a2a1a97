"""The roofline pieces of `make bench` on tiny real models: they measure what they say (no timing
assertions: speeds belong to the benchmark's report, not to tests)."""

import pytest
import torch

from rscaption.bench_roofline import count_flops, matmul_peak, tower_alone
from rscaption.models.fold import can_fuse
from rscaption.models.tiny import build_tiny_captioner


def test_flop_counter_counts_a_matrix_product():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    assert count_flops(lambda: a @ b) == 2 * 64 * 32 * 16


def test_matmul_peak_reports_both_placements():
    r = matmul_peak(sizes=(64,))
    assert r["cores"] >= 1 and r["dtype"] == "float32"
    assert r["threaded"][64] > 0 and r["per_core_side_by_side"][64] > 0
    assert r["peak_gflops"] == max(r["threaded"][64], r["per_core_side_by_side"][64])


def test_tower_alone_times_every_inference_copy_of_a_cnn_tower():
    cap = build_tiny_captioner("lit")
    r = tower_alone(cap, batch=2, reps=1)
    expected = {"plain", "folded", "folded_bf16"} | ({"fused", "fused_bf16"} if can_fuse("cpu") else set())
    assert set(r["ms_per_tile"]) == set(r["gflops"]) == expected
    # the FLOPs are the tower's own products, counted once on the trained modules
    x = torch.randn(1, 3, r["image_size"], r["image_size"])
    with torch.inference_mode():
        assert r["gflop_per_tile"] == pytest.approx(count_flops(lambda: cap.encoder.image_tower(x)) / 1e9, abs=1e-4)
    assert all(v > 0 for v in r["ms_per_tile"].values())


def test_tower_alone_skips_towers_that_are_not_folded():
    assert tower_alone(build_tiny_captioner("open_clip"), batch=2, reps=1) is None

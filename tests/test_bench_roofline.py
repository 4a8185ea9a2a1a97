"""The roofline pieces of `make bench` on tiny real models: they measure what they say (no timing
assertions: speeds belong to the benchmark's report, not to tests)."""

import json

import pytest
import torch

from rscaption.bench import roofline as bench_roofline
from rscaption.bench.roofline import bench_local_engine, count_flops, matmul_peak, tower_alone
from rscaption.bench.sections import Sections, cpu_line, cpu_report, json_saver
from rscaption.device import CPU_FLAGS, bf16_support
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
    variants = {"plain", "folded"} | ({"fused"} if can_fuse("cpu") else set())
    bf16 = {f"{v}_bf16" for v in variants - {"plain"}} if bf16_support().ok else set()  # where bf16 runs
    assert set(r["ms_per_tile"]) == set(r["gflops"]) == variants | bf16
    # the FLOPs are the tower's own products, counted once on the trained modules
    x = torch.randn(1, 3, r["image_size"], r["image_size"])
    with torch.inference_mode():
        assert r["gflop_per_tile"] == pytest.approx(count_flops(lambda: cap.encoder.image_tower(x)) / 1e9, abs=1e-4)
    assert all(v > 0 for v in r["ms_per_tile"].values())


def test_tower_alone_skips_towers_that_are_not_folded():
    assert tower_alone(build_tiny_captioner("open_clip"), batch=2, reps=1) is None


# -- the whole roofline report at toy sizes --------------------------------------------------------------
def test_without_bf16_the_bench_skips_its_bf16_parts_records_a_failure_and_measures_the_rest(
        no_bf16_cpu, monkeypatch, capsys, tmp_path):
    """An AVX2-only CPU (simulated) on which one fp32 part also fails: the bf16 parts are skipped in
    one line each with the CPU's reason, the failure is one line and an ``error`` entry, and every
    other figure is printed and saved (after each part, as `make bench` saves out/bench.json)."""
    real_split = bench_roofline.stage_split

    def split(cap, raster, tile, n_tiles, fast, threads, beam):
        if fast:
            raise RuntimeError("mkldnn_convolution: out of luck\nsecond line")
        return real_split(cap, raster, tile, n_tiles, fast, threads, beam)

    monkeypatch.setattr(bench_roofline, "stage_split", split)
    monkeypatch.setattr(bench_roofline, "SHARED_NAIP", tmp_path / "absent.tif")  # no 300 MB read for 4 tiles
    cap = build_tiny_captioner("lit")
    cap.precision = "fp32"
    report: dict = {}
    out = tmp_path / "bench.json"
    r = bench_local_engine(cap, size=128, tile=64, split_tiles=4, limit_s=2.0, matmul_sizes=(256,),
                           sections=Sections(report, json_saver(out, report)).child("roofline"))
    lines = capsys.readouterr().out.splitlines()

    why = f"bf16 does not run on this CPU: {no_bf16_cpu.reason}"
    assert r["matmul_bf16"] == r["split_optimised_bf16"] == {"skipped": why}
    assert f"  bf16 matmul: skipped: {why}" in lines and f"  bf16 split: skipped: {why}" in lines
    assert not any(k.endswith("bf16") for k in r["tower_alone"]["ms_per_tile"])
    assert r["tower_alone"]["bf16_skipped"] == why
    e = r["end_to_end"]
    assert e["bf16_skipped"] == why and "speedup_bf16" not in e and "optimised_bf16" not in e["tiles_done"]

    error = "RuntimeError: mkldnn_convolution: out of luck"
    assert r["split_optimised"] == {"error": error}
    assert f"  optimised split: failed: {error} (the figures above are kept; going on)" in lines

    # the fp32 figures before and after the failure
    assert r["engine_compute_dtype"] == "float32" and r["matmul"]["peak_gflops"] > 0
    assert r["split_baseline"]["ms_per_tile"] > 0 and r["split_baseline"]["share_of_fp32_peak"]
    assert r["decode_thread_placement"]["main_thread_ms"] and r["tower_alone"]["share_of_fp32_peak"]
    assert max(e["optimised_tiles_per_s"]) > 0 and e["same_output"]["same_captions"] == e["same_output"]["tiles"] > 0
    assert any(line.startswith("  end to end (") for line in lines)
    assert json.loads(out.read_text())["roofline"] == json.loads(json.dumps(r))  # saved, every figure


def test_the_report_names_the_cpu_and_its_bf16_flags(no_bf16_cpu):
    cpu = cpu_report()
    assert cpu["model"] and set(cpu["flags"]) == set(CPU_FLAGS)
    assert {"avx2", "avx512_bf16", "amx_bf16", "amx_tile", "avx_ne_convert", "avx_vnni"} <= set(CPU_FLAGS)
    assert cpu["bf16"] == {"ok": False, "reason": no_bf16_cpu.reason}
    line = cpu_line(cpu)
    assert line.startswith(f"cpu       {cpu['model']}; flags: ") and no_bf16_cpu.reason in line


def test_make_bench_names_the_cpu_first_and_prints_each_section_as_it_ends(monkeypatch, capsys, tmp_path):
    """bench.main with its long sections stubbed: the CPU line comes first, a section that fails is
    one line and an ``error`` entry, the sections after it still run, and out/bench.json holds all."""
    from rscaption.bench import run as bench, search as bench_search

    def disk_full():
        raise OSError("No space left on device")

    monkeypatch.setattr(bench, "ROOT", tmp_path)
    monkeypatch.setenv("MODEL", "tiny")
    monkeypatch.delenv("RSCAPTION_PRECISION", raising=False)
    monkeypatch.setattr(bench, "bench_tiling_memory", disk_full)
    monkeypatch.setattr(bench, "bench_pipeline", lambda cap: None)
    monkeypatch.setattr(bench_roofline, "bench_local_engine",
                        lambda cap, sections: sections.run("matmul", lambda: {"peak_gflops": 1.0}))
    monkeypatch.setattr(bench_search, "bench_search_scale", lambda cap: disk_full())
    assert bench.main() == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == cpu_line(cpu_report())
    assert lines[1].startswith("model     tiny") and lines[2].startswith("decoding  KV-cache batched vs ClipCap loop")
    assert "tiling_memory: failed: OSError: No space left on device (the figures above are kept; going on)" in lines
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["cpu"]["flags"].keys() == set(CPU_FLAGS) and saved["decoding"]["speedup"] > 0
    assert saved["tiling_memory"] == saved["search"] == {"error": "OSError: No space left on device"}
    assert saved["roofline"] == {"matmul": {"peak_gflops": 1.0}} and saved["pipeline"] is None
    assert "gpu" in saved and lines[-1] == f"written {tmp_path / 'out' / 'bench.json'}"

"""`make bench`: speed and memory figures as ratios measured in one run.

Absolute timings on shared 2-core machines are noise; ratios of two things measured back to back
in the same process are not.  Each figure compares our path with a reference:

- decoding: batched KV-cache greedy decoding vs a ClipCap-style loop that re-runs the whole
  sequence for each new token, one caption at a time (same model, same tokens);
- tiling memory: peak RSS reading every tile of a small vs a 16x larger synthetic raster
  (windowed reads must keep this near 1.0);
- pipeline: end-to-end tiles/s of `caption_raster` on a real raster when one is available;
- change: tiles/s of `rscaption change` on the NAIP 2009/2020 pair, and of its scoring alone.

Prints the CPU (model, the flags that decide bf16, whether bf16 runs) first, then each section's
figures as it ends; writes `out/bench.json` after every section. Sections the CPU cannot run (bf16
where ``device.bf16_support`` says no) are skipped with the reason; one that fails is recorded with
its error and the rest still run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .sections import Sections, cpu_line, cpu_report, json_saver, say

ROOT = Path(__file__).resolve().parents[3]


def _model(name: str | None):
    """The default model (a tiny one where none is installed), in ``RSCAPTION_PRECISION`` unless
    that is a bf16 this CPU cannot run: then fp32, said in one line (the bf16 sections skip)."""
    from ..device import bf16_support, parse_precision
    from ..errors import ModelError
    from ..models.registry import load_model

    precision = parse_precision(None)
    if precision == "bf16" and not bf16_support().ok:
        say(f"model     RSCAPTION_PRECISION=bf16 does not run on this CPU ({bf16_support().reason}): the engine "
            "is measured in fp32")
        precision = "fp32"
    try:
        return load_model(name or "default", device="cpu", precision=precision)
    except ModelError:
        from ..models.tiny import build_tiny_captioner
        return build_tiny_captioner()


def clipcap_reference_greedy(cap, emb, max_new_tokens):
    """The loop from the ClipCap notebook: no cache, the full [prefix, tokens] sequence each step."""
    import torch

    eos = cap.eos_token_id
    with torch.inference_mode():
        seq = cap.prefix(torch.as_tensor(emb[None]))
        out = []
        for step in range(max_new_tokens):
            logits = cap.lm(inputs_embeds=seq, use_cache=False).logits[:, -1].float()
            if step == 0:
                logits[:, eos] = -float("inf")
            tok = int(logits.argmax(-1))
            if tok == eos:
                break
            out.append(tok)
            tok_emb = cap.lm.get_input_embeddings()(torch.tensor([[tok]]))
            seq = torch.cat([seq, tok_emb.to(seq.dtype)], dim=1)
    return out


def bench_decoding(cap, n=16, max_new_tokens=24) -> dict:
    import torch

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n, cap.embed_dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cap.caption(emb[:2], max_new_tokens=max_new_tokens)  # warm-up
    t0 = time.perf_counter()
    ids, _ = cap.greedy_ids(torch.as_tensor(emb), max_new_tokens=max_new_tokens)
    t_cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = [clipcap_reference_greedy(cap, e, max_new_tokens) for e in emb]
    t_ref = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(ids, ref))
    return {"captions": n, "kv_cache_batched_s": round(t_cached, 3), "clipcap_loop_s": round(t_ref, 3),
            "speedup": round(t_ref / t_cached, 2), "identical_token_sequences": f"{same}/{n}"}


_MEM_SCRIPT = r"""
import sys
from rscaption.raster.tiling import RasterTiler, TilingParams
with RasterTiler(sys.argv[1], TilingParams(tile_size=256)) as t:
    n = sum(1 for tile in t.plan() if t.read(tile) is not None)
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would report the parent's peak
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(n, hwm)
"""


def _write_raster(path, size):
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    prof = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", tiled=True,
                blockxsize=256, blockysize=256, compress="deflate", crs="EPSG:32618",
                transform=from_origin(500000, 4000000, 1.0, 1.0))
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **prof) as dst:
        for r in range(0, size, 1024):
            h = min(1024, size - r)
            dst.write(rng.integers(0, 255, (3, h, size), dtype=np.uint8), window=Window(0, r, size, h))


def bench_tiling_memory(small=1024, large=4096) -> dict:
    res = {}
    with tempfile.TemporaryDirectory() as d:
        for name, size in (("small", small), ("large", large)):
            p = os.path.join(d, f"{name}.tif")
            _write_raster(p, size)
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, p], capture_output=True, text=True, check=True)
            tiles, rss_kb = out.stdout.split()
            res[name] = {"pixels": size * size, "tiles": int(tiles), "peak_rss_mb": round(int(rss_kb) / 1024, 1),
                         "seconds": round(time.perf_counter() - t0, 2)}
    res["pixels_ratio"] = round(res["large"]["pixels"] / res["small"]["pixels"], 1)
    res["peak_rss_ratio"] = round(res["large"]["peak_rss_mb"] / res["small"]["peak_rss_mb"], 3)
    return res


def bench_pipeline(cap) -> dict | None:
    from ..engine.pipeline import caption_raster

    raster = os.environ.get("RASTER") or str(ROOT.parent / "shared/data/geotiff/m_4709963_se_14_1_20200831.tif")
    if not os.path.exists(raster):
        return None
    with tempfile.TemporaryDirectory() as d:
        s = caption_raster(raster, os.path.join(d, "b.gpkg"), model=cap, batch_size=8)
    return {"raster": os.path.basename(raster), "tiles": s.written, "seconds": round(s.seconds, 2),
            "tiles_per_s": round(s.written / s.seconds, 2), "model": s.model_id}


def _show_decoding(d: dict) -> None:
    say(f"decoding  KV-cache batched vs ClipCap loop: {d['speedup']}x faster "
        f"({d['kv_cache_batched_s']} s vs {d['clipcap_loop_s']} s for {d['captions']} captions; "
        f"identical tokens {d['identical_token_sequences']})")


def _show_tiling(m: dict) -> None:
    say(f"tiling    peak RSS {m['large']['peak_rss_mb']} MB vs {m['small']['peak_rss_mb']} MB for "
        f"{m['pixels_ratio']}x the pixels: ratio {m['peak_rss_ratio']}")


def _show_pipeline(p: dict) -> None:
    say(f"pipeline  {p['tiles']} tiles of {p['raster']} in {p['seconds']} s: {p['tiles_per_s']} tiles/s")


def _show_gpu(g: dict) -> None:
    say(f"gpu       {g['skipped']}" if "skipped" in g else f"gpu       {g['device']}: see out/bench.json \"gpu\"")


def main() -> int:
    """Every section prints as it ends and ``out/bench.json`` is rewritten after each, so a long
    run shows progress and a section that fails (recorded with its error) loses nothing else."""
    import torch

    from .gpu import run as bench_gpu
    from .roofline import bench_local_engine
    from .search import bench_search_scale, print_search

    torch.manual_seed(0)
    out = ROOT / "out" / "bench.json"
    report: dict = {"cpu": cpu_report()}
    say(cpu_line(report["cpu"]))
    sections = Sections(report, json_saver(out, report))
    cap = _model(os.environ.get("MODEL"))
    report.update(model=cap.model_id, precision=cap.precision, torch_threads=torch.get_num_threads())
    say(f"model     {report['model']}, precision {report['precision']}, {report['torch_threads']} torch threads")
    sections.run("decoding", lambda: bench_decoding(cap), _show_decoding)
    sections.run("tiling_memory", bench_tiling_memory, _show_tiling)
    sections.run("pipeline", lambda: bench_pipeline(cap), _show_pipeline)
    bench_local_engine(cap, sections=sections.child("roofline"))  # docs/performance.md
    sections.run("search", lambda: bench_search_scale(cap), print_search)  # docs/performance.md, "Search at scale"
    from .change import bench_change, show_change

    sections.run("change", lambda: bench_change(cap), show_change)  # docs/change.md: rscaption change
    sections.run("gpu", bench_gpu, _show_gpu)  # docs/performance.md, "GPU": skipped without a CUDA device
    say(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

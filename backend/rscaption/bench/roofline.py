"""`make bench`, one machine: a roofline and the local engine against its earlier sequential loop.

All figures come from one process so that their ratios mean something on a shared machine:

- matmul peak: fp32 and bf16 GEMMs at a few sizes, with torch's threads = usable cores and as
  one single-threaded GEMM per core side by side (how the engine's workers run); the engine
  computes in fp32 by default and in bf16 with ``precision="bf16"`` (``device.compute_dtype``),
  so achieved rates are set against the peak of the dtype they ran in;
- FLOPs per tile of the image encoder, of caption decoding (beam search on the KV cache) and of
  the confidence model's caption-text embedding, counted by torch's FlopCounterMode;
- the time split read / preprocess / encode / decode / confidence / write on a sample of tiles,
  run stage by stage in one thread, for the baseline and the optimised model paths, and from
  it the achieved FLOP rates against the peak;
- end to end: `caption_raster` on a 4096 x 4096 GeoTIFF at 256 px tiles with the default model,
  the baseline (workers=0, plain modules, torch's default threads) and the local engine run back
  to back (twice each, alternating, best of two), the engine also in bf16, plus the same captions
  and embeddings checks (engine vs baseline: folding and the lean decoder only; bf16 engine vs
  baseline: rounding).

Each part prints its figures as it ends (``bench_sections``); on a CPU where bf16 does not run
(``device.bf16_support``: AVX2-only CPUs, for one) the bf16 parts are skipped with that reason.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .sections import Sections, done, no_bf16, say

SHARED_NAIP = Path(__file__).resolve().parents[4] / "shared/data/geotiff/m_4709963_se_14_1_20200831.tif"


# ---------------------------------------------------------------------------------------- raster

def write_test_raster(path: str, size: int = 4096) -> str:
    """A real tiled, deflate-compressed GeoTIFF of ``size`` x ``size`` RGB at 0.3 m: real aerial
    content (a small NAIP scene mirrored out to the size) when the shared data is there, so the
    captions are of realistic length; smooth random fields otherwise.  Returns what was used."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if SHARED_NAIP.exists():
        with rasterio.open(SHARED_NAIP) as src:
            base = src.read([1, 2, 3])
        source = f"{SHARED_NAIP.name} mirrored to {size} px"
    else:
        rng = np.random.default_rng(0)
        small = rng.integers(0, 255, (3, size // 64, size // 64)).astype(np.uint8)
        base = np.repeat(np.repeat(small, 16, axis=1), 16, axis=2)
        source = "smooth random fields"
    prof = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", tiled=True,
                blockxsize=256, blockysize=256, compress="deflate", crs="EPSG:32614",
                transform=from_origin(500000, 5200000, 0.3, 0.3), photometric="RGB")
    with rasterio.open(path, "w", **prof) as dst:
        for r in range(0, size, 1024):
            rows = np.arange(r, min(size, r + 1024))
            block = _mirror(base, rows, np.arange(size))
            dst.write(block, window=Window(0, r, size, len(rows)))
    return source


def _mirror(base: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    h, w = base.shape[1:]
    ri = np.abs((rows + h - 1) % (2 * h - 2) - (h - 1))  # reflect without repeating the edge
    ci = np.abs((cols + w - 1) % (2 * w - 2) - (w - 1))
    return base[:, ri][:, :, ci]


# ---------------------------------------------------------------------------------------- peak

def _best(fn, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _side_by_side(n: int, fn) -> None:
    """``fn`` in ``n`` threads released together; returns when the last is done. (Timing each
    thread's own best run instead let a run that happened while the other core idled count as
    side by side: 539 GFLOP/s "on 2 cores" where one core alone does 195.)"""
    start = threading.Barrier(n)

    def run():
        start.wait()
        fn()

    threads = [threading.Thread(target=run) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def matmul_peak(sizes=(256, 512, 1024, 2048), dtype=None) -> dict:
    """GFLOP/s of GEMM in ``dtype`` (fp32): torch threads = usable cores, and one single-threaded
    GEMM per core at the same time (the engine's workers)."""
    import torch

    from ..engine.local import torch_threads, usable_cores

    dtype = dtype or torch.float32
    cores = usable_cores()
    out = {"cores": cores, "dtype": str(dtype).replace("torch.", ""), "threaded": {}, "per_core_side_by_side": {}}
    with torch.inference_mode():
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            reps = max(1, int(5e8 // (2 * n ** 3)))
            with torch_threads(cores):
                t = _best(lambda: [a @ b for _ in range(reps)])
            out["threaded"][n] = round(2 * n ** 3 * reps / t / 1e9, 1)
            with torch_threads(1):
                wall = _best(lambda: _side_by_side(cores, lambda: [a @ b for _ in range(reps)]))
            out["per_core_side_by_side"][n] = round(cores * 2 * n ** 3 * reps / wall / 1e9, 1)
    out["peak_gflops"] = max(*out["threaded"].values(), *out["per_core_side_by_side"].values())
    out["peak_gflops_per_core"] = round(out["peak_gflops"] / cores, 1)
    return out


# ---------------------------------------------------------------------------------------- flops

def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def tower_alone(cap, batch: int = 8, reps: int = 5, bf16_skip: str | None = None) -> dict | None:
    """The image tower alone on one thread, batch 8, as each engine worker runs it: the trained
    modules, the folded copy, the folded and fused copy (CPU), each in fp32 and bf16 (not with
    ``bf16_skip``, the reason bf16 does not run here; default: ``no_bf16()``); the same random
    pixels, variants alternated twice and the best kept. None for towers that are not CNNs
    (nothing is folded there)."""
    import copy

    import torch

    from ..engine.local import torch_threads
    from ..models.fold import can_fuse, folded_copy

    if getattr(cap.encoder, "kind", None) != "lit":
        return None
    bf16_skip = no_bf16() if bf16_skip is None else bf16_skip
    tower = cap.encoder.image_tower.eval()
    size = int(cap.encoder.preprocess["image_size"])
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=torch.channels_last)
    with torch.inference_mode():
        flops = count_flops(lambda: tower(x)) / batch
        variants = {"plain": (tower, x), "folded": (folded_copy(tower, x[:2], fuse=False)[0], x)}
        if can_fuse(x.device):
            variants["fused"] = (folded_copy(tower, x[:2], fuse=True)[0], x)
        for name in [n for n in variants if n != "plain" and not bf16_skip]:
            variants[f"{name}_bf16"] = (copy.deepcopy(variants[name][0]).to(torch.bfloat16), x.to(torch.bfloat16))
        best = dict.fromkeys(variants, float("inf"))
        with torch_threads(1):
            for _ in range(2):
                for name, (m, inp) in variants.items():
                    best[name] = min(best[name], _best(lambda: m(inp), reps) / batch)
    return {"batch": batch, "image_size": size, "gflop_per_tile": round(flops / 1e9, 4),
            "ms_per_tile": {k: round(1e3 * v, 2) for k, v in best.items()},
            "gflops": {k: round(flops / v / 1e9, 1) for k, v in best.items()},
            **({"bf16_skipped": bf16_skip} if bf16_skip else {})}


@contextlib.contextmanager
def precision_of(cap, precision):
    old = cap.precision
    cap.precision = precision
    try:
        yield cap
    finally:
        cap.precision = old


@contextlib.contextmanager
def plain_modules(cap):
    """The model paths of the earlier code (no folded tower, no caption-text cache)."""
    old = cap.fast_inference
    cap.fast_inference = False
    try:
        yield cap
    finally:
        cap.fast_inference = old


def stage_split(cap, raster: str, tile: int, n_tiles: int, fast: bool, threads: int, beam: int) -> dict:
    """Seconds per stage over ``n_tiles`` tiles spread over the raster, each stage timed on its
    own in one thread (batches of 8, as the pipeline runs them), and FLOPs per tile."""
    import torch

    from ..store.gpkg import TileRecord, TileStore
    from ..engine.local import torch_threads
    from ..models.encoders import images_to_pixels
    from ..models.inference import compute_dtype, encode_images
    from ..raster.tiling import RasterTiler, TilingParams

    t = dict.fromkeys(("read", "preprocess", "encode", "decode", "confidence", "write"), 0.0)
    flops = {"encode": 0, "decode": 0, "confidence": 0}
    cm = contextlib.nullcontext() if fast else plain_modules(cap)
    with tempfile.TemporaryDirectory() as d, cm, torch_threads(threads), torch.inference_mode(), \
            RasterTiler(raster, TilingParams(tile_size=tile)) as tiler:
        plan = tiler.plan()
        pick = plan[:: max(1, len(plan) // n_tiles)][:n_tiles]
        store = TileStore.create(os.path.join(d, "split.gpkg"), tiler.crs_wkt, tiler.epsg, cap.embed_dim)
        dtype = compute_dtype(cap) if fast else cap.dtype
        enc = (lambda px: encode_images(cap.encoder, px, dtype)) if fast else cap.encoder.encode_image
        # one untimed batch first: the folded (and bf16) inference copies are built on first use,
        # a one-off per run that would otherwise land in the first batch's encode and decode times
        px = images_to_pixels([tiler.read(x).array for x in pick[:8]], cap.encoder.preprocess, cap.device, cap.dtype)
        cap.caption(torch.nn.functional.normalize(enc(px).float(), dim=-1).numpy(), beam_size=beam, calibrated=False)
        for i in range(0, len(pick), 8):
            chunk = pick[i:i + 8]
            t0 = time.perf_counter()
            imgs = [tiler.read(x) for x in chunk]
            t1 = time.perf_counter()
            px = images_to_pixels([im.array for im in imgs], cap.encoder.preprocess, cap.device, cap.dtype)
            t2 = time.perf_counter()
            emb = torch.nn.functional.normalize(enc(px).float(), dim=-1).numpy()
            t3 = time.perf_counter()
            raw = cap.caption(emb, beam_size=beam, calibrated=False)
            t4 = time.perf_counter()
            caps = cap.calibrate(emb, raw)
            t5 = time.perf_counter()
            store.add([TileRecord(x.tile_id, x.row, x.col, x.polygon, c, float(p), e, f"k{x.tile_id}", "bench",
                                  "now", x.window, im.valid_fraction)
                       for x, im, e, (c, p) in zip(chunk, imgs, emb, caps)])
            t6 = time.perf_counter()
            for k, a, b in zip(t, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6)):
                t[k] += b - a
            if i == 0:  # FLOPs per tile from the first batch (decoding depends a little on the captions)
                # the model's arithmetic, counted on its plain modules: the counter does not see
                # inside the fused oneDNN convolutions of the fast path, which do the same products
                flops["encode"] = count_flops(lambda: cap.encoder.encode_image(px)) // len(chunk)
                flops["decode"] = count_flops(lambda: cap.caption(emb, beam_size=beam, calibrated=False)) // len(chunk)
                with plain_modules(cap):  # the cache would hide the text tower from the counter
                    flops["confidence"] = count_flops(lambda: cap.calibrate(emb, raw)) // len(chunk)
        store.close()
    total = sum(t.values())
    return {"tiles": len(pick), "threads": threads, "compute_dtype": str(dtype).replace("torch.", ""), "seconds": {k: round(v, 3) for k, v in t.items()},
            "share": {k: round(v / total, 3) for k, v in t.items()},
            "ms_per_tile": round(1e3 * total / len(pick), 1), "gflop_per_tile": {k: round(v / 1e9, 4) for k, v in flops.items()},
            # with the caption-text cache most captions are not embedded again: no FLOP rate to claim
            "gflops_achieved": {k: round(flops[k] * len(pick) / t[k] / 1e9, 1) for k in flops
                                if t[k] > 0 and (k != "confidence" or not fast)}}


def thread_placement(cap, threads: int, beam: int, reps: int = 2) -> dict:
    """ms per tile to decode a batch of 8 with ``threads`` intra-op threads, called from the
    process's main thread (what the earlier CLI did) and from a fresh thread (the engine's
    workers), alternating.  On the shared test machine the main thread's OpenMP team was the one
    that collapsed under load."""
    from ..engine.local import torch_threads

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((8, cap.embed_dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)

    def decode_ms():
        t0 = time.perf_counter()
        cap.caption(emb, beam_size=beam, calibrated=False)
        return 1e3 * (time.perf_counter() - t0) / len(emb)

    out = {"threads": threads, "main_thread_ms": [], "fresh_thread_ms": []}
    box = {}
    with torch_threads(threads):
        decode_ms()
        for _ in range(reps):
            out["main_thread_ms"].append(round(decode_ms(), 1))
            th = threading.Thread(target=lambda: box.update(v=decode_ms()))
            th.start()
            th.join()
            out["fresh_thread_ms"].append(round(box["v"], 1))
    return out


# ---------------------------------------------------------------------------------------- end to end

def _run(cap, raster, out, tile, baseline: bool, workers=None, limit_s: float = 40.0,
         plain: bool | None = None) -> tuple[float, object]:
    """Tiles/s of one run, cancelled after ``limit_s`` so a slow baseline on a busy machine cannot
    blow the benchmark's time (the rate of a cancelled run counts its written tiles)."""
    from ..engine.pipeline import caption_raster
    from ..raster.tiling import TilingParams

    if os.path.exists(out):
        os.remove(out)
    cm = plain_modules(cap) if (baseline if plain is None else plain) else contextlib.nullcontext()
    t0 = time.perf_counter()
    with cm:
        s = caption_raster(raster, out, model=cap, tiling=TilingParams(tile_size=tile), batch_size=8,
                           workers=0 if baseline else workers,
                           should_cancel=lambda: time.perf_counter() - t0 > limit_s)
    return s.written / s.seconds, s


def compare_outputs(a: str, b: str) -> dict:
    from ..store.gpkg import TileStore

    with TileStore.open(a) as sa, TileStore.open(b) as sb:
        ta = {t["tile_id"]: t for t in sa.tiles()}
        tb = {t["tile_id"]: t for t in sb.tiles()}
        ia, ea = sa.embeddings()
        ib, eb = sb.embeddings()
    both = sorted(set(ta) & set(tb))  # time-boxed runs may stop at different tiles
    same = sum(ta[k]["caption"] == tb[k]["caption"] for k in both)
    ra = {int(i): e for i, e in zip(ia, ea)}
    rb = {int(i): e for i, e in zip(ib, eb)}
    emb = max((float(np.abs(ra[k] - rb[k]).max()) for k in both), default=0.0)
    conf = max((abs(ta[k]["confidence"] - tb[k]["confidence"]) for k in both), default=0.0)
    return {"tiles": len(both), "same_captions": same, "max_embedding_diff": emb,
            "max_confidence_diff": round(float(conf), 6)}


def _peaks_per_core(report: dict) -> dict:
    """One core's matmul peak per dtype, for the dtypes whose peak section ran."""
    return {m["dtype"]: m["peak_gflops_per_core"] for m in (report.get("matmul"), report.get("matmul_bf16"))
            if done(m)}


def _shares(rates: dict, peak: float | None) -> dict | None:
    return None if not peak else {k: round(v / peak, 3) for k, v in rates.items()}


def _split_against_peaks(report: dict, split: dict) -> dict:
    """The stages' achieved rates against the peak of the dtype they computed in, and fp32's."""
    from ..engine.local import usable_cores

    peaks, cores = _peaks_per_core(report), min(split["threads"], usable_cores())
    per = {k: v * cores for k, v in peaks.items()}
    split["share_of_peak"] = _shares(split["gflops_achieved"], per.get(split["compute_dtype"]))
    split["share_of_fp32_peak"] = _shares(split["gflops_achieved"], per.get("float32"))
    return split


def _tower_against_peaks(report: dict, alone: dict | None) -> dict | None:
    """One thread: against one core's peak of each variant's dtype, and of fp32."""
    if alone:
        peaks = _peaks_per_core(report)
        dtype_of = {k: "bfloat16" if k.endswith("bf16") else "float32" for k in alone["gflops"]}
        alone["share_of_peak"] = {k: round(v / peaks[dtype_of[k]], 3) for k, v in alone["gflops"].items()
                                  if dtype_of[k] in peaks}
        alone["share_of_fp32_peak"] = _shares(alone["gflops"], peaks.get("float32"))
    return alone


def end_to_end(cap, raster: str, d: str, tile: int, limit_s: float, bf16_skip: str = "") -> dict:
    """The baseline and the engine back to back, alternating so drift in the machine's load hits
    both; the engine also in bf16 unless ``bf16_skip`` says why it cannot run here."""
    import torch

    from ..engine.local import plan_workers

    names = ("baseline", "optimised", "optimised_bf16", "one_worker_all_threads", "plain_modules_in_engine",
             "optimised", "optimised_bf16", "baseline")
    order = [n for n in names if not (bf16_skip and n == "optimised_bf16")]
    runs, summaries = {n: [] for n in order}, {}
    cores = plan_workers(torch.device("cpu"))[0]
    for name in order:
        extra = name in ("one_worker_all_threads", "plain_modules_in_engine")
        with precision_of(cap, "bf16" if name == "optimised_bf16" else cap.precision):
            rate, s = _run(cap, raster, os.path.join(d, f"{name}.gpkg"), tile, name == "baseline",
                           workers=1 if name == "one_worker_all_threads" else None,
                           limit_s=limit_s / 2 if extra else limit_s,
                           plain=name in ("baseline", "plain_modules_in_engine"))
        runs[name].append(round(rate, 2))
        summaries[name] = s
    e = {"tiles": max(s.total for s in summaries.values()), "time_box_s": limit_s,
         "tiles_done": {k: s.written for k, s in summaries.items()},
         "baseline_tiles_per_s": runs["baseline"], "optimised_tiles_per_s": runs["optimised"],
         f"one_worker_{cores}_threads_tiles_per_s": runs["one_worker_all_threads"],
         "plain_modules_in_engine_tiles_per_s": runs["plain_modules_in_engine"],
         "speedup": round(max(runs["optimised"]) / max(runs["baseline"]), 2),
         "optimised_stages": summaries["optimised"].stages,
         "same_output": compare_outputs(os.path.join(d, "baseline.gpkg"), os.path.join(d, "optimised.gpkg"))}
    if bf16_skip:
        e["bf16_skipped"] = bf16_skip
    else:
        e.update(optimised_bf16_tiles_per_s=runs["optimised_bf16"],
                 speedup_bf16=round(max(runs["optimised_bf16"]) / max(runs["baseline"]), 2),
                 same_output_bf16=compare_outputs(os.path.join(d, "baseline.gpkg"),
                                                  os.path.join(d, "optimised_bf16.gpkg")))
    st, wall = e["optimised_stages"] or {}, summaries["optimised"].seconds
    e["overlap"] = {
        "read_s": st.get("read_s"), "write_s": st.get("write_s"),
        "workers_waiting_for_tiles_s": st.get("worker_wait_s"),
        "waiting_share_of_worker_time": round(st.get("worker_wait_s", 0.0) / max(1e-9, wall * st.get("workers", 1)), 3)}
    return e


def bench_local_engine(cap, size: int = 4096, tile: int = 256, split_tiles: int = 24, limit_s: float = 30.0,
                       matmul_sizes=(256, 512, 1024, 2048), sections: Sections | None = None) -> dict:
    """The roofline report, one section (``bench_sections``) per part: each printed as it ends, the
    bf16 parts skipped with the CPU's reason where bf16 does not run (``device.bf16_support``), a
    part that fails recorded with its error while the others are still measured."""
    import torch

    from ..engine.local import plan_workers
    from ..models.inference import compute_dtype

    sec = sections or Sections()
    r = sec.report
    skip_bf16 = no_bf16()
    beam = int((cap.card or {}).get("beam_size") or 1)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as d:
        raster = os.path.join(d, "raster.tif")
        source = write_test_raster(raster, size)
        r.update({"raster": f"{size} x {size} px, {tile} px tiles ({source})", "model": cap.model_id,
                  "torch_default_threads": threads, "beam_size": beam,
                  "engine_plan": dict(zip(("workers", "threads_per_worker"), plan_workers(cap.device))),
                  "engine_compute_dtype": str(compute_dtype(cap)).replace("torch.", ""),
                  "load_average_before": [round(x, 2) for x in os.getloadavg()]})
        say(f"roofline  {r['raster']}, {r['model']}, beam {beam}; the engine computes in {r['engine_compute_dtype']} "
            f"(bf16 with --precision bf16)")
        sec.run("matmul", lambda: matmul_peak(matmul_sizes), _show_matmul, label="  matmul")
        sec.run("matmul_bf16", lambda: matmul_peak(matmul_sizes, torch.bfloat16), _show_matmul, skip=skip_bf16,
                label="  bf16 matmul")
        for key, label, fast, n, precision, skip in (
                ("split_baseline", "baseline", False, threads, cap.precision, ""),
                ("split_optimised", "optimised", True, 1, cap.precision, ""),
                ("split_optimised_bf16", "bf16", True, 1, "bf16", skip_bf16)):
            def split(fast=fast, n=n, precision=precision):
                with precision_of(cap, precision):
                    return _split_against_peaks(r, stage_split(cap, raster, tile, split_tiles, fast, n, beam))
            sec.run(key, split, lambda s, label=label: _show_split(label, s), skip=skip, label=f"  {label} split")
        sec.run("decode_thread_placement", lambda: thread_placement(cap, threads, beam), _show_placement,
                label="  decode_thread_placement")
        sec.run("tower_alone", lambda: _tower_against_peaks(r, tower_alone(cap, bf16_skip=skip_bf16)), _show_tower,
                label="  tower_alone")
        sec.run("end_to_end", lambda: end_to_end(cap, raster, d, tile, limit_s, skip_bf16),
                lambda e: _show_end_to_end(r, e), label="  end_to_end")
        r["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        sec.save()
    return r


# ---------------------------------------------------------------------------------------- printing

def _pct(share: dict | None, k: str, what: str) -> str:
    return f"{100 * share[k]:.0f}% of {what}" if share and k in share else f"no {what} measured"


def _show_matmul(m: dict) -> None:
    say(f"  {m['dtype']} matmul peak {m['peak_gflops']} GFLOP/s on {m['cores']} cores (threaded {m['threaded']}, "
        f"one per core side by side {m['per_core_side_by_side']})")


def _show_split(label: str, s: dict) -> None:
    shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in s["share"].items())
    rates = ", ".join(f"{k} {v} GFLOP/s ({_pct(s['share_of_peak'], k, 'the ' + s['compute_dtype'] + ' peak')}, "
                      f"{_pct(s['share_of_fp32_peak'], k, 'the fp32 peak')})"
                      for k, v in s["gflops_achieved"].items())
    say(f"  {label:9s} {s['ms_per_tile']} ms/tile in one stage-by-stage pass ({s['threads']} threads, "
        f"{s['compute_dtype']}): {shares}")
    say(f"            {rates}; GFLOP/tile {s['gflop_per_tile']}")


def _show_placement(tp: dict) -> None:
    say(f"  decoding with {tp['threads']} threads: {tp['main_thread_ms']} ms/tile from the main thread, "
        f"{tp['fresh_thread_ms']} ms/tile from a fresh thread")


def _show_tower(alone: dict) -> None:
    say(f"  image tower alone (1 thread, batch {alone['batch']}, {alone['gflop_per_tile']} GFLOP/tile): " + ", ".join(
        f"{k} {alone['ms_per_tile'][k]} ms/tile = {v} GFLOP/s "
        f"({_pct(alone['share_of_peak'], k, 'its dtype peak per core')}, "
        f"{_pct(alone['share_of_fp32_peak'], k, 'the fp32 one')})" for k, v in alone["gflops"].items()))
    if alone.get("bf16_skipped"):
        say(f"  image tower alone in bf16: skipped: {alone['bf16_skipped']}")


def _show_end_to_end(r: dict, e: dict) -> None:
    o = e["overlap"]
    one = next(v for k, v in e.items() if k.startswith("one_worker_"))
    bf16 = (f"the engine in bf16 {e['optimised_bf16_tiles_per_s']} tiles/s: {e['speedup_bf16']}x"
            if "speedup_bf16" in e else f"the engine in bf16: skipped: {e['bf16_skipped']}")
    say(f"  end to end ({e['tiles']} tiles planned, runs time-boxed at {e['time_box_s']:.0f} s): baseline "
        f"{e['baseline_tiles_per_s']} tiles/s, local engine {e['optimised_tiles_per_s']} tiles/s "
        f"({r['engine_plan']['workers']} workers x 1 thread, {r['engine_compute_dtype']}): {e['speedup']}x; {bf16}")
    say(f"  variants: one worker with all threads {one} tiles/s; the engine's threads with the plain "
        f"modules (no folding, no caption cache) {e['plain_modules_in_engine_tiles_per_s']} tiles/s")
    say(f"  overlap: read {o['read_s']} s and write {o['write_s']} s beside the workers; workers waited "
        f"{o['workers_waiting_for_tiles_s']} s for tiles "
        f"({100 * o['waiting_share_of_worker_time']:.1f}% of their time)")
    for key, label in (("same_output", f"{r['engine_compute_dtype']} engine vs baseline"),
                       ("same_output_bf16", "bf16 engine vs baseline")):
        if key in e:
            same = e[key]
            say(f"  same output ({label}): {same['same_captions']}/{same['tiles']} captions identical, embeddings "
                f"within {same['max_embedding_diff']:.1e}, confidences within {same['max_confidence_diff']:.1e}")

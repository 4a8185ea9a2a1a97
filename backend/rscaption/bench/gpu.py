"""GPU figures for docs/performance.md: what `make bench` adds when torch sees a CUDA device.

- The default model with fp32, fp16 and bf16 weights, model only (tiles already read: preprocessing
  on the device, image tower, beam-3 captions, confidence) at batch 8 to 256, then end to end
  (`caption_raster` on the benchmark's 4096 x 4096 GeoTIFF) at the best batch, with the GPU's
  utilisation sampled by ``nvidia-smi`` while it runs. Tiles cross the bus as uint8 (0.2 MB a
  256 px tile) and are resized there, so the transfer is a small share; the figures say how small.
- The reference ClipCap-style architecture (open_clip ViT-B/32 + GPT-2 small, random weights, an
  MLP to a 10-token prefix), 20 greedy tokens per image, with a key/value cache and as ClipCap's
  own loop (the whole sequence again for every token), per image at batch 1 and 64: comparable
  with published per-image timings.

Without a CUDA device the section says so and returns; a dtype the device cannot run (bf16 before
compute capability 8.0) is skipped with the reason. ``--device cpu --quick`` runs the same code
at toy sizes (the test does), so the script is known to work before a GPU is lent for it:
``.venv/bin/python -m rscaption.bench.gpu --json out/bench_gpu.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

DTYPES = ("float32", "float16", "bfloat16")


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def gpu_utilisation(device, period_s: float = 0.2):
    """Samples of (utilisation %, memory MB) from nvidia-smi while the block runs; stays empty where
    there is no nvidia-smi (CPU runs, other vendors)."""
    import torch

    samples: list[tuple[float, float]] = []
    dev = torch.device(device)
    if dev.type != "cuda" or shutil.which("nvidia-smi") is None:
        yield samples
        return
    stop = threading.Event()
    query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
             "-i", str(dev.index or 0)]

    def poll():
        while not stop.wait(period_s):
            try:
                util, mem = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.split(",")
                samples.append((float(util), float(mem)))
            except (OSError, ValueError, subprocess.SubprocessError):
                return

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        yield samples
    finally:
        stop.set()
        th.join()


def _summary(samples) -> dict | None:
    if not samples:
        return None
    util = np.array([s[0] for s in samples])
    return {"samples": len(samples), "mean_util_%": round(float(util.mean()), 1),
            "median_util_%": round(float(np.median(util)), 1), "max_memory_mb": max(s[1] for s in samples)}


def unsupported(device, dtype_name: str) -> str:
    """Why ``dtype_name`` cannot run on ``device`` ("" when it can): bf16 needs a GPU with bf16
    (compute capability 8.0+, else torch emulates or refuses it), and on a CPU oneDNN's bf16
    kernels (``device.bf16_support``)."""
    import torch

    if dtype_name != "bfloat16":
        return ""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "" if torch.cuda.is_bf16_supported(including_emulation=False) else "this GPU has no bf16 arithmetic"
    if dev.type == "cpu":
        from .sections import no_bf16

        return no_bf16()
    return ""


def model_only(cap, tiles: np.ndarray, batch: int, beam: int) -> dict:
    """Tiles/s of the model on uint8 tiles already in memory: what a reader that keeps up would give."""
    t_embed = t_caption = 0.0
    n = len(tiles)
    for i in range(0, n, batch):
        t0 = time.perf_counter()
        emb = cap.embed_images(tiles[i:i + batch], batch_size=batch)
        _sync(cap.device)
        t1 = time.perf_counter()
        cap.caption(emb, beam_size=beam, batch_size=batch)
        _sync(cap.device)
        t_embed, t_caption = t_embed + t1 - t0, t_caption + time.perf_counter() - t1
    total = t_embed + t_caption
    return {"batch": batch, "tiles": n, "tiles_per_s": round(n / total, 1),
            "share": {"image_tower": round(t_embed / total, 3), "captions": round(t_caption / total, 3)}}


def default_model_section(device, raster: str | None, dtypes=DTYPES, batches=(8, 64, 256), n_tiles: int = 512,
                          tile: int = 256, model: str = "default") -> dict:
    import torch

    from ..models.registry import load_model

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(n_tiles, tile, tile, 3), dtype=np.uint8)
    out: dict = {"model": model, "tile": tile, "by_dtype": {}}
    for name in dtypes:
        skip = unsupported(device, name)
        if skip:
            out["by_dtype"][name] = {"skipped": skip}
            continue
        cap = load_model(model, device=device, dtype=getattr(torch, name))
        beam = int(cap.card.get("beam_size", 3))
        model_only(cap, tiles[:batches[0]], batches[0], beam)  # warm-up: kernels, the tower copy
        runs = []
        for b in batches:
            with gpu_utilisation(device) as samples:
                r = model_only(cap, tiles, b, beam)
            runs.append({**r, "gpu": _summary(samples)})
        best = max(runs, key=lambda r: r["tiles_per_s"])
        entry = {"model_only": runs}
        if raster:
            entry["end_to_end"] = end_to_end(cap, raster, tile, best["batch"], device)
        out["by_dtype"][name] = entry
        del cap
    return out


def end_to_end(cap, raster: str, tile: int, batch: int, device) -> dict:
    from ..engine.pipeline import caption_raster
    from ..raster.tiling import TilingParams

    with tempfile.TemporaryDirectory() as d, gpu_utilisation(device) as samples:
        s = caption_raster(raster, f"{d}/gpu.gpkg", model=cap, tiling=TilingParams(tile_size=tile),
                           batch_size=batch)
    return {"batch": batch, "tiles": s.written, "seconds": round(s.seconds, 2),
            "tiles_per_s": round(s.written / s.seconds, 1), "gpu": _summary(samples)}


def reference_clipcap(device, dtype_name: str = "float16", quick: bool = False):
    """(image encoder, mapping, GPT-2) of ClipCap's architecture with random weights."""
    import open_clip
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ..models.mapping import build_mapping

    cfg = open_clip.get_model_config("ViT-B-32")  # shipped with open_clip: no download
    if quick:  # toy sizes, same code
        cfg = {**cfg, "embed_dim": 64, "vision_cfg": {**cfg["vision_cfg"], "layers": 2, "width": 64, "head_width": 32},
               "text_cfg": {**cfg["text_cfg"], "layers": 1, "width": 64, "heads": 2}}
        lm_cfg = GPT2Config(vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=2)
    else:
        lm_cfg = GPT2Config()  # GPT-2 small: 12 layers, 768 wide, 50,257 tokens
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    clip = open_clip.CLIP(**cfg).visual.to(device, dtype).eval()
    lm = GPT2LMHeadModel(lm_cfg).to(device, dtype).eval()
    mapping = build_mapping({"kind": "mlp", "embed_dim": clip.output_dim, "lm_hidden": lm_cfg.n_embd,
                             "prefix_length": 10}).to(device, dtype).eval()
    return clip, mapping, lm


def reference_timing(device, batch: int, tokens: int = 20, dtype_name: str = "float16", quick: bool = False,
                     reps: int = 3) -> dict:
    """Per-image ms of the reference: image tower, then ``tokens`` greedy tokens with a key/value
    cache and with ClipCap's loop (the whole prefix + sequence again for every token)."""
    import torch

    clip, mapping, lm = reference_clipcap(device, dtype_name, quick)
    dtype = getattr(torch, dtype_name)
    px = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    wte = lm.get_input_embeddings()

    def encode():
        return mapping(clip(px))

    def cached(prefix):
        out = lm(inputs_embeds=prefix, use_cache=True)
        for _ in range(tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = lm(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)

    def clipcap_loop(prefix):
        seq = prefix
        for _ in range(tokens):
            nxt = lm(inputs_embeds=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, wte(nxt)], dim=1)

    def best(fn):
        fn()
        _sync(device)
        t = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            t = min(t, time.perf_counter() - t0)
        return 1e3 * t / batch

    with torch.inference_mode():
        prefix = encode()
        return {"batch": batch, "dtype": dtype_name, "tokens": tokens,
                "params_m": {"image": round(sum(p.numel() for p in clip.parameters()) / 1e6, 1),
                             "lm": round(sum(p.numel() for p in lm.parameters()) / 1e6, 1)},
                "ms_per_image": {"image_tower": round(best(encode), 3), "kv_cache": round(best(lambda: cached(prefix)), 3),
                                 "clipcap_loop": round(best(lambda: clipcap_loop(prefix)), 3)}}


def run(device: str | None = None, quick: bool = False, raster: str | None = None) -> dict:
    import torch

    if device is None:
        if not torch.cuda.is_available():
            return {"skipped": "no CUDA device: GPU figures need a GPU machine"}
        device = "cuda"
    dev = torch.device(device)
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev), "quick": quick}
    if quick:
        report["default_model"] = default_model_section(device, raster, dtypes=("float32",), batches=(4, 8),
                                                        n_tiles=8, tile=64)
        report["reference_clipcap"] = [reference_timing(device, 2, tokens=3, dtype_name="float32", quick=True,
                                                        reps=1)]
        return report
    if raster is None:
        from .roofline import write_test_raster

        raster = write_test_raster(tempfile.mkdtemp(prefix="rscaption-gpu-") + "/bench.tif")
    report["default_model"] = default_model_section(device, raster)
    report["reference_clipcap"] = [reference_timing(device, b, dtype_name=d) if not unsupported(device, d) else
                                   {"batch": b, "dtype": d, "skipped": unsupported(device, d)}
                                   for d in ("float16", "bfloat16") for b in (1, 64)]
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="default: cuda when torch sees one, else skip")
    ap.add_argument("--quick", action="store_true", help="toy sizes: checks the code, not the machine")
    ap.add_argument("--raster", default=None, help="GeoTIFF for the end-to-end runs (default: the benchmark's "
                    "4096 x 4096 one; none with --quick)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    report = run(args.device, args.quick, args.raster)
    text = json.dumps(report, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

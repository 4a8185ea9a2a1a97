"""The local engine (reader thread, model workers, one writer) and the model's inference fast paths:
same output as the earlier sequential loop with the plain modules, errors and cancel without hangs
or lost work.  Real rasters, real GeoPackages, a tiny real EfficientNet-Lite captioner."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from rscaption.errors import RasterError
from rscaption.store.gpkg import TileStore
from rscaption.engine.local import MAX_WORKERS, plan_workers, run_batches
from rscaption.models.inference import embed_texts_cached
from rscaption.models.tiny import build_tiny_captioner
from rscaption.engine.pipeline import caption_raster
from rscaption.raster.tiling import TilingParams


def _engine_threads():
    return [t for t in threading.enumerate() if t.name.startswith("rscaption-")]


@pytest.fixture(scope="module")
def lit_cap():
    """Tiny lit captioner with non-trivial batch-norm statistics, so folding them is tested."""
    cap = build_tiny_captioner("lit")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in cap.encoder.image_tower.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    cap.precision = "fp32"  # these tests compare folding with the plain modules, digit for digit
    return cap.eval()


@pytest.fixture
def raster(tmp_path):
    """512 x 384 px RGB with structure (gradients + blocks), tiled and deflate-compressed."""
    path = tmp_path / "r.tif"
    y, x = np.mgrid[0:384, 0:512]
    data = np.stack([(x * 0.5) % 256, (y * 0.7) % 256, ((x // 32 + y // 32) % 2) * 200 + 20]).astype(np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=512, height=384, count=3, dtype="uint8", tiled=True,
                       blockxsize=128, blockysize=128, compress="deflate", crs="EPSG:32618",
                       transform=from_origin(500000, 4000000, 1.0, 1.0)) as dst:
        dst.write(data)
    return str(path)


def _read(out):
    with TileStore.open(str(out)) as s:
        tiles = {t["tile_id"]: t for t in s.tiles()}
        ids, emb = s.embeddings()
    return tiles, dict(zip((int(i) for i in ids), emb))


def test_engine_gives_the_captions_and_embeddings_of_the_baseline(tmp_path, raster, lit_cap):
    params = TilingParams(tile_size=96)
    lit_cap.fast_inference = False
    try:
        base = caption_raster(raster, str(tmp_path / "base.gpkg"), model=lit_cap, tiling=params, batch_size=3,
                              workers=0)
    finally:
        lit_cap.fast_inference = True
    fast = caption_raster(raster, str(tmp_path / "fast.gpkg"), model=lit_cap, tiling=params, batch_size=3,
                          workers=2)
    assert fast.written == base.written == fast.total > 6 and fast.stages["workers"] == 2
    assert base.stages is None
    tb, eb = _read(tmp_path / "base.gpkg")
    tf, ef = _read(tmp_path / "fast.gpkg")
    assert sorted(tb) == sorted(tf)
    assert [tb[k]["caption"] for k in sorted(tb)] == [tf[k]["caption"] for k in sorted(tf)]
    for k in tb:
        np.testing.assert_allclose(ef[k], eb[k], atol=1e-4)
        assert abs(tf[k]["confidence"] - tb[k]["confidence"]) < 1e-4
    assert not _engine_threads()


def test_folded_tower_follows_weight_changes(lit_cap):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (80, 80, 3), dtype=np.uint8) for _ in range(3)]
    cap = build_tiny_captioner("lit", seed=3)
    cap.precision = "fp32"
    fast = cap.embed_images(imgs)
    cap.fast_inference = False
    plain = cap.embed_images(imgs)
    np.testing.assert_allclose(fast, plain, atol=1e-5)
    with torch.no_grad():  # an in-place update (what an optimiser step does) must not serve stale copies
        bn = next(m for m in cap.encoder.image_tower.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_mean.add_(0.5)
    plain2 = cap.embed_images(imgs)
    cap.fast_inference = True
    fast2 = cap.embed_images(imgs)
    assert np.abs(plain2 - plain).max() > 1e-4
    np.testing.assert_allclose(fast2, plain2, atol=1e-5)


def test_caption_text_cache_matches_and_follows_weight_changes():
    cap = build_tiny_captioner("lit", seed=4)
    texts = ["a river with a bridge.", "many buildings.", "a river with a bridge.", "a desert."]
    np.testing.assert_allclose(embed_texts_cached(cap, texts), cap.embed_texts(texts), atol=1e-5)
    np.testing.assert_allclose(embed_texts_cached(cap, texts[:2]), cap.embed_texts(texts[:2]), atol=1e-5)
    with torch.no_grad():
        cap.encoder.text_proj.weight.mul_(-1.0)
    np.testing.assert_allclose(embed_texts_cached(cap, texts), cap.embed_texts(texts), atol=1e-5)


def test_worker_plan_uses_the_cores_this_process_may_run_on():
    import os

    cores = len(os.sched_getaffinity(0))
    n = min(cores, MAX_WORKERS)
    assert plan_workers(torch.device("cpu")) == (n, cores // n)
    assert plan_workers(torch.device("cpu"), 1) == (1, cores)
    assert plan_workers("cuda:0")[0] == 1


def _corrupt_last_block_row(path):
    with rasterio.open(path) as src:
        offs = [int(src.get_tag_item(f"BLOCK_OFFSET_{c}_2", "TIFF", bidx=b)) for b in (1, 2, 3) for c in range(4)]
    with open(path, "r+b") as f:
        for off in offs:
            f.seek(off)
            f.write(b"\xff" * 64)


def test_a_read_error_stops_the_run_and_keeps_the_finished_batches(tmp_path, raster, lit_cap):
    _corrupt_last_block_row(raster)  # tiles of the third 128-px row cannot be decoded
    out = tmp_path / "o.gpkg"
    params = TilingParams(tile_size=128)
    t0 = time.perf_counter()
    with pytest.raises(RasterError, match="cannot read tile"):
        caption_raster(raster, str(out), model=lit_cap, tiling=params, batch_size=2, workers=2)
    assert time.perf_counter() - t0 < 60 and not _engine_threads()
    tiles, emb = _read(out)
    assert set(tiles) == set(range(8))  # every batch read before the bad row is captioned and kept
    assert all(tiles[k]["caption"].strip() for k in tiles) and set(emb) == set(tiles)


def _records(batch):
    return [f"r{x}" for x in batch]


def test_step_error_is_raised_after_writing_the_batches_that_finished():
    written, finished = [], []

    def step(batch):
        if batch[0] == 6:
            raise ValueError("model failed on batch 3")
        time.sleep(0.05)
        finished.append(batch[0])
        return _records(batch)

    with pytest.raises(ValueError, match="batch 3"):
        run_batches(lambda t: t, list(range(20)), 2, step, lambda recs, skipped: written.append(recs[0]),
                    workers=2)
    assert sorted(int(r[1:]) for r in written) == sorted(finished) and {0, 2, 4} <= set(finished)
    assert not _engine_threads()


def test_cancel_writes_every_finished_batch_and_stops_without_hanging():
    written, finished, skipped_total = [], [], []

    def read(t):
        return None if t % 5 == 4 else t  # every fifth tile is nodata

    def step(batch):
        time.sleep(0.2)
        finished.append(tuple(batch))
        return _records(batch)

    def write(recs, skipped):
        written.append(tuple(int(r[1:]) for r in recs))
        skipped_total.append(skipped)

    t0 = time.perf_counter()
    cancelled = run_batches(read, list(range(200)), 4, step, write, should_cancel=lambda: len(written) >= 2,
                            workers=2)
    assert cancelled and time.perf_counter() - t0 < 10
    assert sorted(written) == sorted(finished) and 2 <= len(written) < 50
    assert written == sorted(written)  # plan order
    assert skipped_total == [sum(t % 5 == 4 for t in range(4 * i, 4 * i + 4)) for i in range(len(written))]
    assert not _engine_threads()

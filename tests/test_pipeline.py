"""The tile pipeline and the CLI end to end: real rasters, a tiny real model, real GeoPackages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rscaption.store.gpkg import TileStore
from rscaption.engine.pipeline import caption_raster
from rscaption.search.query import search_store
from rscaption.raster.tiling import RasterTiler, TilingParams

GEOTIFF = Path(__file__).resolve().parents[2] / "shared" / "data" / "geotiff"
RSCAPTION = [sys.executable, "-m", "rscaption.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def geotiff(name: str) -> str:
    path = GEOTIFF / name
    if not path.exists():
        pytest.skip(f"shared test data not found: {path}")
    return str(path)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from rscaption.models.registry import load_model

    return load_model(tiny_model_dir, device="cpu")


def expected_kept(raster, params):
    with RasterTiler(raster, params) as t:
        return sum(1 for tile in t.plan() if t.read(tile) is not None), len(t.plan())


def test_caption_writes_every_kept_tile_with_captions_and_embeddings(tmp_path, tiny_model):
    raster = geotiff("RGB.byte.tif")
    params = TilingParams(tile_size=128)
    kept, planned = expected_kept(raster, params)
    out = tmp_path / "out.gpkg"
    seen = []
    s = caption_raster(raster, str(out), model=tiny_model, tiling=params, batch_size=4,
                       on_progress=lambda d, t, r: seen.append((d, t, len(r))))
    assert (s.total, s.written, s.resumed, s.cancelled) == (planned, kept, 0, False)
    assert s.skipped_nodata == planned - kept > 0  # RGB.byte.tif has nodata corners
    assert seen[-1][0] == planned and all(t == planned for _, t, _ in seen)
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    with TileStore.open(str(out)) as store:
        tiles = store.tiles()
        ids, emb = store.embeddings()
        meta = store.metadata()
    assert len(tiles) == kept and all(t["caption"].strip() for t in tiles)
    assert all(0.0 < t["confidence"] <= 1.0 for t in tiles)
    assert emb.shape == (kept, tiny_model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert meta["model"]["hash"] == tiny_model.model_hash
    assert meta["source_raster"]["size"] == os.path.getsize(raster)
    assert meta["tiling_params"]["tile_size"] == 128
    assert meta["software"]["name"] == "rscaption"


def test_stored_embeddings_match_a_fresh_embedding_of_the_tile(tmp_path, tiny_model):
    raster = geotiff("RGB.byte.tif")
    params = TilingParams(tile_size=256)
    out = tmp_path / "o.gpkg"
    caption_raster(raster, str(out), model=tiny_model, tiling=params, batch_size=3)
    with TileStore.open(str(out)) as store:
        ids, emb = store.embeddings()
    with RasterTiler(raster, params) as t:
        tile = next(x for x in t.plan() if x.tile_id == int(ids[0]))
        fresh = tiny_model.embed_images([t.read(tile).array])[0]
    np.testing.assert_allclose(emb[0], fresh, atol=1e-4)


def test_cancel_keeps_finished_batches_and_resume_completes(tmp_path, tiny_model):
    raster = geotiff("RGB.byte.tif")
    params = TilingParams(tile_size=128)
    kept, planned = expected_kept(raster, params)
    out = str(tmp_path / "r.gpkg")
    calls = {"n": 0}

    def cancel_after_two_batches():
        calls["n"] += 1
        return calls["n"] > 2

    first = caption_raster(raster, out, model=tiny_model, tiling=params, batch_size=4,
                           should_cancel=cancel_after_two_batches)
    assert first.cancelled and 0 < first.written < kept
    with TileStore.open(out) as store:
        assert store.count() == first.written
    second = caption_raster(raster, out, model=tiny_model, tiling=params, batch_size=4)
    assert not second.cancelled
    assert first.written + second.written == kept
    with TileStore.open(out) as store:
        tiles = store.tiles()
    assert len({t["tile_id"] for t in tiles}) == len(tiles) == kept


def test_resume_refuses_a_different_tiling_or_model(tmp_path, tiny_model):
    from rscaption.errors import StoreError
    from rscaption.models.tiny import build_tiny_captioner

    raster = geotiff("RGB.byte.tif")
    out = str(tmp_path / "m.gpkg")
    caption_raster(raster, out, model=tiny_model, tiling=TilingParams(tile_size=256))
    with pytest.raises(StoreError, match="different tiling"):
        caption_raster(raster, out, model=tiny_model, tiling=TilingParams(tile_size=128))
    other = build_tiny_captioner(seed=1)
    with pytest.raises(StoreError, match="different model"):
        caption_raster(raster, out, model=other, tiling=TilingParams(tile_size=256))


def test_search_ranks_by_text_image_similarity(tmp_path, tiny_model):
    raster = geotiff("RGB.byte.tif")
    out = str(tmp_path / "s.gpkg")
    caption_raster(raster, out, model=tiny_model, tiling=TilingParams(tile_size=128))
    hits = search_store(out, "a river with green banks", k=5, model=tiny_model)
    with TileStore.open(out) as store:
        ids, emb = store.embeddings()
    q = tiny_model.embed_texts(["a river with green banks"])[0]
    scores = emb @ q
    assert [h.tile_id for h in hits] == [int(ids[i]) for i in np.argsort(-scores, kind="stable")[:5]]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def run_cli(*args, timeout=300):
    return subprocess.run(RSCAPTION + list(args), capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.mark.slow
def test_cli_caption_then_search_json(tmp_path, tiny_model_dir):
    raster = geotiff("world.rgb.tif")
    out = str(tmp_path / "world.gpkg")
    r = run_cli("caption", raster, "-o", out, "--model", tiny_model_dir, "--tile-size", "128", "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("done: 8 tiles captioned") and out in last
    r = run_cli("search", out, "snow covered mountains", "-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    assert len(hits) == 3 and set(hits[0]) == {"tile_id", "row", "col", "score", "caption", "confidence"}
    assert all(0.0 <= h["confidence"] <= 1.0 for h in hits)
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    r = run_cli("info", tiny_model_dir)
    assert r.returncode == 0 and "prefix" in r.stdout.lower()


@pytest.mark.parametrize("args, needle", [
    (["caption", "/nonexistent.tif", "-o", "x.gpkg"], "not found"),
    (["caption", "{bad}", "-o", "{out}"], "raster"),
    (["caption", "{raster}", "-o", "{out}", "--model", "/no/such/model"], "model"),
    (["caption", "{raster}", "-o", "{out}", "--bands", "1,2,9"], "band"),
    (["search", "/no/such.gpkg", "houses"], "does not exist"),
])
def test_cli_user_errors_are_one_line_without_traceback(tmp_path, args, needle, tiny_model_dir):
    bad = tmp_path / "bad.tif"
    bad.write_text("this is not a GeoTIFF")
    subst = {"{bad}": str(bad), "{out}": str(tmp_path / "o.gpkg"),
             "{raster}": str(GEOTIFF / "RGB.byte.tif")}
    if "{raster}" in args and not (GEOTIFF / "RGB.byte.tif").exists():
        pytest.skip("shared test data not found")
    args = [subst.get(a, a) for a in args]
    if "--model" not in args and args[0] == "caption":
        args += ["--model", tiny_model_dir]
    r = run_cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("rscaption: error:") and needle in lines[0].lower()


@pytest.mark.slow
def test_killed_cli_keeps_finished_tiles_and_resumes(tmp_path, tiny_model_dir):
    raster = geotiff("m_4709963_se_14_1_20200831.tif")
    params = TilingParams(tile_size=64)
    kept, _ = expected_kept(raster, params)
    out = str(tmp_path / "k.gpkg")
    proc = subprocess.Popen(RSCAPTION + ["caption", raster, "-o", out, "--model", tiny_model_dir,
                                         "--tile-size", "64", "--batch-size", "2", "-q"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    n = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if os.path.exists(out):
            try:
                with TileStore.open(out) as s:
                    n = s.count()
            except Exception:
                continue
            if n >= 4:
                break
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with TileStore.open(out) as s:
        survived = s.count()
    assert 4 <= survived < kept
    r = run_cli("caption", raster, "-o", out, "--model", tiny_model_dir, "--tile-size", "64", "-q")
    assert r.returncode == 0, r.stderr
    assert f"{survived} resumed" in r.stderr
    with TileStore.open(out) as s:
        assert s.count() == kept

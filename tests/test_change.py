"""``rscaption change``: two dates on one grid, honest scores, resume, reuse of caption files, the
CLI, the worker and search on a change file (real rasters copied to tmp, rasterio-made CRS and
resolution changes, real GeoPackages, the tiny model)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.warp import Resampling, calculate_default_transform, reproject

from conftest import geotiff_path

ROOT = Path(__file__).resolve().parents[1]
RSCAPTION = [sys.executable, "-m", "rscaption.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "PYTHONPATH": os.environ.get("PYTHONPATH") or str(ROOT / "backend")}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from rscaption.models.registry import load_model

    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture
def before(tmp_path) -> str:
    """Landsat RGB (EPSG:32618, ~300 m, nodata collar) copied out of the shared folder."""
    out = tmp_path / "before.tif"
    shutil.copy(geotiff_path("RGB.byte.tif"), out)
    return str(out)


def warped(src_path: str, out_path: str, crs: str, coarser: float = 1.0, crop=None) -> str:
    """``src_path`` reprojected to ``crs`` with pixels ``coarser`` times larger; ``crop`` keeps a
    fraction (left, right) of the columns of the source first."""
    with rasterio.open(src_path) as src:
        data, transform, width, height = src.read(), src.transform, src.width, src.height
        if crop:
            c0, c1 = int(crop[0] * width), int(crop[1] * width)
            data, transform, width = data[:, :, c0:c1], transform @ rasterio.Affine.translation(c0, 0), c1 - c0
        bounds = rasterio.transform.array_bounds(height, width, transform)
        dst_t, w, h = calculate_default_transform(src.crs, crs, width, height, left=bounds[0], bottom=bounds[1],
                                                  right=bounds[2], top=bounds[3])
        dst_t = dst_t @ rasterio.Affine.scale(coarser)
        w, h = max(1, int(w / coarser)), max(1, int(h / coarser))
        profile = {**src.profile, "crs": crs, "transform": dst_t, "width": w, "height": h, "driver": "GTiff"}
        out = np.zeros((src.count, h, w), np.uint8)
        reproject(data, out, src_transform=transform, src_crs=src.crs, dst_transform=dst_t, dst_crs=crs,
                  src_nodata=0, dst_nodata=0, resampling=Resampling.average if coarser > 1 else Resampling.bilinear)
    with rasterio.open(out_path, "w", **profile) as dst:
        dst.write(out)
    return out_path


def rows(path, sql):
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def run_change(before, after, out, tiny, **kw):
    from rscaption.change import change_rasters

    messages, progress = [], []
    summary = change_rasters(before, after, str(out), model=tiny, tile_size=128,
                             on_message=messages.append, on_progress=lambda *a: progress.append(a), **kw)
    return summary, messages, progress


# ---------------------------------------------------------------------------------------- alignment
def test_after_in_another_crs_and_resolution_is_read_on_the_before_grid(before, tmp_path):
    """The VRT the after date is tiled from has the before raster's grid, and its pixels are the
    same ground: a window correlates with the before raster's same window, not with its neighbour."""
    from rscaption.change.align import aligned_after, raster_grid

    after = warped(before, str(tmp_path / "after_4326.tif"), "EPSG:4326", coarser=2.5)
    grid = raster_grid(before)
    path, was_warped = aligned_after(after, grid, str(tmp_path / "parts"), before_m=300.0)
    assert was_warped and raster_grid(path).same_as(grid)
    with rasterio.open(before) as b, rasterio.open(path) as a:
        win = rasterio.windows.Window(300, 300, 128, 128)
        x = b.read(1, window=win).astype(float).ravel()
        y = a.read(1, window=win).astype(float).ravel()
        shifted = a.read(1, window=rasterio.windows.Window(428, 300, 128, 128)).astype(float).ravel()
    assert np.corrcoef(x, y)[0, 1] > 0.8
    assert np.corrcoef(x, y)[0, 1] > np.corrcoef(x, shifted)[0, 1] + 0.3


def test_change_run_puts_both_dates_on_one_grid_and_warns_of_resolution(before, tmp_path, tiny):
    after = warped(before, str(tmp_path / "after_4326.tif"), "EPSG:4326", coarser=2.5)
    out = tmp_path / "change.gpkg"
    summary, messages, _ = run_change(before, after, out, tiny)
    assert not summary.cancelled and summary.scored > 10
    assert any(m.startswith("overlap:") for m in messages)
    assert any("2.5x coarser" in m for m in messages) and summary.warnings
    geoms = {d: dict(rows(out, f"SELECT tile_id, geom FROM tiles_{d}")) for d in ("before", "after")}
    common = set(geoms["before"]) & set(geoms["after"])
    assert len(common) >= summary.scored
    assert all(geoms["before"][t] == geoms["after"][t] for t in common)  # same polygons: same grid
    layers = {r[0] for r in rows(out, "SELECT table_name FROM gpkg_contents")}
    assert {"changes", "tiles_before", "tiles_after", "rscaption_embeddings_before",
            "rscaption_embeddings_after"} <= layers
    assert not os.path.exists(str(out) + ".parts")  # work files gone once the file is whole


def test_no_change_claimed_outside_the_overlap(before, tmp_path, tiny):
    """The after raster covers the left half only (and another CRS): tiles beyond it have no score
    and say why; the overlap line gives the share."""
    after = warped(before, str(tmp_path / "left.tif"), "EPSG:3857", crop=(0.0, 0.5))
    out = tmp_path / "change.gpkg"
    summary, messages, _ = run_change(before, after, out, tiny)
    line = next(m for m in messages if m.startswith("overlap:"))
    assert "% of the before raster" in line
    got = rows(out, "SELECT col, change, changed, status, summary FROM changes")
    right = [r for r in got if r[0] >= 4]  # 791 px / 128: columns 4-6 lie beyond the middle
    assert right and all(r[1] is None and r[2] is None and r[3] != "scored" for r in right)
    assert all("not compared" in r[4] for r in right)
    assert summary.not_scored == sum(r[3] != "scored" for r in got) > 0


# ---------------------------------------------------------------------------------------- resume
def test_a_cancelled_change_run_resumes_without_redoing_finished_tiles(before, tmp_path, tiny):
    after = warped(before, str(tmp_path / "after.tif"), "EPSG:4326")
    out = tmp_path / "change.gpkg"
    seen = {"after": 0}

    def cancel_in_after():
        return seen["after"] > 0

    def progress(phase, done, total):
        if phase == "after" and done > 0:
            seen["after"] = done

    from rscaption.change import change_rasters

    first = change_rasters(before, after, str(out), model=tiny, tile_size=128, batch_size=4,
                           on_progress=progress, should_cancel=cancel_in_after, workers=0)
    assert first.cancelled and not out.exists()
    parts = Path(str(out) + ".parts")
    before_created = dict(rows(parts / "before.gpkg", "SELECT tile_id, created FROM tiles"))
    after_done = len(rows(parts / "after.gpkg", "SELECT tile_id FROM tiles"))
    assert before_created and 0 < after_done
    second, _, progress_calls = run_change(before, after, out, tiny)
    assert not second.cancelled and out.exists()
    first_before = next(p for p in progress_calls if p[0] == "before")
    first_after = next(p for p in progress_calls if p[0] == "after")
    assert first_before[1] == len(before_created)  # every before tile resumed (the rest are nodata)
    assert first_after[1] >= after_done
    assert dict(rows(out, "SELECT tile_id, created FROM tiles_before")) == before_created
    third, _, _ = run_change(before, after, out, tiny)  # finished: reported, not redone
    assert third.up_to_date and third.scored == second.scored


# ---------------------------------------------------------------------------------------- reuse
def test_captioned_geopackages_are_reused_without_recomputing(before, tmp_path, tiny):
    from rscaption.engine.pipeline import caption_raster
    from rscaption.raster.tiling import TilingParams

    after = str(tmp_path / "after_same_grid.tif")
    with rasterio.open(before) as src:  # the same grid, another "date": re-lit
        profile, data = src.profile, src.read()
    with rasterio.open(after, "w", **profile) as dst:
        dst.write(np.where(data > 0, np.clip(data.astype(int) * 0.8 + 10, 1, 255), 0).astype(np.uint8))
    tiling = TilingParams(tile_size=128)
    caption_raster(before, str(tmp_path / "b.gpkg"), model=tiny, tiling=tiling)
    caption_raster(after, str(tmp_path / "a.gpkg"), model=tiny, tiling=tiling)
    stamps = {d: dict(rows(tmp_path / f"{d}.gpkg", "SELECT tile_id, created FROM tiles")) for d in "ba"}
    out = tmp_path / "change.gpkg"
    summary, messages, progress = run_change(str(tmp_path / "b.gpkg"), str(tmp_path / "a.gpkg"), out, tiny)
    assert summary.before_reused and summary.after_reused
    assert sum("reusing" in m for m in messages) == 2
    assert all(done == total for phase, done, total in progress if phase != "score")
    assert dict(rows(out, "SELECT tile_id, created FROM tiles_before")) == stamps["b"]
    assert dict(rows(out, "SELECT tile_id, created FROM tiles_after")) == stamps["a"]
    assert not os.path.exists(str(out) + ".parts")  # nothing was captioned
    # a caption file on another grid falls back to its raster, read on the before grid
    other = warped(before, str(tmp_path / "other.tif"), "EPSG:4326")
    caption_raster(other, str(tmp_path / "o.gpkg"), model=tiny, tiling=tiling)
    summary2, messages2, _ = run_change(str(tmp_path / "b.gpkg"), str(tmp_path / "o.gpkg"),
                                        tmp_path / "change2.gpkg", tiny)
    assert summary2.before_reused and not summary2.after_reused
    assert any("another grid" in m for m in messages2)


# ---------------------------------------------------------------------------------------- CLI
def cli(*args, timeout=600):
    return subprocess.run(RSCAPTION + [str(a) for a in args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def test_cli_change_then_search_both_dates_and_transitions(before, tmp_path, tiny_model_dir):
    after = warped(before, str(tmp_path / "after.tif"), "EPSG:4326", coarser=1.5)
    out = tmp_path / "c.gpkg"
    r = cli("change", before, after, "-o", out, "--model", tiny_model_dir, "--tile-size", 128, "-k", 3, "-q")
    assert r.returncode == 0, r.stderr
    assert "most changed tiles" in r.stdout and len(r.stdout.strip().splitlines()) == 4
    assert "done:" in r.stderr and "overlap:" in r.stderr
    dates = {}
    for query in ("before: a river", "after: a river", "a river"):
        s = cli("search", out, query, "--json", "-k", 4)
        assert s.returncode == 0, s.stderr
        hits = json.loads(s.stdout)
        assert len(hits) == 4 and {"change", "summary", "date"} <= set(hits[0])
        dates[query] = {h["date"] for h in hits}
    assert dates == {"before: a river": {"before"}, "after: a river": {"after"}, "a river": {"after"}}
    t = cli("search", out, "farmland that became houses", "--json", "--where", "change >= 0")
    assert t.returncode == 0, t.stderr
    threshold = json.loads(rows(out, "SELECT value FROM rscaption_metadata WHERE key = 'change'")[0][0])["scorer"][
        "threshold"]
    assert all(h["date"] == "change" and h["change"] >= threshold for h in json.loads(t.stdout))
    bad = cli("search", out, "a river", "--where", "caption_before) OR (1")
    assert bad.returncode == 2 and bad.stderr.startswith("rscaption: error:") and "Traceback" not in bad.stderr


def test_cli_mistakes_are_one_line(before, tmp_path, tiny_model_dir):
    out = tmp_path / "c.gpkg"
    far = str(tmp_path / "far.tif")
    with rasterio.open(before) as src:
        profile = {**src.profile, "transform": src.transform @ rasterio.Affine.translation(10_000, 0)}
        data = src.read()
    with rasterio.open(far, "w", **profile) as dst:
        dst.write(data)
    for args, words in ((("missing.tif", before), "missing.tif"), ((before, before), "same file"),
                        ((before, far), "does not overlap")):
        r = cli("change", *args, "-o", out, "--model", tiny_model_dir, "--tile-size", 128, "-q")
        assert r.returncode == 2 and r.stderr.startswith("rscaption: error:"), r.stderr
        assert words in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2
    out.write_bytes(b"not a geopackage")
    after = warped(before, str(tmp_path / "after.tif"), "EPSG:4326")
    r = cli("change", before, after, "-o", out, "--model", tiny_model_dir, "-q")
    assert r.returncode == 2 and "not an rscaption change file" in r.stderr


# ---------------------------------------------------------------------------------------- worker
def test_worker_change_streams_the_caption_events(before, tmp_path, tiny_model_dir):
    from rscaption.protocol import encode_request

    after = warped(before, str(tmp_path / "after.tif"), "EPSG:4326")
    out = str(tmp_path / "w.gpkg")
    lines = encode_request("change", before=before, after=after, out=out, model=tiny_model_dir, tile_size=128, k=2)
    lines += encode_request("search", gpkg=out, query="before: a river", k=2)
    # no shutdown: at the end of input the worker answers what is queued, then leaves
    r = subprocess.run([sys.executable, "-m", "rscaption.worker", "--heartbeat", "30"], input=lines, text=True,
                       capture_output=True, env=ENV, timeout=600)
    msgs = [json.loads(line) for line in r.stdout.splitlines()]
    phases = {m.get("phase") for m in msgs if m["type"] == "progress"}
    assert {"before", "after", "score"} <= phases
    assert any(m["type"] == "log" and m["message"].startswith("overlap:") for m in msgs)
    result = next(m for m in msgs if m["type"] == "result" and m.get("cmd") == "change")
    assert len(result["top"]) == 2 and "summary" in result["top"][0]
    done = [m for m in msgs if m["type"] == "done"]
    assert done[0]["cmd"] == "change" and done[0]["summary"]["scored"] > 0
    hits = next(m for m in msgs if m["type"] == "result" and m.get("cmd") == "search")["hits"]
    assert len(hits) == 2 and all(h["date"] == "before" for h in hits)


# ---------------------------------------------------------------------------------------- scorer
def test_query_forms():
    from rscaption.change.search import parse_query

    assert parse_query("farmland that became houses") == ("change", ["farmland", "houses"])
    assert parse_query("from forest to bare land") == ("change", ["forest", "bare land"])
    assert parse_query("lake -> meadow") == ("change", ["lake", "meadow"])
    assert parse_query("before: a lake") == ("before", ["a lake"])
    assert parse_query("houses") == ("after", ["houses"])
    assert parse_query("houses", date="before") == ("before", ["houses"])


def test_the_shipped_scorer_fits_the_default_model_and_leaves_its_hash_alone(tmp_path):
    """change.json is JSON beside the checkpoint: the checkpoint hash (what every caption file's
    resume and search check) is the same with and without it, and it was fitted for that hash."""
    from rscaption.change.score import SCORER_FILE, ChangeScorer
    from rscaption.models.checkpoint_save import hash_dir
    from rscaption.models.registry import default_model_dir

    model = default_model_dir()
    data = json.loads((model / SCORER_FILE).read_text())
    copy = tmp_path / "m"
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns(SCORER_FILE))
    assert hash_dir(copy) == hash_dir(model) == data["model_hash"]
    scorer = ChangeScorer.from_dict(data)
    assert scorer.needs_scene and 0 < scorer.threshold < 1
    assert {"command", "cpu_seconds", "cpu"} <= set(data["fit"])


def test_same_scene_pairs_score_lower_than_scene_changes_at_the_same_cosine():
    """The fitted score reads the scene posteriors: two tiles as far apart in embedding as a
    change, but of the same scene, are not called a change."""
    from rscaption.change.score import ChangeScorer, SCORER_FILE
    from rscaption.models.registry import default_model_dir

    scorer = ChangeScorer.from_dict(json.loads((default_model_dir() / SCORER_FILE).read_text()))
    same = {"cosine_change": np.array([0.4]), "scene_tv": np.array([0.05]), "scene_js": np.array([0.01]),
            "top_disagree": np.array([0.0]), "proto_tv": np.array([0.05]), "metric_change": np.array([2.9])}
    moved = {"cosine_change": np.array([0.4]), "scene_tv": np.array([0.95]), "scene_js": np.array([0.9]),
             "top_disagree": np.array([0.9]), "proto_tv": np.array([0.95]), "metric_change": np.array([2.9])}
    assert scorer.score(same)[0] < scorer.threshold < scorer.score(moved)[0]


@pytest.mark.slow
def test_default_model_tells_appearance_from_land_use_on_real_naip(tmp_path):
    """The shipped scorer on the real 5 m NAIP scene: the same ground re-lit and misregistered by
    2 px is (almost) never a change; the scene against its own mirror image (other ground on every
    tile) mostly is, and each changed tile's sentence names two scenes."""
    from rscaption.change import change_rasters
    from rscaption.models.registry import load_model

    before = tmp_path / "naip2009.tif"
    shutil.copy(geotiff_path("m_4709963_se_14_1_20090818.tif"), before)
    with rasterio.open(before) as src:
        profile, data = src.profile, src.read()
    relit = np.where(data > 0, np.clip(255 * (data / 255.0) ** 0.8 * 1.1, 1, 255), 0).astype(np.uint8)
    shifted = {**profile, "transform": profile["transform"] @ rasterio.Affine.translation(2, 0)}
    with rasterio.open(tmp_path / "relit.tif", "w", **shifted) as dst:
        dst.write(relit)
    with rasterio.open(tmp_path / "mirror.tif", "w", **profile) as dst:
        dst.write(data[:, ::-1, ::-1])
    cap = load_model("default", device="cpu")
    same = change_rasters(str(before), str(tmp_path / "relit.tif"), str(tmp_path / "same.gpkg"), model=cap)
    other = change_rasters(str(before), str(tmp_path / "mirror.tif"), str(tmp_path / "other.gpkg"), model=cap)
    assert same.scorer == other.scorer == "logistic"
    assert same.changed <= 0.1 * same.scored
    assert other.changed >= 0.5 * other.scored
    changed = rows(tmp_path / "other.gpkg", "SELECT summary FROM changes WHERE changed = 1")
    assert all(" -> " in s or s.startswith("changed (") for (s,) in changed)

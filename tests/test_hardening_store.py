"""Reliability issue, second round, the store and resume part: a raster rewritten during a run, a
resume with other caption options or another compute dtype, repair advice that runs, relative
/vsizip/ paths, duplicate and orphan rows, a file whose every embedding was truncated. Real
rasters, real GeoPackages, the tiny real model, the real CLI in a subprocess where it is the subject."""

from __future__ import annotations

import shlex
import shutil
import sqlite3
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import rasterio

from rscaption.engine.pipeline import caption_raster
from rscaption.errors import RasterError
from rscaption.models.registry import load_model
from rscaption.raster.tiling import TilingParams
from rscaption.store.gpkg import TileStore
from test_bad_inputs import edit, one_error_line
from test_hardening import ENV, cli, private_raster

PARAMS = TilingParams(tile_size=128)


def contents(path) -> dict:
    """tile_id -> (caption, embedding) of a stored file."""
    with TileStore.open(path) as s:
        ids, emb = s.embeddings()
        caps = {t["tile_id"]: t["caption"] for t in s.tiles()}
    return {int(i): (caps[int(i)], e) for i, e in zip(ids, emb)}


def assert_same(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k][0] == want[k][0], k
        np.testing.assert_allclose(got[k][1], want[k][1], atol=1e-5)


def inverted_copy(src, dst):
    """The same raster (size, georeferencing, bytes on disk) with other pixels."""
    with rasterio.open(src) as ds:
        profile, data = ds.profile, ds.read()
    with rasterio.open(dst, "w", **profile) as out:
        out.write(255 - data)
    return dst


def cancel_after_first_batch():
    state = {"written": 0}

    def progress(_done, _total, records):
        state["written"] += len(records)

    return progress, (lambda: state["written"] > 0), state


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """An uninterrupted run over a private copy of RGB.byte.tif (128 px tiles)."""
    root = tmp_path_factory.mktemp("ref")
    raster = private_raster(root)
    out = root / "ref.gpkg"
    caption_raster(str(raster), str(out), model=tiny_model_dir, tiling=PARAMS, device="cpu")
    with TileStore.open(out) as s:
        meta = s.metadata()
    return raster, out, contents(out), meta


# -- 7. a raster overwritten during a run stops it before two rasters mix in one file ------------------
@pytest.mark.parametrize("workers", [None, 0])
def test_a_raster_overwritten_during_a_run_stops_it_and_keeps_only_the_original_tiles(
        tmp_path, tiny_model_dir, reference, workers):
    raster = private_raster(tmp_path)
    original = shutil.copy(raster, tmp_path / "original.tif")
    other = inverted_copy(raster, tmp_path / "other.tif")
    out = tmp_path / "out.gpkg"
    state = {"swapped": False}

    def progress(_done, _total, records):
        if records and not state["swapped"]:  # after the first committed batch: overwrite in place
            shutil.copyfile(other, raster)
            state["swapped"] = True

    with pytest.raises(RasterError) as err:
        caption_raster(str(raster), str(out), model=tiny_model_dir, tiling=PARAMS, device="cpu", batch_size=4,
                       on_progress=progress, workers=workers)
    kept = contents(out)
    assert str(err.value) == (
        f"{raster} changed on disk during the run: stopped before mixing two rasters in one file; the "
        f"{len(kept)} tile(s) in {out} were read before the change. Put the raster back as it was and run again "
        "to resume, or caption the new one with --overwrite")
    _, _, want, ref_meta = reference
    assert 0 < len(kept) < len(want)
    assert_same(kept, {k: want[k] for k in kept})  # every kept tile is the original raster's
    with TileStore.open(out) as s:
        assert s.metadata()["source_raster"]["checksum"] == ref_meta["source_raster"]["checksum"]
    proc = cli("caption", raster, "-o", out, "--model", tiny_model_dir, "--tile-size", "128", "-q")
    assert proc.returncode == 2 and one_error_line(proc.stderr) == (
        f"rscaption: error: {out} was written from a different raster; choose another output or pass --overwrite")
    shutil.copyfile(original, raster)  # the original back: the same command resumes to the full result
    proc = cli("caption", raster, "-o", out, "--model", tiny_model_dir, "--tile-size", "128", "-q")
    assert proc.returncode == 0, proc.stderr
    assert_same(contents(out), want)


# -- 8. caption options must match on resume; the compute dtypes that made the tiles are recorded -------
def test_a_resume_with_another_beam_size_is_refused_and_repair_uses_the_files(tmp_path, tiny_model_dir):
    raster = private_raster(tmp_path)
    out = tmp_path / "beam.gpkg"
    progress, cancel, _ = cancel_after_first_batch()
    s = caption_raster(str(raster), str(out), model=tiny_model_dir, tiling=PARAMS, device="cpu", beam_size=2,
                       batch_size=4, on_progress=progress, should_cancel=cancel)
    assert s.cancelled and 0 < s.written < s.total
    before = contents(out)
    proc = cli("caption", raster, "-o", out, "--model", tiny_model_dir, "--tile-size", "128", "--beam-size", "3", "-q")
    assert proc.returncode == 2 and one_error_line(proc.stderr) == (
        f"rscaption: error: {out} was captioned with --beam-size 2, not 3; resume it with --beam-size 2, or pass "
        "--overwrite to caption it again with --beam-size 3")
    assert_same(contents(out), before)  # nothing written, nothing lost
    proc = cli("caption", raster, "-o", out, "--model", tiny_model_dir, "--tile-size", "128", "--beam-size", "2", "-q")
    assert proc.returncode == 0, proc.stderr
    full = contents(out)
    with TileStore.open(out) as st:
        assert st.metadata()["caption_options"] == {"beam_size": 2, "max_new_tokens": 30}
    victim = sorted(full)[5]
    edit(out, f"UPDATE tiles SET caption = NULL WHERE tile_id = {victim}")
    proc = cli("check", out, "--repair")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[1] == "repaired: 1 tile(s) captioned again"
    assert_same(contents(out), full)  # captioned again with the file's beam width, not the card's


@pytest.mark.needs_bf16
def test_a_bf16_run_resumed_in_fp32_records_both_dtypes(tmp_path, tiny_model_dir):
    raster = private_raster(tmp_path)
    bf16 = load_model(tiny_model_dir, device="cpu", precision="bf16")
    fp32 = load_model(tiny_model_dir, device="cpu", precision="fp32")
    out = tmp_path / "mixed.gpkg"
    progress, cancel, _ = cancel_after_first_batch()
    s = caption_raster(str(raster), str(out), model=bf16, tiling=PARAMS, batch_size=4, on_progress=progress,
                       should_cancel=cancel)
    assert s.cancelled and s.written > 0
    with TileStore.open(out) as st:
        meta = st.metadata()
    assert (meta["compute_dtype"], meta["compute_dtypes"]) == ("bfloat16", ["bfloat16"])
    caption_raster(str(raster), str(out), model=fp32, tiling=PARAMS, batch_size=4)
    with TileStore.open(out) as st:
        meta = st.metadata()
    assert (meta["compute_dtype"], meta["compute_dtypes"]) == ("bfloat16 + float32", ["bfloat16", "float32"])
    # a bf16 run that wrote no tile leaves no trace of bf16
    empty = tmp_path / "fp32.gpkg"
    s = caption_raster(str(raster), str(empty), model=bf16, tiling=PARAMS, should_cancel=lambda: True)
    assert s.cancelled and s.written == 0
    caption_raster(str(raster), str(empty), model=fp32, tiling=PARAMS)
    with TileStore.open(empty) as st:
        meta = st.metadata()
    assert (meta["compute_dtype"], meta["compute_dtypes"]) == ("float32", ["float32"])


@pytest.mark.slow
@pytest.mark.needs_bf16
def test_the_ray_engine_records_the_dtypes_its_workers_computed_in(tmp_path, tiny_model_dir):
    ray = pytest.importorskip("ray")
    from rscaption.engine.ray import caption_raster_ray

    raster = private_raster(tmp_path)
    out = tmp_path / "ray.gpkg"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        progress, cancel, _ = cancel_after_first_batch()
        s = caption_raster_ray(str(raster), str(out), model=load_model(tiny_model_dir, device="cpu", precision="bf16"),
                               model_spec=tiny_model_dir, tiling=PARAMS, batch_size=4, on_progress=progress,
                               should_cancel=cancel, shard_batches=1)
        assert s.cancelled and s.written > 0
        caption_raster_ray(str(raster), str(out), model=load_model(tiny_model_dir, device="cpu", precision="fp32"),
                           model_spec=tiny_model_dir, tiling=PARAMS, batch_size=4)
    finally:
        ray.shutdown()
    with TileStore.open(out) as st:
        meta = st.metadata()
    assert (meta["compute_dtype"], meta["compute_dtypes"]) == ("bfloat16 + float32", ["bfloat16", "float32"])


# -- 20. check --repair on a changed raster prints a command that runs -----------------------------------
def test_repair_of_a_file_whose_raster_changed_advises_a_command_that_runs(tmp_path, tiny_model_dir):
    raster = private_raster(tmp_path)
    out = tmp_path / "g.gpkg"
    proc = cli("caption", raster, "-o", out, "--model", tiny_model_dir, "--tile-size", "128", "--beam-size", "2",
               "--overlap", "16", "-q")
    assert proc.returncode == 0, proc.stderr
    edit(out, "UPDATE tiles SET caption = NULL WHERE tile_id = (SELECT min(tile_id) FROM tiles)")
    other = inverted_copy(raster, tmp_path / "other.tif")
    shutil.copyfile(other, raster)
    proc = cli("check", out, "--repair")
    command = (f"rscaption caption {raster} -o {out} --overwrite --model {tiny_model_dir} --tile-size 128 "
               "--overlap 16 --beam-size 2")
    assert proc.returncode == 2 and one_error_line(proc.stderr) == (
        f"rscaption: error: cannot repair {out}: its source raster {raster} changed since the file was written; put "
        f"the original back there and repair again, or caption the raster anew: {command}")
    argv = shlex.split(one_error_line(proc.stderr).rsplit(": ", 1)[1])
    assert argv[:2] == ["rscaption", "caption"]
    proc = cli(*argv[1:], "-q")
    assert proc.returncode == 0, proc.stderr
    proc = cli("check", out)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("none damaged")


# -- 21. a relative /vsizip/ path is stored absolute: repair works from another folder -------------------
def test_a_relative_vsizip_path_is_recorded_absolute_and_repairs_from_elsewhere(tmp_path, tiny_model_dir,
                                                                                monkeypatch):
    (tmp_path / "rel" / "dir").mkdir(parents=True)
    with zipfile.ZipFile(tmp_path / "rel" / "dir" / "a.zip", "w") as z:
        z.write(private_raster(tmp_path), "x.tif")
    proc = subprocess.run([sys.executable, "-m", "rscaption.cli", "caption", "/vsizip/rel/dir/a.zip/x.tif", "-o",
                           "out.gpkg", "--model", tiny_model_dir, "--tile-size", "256", "-q"],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out.gpkg"
    with TileStore.open(out) as s:
        assert s.metadata()["source_raster"]["path"] == f"/vsizip/{tmp_path}/rel/dir/a.zip/x.tif"
    edit(out, "UPDATE tiles SET caption = NULL WHERE tile_id = (SELECT min(tile_id) FROM tiles)")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-m", "rscaption.cli", "check", str(out), "--repair"],
                          capture_output=True, text=True, env=ENV, cwd=elsewhere, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == "repaired: 1 tile(s) captioned again"
    # the braced form too; remote and already absolute paths stay as given
    from rscaption.raster.paths import absolute_path

    monkeypatch.chdir(tmp_path)
    assert absolute_path("/vsizip/{rel/a b.zip}/x.tif") == f"/vsizip/{{{tmp_path}/rel/a b.zip}}/x.tif"
    assert absolute_path("/vsitar/rel/t.tar/x.tif") == f"/vsitar/{tmp_path}/rel/t.tar/x.tif"
    for given in ("/vsizip//abs/a.zip/x.tif", "/vsizip//vsicurl/https://h/a.zip/x.tif",
                  "/vsicurl/https://h/x.tif", "/vsis3/bucket/x.tif"):
        assert absolute_path(given) == given


# -- check finds duplicate tile ids and deleted rows; repair redoes them -------------------------------
def test_check_flags_duplicate_ids_and_deleted_rows_and_repair_redoes_them(tmp_path, reference):
    raster, ref, want, _ = reference
    out = tmp_path / "rows.gpkg"
    shutil.copy(ref, out)
    ids = sorted(want)
    dup, gone = ids[3], ids[7]
    columns = ('geom, tile_id, "row", "col", caption, confidence, model, created, px_col_off, px_row_off, '
               "px_width, px_height, valid_fraction")
    edit(out, f"INSERT INTO tiles ({columns}, tile_key) SELECT {columns}, NULL FROM tiles WHERE tile_id = {dup}",
         f"DELETE FROM tiles WHERE tile_id = {gone}")
    proc = cli("check", out)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.strip() == (f"{out}: 2 damaged tile(s) of {len(ids)}: {dup} (2 rows with this tile id), "
                                   f"{gone} (tile row deleted, its embedding left)")
    proc = cli("check", out, "--repair")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[1:] == ["repaired: 2 tile(s) captioned again",
                                            f"{out}: ok: {len(ids)} tiles, none damaged"]
    assert_same(contents(out), want)
    con = sqlite3.connect(out)
    assert con.execute("SELECT count(*), count(DISTINCT tile_id) FROM tiles").fetchone() == (len(ids), len(ids))
    con.close()


# -- a file whose every embedding was truncated is repaired, not only overwritten -----------------------
def test_a_file_whose_embeddings_are_all_truncated_is_repaired_and_resumed(tmp_path, reference, tiny_model_dir):
    raster, ref, want, _ = reference
    ids = sorted(want)
    for name in ("repair", "resume"):
        out = tmp_path / f"{name}.gpkg"
        shutil.copy(ref, out)
        edit(out, "UPDATE rscaption_embeddings SET embedding = substr(embedding, 1, 10)")
        if name == "repair":
            proc = cli("check", out)
            assert proc.returncode == 1, proc.stdout + proc.stderr
            assert proc.stdout.startswith(f"{out}: {len(ids)} damaged tile(s) of {len(ids)}: "
                                          f"{ids[0]} (embedding has 2 values, not 32), ")
            proc = cli("check", out, "--repair")
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert proc.stdout.splitlines()[1] == f"repaired: {len(ids)} tile(s) captioned again"
        else:
            proc = cli("caption", raster, "-o", out, "--model", tiny_model_dir, "--tile-size", "128", "-q")
            assert proc.returncode == 0, proc.stderr
            assert f"done: {len(ids)} tiles captioned, 0 resumed" in proc.stderr
        assert_same(contents(out), want)

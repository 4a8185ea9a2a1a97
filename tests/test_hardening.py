"""Reliability issue, second round: links around the run lock, the worker's output path, pickled
weights in a checkpoint, a --where that closes its brackets, non-finite embeddings. Real files,
real SQLite, the real CLI in a subprocess where the CLI is the subject."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, geotiff_path
from rscaption.errors import ModelError, StoreError
from rscaption.store.run_lock import RunLock, lock_path
from test_bad_inputs import one_error_line, run_main
from test_search_scale import store, tiny  # noqa: F401 (fixtures: 600 synthetic tiles, the tiny model)
from test_worker import Worker

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "backend"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rscaption.cli", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def private_raster(tmp_path, name="r.tif"):
    dst = tmp_path / name
    shutil.copy(geotiff_path("RGB.byte.tif"), dst)
    return dst


# -- 1. the lock file is never opened through a symlink -------------------------------------------------
def test_a_lock_file_that_is_a_symlink_is_refused(tmp_path, tiny_model_dir):
    raster = private_raster(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "x.gpkg"
    os.symlink(victim, lock_path(out))
    proc = cli("caption", raster, "-o", out, "--model", tiny_model_dir, "--tile-size", "256", "-q")
    assert proc.returncode == 2, proc.stderr
    assert one_error_line(proc.stderr) == (
        f"rscaption: error: cannot lock {out}: its lock file {lock_path(out)} is a symbolic link; "
        "remove it (rscaption never writes through one)")
    assert victim.read_text() == "precious\n" and os.path.islink(lock_path(out)) and not out.exists()
    os.unlink(lock_path(out))  # a dangling link is refused as well
    os.symlink(tmp_path / "nowhere.txt", lock_path(out))
    with pytest.raises(StoreError, match="is a symbolic link"):
        RunLock(out).acquire()
    assert not (tmp_path / "nowhere.txt").exists()


# -- 2. a symlink and its target are one output with one writer -----------------------------------------
def test_a_symlink_and_its_target_share_one_lock(tmp_path, tiny_model_dir, capsys):
    raster = private_raster(tmp_path)
    target = tmp_path / "real.gpkg"
    target.write_bytes(b"the first run's file")
    link = tmp_path / "link.gpkg"
    os.symlink(target, link)
    assert lock_path(link) == lock_path(target)
    with RunLock(target):  # the first run, writing through the target's name
        with pytest.raises(StoreError, match="is being written by another rscaption run"):
            RunLock(link).acquire()
        rc, err = run_main(capsys, "caption", raster, "-o", link, "--model", tiny_model_dir, "--tile-size", "256",
                           "-q", "--overwrite")
        assert rc == 2 and one_error_line(err).startswith(
            f"rscaption: error: {link} is being written by another rscaption run (pid {os.getpid()} since ")
        assert target.read_bytes() == b"the first run's file" and os.path.islink(link)
    assert not os.path.exists(lock_path(target))


# -- 3. the worker checks its output path as the CLI does ----------------------------------------------
def test_the_worker_checks_the_output_path_like_the_cli(tmp_path, tiny_model_dir, capsys):
    raster = private_raster(tmp_path)
    precious = private_raster(tmp_path, "precious.tif")
    before = precious.read_bytes()
    folder = tmp_path / "folder.gpkg"
    folder.mkdir()
    gpkg_raster = tmp_path / "raster.gpkg"  # a GeoPackage that is the input raster itself
    shutil.copy(raster, gpkg_raster)
    cases = [(raster, precious), (raster, tmp_path / "new.txt"), (raster, folder), (gpkg_raster, gpkg_raster)]
    said = []
    for src, out in cases:
        rc, err = run_main(capsys, "caption", src, "-o", out, "--model", tiny_model_dir, "--overwrite")
        assert rc == 2
        said.append(one_error_line(err).removeprefix("rscaption: error: "))
    assert said[0] == f"the output must be a .gpkg file, got {precious}"
    w = Worker()
    try:
        w.until(lambda m: m["type"] == "hello")
        for (src, out), cli_said in zip(cases, said):
            w.send("caption", raster=str(src), out=str(out), model=tiny_model_dir, tile_size=256, overwrite=True)
            msg, _ = w.until(lambda m: m["type"] in ("done", "error"))
            assert msg["type"] == "error" and msg["kind"] == "user" and msg["message"] == cli_said, msg
        w.send("shutdown")
        assert w.proc.wait(30) == 0
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
    assert precious.read_bytes() == before and folder.is_dir() and not (tmp_path / "new.txt").exists()


# -- 4. only safetensors load, and the hash covers every weight file ------------------------------------
def test_a_pickled_language_model_is_refused_and_changes_the_hash(tmp_path, tiny_model_dir, capsys):
    import torch
    from safetensors.torch import load_file

    from rscaption.models.checkpoint import load_checkpoint
    from rscaption.models.checkpoint_save import hash_dir

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt)
    lm = ckpt / "lm"
    torch.save(load_file(str(lm / "model.safetensors")), lm / "pytorch_model.bin")
    good_hash = hash_dir(tiny_model_dir)
    assert hash_dir(ckpt) != good_hash  # the extra weights change the hash ...
    with pytest.raises(ModelError) as info:  # ... and refuse the checkpoint
        load_checkpoint(ckpt, device="cpu")
    assert "lm/pytorch_model.bin, which is not a safetensors file" in str(info.value)
    (lm / "model.safetensors").unlink()  # the brief's case: lm/ holds only the pickle
    rc, err = run_main(capsys, "info", ckpt)
    assert rc == 2 and one_error_line(err) == (
        f"rscaption: error: checkpoint {ckpt.resolve()} holds lm/pytorch_model.bin, which is not a "
        "safetensors file; only .safetensors weights load (save it with safe_serialization=True)")
    assert load_checkpoint(tiny_model_dir, device="cpu").model_hash == good_hash  # safetensors only: as before


# -- 5. --where is one expression: it cannot close the caller's bracket ---------------------------------
@pytest.mark.parametrize("extra", [[], ["--bbox", "0", "0", "1", "1"]])
def test_where_cannot_escape_its_brackets(store, tiny_model_dir, extra):  # noqa: F811
    proc = cli("search", store, "a river", "--model", tiny_model_dir, "--min-confidence", "0.99",
               "--where", "1) OR (1", "--json", *extra)
    assert proc.returncode == 2, proc.stdout[:300]
    assert one_error_line(proc.stderr) == ("rscaption: error: bad --where expression '1) OR (1': a ')' without "
                                           "its '(' (the expression must be one expression)")


@pytest.mark.parametrize("where, said", [
    ("(1", "1 '(' not closed"),
    ("caption = 'it''s", "unterminated ' quote"),
    ("1 /* ) OR (1", "unterminated /* comment"),
    ('"caption) OR (1', 'unterminated " quote'),
])
def test_where_unbalanced_or_unterminated_is_refused(store, tiny, where, said):  # noqa: F811
    from rscaption.search.query import search_store

    with pytest.raises(StoreError) as info:
        search_store(str(store), "a river", model=tiny, where=where, min_confidence=0.99)
    assert str(info.value) == f"bad --where expression {where!r}: {said}"


def test_brackets_inside_literals_and_comments_still_work(store, tiny):  # noqa: F811
    from rscaption.search.query import search_store

    hits = search_store(str(store), "a river", k=50, model=tiny, min_confidence=0.5,
                        where="(caption != ')') AND [caption] NOT LIKE '%(%' /* ) OR ( */ -- ) OR (1")
    assert hits and all(h.confidence >= 0.5 for h in hits)


# -- 6. a NaN in one embedding is damage: check flags it, repair redoes it, search skips it -------------
@pytest.fixture
def nan_store(tmp_path, tiny_model_dir):
    from rscaption.engine.pipeline import caption_raster
    from rscaption.raster.tiling import TilingParams
    from rscaption.store.gpkg import TileStore

    raster = private_raster(tmp_path)
    out = tmp_path / "nan.gpkg"
    caption_raster(str(raster), str(out), model=tiny_model_dir, tiling=TilingParams(tile_size=128), device="cpu")
    with TileStore.open(out) as s:
        ids, emb = s.embeddings()
    bad = int(ids[3])
    vec = emb[3].astype("<f4").copy()
    vec[5] = np.nan
    con = sqlite3.connect(out)
    con.execute("UPDATE rscaption_embeddings SET embedding = ? WHERE tile_id = ?", (vec.tobytes(), bad))
    con.commit()
    con.close()
    return out, bad, [int(t) for t in ids if int(t) != bad]


def _strict_json(text):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_nan_embedding_is_damage_that_search_skips_and_check_repairs(nan_store, tiny_model_dir, capsys):
    out, bad, good_ids = nan_store
    proc = cli("check", out)
    assert proc.returncode == 1, proc.stdout
    assert proc.stdout.strip() == (f"{out}: 1 damaged tile(s) of {len(good_ids) + 1}: "
                                   f"{bad} (embedding has NaN or infinite values)")
    warning = (f"warning: {out}: 1 tile(s) with NaN or infinite embedding values are skipped "
               f"(run 'rscaption check {out} --repair')")
    proc = cli("search", out, "a river", "--model", tiny_model_dir, "-k", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    hits = _strict_json(proc.stdout)
    assert len(hits) == 5 and bad not in [h["tile_id"] for h in hits]
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [warning]
    proc = cli("similar", out, good_ids[0], "-k", "50", "--json")
    assert proc.returncode == 0, proc.stderr
    hits = _strict_json(proc.stdout)
    assert len(hits) == len(good_ids) - 1 and bad not in [h["tile_id"] for h in hits]
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [warning]
    rc, err = run_main(capsys, "similar", out, bad)
    assert rc == 2 and one_error_line(err) == (f"rscaption: error: tile {bad} of {out} has NaN or infinite "
                                               f"embedding values (run 'rscaption check {out} --repair')")
    rc, err = run_main(capsys, "check", out, "--repair", out=(said := []))
    assert rc == 0, err
    assert said[0].strip().splitlines()[1:] == ["repaired: 1 tile(s) captioned again",
                                                f"{out}: ok: {len(good_ids) + 1} tiles, none damaged"]

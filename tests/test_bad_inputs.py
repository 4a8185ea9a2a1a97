"""Bad inputs get one clear line (exit 2), never a traceback (issue 11): real files, the real CLI.

Most cases call ``rscaption.cli.main`` in this process (the same code the console script runs,
without paying a torch import per case); one case runs the console entry point as a subprocess to
pin the process-level behaviour (exit status, stderr only one line).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys

import pytest

from conftest import ROOT, geotiff_path
from rscaption.cli import main
from rscaption.errors import StoreError
from rscaption.store.gpkg import TileStore
from rscaption.store.gpkg_sql import register_functions


@pytest.fixture(scope="module")
def good_gpkg(tmp_path_factory, tiny_model_dir):
    """One small real output (RGB.byte.tif, 256 px tiles) that each test copies and damages."""
    from rscaption.engine.pipeline import caption_raster
    from rscaption.raster.tiling import TilingParams

    out = tmp_path_factory.mktemp("good") / "good.gpkg"
    caption_raster(str(geotiff_path("RGB.byte.tif")), str(out), model=tiny_model_dir,
                   tiling=TilingParams(tile_size=256), device="cpu")
    return out


def copy_of(good, tmp_path) -> str:
    dst = tmp_path / "copy.gpkg"
    shutil.copy(good, dst)
    return str(dst)


def run_main(capsys, *argv, out: list | None = None) -> tuple[int, str]:
    """Exit status and stderr of one CLI call; its stdout is appended to ``out`` when given."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    captured = capsys.readouterr()
    if out is not None:
        out.append(captured.out)
    return rc, captured.err


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# -- caption ----------------------------------------------------------------------------------------
def test_directory_as_raster(tmp_path, capsys, tiny_model_dir):
    rc, err = run_main(capsys, "caption", tmp_path, "-o", tmp_path / "o.gpkg", "--model", tiny_model_dir)
    assert rc == 2 and one_error_line(err) == f"rscaption: error: {tmp_path} is a directory, not a raster file"
    from rscaption.errors import RasterError
    from rscaption.engine.pipeline import caption_raster  # the worker's and the plugin's path

    with pytest.raises(RasterError, match="is a directory, not a raster file"):
        caption_raster(str(tmp_path), str(tmp_path / "o.gpkg"), model=tiny_model_dir, device="cpu")


def test_huge_tile_size_is_refused_before_allocating(tmp_path, capsys, tiny_model_dir):
    raster = geotiff_path("RGB.byte.tif")
    rc, err = run_main(capsys, "caption", raster, "-o", tmp_path / "o.gpkg", "--model", tiny_model_dir,
                       "--tile-size", "100000")
    assert rc == 2
    assert one_error_line(err) == ("rscaption: error: tile size 100000 px is too large: at most 8192 px "
                                   "(each tile is read into memory whole)")
    rc, err = run_main(capsys, "caption", raster, "-o", tmp_path / "o.gpkg", "--model", tiny_model_dir,
                       "--tile-size", "5000")
    assert rc == 2 and "more than 4x the larger side" in one_error_line(err) and "791 px" in err
    assert not (tmp_path / "o.gpkg").exists()


def test_overwrite_onto_a_directory(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "dir.gpkg"
    out.mkdir()
    rc, err = run_main(capsys, "caption", geotiff_path("RGB.byte.tif"), "-o", out, "--model", tiny_model_dir,
                       "--overwrite")
    assert rc == 2
    assert one_error_line(err) == f"rscaption: error: {out} is a directory; give a .gpkg file path for the output"
    assert out.is_dir()


def edit(path, *statements):
    """Damage a copy with plain SQL (the R-tree triggers need the ST_ functions GDAL would give)."""
    con = sqlite3.connect(path)
    register_functions(con)
    for sql in statements:
        con.execute(*sql) if isinstance(sql, tuple) else con.execute(sql)
    con.commit()
    con.close()


def set_meta(path, key, raw_json):
    edit(path, ("UPDATE rscaption_metadata SET value = ? WHERE key = ?", (raw_json, key)))


@pytest.mark.parametrize("key, raw, said", [
    ("model", None, "metadata 'model' must be an object, got null"),
    ("model", json.dumps("tiny"), "metadata 'model' must be an object, got a string"),
    ("source_raster", json.dumps([1, 2]), "metadata 'source_raster' must be an object, got a list"),
    ("tiling_params", json.dumps(3), "metadata 'tiling_params' must be an object, got int"),
    ("rscaption_format", json.dumps("1"), "metadata 'rscaption_format' must be an integer, got a string"),
    ("embed_dim", json.dumps(None), "metadata 'embed_dim' must be a positive integer, got None"),
    ("model", "{not json", "metadata 'model' is not valid JSON"),
])
def test_resume_onto_wrong_metadata_types(tmp_path, capsys, tiny_model_dir, good_gpkg, key, raw, said):
    out = copy_of(good_gpkg, tmp_path)
    set_meta(out, key, raw)
    with pytest.raises(StoreError, match=f"^{out}: {said}$"):
        TileStore.open(out)
    rc, err = run_main(capsys, "caption", geotiff_path("RGB.byte.tif"), "-o", out, "--model", tiny_model_dir,
                       "--tile-size", "256")
    assert rc == 2 and one_error_line(err) == f"rscaption: error: {out}: {said}"


def test_store_with_a_foreign_embedding_size_is_refused(tmp_path, good_gpkg):
    out = copy_of(good_gpkg, tmp_path)
    edit(out, "UPDATE rscaption_embeddings SET embedding = zeroblob(4 * 7)")
    with pytest.raises(StoreError, match="its embeddings have 7 values but the metadata says embed_dim 32"):
        TileStore.open(out)


# -- search -----------------------------------------------------------------------------------------
def test_search_with_another_models_embedding_size(tmp_path, capsys, good_gpkg):
    """A file whose vectors (and declared size) come from another model, searched with ours."""
    out = copy_of(good_gpkg, tmp_path)
    edit(out, "UPDATE rscaption_embeddings SET embedding = zeroblob(4 * 16)",
         "UPDATE rscaption_metadata SET value = '16' WHERE key = 'embed_dim'",
         "UPDATE rscaption_metadata SET value = json_set(value, '$.hash', NULL) WHERE key = 'model'")
    rc, err = run_main(capsys, "search", out, "houses")
    assert rc == 2
    line = one_error_line(err)
    assert line.startswith(f"rscaption: error: {out} holds 16-d embeddings but model ") and "makes 32-d" in line


def test_search_with_null_row_and_col(tmp_path, capsys, good_gpkg):
    out = copy_of(good_gpkg, tmp_path)
    edit(out, 'UPDATE tiles SET "row" = NULL, "col" = NULL')
    stdout = []
    rc, _ = run_main(capsys, "search", out, "houses", "-k", "2", "--json", out=stdout)
    assert rc == 0
    hits = json.loads(stdout[0])
    assert [(h["row"], h["col"]) for h in hits] == [(-1, -1), (-1, -1)]


def corrupt(path, table=None):
    """Scramble every page but the header one, or only the root page of ``table`` (the file then
    opens and its metadata reads fine; the damage shows when the tiles are read)."""
    con = sqlite3.connect(path)
    page = con.execute("PRAGMA page_size").fetchone()[0]
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    con.close()
    data = bytearray(open(path, "rb").read())
    start, end = ((root[0] - 1) * page, root[0] * page) if table else (page, len(data))
    for i in range(start, end):
        data[i] = (i * 7919) % 251
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("table", [None, "tiles"])
def test_search_on_a_corrupted_geopackage(tmp_path, capsys, good_gpkg, table):
    out = copy_of(good_gpkg, tmp_path)
    corrupt(out, table)
    rc, err = run_main(capsys, "search", out, "houses")
    assert rc == 2
    line = one_error_line(err)
    if table:
        assert line == f"rscaption: error: cannot read {out}: the file is damaged (database disk image is malformed)"
    else:
        assert line.startswith(f"rscaption: error: {out} is not an rscaption GeoPackage or is damaged (")


# -- argument errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, said", [
    (["caption", "a.tif", "-o", "b.gpkg", "--tile-size", "0"],
     "rscaption caption: error: argument --tile-size: must be a positive integer, got 0 "
     "(see rscaption caption --help)"),
    (["caption", "a.tif"], "rscaption caption: error: the following arguments are required: -o/--output "
                           "(see rscaption caption --help)"),
    (["search", "x.gpkg"], "rscaption search: error: the following arguments are required: query or --queries FILE "
                           "(see rscaption search --help)"),
    (["fly"], None),
])
def test_argument_errors_are_one_line(capsys, argv, said):
    rc, err = run_main(capsys, *argv)
    line = one_error_line(err)
    assert rc == 2
    if said:
        assert line == said
    else:
        assert line.startswith("rscaption: error: argument COMMAND: invalid choice: 'fly'")
        assert line.endswith("(see rscaption --help)")


def test_console_script_prints_one_line_for_an_argument_error():
    r = subprocess.run([sys.executable, "-m", "rscaption.cli", "caption", "--overlap", "x"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "rscaption caption: error: argument --overlap: expected a whole number from 0 to 8,191, got 'x' "
        "(see rscaption caption --help)"]

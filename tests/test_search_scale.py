"""Search at scale (issue 12, part 2): several queries in one load, filters applied before ranking,
the float16 matrix kept in memory and inside the file, all checked against a float32 brute force
over the raw sqlite rows. Files are small; the speed figures live in `make bench`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import numpy as np
from pathlib import Path
import pytest

from test_plugin_support import ROOT
from test_worker import Worker

from rscaption.search import matrix as search_matrix
from rscaption.cli import main as cli_main
from rscaption.errors import StoreError
from rscaption.store.gpkg import TileStore
from rscaption.protocol import ProtocolError, parse_request
from rscaption.search.query import search_queries, search_store
from rscaption.bench.synthetic_store import WORDS, write_synthetic_store

QUERIES = ["a river", "dense residential area", "a parking lot"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from rscaption.models.registry import load_model

    return load_model(tiny_model_dir, device="cpu")


def synthetic(path, tiny, n=600, noise=0.08, seed=0, centres=None):
    centres = tiny.embed_texts(list(WORDS)) if centres is None else centres
    return write_synthetic_store(path, n, tiny.embed_dim, {"id": tiny.model_id, "hash": tiny.model_hash},
                                 centres=centres, seed=seed, noise=noise, chunk=128)


@pytest.fixture(scope="module")
def store(tiny, tmp_path_factory):
    return Path(synthetic(tmp_path_factory.mktemp("scale") / "s.gpkg", tiny))


def brute_force(path, q: np.ndarray, k: int, keep=None) -> list[tuple[int, float]]:
    """Reference ranking straight from sqlite: the float32 vectors' dot products (in float64), ties by tile_id."""
    con = sqlite3.connect(str(path))
    try:
        rows = con.execute("SELECT e.tile_id, e.embedding FROM rscaption_embeddings e "
                           "WHERE e.tile_id IN (SELECT tile_id FROM tiles) ORDER BY e.tile_id").fetchall()
    finally:
        con.close()
    ids = np.array([r[0] for r in rows])
    emb = np.stack([np.frombuffer(r[1], dtype="<f4") for r in rows]).astype(np.float64)
    scores = emb @ q.astype(np.float32).astype(np.float64)
    order = [i for i in np.lexsort((ids, -scores)) if keep is None or int(ids[i]) in keep][:k]
    return [(int(ids[i]), float(scores[i])) for i in order]


def pairs(hits):
    return [(h.tile_id, h.score) for h in hits]


def column(path, sql) -> dict:
    con = sqlite3.connect(str(path))
    try:
        return dict(con.execute(sql).fetchall())
    finally:
        con.close()


def edit(path, sql, params=()):
    """An attribute edit as QGIS would make it (the R-tree triggers need the ST_* functions)."""
    from rscaption.store.gpkg_sql import register_functions

    con = sqlite3.connect(str(path))
    register_functions(con)
    try:
        con.execute(sql, params)
        con.commit()
    finally:
        con.close()


def assert_same(hits, want):
    assert [h.tile_id for h in hits] == [t for t, _ in want]
    assert [h.score for h in hits] == pytest.approx([s for _, s in want], abs=1e-6)


# -- several queries, exact ranking ---------------------------------------------------------------------
def test_several_queries_equal_separate_searches_and_the_float32_brute_force(store, tiny):
    together = search_queries(str(store), QUERIES, k=7, model=tiny)
    search_matrix.forget()
    alone = [search_store(str(store), q, k=7, model=tiny) for q in QUERIES]
    assert [pairs(h) for h in together] == [pairs(h) for h in alone]
    for q, hits in zip(tiny.embed_texts(QUERIES), together):
        assert_same(hits, brute_force(store, q, 7))
        assert all(h.caption.startswith("an aerial image of a ") and h.confidence is not None for h in hits)


def test_near_ties_rank_exactly_like_float32(tiny, tmp_path):
    """Rows a hair apart in float32 are equal in float16; the finalists are re-scored from the
    stored float32 vectors, so the order and the scores are the exact ones."""
    q = tiny.embed_texts(["a river"])
    path = synthetic(tmp_path / "ties.gpkg", tiny, n=500, noise=3e-3, centres=q)
    approx = search_matrix.load_matrix(path, tiny.embed_dim).approx_scores(q)[0]
    want = brute_force(path, q[0], 20)
    assert len(np.unique(approx)) < 0.5 * len(approx)  # float16 alone could not order these
    assert_same(search_store(path, "a river", k=20, model=tiny), want)


# -- filters before ranking -----------------------------------------------------------------------------
def test_where_filter_applies_before_ranking(store, tiny, tmp_path):
    path = tmp_path / "where.gpkg"
    path.write_bytes(store.read_bytes())
    q = tiny.embed_texts(["a river"])[0]
    best = brute_force(path, q, 1)[0][0]
    edit(path, "UPDATE tiles SET confidence = 0.01 WHERE tile_id = ?", (best,))
    conf = column(path, "SELECT tile_id, confidence FROM tiles")
    keep = {t for t, c in conf.items() if c >= 0.5}
    hits = search_store(str(path), "a river", k=10, model=tiny, where="confidence >= 0.5")
    assert best not in [h.tile_id for h in hits] and len(hits) == 10
    assert_same(hits, brute_force(path, q, 10, keep))
    # --min-confidence is the same filter
    assert pairs(search_store(str(path), "a river", k=10, model=tiny, min_confidence=0.5)) == pairs(hits)
    # text filters, and both together
    caps = column(path, "SELECT tile_id, caption FROM tiles")
    river = {t for t, c in caps.items() if "river" in c}
    hits = search_store(str(path), "a lake", k=5, model=tiny, where="caption LIKE '%river%'", min_confidence=0.5)
    assert_same(hits, brute_force(path, tiny.embed_texts(["a lake"])[0], 5, river & keep))


def test_bbox_filter_keeps_only_intersecting_tiles(store, tiny):
    q = tiny.embed_texts(["a parking lot"])[0]
    best = brute_force(store, q, 1)[0][0]
    with TileStore.open(store) as s:
        tiles = s.tiles()
    bounds = {t["tile_id"]: t["bounds"] for t in tiles}
    col = {t["tile_id"]: t["col"] for t in tiles}
    x0, top = min(b[0] for b in bounds.values()), max(b[3] for b in bounds.values())
    w = bounds[best][2] - bounds[best][0]
    c0 = 2 if col[best] >= 12 else 16  # three columns far from the best tile's, ten rows down from the top
    box = (x0 + (c0 + 0.25) * w, top - 9.5 * w, x0 + (c0 + 2.75) * w, top - 0.25 * w)
    inside = {t for t, b in bounds.items() if b[0] <= box[2] and b[2] >= box[0] and b[1] <= box[3] and b[3] >= box[1]}
    assert best not in inside and len(inside) == 30
    hits = search_store(str(store), "a parking lot", k=10, model=tiny, bbox=box)
    assert_same(hits, brute_force(store, q, 10, inside))
    assert len(hits) == min(10, len(inside))
    assert search_store(str(store), "a parking lot", k=3, model=tiny, bbox=(0, 0, 1, 1)) == []


@pytest.mark.parametrize("where, fragment", [
    ("nosuch > 1", "no such column: nosuch"),
    ("confidence >=", "syntax error"),
    ("confidence > 0; DROP TABLE tiles", "syntax error"),
    ("(SELECT count(*) FROM rscaption_metadata) > 0", "may only read the tiles layer"),
])
def test_bad_where_is_one_line_naming_the_expression(store, tiny, where, fragment):
    with pytest.raises(StoreError) as err:
        search_store(str(store), "a river", model=tiny, where=where)
    text = str(err.value)
    assert "\n" not in text and repr(where) in text and fragment in text
    assert column(store, "SELECT 1, count(*) FROM tiles") == {1: 600}  # nothing was dropped


def test_bad_where_and_bbox_through_the_cli(store, tiny_model_dir, capsys):
    rc = cli_main(["search", str(store), "a river", "--model", tiny_model_dir, "--where", "caption LIKE"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "bad --where expression 'caption LIKE'" in err
    rc = cli_main(["search", str(store), "a river", "--model", tiny_model_dir, "--bbox", "5", "0", "1", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "is empty" in err


# -- --queries files --------------------------------------------------------------------------------------
def test_queries_file_groups_output_per_query(store, tiny, tiny_model_dir, tmp_path, capsys):
    qfile = tmp_path / "q.txt"
    qfile.write_text("a river\n\n   dense residential area  \na parking lot\n", encoding="utf-8")
    assert cli_main(["search", str(store), "--queries", str(qfile), "-k", "4", "--json",
                     "--model", tiny_model_dir, "--where", "confidence >= 0.2"]) == 0
    grouped = json.loads(capsys.readouterr().out)
    assert [g["query"] for g in grouped] == QUERIES
    for g in grouped:
        single = search_store(str(store), g["query"], k=4, model=tiny, where="confidence >= 0.2")
        assert [(h["tile_id"], h["score"]) for h in g["hits"]] == pairs(single)
    # text output: one headed table per query; a positional query comes first
    assert cli_main(["search", str(store), "forest", "--queries", str(qfile), "-k", "2", "--model", tiny_model_dir]) == 0
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if line.startswith("query ")]
    assert heads == ["query 1: forest  (2 hits)", "query 2: a river  (2 hits)",
                     "query 3: dense residential area  (2 hits)", "query 4: a parking lot  (2 hits)"]


def test_queries_file_errors_are_one_line(store, tiny_model_dir, tmp_path, capsys):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n", encoding="utf-8")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81 river")
    cases = [(["--queries", str(tmp_path / "missing.txt")], "queries file not found"),
             (["--queries", str(blank)], "has no queries"),
             (["--queries", str(tmp_path)], "is a directory"),
             (["--queries", str(binary)], "is not UTF-8"),
             ([], "the following arguments are required: query or --queries FILE")]
    for extra, fragment in cases:
        try:
            rc = cli_main(["search", str(store), *extra, "--model", tiny_model_dir])
        except SystemExit as exc:  # argparse's own one-line error
            rc = exc.code
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and fragment in err, (extra, err)


# -- the matrix: kept while the file is unchanged, reloaded when it changes ------------------------------
def test_warm_matrix_is_reused_and_invalidated_by_a_resume(tiny, geotiff, tmp_path):
    from rscaption.engine.pipeline import caption_raster
    from rscaption.raster.tiling import TilingParams

    raster, out = str(geotiff("RGB.byte.tif")), str(tmp_path / "resume.gpkg")
    params, calls = TilingParams(tile_size=128), {"n": 0}

    def cancel_after_two_batches():
        calls["n"] += 1
        return calls["n"] > 2

    first = caption_raster(raster, out, model=tiny, tiling=params, batch_size=4, should_cancel=cancel_after_two_batches)
    assert first.cancelled
    q = tiny.embed_texts(["a river"])[0]
    assert_same(search_store(out, "a river", k=50, model=tiny), brute_force(out, q, 50))
    m1 = search_matrix.load_matrix(out, tiny.embed_dim)
    assert m1.rows == first.written and search_matrix.load_matrix(out, tiny.embed_dim) is m1  # warm
    # an attribute edit keeps the rows but not the filter masks
    search_store(out, "a river", model=tiny, where="confidence >= 0.5")
    edit(out, "UPDATE tiles SET confidence = 0.99")
    hits = search_store(out, "a river", k=50, model=tiny, where="confidence >= 0.5")
    assert search_matrix.load_matrix(out, tiny.embed_dim) is m1 and len(hits) == first.written
    second = caption_raster(raster, out, model=tiny, tiling=params, batch_size=4)  # resume adds tiles
    assert second.written > 0
    hits = search_store(out, "a river", k=50, model=tiny)
    m2 = search_matrix.load_matrix(out, tiny.embed_dim)
    assert m2 is not m1 and m2.rows == first.written + second.written
    assert_same(hits, brute_force(out, q, 50))


def test_stored_matrix_copy_is_used_and_ignored_when_stale(tiny, tmp_path):
    path = synthetic(tmp_path / "copy.gpkg", tiny, n=300)
    q = tiny.embed_texts(["a river"])[0]
    search_matrix.refresh_stored_matrix(path, tiny.embed_dim)
    search_matrix.forget()
    m = search_matrix.load_matrix(path, tiny.embed_dim)
    assert m.source == "stored copy" and m.rows == 300
    assert_same(search_store(path, "a river", k=5, model=tiny), brute_force(path, q, 5))
    with TileStore.open(path) as s:  # the file stays a valid, undamaged rscaption GeoPackage
        assert s.damaged() == [] and s.count() == 300
        gone = sorted(t["tile_id"] for t in s.tiles())[:40]
    assert cli_main(["check", path]) == 0
    con = sqlite3.connect(path)  # features deleted in QGIS: their tiles must not come back
    con.executemany("DELETE FROM tiles WHERE tile_id = ?", [(t,) for t in gone])
    con.commit()
    con.close()
    search_matrix.forget()
    m = search_matrix.load_matrix(path, tiny.embed_dim, persist_min_rows=0, quiet_s=0)
    assert m.source == "embeddings" and m.rows == 260 and m.stored  # rebuilt and written back
    hits = search_store(path, "a river", k=300, model=tiny)
    assert not {h.tile_id for h in hits} & set(gone)
    assert_same(hits, brute_force(path, q, 300))
    search_matrix.forget()
    assert search_matrix.load_matrix(path, tiny.embed_dim).source == "stored copy"


# -- the worker -------------------------------------------------------------------------------------------
def test_protocol_search_requests():
    req = parse_request('{"cmd": "search", "gpkg": "a", "queries": ["x", "y"], "bbox": [0, 0, 1, 1], '
                        '"where": "confidence > 0.5"}')
    assert req["queries"] == ["x", "y"]
    for line, fragment in [('{"cmd": "search", "gpkg": "a"}', "missing 'query'"),
                           ('{"cmd": "search", "gpkg": "a", "queries": []}', "non-empty list"),
                           ('{"cmd": "search", "gpkg": "a", "query": "q", "bbox": [0, 0, 1]}', "bbox"),
                           ('{"cmd": "search", "gpkg": "a", "query": "q", "bbox": [2, 0, 1, 1]}', "empty"),
                           ('{"cmd": "search", "gpkg": "a", "query": "q", "where": 3}', "'where' must be str")]:
        with pytest.raises(ProtocolError, match=fragment):
            parse_request(line)


def test_worker_search_with_filters_and_several_queries(store, tiny, tiny_model_dir, tmp_path):
    path = tmp_path / "worker.gpkg"
    path.write_bytes(store.read_bytes())
    with TileStore.open(path) as s:
        b = s.tiles()[0]["bounds"]
    box = [b[0], b[1], b[0] + 10 * (b[2] - b[0]), b[3]]
    w = Worker()
    try:
        w.until(lambda m: m["type"] == "hello")
        w.send("search", gpkg=str(path), queries=QUERIES, k=5, where="confidence >= 0.3", bbox=box,
               model=tiny_model_dir)
        res, _ = w.until(lambda m: m["type"] in ("result", "error"))
        assert res["type"] == "result", res
        assert [r["query"] for r in res["results"]] == QUERIES
        for r in res["results"]:
            want = search_store(str(path), r["query"], k=5, model=tiny, where="confidence >= 0.3", bbox=box)
            assert [h["tile_id"] for h in r["hits"]] == [h.tile_id for h in want]
            assert [h["score"] for h in r["hits"]] == pytest.approx([h.score for h in want])
        w.until(lambda m: m["type"] == "done")
        # the worker keeps the matrix; an attribute edited afterwards is seen by the next request
        edit(path, "UPDATE tiles SET confidence = 0.0 WHERE tile_id = ?", (want[0].tile_id,))
        w.send("search", gpkg=str(path), query=QUERIES[-1], k=5, where="confidence >= 0.3", bbox=box,
               model=tiny_model_dir)
        res, _ = w.until(lambda m: m["type"] in ("result", "error"))
        assert want[0].tile_id not in [h["tile_id"] for h in res["hits"]] and len(res["hits"]) == 5
        w.until(lambda m: m["type"] == "done")
        w.send("search", gpkg=str(path), query="x", where="nosuch = 1", model=tiny_model_dir)
        err, _ = w.until(lambda m: m["type"] == "error")
        assert err["kind"] == "user" and "bad --where expression 'nosuch = 1'" in err["message"]
        w.send("shutdown")
        assert w.proc.wait(30) == 0
    finally:
        if w.proc.poll() is None:
            w.proc.kill()


def test_search_cli_still_prints_a_plain_list_for_one_query(store, tiny_model_dir):
    out = subprocess.run([sys.executable, "-m", "rscaption.cli", "search", str(store), "a river", "-k", "3",
                          "--json", "--model", tiny_model_dir], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "backend")})
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)
    assert isinstance(hits, list) and len(hits) == 3 and set(hits[0]) >= {"tile_id", "score", "caption"}


# -- the text tower alone ----------------------------------------------------------------------------------
def test_text_tower_alone_gives_the_full_models_vectors_and_hash(tiny_model_dir):
    from rscaption.models.registry import load_model
    from rscaption.models.text_query import load_text_query_model

    texts = ["a river with green banks", "dense residential area", "x", "a very long caption " * 40,
             "Ünïcode   spaces\tand CAPS!"]
    alone = load_text_query_model("default")
    full = load_model("default", device="cpu")
    assert alone.model_hash == full.model_hash and alone.model_id == full.model_id == "default"
    want = np.concatenate([full.embed_texts([t]) for t in texts])
    assert np.abs(alone.embed_texts(texts) - want).max() < 1e-5
    assert load_text_query_model(tiny_model_dir) is None  # an open_clip checkpoint: the full model is used


def test_cold_search_loads_neither_the_image_tower_nor_transformers(tmp_path):
    from rscaption.models.text_query import load_text_query_model
    from rscaption.bench.synthetic_store import write_synthetic_store

    m = load_text_query_model("default")
    path = write_synthetic_store(tmp_path / "d.gpkg", 400, m.embed_dim, {"id": "default", "hash": m.model_hash},
                                 centres=m.embed_texts(list(WORDS)), chunk=100)
    want = search_store(path, "a river", k=5, model=m)
    code = ("import json, sys\nfrom rscaption.search import search_store\n"
            f"hits = search_store({path!r}, 'a river', k=5)\n"
            "print(json.dumps([[h.tile_id, h.score] for h in hits]))\n"
            "print(json.dumps(sorted(n for n in ('timm', 'transformers', 'torchvision') if n in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "backend")})
    assert out.returncode == 0, out.stderr
    hits, loaded = (json.loads(line) for line in out.stdout.splitlines()[-2:])
    assert [t for t, _ in hits] == [h.tile_id for h in want] and "river" in want[0].caption
    assert loaded == []
    # only search asks for the text tower: `rscaption check --repair` still gets a captioner
    from rscaption.search.query import model_for_store

    with TileStore.open(path) as store:
        assert not model_for_store(store, text_only=True).can_caption
        assert model_for_store(store).can_caption

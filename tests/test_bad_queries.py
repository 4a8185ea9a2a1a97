"""Search queries a user (or an attacker) may type (issue 11): empty, 100 KB, any script, control
characters, SQL. Each is ranked like any text or refused in one line, and the GeoPackage is byte for
byte what it was: the query is only ever embedded, never put into SQL."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest

from test_bad_inputs import one_error_line, run_main
from test_bad_rasters import write_raster


@pytest.fixture(scope="module")
def gpkg(tmp_path_factory, tiny_model_dir):
    from rscaption.engine.pipeline import caption_raster
    from rscaption.raster.tiling import TilingParams

    d = tmp_path_factory.mktemp("queries")
    out = d / "q.gpkg"
    caption_raster(str(write_raster(d / "r.tif", width=128, height=128)), str(out), model=tiny_model_dir,
                   tiling=TilingParams(tile_size=32))
    return out


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("query", ["", "   ", "\n\t "])
def test_empty_query_is_one_line(gpkg, capsys, query):
    rc, err = run_main(capsys, "search", gpkg, query)
    # "" reaches the CLI's own check (with --queries FILE a query may be left out), blanks the search's
    assert rc == 2 and one_error_line(err) in ("rscaption: error: the search query is empty",
                                               "rscaption search: error: the following arguments are required: "
                                               "query or --queries FILE (see rscaption search --help)")


@pytest.mark.parametrize("query", [
    "farmland next to a river " * 4000,                        # 100 KB: longer than any text tower reads
    "机场附近停着几架飞机",                                      # Chinese
    "Überführung über den Fluss, été, ñandú, ελιές, пашня",    # accents, Greek, Cyrillic
    "مزرعة قرب النهر ✈️🛩️ 🌾",                                   # right-to-left script and emoji
    "a\x00b\x1b[31m\u202e\ufeff",                               # NUL, an ANSI escape, bidi override, BOM
    "'; DROP TABLE tiles; --",
    "x\" OR 1=1; DELETE FROM rscaption_embeddings; --",
    "%' UNION SELECT key, value FROM rscaption_metadata --",
])
def test_odd_queries_rank_and_leave_the_file_untouched(gpkg, capsys, query):
    before = digest(gpkg)
    stdout = []
    rc, err = run_main(capsys, "search", gpkg, query, "-k", "3", "--json", out=stdout)
    assert rc == 0 and "Traceback" not in err
    hits = json.loads(stdout[0])
    assert len(hits) == 3 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert all(h["caption"] for h in hits)
    assert digest(gpkg) == before
    con = sqlite3.connect(gpkg)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT count(*) FROM tiles").fetchone()[0] == 16
        assert con.execute("SELECT count(*) FROM rscaption_embeddings").fetchone()[0] == 16
    finally:
        con.close()


def test_sql_like_query_ranks_like_the_same_words(gpkg, capsys):
    """The SQL text is just words to the text tower: ranking it twice gives the same order."""
    out1, out2 = [], []
    run_main(capsys, "search", gpkg, "'; DROP TABLE tiles; --", "-k", "16", "--json", out=out1)
    run_main(capsys, "search", gpkg, "'; DROP TABLE tiles; --", "-k", "16", "--json", out=out2)
    assert [h["tile_id"] for h in json.loads(out1[0])] == [h["tile_id"] for h in json.loads(out2[0])]
    assert sorted(h["tile_id"] for h in json.loads(out1[0])) == list(range(16))

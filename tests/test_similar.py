"""Find similar tiles (issue 10): rank a GeoPackage's tiles by likeness to one of its tiles, from the
stored image embeddings only (no model load), through the function, the CLI and the worker."""

from __future__ import annotations

import io
import json
import sqlite3

import numpy as np
import pytest

from test_plugin_support import tiny_model_dir

from rscaption.cli import main as cli_main
from rscaption.errors import StoreError
from rscaption.search.similar import similar


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    from rscaption.engine.pipeline import caption_raster
    from rscaption.raster.tiling import TilingParams

    from conftest import geotiff_path

    tiny = tiny_model_dir(tmp_path_factory)
    out = tmp_path_factory.mktemp("similar") / "tiles.gpkg"
    caption_raster(str(geotiff_path("RGB.byte.tif")), str(out), model=tiny, tiling=TilingParams(tile_size=128),
                   batch_size=8)
    return out


def _raw_embeddings(path) -> dict[int, np.ndarray]:
    """Read the vectors with sqlite3 directly, not through TileStore, as an independent reference."""
    con = sqlite3.connect(str(path))
    try:
        rows = con.execute("SELECT tile_id, embedding FROM rscaption_embeddings").fetchall()
    finally:
        con.close()
    return {int(t): np.frombuffer(blob, dtype="<f4").astype(np.float64) for t, blob in rows}


def test_ranks_other_tiles_by_cosine_of_the_stored_embeddings(captioned):
    vecs = _raw_embeddings(captioned)
    query = sorted(vecs)[len(vecs) // 2]
    q = vecs[query] / np.linalg.norm(vecs[query])
    cosine = {t: float(v @ q / np.linalg.norm(v)) for t, v in vecs.items() if t != query}
    hits = similar(str(captioned), query, k=5)
    assert len(hits) == 5
    assert query not in [h.tile_id for h in hits]  # the query tile is excluded
    want = sorted(cosine, key=lambda t: (-cosine[t], t))[:5]
    assert [h.tile_id for h in hits] == want
    assert [h.score for h in hits] == pytest.approx([cosine[t] for t in want], abs=1e-5)
    assert all(h.caption and h.row >= 0 and h.col >= 0 for h in hits)
    # k larger than the layer: every other tile, once
    everything = similar(str(captioned), query, k=10_000)
    assert sorted(h.tile_id for h in everything) == sorted(cosine)


def test_min_confidence_filters_before_ranking(captioned):
    vecs = _raw_embeddings(captioned)
    query = min(vecs)
    con = sqlite3.connect(str(captioned))
    conf = dict(con.execute("SELECT tile_id, confidence FROM tiles").fetchall())
    con.close()
    cut = float(np.median([c for t, c in conf.items() if t != query]))
    hits = similar(str(captioned), query, k=10_000, min_confidence=cut)
    assert {h.tile_id for h in hits} == {t for t, c in conf.items() if t != query and c >= cut}


def test_unknown_tile_and_missing_file_are_one_line_errors(captioned, tmp_path):
    with pytest.raises(StoreError, match=r"tile 99999 is not in .*tile ids run \d+\.\.\d+"):
        similar(str(captioned), 99999)
    with pytest.raises(StoreError, match="does not exist"):
        similar(str(tmp_path / "nope.gpkg"), 1)


def test_cli_similar_json_and_table(captioned, capsys):
    assert cli_main(["similar", str(captioned), "3", "-k", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["tile_id"] for r in rows] == [h.tile_id for h in similar(str(captioned), 3, k=4)]
    assert cli_main(["similar", str(captioned), "3", "-k", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "tiles like tile 3" in table[0] and len(table) == 3
    assert cli_main(["similar", str(captioned), "424242"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rscaption: error: tile 424242 is not in") and "\n" not in err


def test_worker_answers_similar_without_loading_a_model(captioned):
    from rscaption.protocol import encode_request, parse_message
    from rscaption.worker import Worker, _Writer

    stdin = io.StringIO(encode_request("similar", gpkg=str(captioned), tile_id=3, k=4)
                        + encode_request("similar", gpkg=str(captioned), tile_id=424242))
    out = io.StringIO()
    worker = Worker(stdin, _Writer(out), heartbeat_s=60)
    assert worker.run() == 0
    msgs = [parse_message(line) for line in out.getvalue().splitlines()]
    results = [m for m in msgs if m["type"] == "result"]
    assert [h["tile_id"] for h in results[0]["hits"]] == [h.tile_id for h in similar(str(captioned), 3, k=4)]
    assert [m["type"] for m in msgs if m["type"] in ("done", "error")] == ["done", "error"]
    assert "tile 424242 is not in" in [m for m in msgs if m["type"] == "error"][0]["message"]
    assert worker._models == {}  # no model was loaded for it


@pytest.mark.parametrize("line, fragment", [
    ('{"cmd": "similar", "gpkg": "a.gpkg"}', "missing 'tile_id'"),
    ('{"cmd": "similar", "gpkg": "a.gpkg", "tile_id": "7"}', "'tile_id' must be int"),
    ('{"cmd": "similar", "gpkg": "a.gpkg", "tile_id": 7, "k": 0}', "'similar' request: 'k' must be at least 1"),
    ('{"cmd": "similar", "gpkg": "a.gpkg", "tile_id": 7, "min_confidence": 2}', "between 0 and 1"),
])
def test_bad_similar_requests_are_rejected_with_a_reason(line, fragment):
    from rscaption.protocol import ProtocolError, parse_request

    with pytest.raises(ProtocolError, match=fragment):
        parse_request(line)

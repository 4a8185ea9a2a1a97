"""`make bench`, search section: text search over 10^4, 10^5 and 10^6 stored tiles.

What is measured, per size, with the default model:

- warm: per-query latency in a process that already holds the model and the file's matrix (the
  worker, the plugin's in-process backend, the Python API), unfiltered and with a ``--where``
  filter (first use of the filter, then again); the time spent ranking alone;
- cold: ``rscaption search`` as a fresh subprocess (interpreter, torch, model, matrix from the
  copy inside the file), one query and a ten-query ``--queries`` file; its peak RSS;
- loading the matrix from the embeddings table (the first search after a run, before the copy
  exists) and from the copy;
- the previous search path (every row into Python dicts, float32 ranking) as the reference ratio,
  where it finishes in reasonable time (10^4, 10^5).

Wall times on a shared machine are inflated by whatever else runs, so CPU times are reported
beside them (this process's, all threads; a child's user + system): roughly what an idle machine
shows as wall time for the single-threaded parts.

The GeoPackages are synthetic (:mod:`rscaption.bench.synthetic_store`: real schema, embeddings drawn
around the default model's text embeddings of a few scene words) and cached under
``out/bench_cache`` (``RSCAPTION_BENCH_CACHE``), so only the first ``make bench`` pays for
writing 10^6 tiles (about a minute on 2 cores). ``BENCH_SEARCH_SIZES=10000,100000`` limits sizes.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
SIZES = (10_000, 100_000, 1_000_000)
GENERATOR_VERSION = 1
OLD_PATH_MAX = 100_000
QUERIES = ["a river with green banks", "dense residential area", "a parking lot with many cars",
           "an airport runway", "farmland with square fields", "a beach next to the sea", "a dense forest",
           "an industrial area with storage tanks", "a bridge over a river", "a golf course"]


def cache_dir() -> Path:
    path = Path(os.environ.get("RSCAPTION_BENCH_CACHE") or ROOT / "out" / "bench_cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def bench_file(n: int, cap) -> tuple[Path, float | None]:
    """The cached synthetic file for ``n`` tiles (written now if missing): path, seconds to write."""
    from ..search.matrix import refresh_stored_matrix
    from .synthetic_store import WORDS, write_synthetic_store

    path = cache_dir() / f"search-{n}-{cap.model_hash[:12]}-v{GENERATOR_VERSION}.gpkg"
    if path.exists():
        return path, None
    t0 = time.perf_counter()
    tmp = path.with_suffix(".partial.gpkg")
    write_synthetic_store(tmp, n, cap.embed_dim, {"id": cap.model_id, "hash": cap.model_hash},
                          centres=cap.embed_texts(list(WORDS)), seed=n)
    refresh_stored_matrix(tmp, cap.embed_dim)  # what a finished run leaves: the copy inside the file
    os.replace(tmp, path)
    return path, time.perf_counter() - t0


def _timed(fn, repeat: int, cpu: list | None = None) -> list[float]:
    """Wall seconds per call; ``cpu`` collects this process's CPU seconds per call (all threads):
    on a shared machine the CPU time is what an idle one would show as wall time, roughly."""
    out = []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
    return out


def _ms(values) -> float:
    return round(1000 * statistics.median(values), 1)


def old_search(path, q: np.ndarray, k: int = 10):
    """The previous implementation's work per query (model already loaded): all embeddings, all
    tile rows as dicts, float32 ranking."""
    from ..store.gpkg import TileStore
    from ..search.query import rank

    with TileStore.open(path) as store:
        ids, emb = store.embeddings()
        attrs = {t["tile_id"]: t for t in store.tiles()}
        order, _ = rank(q, emb, k)
        return [attrs[int(ids[i])]["caption"] for i in order]


def warm(path: Path, cap, n: int) -> dict:
    from ..search import matrix as search_matrix
    from ..search.query import search_store, search_threads

    search_matrix.forget()
    t0 = time.perf_counter()
    m = search_matrix.load_matrix(path, cap.embed_dim, use_cache=False)
    from_copy = time.perf_counter() - t0
    assert m.source == "stored copy", m.source
    del m
    conn = search_matrix.connect_ro(path)
    t0 = time.perf_counter()
    rows = search_matrix.stream_embeddings(conn, str(path), cap.embed_dim)
    from_table = time.perf_counter() - t0
    conn.close()
    del rows
    search_store(str(path), QUERIES[0], model=cap)  # loads the matrix into the process cache
    cpu_query, cpu_rank = [], []
    per_query = _timed(lambda: [search_store(str(path), q, model=cap) for q in QUERIES], 3, cpu_query)
    per_query = [t / len(QUERIES) for t in per_query]
    cpu_query = [t / len(QUERIES) for t in cpu_query]
    matrix = search_matrix.load_matrix(path, cap.embed_dim)
    qv = np.concatenate([cap.embed_texts([q]) for q in QUERIES])
    ranking = _timed(lambda: matrix.approx_scores(qv[:1]), 10, cpu_rank)
    batch = _timed(lambda: matrix.approx_scores(qv), 3)
    where = "confidence >= 0.5"
    t0 = time.perf_counter()
    search_store(str(path), QUERIES[1], model=cap, where=where)
    first_filter = time.perf_counter() - t0
    filtered = _timed(lambda: search_store(str(path), QUERIES[2], model=cap, where=where), 5)
    with search_threads():
        embed = _timed(lambda: cap.embed_texts([QUERIES[3]]), 10)
    res = {"tiles": n, "matrix_mb": round(matrix.vectors.nbytes / 2**20, 1),
           "load_from_copy_s": round(from_copy, 2), "load_from_embeddings_s": round(from_table, 2),
           "warm_query_ms": _ms(per_query), "warm_query_min_ms": round(1000 * min(per_query), 1),
           "warm_query_cpu_ms": _ms(cpu_query), "ranking_cpu_ms": _ms(cpu_rank),
           "text_embedding_ms": _ms(embed), "ranking_ms": _ms(ranking),
           "ranking_10_queries_ms": _ms(batch), "where_first_ms": round(1000 * first_filter, 1),
           "where_again_ms": _ms(filtered)}
    if n <= OLD_PATH_MAX:
        old = _timed(lambda: old_search(path, qv[0]), 2 if n > 10_000 else 5)
        res["old_path_ms"] = _ms(old)
        res["speedup_vs_old"] = round(statistics.median(old) / (statistics.median(per_query) - statistics.median(embed)), 1)
    search_matrix.forget()
    return res


_PEAK = ("import sys\n"
         "def peak():\n"
         "    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec (it would be this bench's peak)\n"
         "    line = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
         "    sys.stderr.write('VMHWM_KB ' + line.split()[1] + '\\n')\n")
_CLI = _PEAK + "from rscaption.cli import main\nrc = main(sys.argv[1:])\npeak()\nsys.exit(rc)\n"


def _run_measured(code: str, args: list[str], env: dict) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (MB) and CPU seconds of ``python -c code args`` in a fresh process."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"search benchmark subprocess failed: {proc.stderr[-500:]}")
    kb = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("VMHWM_KB ")]
    return wall, round(kb[-1] / 1024) if kb else -1, cpu


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "backend"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cold(path: Path) -> dict:
    base = ["search", str(path)]
    one = _run_measured(_CLI, base + [QUERIES[0], "-k", "10"], _env())
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write("\n".join(QUERIES) + "\n")
    try:
        many = _run_measured(_CLI, base + ["--queries", fh.name, "-k", "10"], _env())
    finally:
        os.unlink(fh.name)
    return {"cold_cli_s": round(one[0], 2), "cold_cli_peak_mb": one[1], "cold_cli_cpu_s": round(one[2], 2),
            "cold_cli_10_queries_s": round(many[0], 2), "cold_cli_10_queries_peak_mb": many[1]}


def startup() -> dict:
    wall, peak, cpu = _run_measured(_STARTUP, [], _env())
    full = _run_measured(_STARTUP_FULL, [], _env())
    return {"model_load_only_s": round(wall, 2), "model_load_only_peak_mb": peak, "model_load_only_cpu_s": round(cpu, 2),
            "full_model_load_s": round(full[0], 2), "full_model_load_peak_mb": full[1],
            "full_model_load_cpu_s": round(full[2], 2)}


# The part of a cold call that does not depend on the file: interpreter, torch, the default model,
# one text embedding. The difference to cold_cli_s is what search itself costs cold.
_STARTUP = _PEAK + ("from rscaption.search import load_search_model\n"
                    "load_search_model('default').embed_texts(['a river'])\npeak()\n")
# the same with the whole captioner, as every search loaded it before
_STARTUP_FULL = _PEAK + ("from rscaption.models.registry import load_model\n"
                         "load_model('default', device='cpu').embed_texts(['a river'])\npeak()\n")


def bench_search_scale(cap=None) -> dict:
    import torch

    from ..device import cpu_model
    from ..models.registry import load_model

    sizes = tuple(int(s) for s in os.environ.get("BENCH_SEARCH_SIZES", "").split(",") if s.strip()) or SIZES
    if cap is None or cap.model_id != "default":  # fp32: the text tower is all search uses
        cap = load_model("default", device="cpu", precision="fp32")
    out = {"model": cap.model_id, "embed_dim": cap.embed_dim, "torch_threads": torch.get_num_threads(),
           "cpu": cpu_model(), "cores": os.cpu_count(), "load_before": [round(v, 1) for v in os.getloadavg()],
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sizes": []}
    out.update(startup())
    for n in sizes:
        path, wrote = bench_file(n, cap)
        row = {"file_mb": round(path.stat().st_size / 2**20), "generated_s": None if wrote is None else round(wrote, 1)}
        row.update(warm(path, cap, n))
        row.update(cold(path))
        out["sizes"].append(row)
    out["load_after"] = [round(v, 1) for v in os.getloadavg()]
    return out


def print_search(report: dict) -> None:
    print(f"search    {report['model']} ({report['embed_dim']}-d), {report['cores']} cores, load average "
          f"{report['load_before'][0]} -> {report['load_after'][0]}; cold start without search (interpreter, "
          f"torch, text tower, one embedding): {report['model_load_only_s']} s wall, "
          f"{report['model_load_only_cpu_s']} s CPU, {report['model_load_only_peak_mb']} MB (whole captioner: "
          f"{report['full_model_load_s']} s, {report['full_model_load_cpu_s']} s CPU, {report['full_model_load_peak_mb']} MB)")
    print(f"{'tiles':>9} {'warm ms':>8} {'(cpu)':>6} {'rank ms':>8} {'(cpu)':>6} {'where 1st/again':>16} "
          f"{'cold s':>7} {'(cpu)':>6} {'10 q s':>7} {'peak MB':>8} {'load copy/table s':>18} {'vs old':>7}")
    for r in report["sizes"]:
        print(f"{r['tiles']:>9} {r['warm_query_ms']:>8} {r['warm_query_cpu_ms']:>6} {r['ranking_ms']:>8} "
              f"{r['ranking_cpu_ms']:>6} {str(r['where_first_ms']) + ' / ' + str(r['where_again_ms']):>16} "
              f"{r['cold_cli_s']:>7} {r['cold_cli_cpu_s']:>6} {r['cold_cli_10_queries_s']:>7} "
              f"{r['cold_cli_peak_mb']:>8} {str(r['load_from_copy_s']) + ' / ' + str(r['load_from_embeddings_s']):>18} "
              f"{str(r.get('speedup_vs_old', '-')) + 'x':>7}")


def main() -> int:
    import json

    report = bench_search_scale()
    out = ROOT / "out" / "bench_search.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_search(report)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

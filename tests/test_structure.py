"""Code layout rules a reader relies on: the backend's modules import each other without loops
(function-level imports included: a loop hidden in a function is still a loop to read), rooms
import each other only in the directions of the table below (``ls backend/rscaption`` tells the
story a tile follows, and a room never reaches back up it), and no backend or plugin module grows
past the size one reader holds in their head."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKEND = ROOT / "backend" / "rscaption"
PLUGIN = ROOT / "rscaption_plugin"
MAX_LINES = 520

# ---------------------------------------------------------------------------------------- rooms
# backend/rscaption/: what may sit at the top, beside the rooms (packages)
ENTRY_POINTS = {"cli", "worker", "demo", "bench_gpu"}  # bench_gpu: the `python -m rscaption.bench_gpu` shim
PROTOCOL = {"protocol"}  # the worker's NDJSON protocol: imports nothing; the worker and the plugin's client share it
FOUNDATION = {"errors", "device", "limits"}  # anyone may import these; they import no room
BACKEND_ROOMS = {"raster", "store", "engine", "search", "bench", "data", "models", "training", "evaluation",
                 "change"}

# room -> the rooms it may import (its own room always). Read down the story of a tile: a raster
# becomes tiles (raster), the engine runs them through the models into the store, search reads
# the store back with the models; data feeds training and evaluation; training reports through
# evaluation, evaluation never imports training; bench measures everything but the entry points;
# nothing but an entry point imports an entry point (cli, worker, protocol, demo).
ALLOWED = {
    "foundation": set(),
    "raster": {"foundation"},
    "store": {"foundation"},
    "data": {"foundation"},
    "models": {"foundation", "data"},
    "engine": {"foundation", "raster", "store", "models"},
    "search": {"foundation", "store", "models"},
    "evaluation": {"foundation", "data", "models", "raster"},
    "training": {"foundation", "data", "models", "evaluation", "raster"},
    # change: two dates through the engine, scored with the models, searched; only entry points and bench import it
    "change": {"foundation", "engine", "raster", "store", "models", "search", "data"},
    "bench": {"foundation", "raster", "store", "engine", "search", "models", "data", "change"},
    "protocol": set(),
    "entry": {"entry", "protocol", "foundation", *BACKEND_ROOMS},
    # the plugin: plugin.py / processing_provider.py (QGIS's ways in) -> ui -> core -> the backend
    "plugin": {"plugin.ui", "plugin.core", "foundation", "protocol", *BACKEND_ROOMS},
    "plugin.ui": {"plugin.core"},  # widgets reach the backend only through core
    "plugin.core": {"foundation", "protocol", *BACKEND_ROOMS},  # core never imports a widget
}
# single module edges against the table, each with its reason (a stale one fails the test too)
EXCEPTIONS = {
    ("rscaption.models.scene", "rscaption.evaluation.calibration"):
        "the scene head applies the numpy softmax/sigmoid whose fits calibration owns",
    ("rscaption.engine.check", "rscaption.search.query"):
        "check --repair loads the model recorded in the file (model_for_store), as search does",
}
PLUGIN_TOP = {"plugin", "processing_provider"}


def room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "rscaption_plugin":
        return "plugin" if len(parts) == 1 or parts[1] in PLUGIN_TOP else f"plugin.{parts[1]}"
    if len(parts) == 1 or parts[1] in FOUNDATION:
        return "foundation"
    if parts[1] in PROTOCOL:
        return "protocol"
    return "entry" if parts[1] in ENTRY_POINTS else parts[1]


# ---------------------------------------------------------------------------------------- graph
def _modules() -> dict[str, Path]:
    mods = {}
    for base in (BACKEND, PLUGIN):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def _imported_names(m: str, f: Path):
    """Every dotted name module ``m`` (file ``f``) imports, anywhere in its code."""
    package = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            yield target
            yield from (f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def import_graph() -> dict[str, set[str]]:
    """Module -> the backend and plugin modules it imports anywhere in its code (not its parent
    packages)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        graph[m] |= {n for n in _imported_names(m, f) if n in mods and n != m and not m.startswith(n + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    """Edges between rooms that the table does not allow (and that are not listed exceptions)."""
    bad = []
    for m in sorted(graph):
        for t in sorted(graph[m]):
            a, b = room(m), room(t)
            if a != b and b not in ALLOWED.get(a, ()) and (m, t) not in EXCEPTIONS:
                bad.append(f"{m} ({a}) -> {t} ({b})")
    return bad


# ---------------------------------------------------------------------------------------- tests
def test_the_checker_finds_a_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_checker_finds_a_wrong_way_import():
    graph = {"rscaption.evaluation.evaluate": {"rscaption.training.datasets", "rscaption.data.datasets"},
             "rscaption.store.gpkg": {"rscaption.engine.pipeline", "rscaption.errors"},
             "rscaption_plugin.core.runner": {"rscaption_plugin.ui.dialog", "rscaption.engine.pipeline"},
             "rscaption.training.runner": {"rscaption.evaluation.metrics"}, "rscaption.errors": set()}
    assert wrong_way(graph) == [
        "rscaption.evaluation.evaluate (evaluation) -> rscaption.training.datasets (training)",
        "rscaption.store.gpkg (store) -> rscaption.engine.pipeline (engine)",
        "rscaption_plugin.core.runner (plugin.core) -> rscaption_plugin.ui.dialog (plugin.ui)",
    ]


def test_backend_modules_import_each_other_without_loops():
    graph = import_graph()
    assert "rscaption.models.checkpoint_save" in graph["rscaption.models.captioner"]  # the graph sees lazy imports
    assert cycles(graph) == []


def test_rooms_import_each_other_only_in_the_allowed_directions():
    graph = import_graph()
    assert "rscaption.engine.pipeline" in graph["rscaption.engine.check"]  # function-level imports count
    assert wrong_way(graph) == []
    edges = {(m, t) for m, ts in graph.items() for t in ts}
    assert {e: why for e, why in EXCEPTIONS.items() if e not in edges} == {}, "an exception no longer needed"


def test_evaluation_never_imports_training():
    graph = import_graph()
    assert {(m, t) for m, ts in graph.items() for t in ts
            if room(m) == "evaluation" and room(t) == "training"} == set()


def test_the_top_of_each_package_holds_only_entry_points_and_rooms():
    top = {f.stem for f in BACKEND.glob("*.py")}
    assert top - {"__init__"} - ENTRY_POINTS - PROTOCOL - FOUNDATION == set(), "a new module needs a room"
    rooms = {d.name for d in BACKEND.iterdir() if (d / "__init__.py").is_file()}
    assert rooms == BACKEND_ROOMS
    assert {f.stem for f in PLUGIN.glob("*.py")} == {"__init__", *PLUGIN_TOP}
    assert {d.name for d in PLUGIN.iterdir() if (d / "__init__.py").is_file()} == {"ui", "core"}


def test_the_backend_never_imports_qgis_or_the_plugin():
    found = {}
    for m, f in _modules().items():
        if m.startswith("rscaption."):
            bad = {n for n in _imported_names(m, f) if n.split(".")[0] in ("qgis", "rscaption_plugin", "PyQt5", "PyQt6")}
            if bad:
                found[m] = sorted(bad)
    assert found == {}


def test_no_module_is_longer_than_a_reader_holds():
    files = [*BACKEND.rglob("*.py"), *PLUGIN.rglob("*.py")]
    long = {str(f.relative_to(ROOT)): n for f in files if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}

"""Find tiles that look like a chosen tile, off the GUI thread.

The ranking only reads the image embeddings stored in the GeoPackage (``rscaption.search.similar``): no
model and no torch, so it runs in QGIS's own Python whenever the shipped backend imports there
(numpy and sqlite3 are all it needs), even when the caption backend is a subprocess. Only an
explicit "subprocess" mode, or a QGIS Python where the backend cannot import, sends it to the
worker. Results come back as the same hit dicts as text search, so the dock shows both alike.
"""

from __future__ import annotations

from .runner import Callbacks, RunError, _subprocess_run, gui_errors, hits_of
from .tasks import RankTask


def _inprocess_available() -> bool:
    from .paths import ensure_backend_on_path

    ensure_backend_on_path()
    try:
        import rscaption.search.similar  # noqa: F401  (numpy + sqlite3 only)
    except Exception:  # numpy missing or broken in QGIS's Python: the worker does it
        return False
    return True


def run_similar(gpkg: str, tile_id: int, k: int, mode: str, python: str | None,
                min_confidence: float | None = None, cb: Callbacks | None = None) -> list[dict]:
    """Hits as dicts (tile_id, row, col, score, caption, confidence), best first, ``tile_id``
    itself excluded; raises RunError with a one-line message."""
    cb = cb or Callbacks()
    mode = (mode or "auto").lower()
    with gui_errors("finding similar tiles"):
        if mode != "subprocess" and _inprocess_available():
            from rscaption.errors import RscaptionError
            from rscaption.search.similar import similar

            if cb.on_backend:
                cb.on_backend({"mode": "inprocess"})
            try:
                return [h.to_dict() for h in similar(gpkg, int(tile_id), k=int(k), min_confidence=min_confidence)]
            except RscaptionError as exc:
                raise RunError(str(exc)) from None
        if not python:
            raise RunError("no backend available: QGIS's Python cannot import the rscaption backend and no "
                           "backend environment is configured. Use rscaption > Set up backend")
        fields = {"gpkg": gpkg, "tile_id": int(tile_id), "k": int(k),
                  "min_confidence": float(min_confidence) if min_confidence else None}
        _, results = _subprocess_run(python, None, "similar", fields, cb)
        return hits_of(results, "similar")


class SimilarTask(RankTask):
    """Ranks a layer's tiles by likeness to one tile; the outcome goes to ``on_finished`` on the GUI thread."""

    def __init__(self, gpkg: str, tile_id: int, k: int, mode: str, python: str | None, on_finished=None,
                 min_confidence: float | None = None):
        super().__init__(f"rscaption: tiles like tile {tile_id}", on_finished)
        self.gpkg, self.tile_id, self.k = gpkg, int(tile_id), int(k)
        self.mode, self.python, self.min_confidence = mode, python, min_confidence

    def rank(self, cb: Callbacks) -> list:
        return run_similar(self.gpkg, self.tile_id, self.k, self.mode, self.python,
                           min_confidence=self.min_confidence, cb=cb)

"""Export a captioned tile layer as a standalone GeoPackage.

The run's output already is the complete format (tiles layer + ``rscaption_embeddings`` +
``rscaption_metadata``), so export is a consistent copy of that file through SQLite's backup
API: it includes anything still in a WAL journal and never copies a half-written page, which a
plain file copy during a run could. The copy registers the internal tables as the backend now
does (``rscaption.store.tile_style``), so reopening an export offers the ``tiles`` layer alone.
"""

from __future__ import annotations

import os
import sqlite3

from .layers import gpkg_path_of, is_rscaption_gpkg


class ExportError(ValueError):
    pass


def export_gpkg(src: str, dst: str) -> str:
    if not is_rscaption_gpkg(src):
        raise ExportError(f"{src} is not an rscaption GeoPackage (no embeddings/metadata tables)")
    if not dst.lower().endswith(".gpkg"):
        dst += ".gpkg"
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ExportError("choose a different file than the layer's own GeoPackage")
    tmp = dst + ".part"
    if os.path.exists(tmp):
        os.remove(tmp)
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    try:
        target = sqlite3.connect(tmp)
        try:
            source.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file
            with target:  # a file made before they were hidden: Add Vector Layer offers ``tiles`` alone
                _hide_internal_tables(target)
        finally:
            target.close()
    finally:
        source.close()
    os.replace(tmp, dst)
    return dst


def _hide_internal_tables(con) -> None:
    """The backend's own registration of its tables (pure sqlite3, no numpy or torch)."""
    from .paths import ensure_backend_on_path

    ensure_backend_on_path()
    from rscaption.store.tile_style import hide_internal_tables

    hide_internal_tables(con)


def export_layer(layer, dst: str) -> str:
    src = gpkg_path_of(layer)
    if src is None:
        raise ExportError("the layer is not backed by a GeoPackage file")
    return export_gpkg(src, dst)

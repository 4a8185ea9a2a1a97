"""Search filters: which tiles may be ranked at all (``--where``, ``--bbox``, minimum confidence).

Why filter before ranking: "the 10 best river tiles with confidence >= 0.5 in this town" must
return 10 such tiles, not the few of the global top 10 that happen to qualify. The filter is
evaluated by SQLite against the layer's attribute columns (so users write the same expressions
as in QGIS's attribute filter: ``confidence >= 0.5``, ``caption LIKE '%river%'``) on a read-only
connection whose authorizer allows reading the tiles layer and its R-tree only: an expression
cannot write, attach, or read other tables. The bounding box uses the layer's standard R-tree.

Each filter's tile mask is kept with the matrix while the file is unchanged, so a dock asking many
queries with the same filter scans the table once.
"""

from __future__ import annotations

import math
import os
import sqlite3

import numpy as np

from ..errors import Cancelled, StoreError
from ..store.gpkg import GEOM, RTREE, TABLE
from ..store.gpkg_sql import bounded, register_functions
from .matrix import SearchMatrix, connect_ro

MASKS_KEPT = 8
_READABLE = (TABLE, RTREE)
WHERE_TIMEOUT_S = 30.0  # a filter over 10^6 tiles takes about a second; env RSCAPTION_WHERE_TIMEOUT_S


def where_timeout_s() -> float:
    """How long a filter may run: an expression is the user's own SQL (``WITH RECURSIVE`` without
    an end never finishes), so it gets a deadline like any other request."""
    try:
        value = float(os.environ.get("RSCAPTION_WHERE_TIMEOUT_S") or WHERE_TIMEOUT_S)
    except ValueError:
        return WHERE_TIMEOUT_S
    return value if math.isfinite(value) and value > 0 else WHERE_TIMEOUT_S


def check_bbox(bbox) -> tuple[float, float, float, float] | None:
    if bbox is None:
        return None
    try:
        vals = tuple(float(v) for v in bbox)
    except (TypeError, ValueError):
        raise StoreError(f"the bounding box must be 4 numbers MINX MINY MAXX MAXY, not {bbox!r}") from None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise StoreError(f"the bounding box must be 4 finite numbers MINX MINY MAXX MAXY, not {list(bbox)!r}")
    if vals[0] > vals[2] or vals[1] > vals[3]:
        raise StoreError(f"the bounding box {list(vals)} is empty (MINX > MAXX or MINY > MAXY)")
    return vals


def check_where(where) -> str | None:
    if where is None:
        return None
    if not isinstance(where, str):
        raise StoreError(f"the where expression must be text, not {type(where).__name__}")
    where = " ".join(where.split())
    if where:
        _check_one_expression(where)
    return where or None


_CLOSERS = {"'": "'", '"': '"', "`": "`", "[": "]"}


def _check_one_expression(where: str) -> None:
    """The expression goes inside the caller's brackets (``AND (WHERE)``), so it must not close
    them: ``1) OR (1`` would turn the whole filter into an OR and every tile would pass the
    confidence and bounding-box conditions. Brackets are counted outside string literals, quoted
    names and comments, the way SQLite's tokenizer reads them; an unterminated literal or
    comment would swallow what follows and is refused too."""
    depth, i, n = 0, 0, len(where)
    while i < n:
        c = where[i]
        if c in _CLOSERS:
            end = where.find(_CLOSERS[c], i + 1)
            while end != -1 and c != "[" and where.startswith(c * 2, end):  # 'it''s', "a""b"
                end = where.find(_CLOSERS[c], end + 2)
            if end == -1:
                raise StoreError(f"bad --where expression {where!r}: unterminated {c} quote")
            i = end + 1
            continue
        if where.startswith("--", i):  # whitespace was collapsed: a line comment runs to the end
            break
        if where.startswith("/*", i):
            end = where.find("*/", i + 2)
            if end == -1:
                raise StoreError(f"bad --where expression {where!r}: unterminated /* comment")
            i = end + 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise StoreError(f"bad --where expression {where!r}: a ')' without its '(' "
                                 "(the expression must be one expression)")
        i += 1
    if depth:
        raise StoreError(f"bad --where expression {where!r}: {depth} '(' not closed")


def check_min_confidence(value) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise StoreError(f"the minimum confidence must be a number between 0 and 1, not {value!r}") from None
    if not 0.0 <= value <= 1.0:
        raise StoreError(f"the minimum confidence must be between 0 and 1, not {value}")
    return value or None  # 0 keeps every tile, as before


def _authorize(action, arg1, arg2, db_name, trigger):
    """Reads of other tables, ATTACH and PRAGMA are refused; the connection is read-only anyway,
    so the R-tree module's own (never executed) write statements may be prepared."""
    if action == sqlite3.SQLITE_READ:
        ok = arg1 in _READABLE or str(arg1).startswith(RTREE + "_") or arg1 == "sqlite_master"
        return sqlite3.SQLITE_OK if ok else sqlite3.SQLITE_DENY
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH, sqlite3.SQLITE_PRAGMA):
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def filter_sql(where: str | None, bbox, min_confidence: float | None) -> tuple[str, list]:
    sql, params = f'SELECT tile_id FROM "{TABLE}" WHERE 1', []
    if where:
        sql += f" AND ({where}\n)"  # newline: a trailing -- comment cannot swallow the bracket
    if min_confidence:
        sql += " AND confidence >= ?"
        params.append(float(min_confidence))
    if bbox:
        sql += f' AND fid IN (SELECT id FROM "{RTREE}" WHERE minx <= ? AND maxx >= ? AND miny <= ? AND maxy >= ?)'
        params += [bbox[2], bbox[0], bbox[3], bbox[1]]
    return sql, params


def filtered_ids(path: str, where: str | None, bbox, min_confidence: float | None, should_cancel=None) -> np.ndarray:
    """Tile ids passing the filter, evaluated by SQLite on a read-only, read-the-layer-only connection,
    within :func:`where_timeout_s`; ``should_cancel()`` true (the worker's cancel) stops it too."""
    sql, params = filter_sql(where, bbox, min_confidence)
    conn = connect_ro(path)
    try:
        has_rtree = conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (RTREE,)).fetchone()
        if bbox and not has_rtree:  # a copy made without the spatial index: envelopes computed here
            register_functions(conn)
            sql = sql.replace(f'fid IN (SELECT id FROM "{RTREE}" WHERE minx <= ? AND maxx >= ? AND miny <= ? '
                              'AND maxy >= ?)', f'ST_MinX("{GEOM}") <= ? AND ST_MaxX("{GEOM}") >= ? AND '
                              f'ST_MinY("{GEOM}") <= ? AND ST_MaxY("{GEOM}") >= ?')
        conn.set_authorizer(_authorize)
        try:
            # a Ctrl-C stops the query and is raised after it, not inside the envelope functions
            with bounded(conn, where_timeout_s(), should_cancel) as bound:
                cur = conn.execute(sql, params)
                return np.fromiter((r[0] for r in cur if r[0] is not None), dtype=np.int64)
        except sqlite3.Warning:  # more than one statement
            raise StoreError(f"bad --where expression {where!r}: only one expression is allowed") from None
        except sqlite3.DatabaseError as exc:
            if bound.why == "cancelled":
                raise Cancelled("search cancelled") from None
            if bound.why == "timeout":
                what = "--where" if where else f"filtering {path}"
                raise StoreError(f"{what} took longer than {bound.seconds:g} s; simplify the expression (a "
                                 "WITH RECURSIVE without an end never finishes) or raise "
                                 "RSCAPTION_WHERE_TIMEOUT_S") from None
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "not authorized" in msg:
                msg = "it may only read the tiles layer's columns"
            if where:
                raise StoreError(f"bad --where expression {where!r}: {msg}") from None
            raise StoreError(f"cannot filter {path}: {msg}") from None
    finally:
        conn.close()


def filter_mask(matrix: SearchMatrix, where: str | None, bbox, min_confidence: float | None, should_cancel=None):
    """Boolean [N] over the matrix rows, or None when nothing is filtered; cached per matrix."""
    if not where and not bbox and not min_confidence:
        return None
    key = (where, bbox, min_confidence)
    mask = matrix.masks.get(key)
    if mask is None:
        mask = np.zeros(matrix.rows, dtype=bool)
        mask[matrix.positions(filtered_ids(matrix.path, where, bbox, min_confidence, should_cancel))] = True
        matrix.masks[key] = mask
        while len(matrix.masks) > MASKS_KEPT:
            matrix.masks.popitem(last=False)
    return mask

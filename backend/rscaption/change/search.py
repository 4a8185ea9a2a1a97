"""Text search of a change file: one date, or a transition between the two.

A change file keeps both dates' embeddings, so a query is ranked like a caption file's search,
against the date it is about:

* ``"houses"`` or ``"after: houses"``: the after date (the current state of the ground);
* ``"before: farmland"``: the before date;
* a transition, ``"farmland that became houses"`` (also "X became Y", "X turned into Y",
  "X changed into Y", "X replaced by Y", "from X to Y", "X -> Y"): only tiles scored as changed,
  ranked by the mean of X's similarity to the before date and Y's to the after date, so "houses
  that were always houses" and farmland that stayed farmland never come up.

``--where`` filters on the ``changes`` layer's columns (``change >= 0.8``, ``scene_before =
'farmland'``) on a read-only connection that may read that layer only; ``--bbox`` on its R-tree;
``--min-confidence`` on the ranked date's caption confidence (a transition: ``confidence``).
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import StoreError
from ..search.filter import check_bbox, check_min_confidence, check_where
from ..search.query import model_for_store, search_threads
from ..store.gpkg_sql import bounded
from .store import ChangeFile

_PREFIX = re.compile(r"^\s*(before|after)\s*:\s*(.*)$", re.I | re.S)
_TRANSITIONS = [
    re.compile(r"^\s*from\s+(?P<x>.+?)\s+(?:to|into)\s+(?P<y>.+?)\s*$", re.I | re.S),
    re.compile(r"^\s*(?P<x>.+?)\s+(?:that|which)\s+(?:has\s+|have\s+)?(?:became|become|turned\s+into|"
               r"changed\s+(?:in)?to|(?:was|were)\s+(?:turned|converted)\s+into|(?:was|were)\s+replaced\s+by|"
               r"gave\s+way\s+to)\s+(?P<y>.+?)\s*$", re.I | re.S),
    re.compile(r"^\s*(?P<x>.+?)\s+(?:became|turned\s+into|changed\s+(?:in)?to|converted\s+(?:in)?to|"
               r"replaced\s+by|->|=>|→)\s+(?P<y>.+?)\s*$", re.I | re.S),
]


@dataclass
class ChangeHit:
    tile_id: int
    row: int
    col: int
    score: float
    caption: str
    confidence: float | None
    date: str           # "before", "after" or "change"
    change: float | None
    summary: str

    def to_dict(self) -> dict:
        return asdict(self)


def parse_query(query: str, date: str | None = None) -> tuple[str, list[str]]:
    """("before" | "after" | "change", texts to embed)."""
    q = " ".join(str(query).split())
    m = _PREFIX.match(q)
    if m:
        date, q = m.group(1).lower(), m.group(2).strip()
    if not q:
        raise StoreError("the search query is empty")
    if date in ("before", "after"):
        return date, [q]
    for pattern in _TRANSITIONS:
        t = pattern.match(q)
        if t and t.group("x").strip() and t.group("y").strip():
            return "change", [t.group("x").strip(), t.group("y").strip()]
    if date == "change":
        raise StoreError(f"'{query}' is not a transition; write it like 'farmland that became houses'")
    return "after", [q]


def search_changes(gpkg: str, queries, k: int = 10, model=None, device=None, *, date: str | None = None,
                   where: str | None = None, bbox=None, min_confidence: float | None = None) -> list[list[ChangeHit]]:
    """One list of hits per query (``queries`` a string or a list), one model load."""
    queries = [queries] if isinstance(queries, str) else list(queries or [])
    if not queries:
        raise StoreError("no search query given")
    if date not in (None, "before", "after", "change"):
        raise StoreError(f"--date must be before, after or change, not {date!r}")
    parsed = [parse_query(q, date) for q in queries]
    where, bbox, min_confidence = check_where(where), check_bbox(bbox), check_min_confidence(min_confidence)
    with ChangeFile(gpkg) as cf:
        rows = cf.changes()
        keep = _filtered(cf.path, where, bbox) if (where or bbox) else None
        emb = {d: cf.embeddings(d) for d in ("before", "after")}
        cap = model_for_store(cf, model, device, text_only=True)
        threshold = float(((cf.metadata().get("change") or {}).get("scorer") or {}).get("threshold", 0.5))
    with search_threads():
        vecs = [[np.asarray(cap.embed_texts([t]), np.float32)[0] for t in texts] for _, texts in parsed]
    if any(v.shape[-1] != cf.embed_dim for vs in vecs for v in vs):
        raise StoreError(f"{gpkg} holds {cf.embed_dim}-d embeddings but model {cap.model_id} makes other ones")
    out = []
    for (mode, _), vs in zip(parsed, vecs):
        if mode == "change":
            out.append(_transition(rows, emb, vs, k, keep, min_confidence, threshold))
        else:
            out.append(_one_date(rows, emb[mode], mode, vs[0], k, keep, min_confidence))
    return out


def _one_date(rows, emb, mode, q, k, keep, min_confidence):
    ids, mat = emb
    scores = mat.astype(np.float64) @ q.astype(np.float64)
    ok = np.array([int(t) in rows and (keep is None or int(t) in keep) and
                   _at_least(rows[int(t)].get(f"confidence_{mode}"), min_confidence) for t in ids], bool)
    ids, scores = ids[ok], scores[ok]
    order = np.lexsort((ids, -scores))[: max(0, k)]
    return [_hit(rows[int(ids[i])], float(scores[i]), mode) for i in order]


def _transition(rows, emb, vs, k, keep, min_confidence, threshold):
    (ib, mb), (ia, ma) = emb["before"], emb["after"]
    sb = dict(zip(ib.tolist(), (mb.astype(np.float64) @ vs[0].astype(np.float64)).tolist()))
    sa = dict(zip(ia.tolist(), (ma.astype(np.float64) @ vs[1].astype(np.float64)).tolist()))
    cands = [(0.5 * (sb[t] + sa[t]), t) for t, r in rows.items()
             if t in sb and t in sa and r.get("change") is not None and r["change"] >= threshold
             and (keep is None or t in keep) and _at_least(r.get("confidence"), min_confidence)]
    cands.sort(key=lambda c: (-c[0], c[1]))
    return [_hit(rows[t], s, "change") for s, t in cands[: max(0, k)]]


def _at_least(value, minimum) -> bool:
    return minimum is None or (value is not None and value >= minimum)


def _hit(r: dict, score: float, mode: str) -> ChangeHit:
    if mode == "change":
        caption, conf = f"{r.get('caption_before') or ''} -> {r.get('caption_after') or ''}", r.get("confidence")
    else:
        caption, conf = r.get(f"caption_{mode}") or "", r.get(f"confidence_{mode}")
    return ChangeHit(tile_id=int(r["tile_id"]), row=int(r["row"] if r["row"] is not None else -1),
                     col=int(r["col"] if r["col"] is not None else -1), score=score, caption=caption,
                     confidence=None if conf is None else float(conf), date=mode, change=r.get("change"),
                     summary=r.get("summary") or "")


_READABLE = ("changes", "rtree_changes_geom")


def _authorize(action, arg1, arg2, db_name, trigger):
    if action == sqlite3.SQLITE_READ:
        ok = arg1 in _READABLE or str(arg1).startswith("rtree_changes_geom_") or arg1 == "sqlite_master"
        return sqlite3.SQLITE_OK if ok else sqlite3.SQLITE_DENY
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH, sqlite3.SQLITE_PRAGMA):
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _filtered(path: str, where, bbox) -> set[int]:
    """tile_ids of ``changes`` passing ``where`` and ``bbox``, read-only, that layer only, bounded in time."""
    from ..search.filter import where_timeout_s

    sql, params = 'SELECT tile_id FROM "changes" WHERE 1', []
    if where:
        sql += f" AND ({where}\n)"
    if bbox:
        sql += ' AND fid IN (SELECT id FROM "rtree_changes_geom" WHERE minx <= ? AND maxx >= ? AND miny <= ? AND maxy >= ?)'
        params += [bbox[2], bbox[0], bbox[3], bbox[1]]
    conn = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=ro", uri=True)
    try:
        conn.set_authorizer(_authorize)
        with bounded(conn, where_timeout_s(), None) as bound:
            try:
                return {int(r[0]) for r in conn.execute(sql, params) if r[0] is not None}
            except sqlite3.Warning:
                raise StoreError(f"bad --where expression {where!r}: only one expression is allowed") from None
            except sqlite3.DatabaseError as exc:
                if bound.why == "timeout":
                    raise StoreError(f"--where took longer than {bound.seconds:g} s; simplify the expression") from None
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if "not authorized" in msg:
                    msg = "it may only read the columns of the changes layer"
                raise StoreError(f"bad --where expression {where!r}: {msg}") from None
    finally:
        conn.close()

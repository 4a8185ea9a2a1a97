"""The SQL functions a GeoPackage's R-tree triggers call (ST_MinX ... ST_IsEmpty: GDAL registers its
own, a plain sqlite3 connection has none), computed from the geometry blob's envelope.

They run Python inside SQLite, which turns any exception raised there into "user-defined function
raised exception" and drops it; ``interrupts_deferred`` keeps a Ctrl-C out of them.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import struct
import threading


def envelope(blob) -> tuple[float, float, float, float] | None:
    """(minx, maxx, miny, maxy) of a GeoPackage geometry blob, None for NULL or empty."""
    if blob is None or len(blob) < 8 or blob[:2] != b"GP":
        return None
    flags = blob[3]
    if flags & 0b10000:  # empty geometry
        return None
    order = "<" if flags & 1 else ">"
    if (flags >> 1) & 0b111:
        return struct.unpack_from(order + "4d", blob, 8)
    return _wkb_polygon_envelope(bytes(blob[8:]))


def _wkb_polygon_envelope(wkb: bytes):
    # Only needed for envelope-less polygons written by other tools; GDAL always writes one.
    order = "<" if wkb[0] == 1 else ">"
    (gtype,) = struct.unpack_from(order + "I", wkb, 1)
    if gtype != 3:
        return None
    (nrings,) = struct.unpack_from(order + "I", wkb, 5)
    offset, coords = 9, []
    for _ in range(nrings):
        (n,) = struct.unpack_from(order + "I", wkb, offset)
        coords.extend(struct.unpack_from(order + f"{2 * n}d", wkb, offset + 4))
        offset += 4 + 16 * n
    if not coords:
        return None
    xs, ys = coords[0::2], coords[1::2]
    return min(xs), max(xs), min(ys), max(ys)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold a Ctrl-C that arrives inside the block until the block is over, then raise it.

    Python runs its SIGINT handler at the next bytecode, which inside a transaction is often one of
    these functions called by an R-tree trigger: SQLite turns the KeyboardInterrupt into "user-defined
    function raised exception", and a cancel would read as a failed write. Held here, the batch
    commits (or fails for its own reason) and the cancel comes after it, so no finished tile is lost.
    Only the main thread with Python's own handler is concerned: no other thread gets signals, and a
    host that installed its own handler (QGIS) keeps it.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def _coordinate(index):
    return lambda blob: None if (env := envelope(blob)) is None else env[index]


def register_functions(conn: sqlite3.Connection) -> None:
    for name, index in (("ST_MinX", 0), ("ST_MaxX", 1), ("ST_MinY", 2), ("ST_MaxY", 3)):
        conn.create_function(name, 1, _coordinate(index), deterministic=True)
    conn.create_function("ST_IsEmpty", 1, lambda blob: int(envelope(blob) is None),
                         deterministic=True)

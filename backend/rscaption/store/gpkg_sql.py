"""The SQL functions a GeoPackage's R-tree triggers call (ST_MinX ... ST_IsEmpty: GDAL registers its
own, a plain sqlite3 connection has none), computed from the geometry blob's envelope.

They run Python inside SQLite, which turns any exception raised there into "user-defined function
raised exception" and drops it; ``interrupts_deferred`` keeps a Ctrl-C out of them, and
``bounded`` stops a statement that runs too long or is cancelled (a user's ``--where``).
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import struct
import threading
import time

from ..errors import raise_interrupted

PROGRESS_STEPS = 10_000  # SQLite steps between two looks at the clock and the cancel flags


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


_HANDLERS = (signal.default_int_handler, raise_interrupted)  # Python's and the CLI's: they raise
_DEFERRED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))


@contextlib.contextmanager
def interrupts_deferred():
    """Hold a Ctrl-C (or a SIGTERM the CLI treats as one) that arrives inside the block until the
    block is over, then deliver it; yields a function that says whether one is being held.

    Python runs its SIGINT handler at the next bytecode, which inside a transaction is often one of
    these functions called by an R-tree trigger: SQLite turns the KeyboardInterrupt into "user-defined
    function raised exception", and a cancel would read as a failed write. Held here, the batch
    commits (or fails for its own reason) and the cancel comes after it, so no finished tile is lost.
    Only the main thread with a handler that raises (Python's own, the CLI's) is concerned: no other
    thread gets signals, and a host that installed its own handler (QGIS, the worker) keeps it.
    """
    watched = [s for s in _DEFERRED if signal.getsignal(s) in _HANDLERS]
    if threading.current_thread() is not threading.main_thread() or not watched:
        yield lambda: False
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in watched}
    try:
        yield lambda: bool(caught)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            previous[caught[0]](caught[0], None)  # raises: KeyboardInterrupt, or Interrupted(signum)


class Bound:
    """Why :func:`bounded` stopped a statement: ``"timeout"``, ``"cancelled"`` or None."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.why: str | None = None


@contextlib.contextmanager
def bounded(conn: sqlite3.Connection, seconds: float, should_cancel=None):
    """Stop the statements run inside the block after ``seconds``, or as soon as ``should_cancel()``
    is true or a Ctrl-C/SIGTERM is held; they fail with ``sqlite3.OperationalError: interrupted``
    and the yielded :class:`Bound` says why (a held signal is raised when the block ends).

    Why: a user's expression runs inside SQLite, where Python never gets control back: ``WITH
    RECURSIVE`` without an end spins at 100 % CPU forever, and neither Ctrl-C (held until the block
    ends, see :func:`interrupts_deferred`) nor the worker's cancel could reach it. SQLite's progress
    handler is called every few thousand virtual-machine steps, so it looks at the clock and the
    flags well under a millisecond apart.
    """
    bound = Bound(seconds)
    deadline = time.monotonic() + seconds
    with interrupts_deferred() as interrupted:
        def check() -> int:
            if interrupted() or (should_cancel is not None and should_cancel()):
                bound.why = "cancelled"
            elif time.monotonic() > deadline:
                bound.why = "timeout"
            return 1 if bound.why else 0

        conn.set_progress_handler(check, PROGRESS_STEPS)
        try:
            yield bound
        finally:
            conn.set_progress_handler(None, PROGRESS_STEPS)


def _coordinate(index):
    return lambda blob: None if (env := envelope(blob)) is None else env[index]


def register_functions(conn: sqlite3.Connection) -> None:
    for name, index in (("ST_MinX", 0), ("ST_MaxX", 1), ("ST_MinY", 2), ("ST_MaxY", 3)):
        conn.create_function(name, 1, _coordinate(index), deterministic=True)
    conn.create_function("ST_IsEmpty", 1, lambda blob: int(envelope(blob) is None),
                         deterministic=True)

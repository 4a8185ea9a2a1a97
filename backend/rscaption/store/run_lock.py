"""One writer per output GeoPackage: a lock file beside it (``OUT.gpkg.lock``) naming the writer.

Why SQLite's own locking is not enough: every batch is its own short transaction, so two runs on
one output would interleave their batches, and a second run with ``--overwrite`` would delete the
file under the first. The lock is an OS lock on the lock file (``flock`` on POSIX, ``msvcrt`` on
Windows), which the kernel drops when its holder dies: a run killed with ``kill -9`` never leaves a
lock that blocks the next run, whatever PID the stale file still names. The PID, host, start
time and command in the file only tell the refused user who holds it, and a reader that finds the
GeoPackage locked by a writer who is writing it (:func:`busy_error`).
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import socket
import sqlite3
import sys

from ..errors import StoreError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


def lock_path(out_gpkg) -> str:
    """The lock file of the output's resolved path: a symlink and its target (or two spellings of
    one folder) are one output with one lock, so they get one writer."""
    return f"{os.path.realpath(os.fspath(out_gpkg))}.lock"


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def check_output_path(out_gpkg, raster_path=None) -> str:
    """What every caller that writes an output (CLI, worker, plugin, ``caption_raster``) checks
    before anything is loaded or removed: a ``.gpkg`` name (so ``--overwrite`` can never delete a
    raster, ``/dev/null`` or any other file), not a folder, not the input raster itself. Raises
    StoreError in one line; returns the path as text."""
    out = os.fspath(out_gpkg) if isinstance(out_gpkg, (str, os.PathLike)) else out_gpkg
    if not isinstance(out, str) or not out.strip():
        raise StoreError(f"the output must be a .gpkg file path, got {out_gpkg!r}")
    if not out.lower().endswith(".gpkg"):
        raise StoreError(f"the output must be a .gpkg file, got {out}")
    if os.path.isdir(out):  # --overwrite would otherwise try os.remove() on a folder
        raise StoreError(f"{out} is a directory; give a .gpkg file path for the output")
    raster = os.fspath(raster_path) if isinstance(raster_path, (str, os.PathLike)) else None
    if raster and os.path.exists(out) and os.path.exists(raster) and os.path.samefile(out, raster):
        raise StoreError(f"the output {out} is the input raster; choose another .gpkg file")
    return out


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK):
            return False
        raise


def _unlock(fd: int) -> None:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        else:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    except OSError:
        pass


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
    pid, since = holder.get("pid"), holder.get("started")
    where = f" on {holder['host']}" if holder.get("host") and holder.get("host") != socket.gethostname() else ""
    return f"pid {pid}{where} since {since}" if pid else "a process that did not say who it is"


def _running_here(pid) -> bool:
    """Whether ``pid`` is a live process of this machine (signal 0 only asks; on Windows
    ``os.kill`` would end it, so there the lock file's word is taken)."""
    if fcntl is None:
        return True
    try:
        os.kill(int(pid), 0)
    except PermissionError:  # alive, someone else's
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return True


def live_holder(out_gpkg) -> dict | None:
    """What the lock file says of a run still writing ``out_gpkg`` (None: no such run), read without
    taking the lock: a reader holding it even briefly could make a starting writer refuse."""
    try:
        with open(lock_path(out_gpkg), "rb") as fh:
            holder = json.loads(fh.read(4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return None
    if holder.get("host") not in (None, socket.gethostname()):
        return holder  # another machine's process: cannot be asked, take the file's word
    return holder if _running_here(holder["pid"]) else None


def is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED: another connection holds a lock the busy timeout did not
    outlast (``database is locked``), which is not damage."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "database is locked" in str(exc) or "database table is locked" in str(exc)


def busy_error(out_gpkg) -> StoreError:
    """The one line for a GeoPackage another process keeps locked, naming it when it is an
    rscaption run (its lock file); otherwise it is some other program writing the file."""
    holder = live_holder(out_gpkg)
    if holder:
        command = f", {holder['command']}" if isinstance(holder.get("command"), str) else ""
        who = f"rscaption run {describe_holder(holder)}{command}"
    else:
        who = "not an rscaption run: QGIS saving edits to the layer, a sqlite client, another tool"
    return StoreError(f"{out_gpkg} is busy: another process is writing it ({who}); "
                      "try again when it has finished")


def _command_line() -> str:
    """This process's command line, shortened, for the lock file: which run it is."""
    argv = list(getattr(sys, "argv", None) or [""])  # an embedded interpreter (QGIS) may have none
    prog = os.path.basename(str(argv[0])) or "python"
    prog = {"cli.py": "rscaption", "worker.py": "rscaption serve"}.get(prog, prog)
    text = " ".join([prog] + [str(a) for a in argv[1:]])
    return text if len(text) <= 200 else text[:197] + "..."


class RunLock:
    """Context manager: ``with RunLock(out):`` refuses with one StoreError line while another live
    run holds ``out``; a lock left by a dead process is taken over."""

    def __init__(self, out_gpkg):
        self.out = str(out_gpkg)
        self.path = lock_path(self.out)
        self.previous: dict = {}  # what a dead holder left behind (for tests and logs)
        self._fd = None

    def acquire(self) -> "RunLock":
        for _ in range(10):  # the holder may unlink the file between our open and our lock
            try:
                if os.path.islink(self.path):  # Windows has no O_NOFOLLOW: refuse what we can see
                    raise OSError(errno.ELOOP, "is a symbolic link")
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
            except FileNotFoundError:
                raise StoreError(f"cannot write {self.out}: its folder does not exist") from None
            except OSError as exc:
                if exc.errno == errno.ELOOP or os.path.islink(self.path):  # never write through a link
                    raise StoreError(f"cannot lock {self.out}: its lock file {self.path} is a symbolic link; "
                                     "remove it (rscaption never writes through one)") from None
                raise StoreError(f"cannot write {self.out}: {exc.strerror or exc} "
                                 f"(in {os.path.dirname(os.path.abspath(self.out))})") from None
            if not _try_lock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise StoreError(f"{self.out} is being written by another rscaption run "
                                 f"({describe_holder(holder)}); wait for it to finish or choose another output")
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(fd), current):
                break
            _unlock(fd)
            os.close(fd)
        else:
            raise StoreError(f"cannot lock {self.out}: its lock file {self.path} keeps changing")
        self.previous = _read_holder(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": _command_line()}
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode("utf-8"))
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:  # removed while still held, so a waiting opener re-checks (see acquire) and nothing lingers
            os.unlink(self.path)
        except OSError:  # Windows cannot remove an open file; the next run reuses it
            pass
        _unlock(fd)
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
